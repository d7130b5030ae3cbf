"""Command line: `fasttune train|generate|chat|eval|doctor|bench|experiments`, one tyro parser for every subcommand.

Why tyro (not jsonargparse): the config already is a tree of dataclasses whose field docstrings are the help text,
tyro turns such a tree and a union of dataclasses into nested subcommands with `--section.field` options, and it is
already a dependency (jsonargparse would be a second one, missing on machines with only the base install).

Adding a subcommand:
1. Write a dataclass of its options that subclasses `fasttune.command.Command` (for `--debug`) with a
   `run(self) -> int` method returning the exit code. Its docstring is the description of `fasttune NAME --help` and
   each field's docstring that option's help: write them for users. `fasttune --help` imports every command's
   options module, so that module imports neither torch nor transformers (nor any module that does): `run` (and
   `check`, after the checks of the command line alone) imports the module that does the work (eval/cli.py ->
   eval/run.py). tests/test_cli_startup.py holds every command's `--help` to that (2-3 s of imports otherwise).
2. Add one entry to `COMMANDS` below (a dict of name -> class makes a group, as `bench` is).
Bad input ends with one line `error: ...` naming the option and the valid values, exit code 2; the traceback only
with `--debug`. This module also sets the process-wide environment (PYTORCH_ALLOC_CONF) before torch is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Annotated, Union

import tyro

from fasttune.command import Command
from fasttune.errors import FasttuneError, PeerFailed, Stopped
from fasttune.quiet import progress_bars_off, quiet_torchao
from fasttune.streams import surviving_closed_output

log = logging.getLogger("fasttune")


# name -> "module:Class" (imported when the parser is built), or a group of them.
COMMANDS: dict[str, str | dict[str, str]] = {
    "train": "fasttune.train.cli:TrainArgs",
    "generate": "fasttune.generate.commands:GenerateArgs",
    "chat": "fasttune.generate.commands:ChatArgs",
    "eval": "fasttune.eval.cli:EvalArgs",
    "doctor": "fasttune.doctor.cli:DoctorArgs",
    "bench": {
        "attention": "fasttune.bench.cli:AttentionBench",
        "train": "fasttune.bench.cli:TrainBench",
        "generate": "fasttune.bench.cli:GenerateBench",
    },
    "experiments": "fasttune.config.experiments:ExperimentsArgs",
}
REPORT_WAIT_S = 5.0
"""How long a later torchrun rank waits, after the command line failed its checks, before it exits: rank 0 reports
the error, and torchrun stops the other ranks as soon as one exits (rank 0 names the options as given: it may take
longer than a rank that only fails)."""
GROUP_HELP = {"bench": "Measure attention backends, training and generation throughput on this machine."}


def _load(target: str) -> type[Command]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _union(table: dict, argv: Sequence[str]):
    """The tyro type of a command table: a union of subcommands; a group is a one-field dataclass holding its own."""
    options = []
    for name, target in table.items():
        if isinstance(target, dict):
            inner = _union(target, argv[1:] if argv[:1] == [name] else [])
            kind = dataclasses.make_dataclass(name.title(), [("command", Annotated[inner, tyro.conf.arg(name="")])])
            options.append(Annotated[kind, tyro.conf.subcommand(name, description=GROUP_HELP.get(name))])
            continue
        cls = _load(target)
        default = cls.default_for(argv[1:]) if argv[:1] == [name] and hasattr(cls, "default_for") else None
        conf = tyro.conf.subcommand(name, default=default) if default is not None else tyro.conf.subcommand(name)
        options.append(Annotated[cls, conf])
    return Union[tuple(options)]  # noqa: UP007 - a runtime union of Annotated types for tyro


def _selected(argv: Sequence[str]) -> tuple[list[str], dict | str | None]:
    """(the command names `argv` starts with, what they name in COMMANDS: a class target, a group or None)."""
    path, target = [], COMMANDS
    for token in argv:
        if not (isinstance(target, dict) and token in target):
            break
        target = target[token]
        path.append(token)
    return path, target


def parse(argv: Sequence[str]) -> Command:
    """The subcommand's options parsed from `argv`; ConfigError (one line) when they are wrong."""
    from fasttune.config.argcheck import option_table, parse
    from fasttune.config.repeated import refuse_repeated

    argv = list(argv)
    path, target = _selected(argv)
    if isinstance(target, str):  # before a --config file or a run folder is read
        refuse_repeated(argv[len(path) :], _load(target))
    table = option_table(_load(target)) if isinstance(target, str) else {}
    commands = list(target) if isinstance(target, dict) else []
    out = parse(_union(COMMANDS, argv), argv, prog="fasttune", table=table, commands=commands,
                command=" ".join(["fasttune", *path]),
                description="Train and fine-tune Hugging Face causal LMs as fast as the machine allows.",
                config=(tyro.conf.OmitSubcommandPrefixes,))  # fmt: skip
    while not isinstance(out, Command):
        out = out.command  # a group's chosen subcommand
    return out


