"""fasttune: train and fine-tune Hugging Face causal LMs as fast as the machine allows, with no compiler.

Importing fasttune changes nothing in the process: environment variables (PYTORCH_ALLOC_CONF) are set by the command
line (`fasttune.cli.set_environment`). Importing its training package hides a few third-party log lines that say
nothing to a user, in fasttune's debug log instead (fasttune/train/__init__.py, quiet.py)."""

__version__ = "0.1.0"
