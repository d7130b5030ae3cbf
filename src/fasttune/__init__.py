"""fasttune: train and fine-tune Hugging Face causal LMs as fast as the machine allows, with no compiler."""

import os

# Set before torch is imported anywhere in the process: expandable segments cut fragmentation with the variable
# sequence lengths of packed batches. A value the user set is kept.
if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

__version__ = "0.1.0"