def parse_train_args(argv: Sequence[str]):
    """The validated config of `fasttune train ARGV` (for scripts and tests)."""
    return parse(["train", *argv]).config.validate()


@contextlib.contextmanager
def _command_logging(debug: bool):
    """The command's log lines on stderr as plain lines (INFO; DEBUG with --debug) while it runs; on return the
    logging of the process as it was: a caller in Python (a script, a notebook, the tests) that runs one command in
    process kept a root handler writing to that command's stderr and the command's levels, so its own later log
    lines, a `train()` call's for one, went to a stream that may be gone by then ('--- Logging error ---' and a
    traceback on stderr). The filters of quiet_torchao stay: process-wide."""
    # torch sets its own loggers to WARNING, but only at the end of its import: a Ctrl-C before that left its
    # fake-tensor exit hook's INFO lines ("FakeTensor cache stats:") to this root logger
    root, noisy = logging.getLogger(), ("httpx", "urllib3", "matplotlib", "PIL", "torch")
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in ("fasttune", *noisy)}
    for handler in saved[0]:
        root.removeHandler(handler)
    handler = logging.StreamHandler()  # sys.stderr as the command has it (streams.surviving_closed_output)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_torchao()  # torchao's "Failed to load" lines, printed on every model load once it is installed
    try:
        yield
    finally:
        root.removeHandler(handler)
        for kept in saved[0]:
            root.addHandler(kept)
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)


def set_environment() -> None:
    """Process-wide settings, made by the CLI (never by importing fasttune) before torch is imported: expandable
    segments cut allocator fragmentation with the variable sequence lengths of packed batches. A user's value wins."""
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def _later_rank(argv: Sequence[str]) -> int | None:
    """This process's rank when it is a torchrun worker of `train` after the first (torchrun sets LOCAL_RANK and
    WORLD_SIZE); None otherwise, also for other commands run where RANK happens to be set (a cluster's pod)."""
    env = os.environ
    if not argv or argv[0] != "train" or "LOCAL_RANK" not in env or env.get("RANK", "0") == "0":
        return None
    return int(env["RANK"]) if env["RANK"].isdigit() and env.get("WORLD_SIZE", "1") not in ("0", "1") else None


def _quiet_parsing(rank: int | None):
    """Every torchrun rank parses and checks the same command line (Command.check): rank 0 alone reports what is
    wrong with it (tyro's own messages and fasttune's), the others exit with the same code, instead of one copy per
    GPU. Errors after that are each rank's own (a local rank with no GPU, a file missing on one node) and stay
    printed, named by rank."""
    if rank is None:
        return contextlib.nullcontext()
    sink = io.StringIO()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(sink))
    stack.enter_context(contextlib.redirect_stdout(sink))
    return stack


def _message(e: Exception) -> str:
    """A FasttuneError's own line; for a PermissionError that no check caught (a file the user may not read or write
    wherever fasttune meets it), the file and the fix, instead of a traceback."""
    if not isinstance(e, PermissionError):
        return str(e)
    name = e.filename or "a file"
    return (f"{name}: permission denied; give your user access to it (see ls -l; e.g. chmod u+rw, or u+rwx for a "
            f"folder) or use another path (--debug shows where)")  # fmt: skip


def _option_names(argv: Sequence[str], command: Command | None):
    """How the user gave each option of `argv` (config/naming.py's OptionNames); None for a group, or when a file or
    preset cannot be read (the message as its check wrote it). `command`: the options, once parsed."""
    path, target = _selected(argv)
    if not isinstance(target, str):
        return None
    try:
        return _load(target).option_names(argv[len(path) :], command)
    except Exception:  # noqa: BLE001 - a file or preset that cannot be read
        return None


