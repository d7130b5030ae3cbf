"""fasttune: train and fine-tune Hugging Face causal LMs as fast as the machine allows, with no compiler.

Importing fasttune changes nothing in the process: environment variables (PYTORCH_ALLOC_CONF) are set by the command
line (`fasttune.cli.set_environment`)."""

__version__ = "0.1.0"
