"""The base of every subcommand's options (see `fasttune.cli` for how a subcommand is added)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import tyro

if TYPE_CHECKING:
    from fasttune.config.naming import OptionNames


@dataclasses.dataclass
class Command:
    """Base of every subcommand's options: a dataclass that tyro fills from the command line, then `run()`."""

    debug: Annotated[bool, tyro.conf.FlagCreatePairsOff] = dataclasses.field(default=False, kw_only=True)
    """Show the full Python traceback of an error instead of one line saying what is wrong and how to fix it, the
    debug log, and the other packages' lines fasttune hides otherwise (torchao's, transformers' progress bars)."""

    def check(self) -> None:
        """Checks of the command line alone, the same on every torchrun rank: run with parsing, so that cli.py
        reports their errors once, from rank 0."""

    @classmethod
    def option_names(cls, args: Sequence[str], parsed: Command | None = None) -> OptionNames:
        """How the user gave each option in `args` (the command line after the command's name), for the CLI to name
        them so in an error (config/naming.py); `parsed`: the options, when they were parsed. Here: the flags typed
        for the dotted keys of nested options; a command whose options also come from elsewhere says so."""
        from fasttune.config.argcheck import options
        from fasttune.config.naming import OptionNames

        return OptionNames(args, {key: flags for key, _, flags in options(cls) if "." in key})

    def run(self) -> int:
        """Do the work; return the exit code."""
        raise NotImplementedError
