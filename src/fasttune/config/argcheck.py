"""Config overrides from the command line: tyro parses, and a mistake becomes one line naming the option and the fix
(`explain`), never a help panel or a traceback. Used by `fasttune train` and by `fasttune bench train --variant`."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import types
import typing

from fasttune.config.base_config import BaseConfig
from fasttune.errors import ConfigError


def option_table(cls: type = BaseConfig, prefix: str = "") -> dict[str, type]:
    """Every accepted `--flag` -> the field's type (bools also as `--no-flag`, taking no value)."""
    table: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            table.update(option_table(kind, f"{prefix}{f.name}."))
            continue
        name = f.name.replace("_", "-")
        table[f"--{prefix}{name}"] = kind
        if kind is bool:
            table[f"--{prefix}no-{name}"] = bool
    return table


def _parses(value: str, kind) -> bool:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return (value == "None" and type(None) in args) or any(_parses(value, a) for a in args if a is not type(None))
    if kind in (int, float):
        try:
            kind(value)
        except ValueError:
            return False
    return True


def explain(args: list[str]) -> str:
    """The first problem in `args`, as one line naming the option and what to do."""
    table = option_table()
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            return f"unexpected argument {arg!r}; options look like --section.name VALUE (see --help)"
        flag, eq, value = arg.partition("=")
        flag = flag.replace("_", "-")
        if flag not in table:
            close = difflib.get_close_matches(flag, table, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            return f"unknown option {flag}; {hint}see `fasttune train --help` for the list"
        kind = table[flag]
        if kind is bool:
            if eq or (i + 1 < len(args) and args[i + 1].lower() in ("true", "false", "0", "1")):
                head, _, leaf = flag[2:].rpartition(".")
                on = "--" + (head + "." if head else "") + leaf.removeprefix("no-")
                off = "--" + (head + "." if head else "") + "no-" + leaf.removeprefix("no-")
                return f"{flag} is a switch and takes no value: write {on} to turn it on, {off} to turn it off"
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and typing.get_origin(kind) is not tuple):
                return f"{flag} needs a value"
            value = args[i + 1]
            i += 1
        if not _parses(value, kind):
            name = getattr(kind, "__name__", str(kind))
            return f"{flag}: {value!r} is not a valid {name}"
        i += 1
        while typing.get_origin(kind) is tuple and i < len(args) and not args[i].startswith("--"):
            i += 1
    return "invalid arguments; see `fasttune train --help`"


def parse_overrides(
    base: BaseConfig, args: list[str], prog: str = "fasttune train", description: str = ""
) -> BaseConfig:
    """`base` with `args` (`--section.field VALUE`, `--flag`, `--no-flag`) applied and validated."""
    import tyro

    wants_help = any(a in ("-h", "--help") for a in args)
    # tyro prints some errors as a panel even with console_outputs off: mistakes get explain()'s line instead
    quiet = contextlib.nullcontext() if wants_help else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            cfg = tyro.cli(BaseConfig, default=base, args=args, prog=prog, description=description,
                           console_outputs=wants_help)  # fmt: skip
    except SystemExit as e:
        if wants_help or e.code == 0:
            raise
        raise ConfigError(explain(args)) from None
    return cfg.validate()


def assignments_to_args(assignments: list[str]) -> list[str]:
    """["section.field=value", ...] -> tyro arguments; booleans become --section.field / --section.no-field."""
    table = option_table()
    args = []
    for assignment in assignments:
        path, eq, value = assignment.strip().partition("=")
        flag = "--" + path.replace("_", "-")
        if not eq:
            raise ConfigError(f"{assignment!r} is not section.field=value")
        if table.get(flag) is bool:
            on = value.lower() in ("1", "true", "yes", "on")
            head, _, leaf = flag[2:].rpartition(".")
            args.append(flag if on else "--" + (head + "." if head else "") + "no-" + leaf)
        else:
            args += [flag, value]
    return args
