"""The training loop and what it runs on (see docs/ARCHITECTURE.md). Importing it hides torchao's and torch's lines
that say nothing to a user (quiet.py): the import of transformers below it imports torchao, which prints them, and a
script that calls `train()` gets the command line's output (they go to fasttune's debug log, shown with --debug)."""

from fasttune.quiet import quiet_torchao

quiet_torchao()
