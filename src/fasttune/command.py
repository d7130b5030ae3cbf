"""The base of every subcommand's options (see `fasttune.cli` for how a subcommand is added)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import tyro


@dataclasses.dataclass
class Command:
    """Base of every subcommand's options: a dataclass that tyro fills from the command line, then `run()`."""

    debug: Annotated[bool, tyro.conf.FlagCreatePairsOff] = dataclasses.field(default=False, kw_only=True)
    """Show the full Python traceback of an error instead of one line saying what is wrong and how to fix it."""

    def check(self) -> None:
        """Checks of the command line alone, the same on every torchrun rank: run with parsing, so that cli.py
        reports their errors once, from rank 0."""

    def run(self) -> int:
        """Do the work; return the exit code."""
        raise NotImplementedError