def _name_options(e: Exception, argv: Sequence[str], command: Command | None) -> None:
    """A FasttuneError's message with each config key in it (`training.compile`) named as the user gave that option:
    the flag as typed, the --config file's key, the preset (config/naming.py); the same error, so that --debug
    shows where it came from. `command`: the options, once parsed."""
    if isinstance(e, FasttuneError) and e.args and (names := _option_names(argv, command)) is not None:
        e.args = (names.rewrite(str(e.args[0])), *e.args[1:])


@contextlib.contextmanager
def _naming_warnings(argv: Sequence[str], command: Command):
    """While the command checks and runs, its warnings (and info lines logged with naming.NAMES_OPTIONS) name each
    config key in them as its errors do (`training.fsdp: true in run.yaml`, not a flag the user never typed): a filter
    on fasttune's logger."""
    names: list = []

    def rename(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or getattr(record, "names_options", False):  # naming.NAMES_OPTIONS
            if not names:
                names.append(_option_names(argv, command))
            if names[0] is not None:
                with contextlib.suppress(Exception):  # a record that does not format: logging reports it as ever
                    record.msg, record.args = names[0].rewrite(record.getMessage()), ()
        return True

    log.addFilter(rename)
    try:
        yield
    finally:
        log.removeFilter(rename)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one subcommand; user errors become one line on stderr and exit code 2 (traceback with --debug).
    Output piped into a reader that went away (`| head`, `| tee` after a Ctrl-C) goes to os.devnull from then on:
    the command carries on and exits as it would have (streams.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug decides how errors raised while parsing are shown, so it is looked at before tyro parses
    with surviving_closed_output(), _command_logging("--debug" in argv):
        return _main(argv)


def version() -> str:
    """`fasttune --version`: fasttune's version and those of the packages a bug report needs, read from the installed
    packages' metadata (importing torch takes seconds)."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from fasttune import __version__

    def of(name: str) -> str:
        try:
            return f"{name} {installed(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    return f"fasttune {__version__} ({of('torch')}, {of('transformers')}, Python {platform.python_version()})"


def _debug_after_command(argv: list[str]) -> list[str]:
    """`fasttune --debug train ...` (the flag before the command, as `git` and `pip` take global flags): the same as
    `fasttune train --debug ...`; it was 'unknown option --debug', with the traceback it asked for."""
    if argv[:1] != ["--debug"] or len(argv) < 2 or argv[1] not in COMMANDS:
        return argv
    rest = argv[1:]
    n = 2 if isinstance(COMMANDS[rest[0]], dict) and rest[1:2] and rest[1] in COMMANDS[rest[0]] else 1
    return [*rest[:n], "--debug", *rest[n:]]


def _main(argv: list[str]) -> int:
    set_environment()
    argv = _debug_after_command(argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(version())
        return 0
    debug = "--debug" in argv
    rank = _later_rank(argv)
    command = None
    try:
        with _quiet_parsing(rank):
            command = parse(argv or ["--help"])
            with _naming_warnings(argv, command):
                command.check()
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # --help piped into `head`
        return 0
    except (FasttuneError, PermissionError) as e:
        if rank is not None and not debug:  # rank 0 says it; torchrun stops every rank once one exits, so this one
            time.sleep(REPORT_WAIT_S)  # leaves rank 0 the time to print before it might be stopped
            return getattr(e, "exit_code", 2)
        _name_options(e, argv, command)
        if debug:
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:  # while torch and transformers are imported (seconds): no traceback either
        return _interrupted(rank)
    try:
        if not debug:  # --debug shows every third-party line (quiet.py), these bars too
            progress_bars_off()  # for the whole command: its process ends with it
        from fasttune.generate.prompts import removing_made_folders

        with removing_made_folders(), _naming_warnings(argv, command):
            return command.run()
    except Stopped as e:
        if str(e):  # torchrun: rank 0 says it
            print(str(e), file=sys.stderr)
        return e.exit_code
    except PeerFailed as e:  # rank 0 said why
        return e.exit_code
    except (FasttuneError, PermissionError) as e:
        _name_options(e, argv, command)
        if debug:
            raise
        print(f"{'' if rank is None else f'[rank {rank}] '}error: {_message(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return _interrupted(rank)


def _interrupted(rank: int | None) -> int:
    if rank is None:  # torchrun: Ctrl-C reaches every rank, rank 0 says it
        print("interrupted (Ctrl-C)", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
