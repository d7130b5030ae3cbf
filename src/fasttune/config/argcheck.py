"""One-line explanations for command-line mistakes, so a typo never prints a help panel or a traceback.

tyro does the parsing; when it rejects the arguments, `explain(args)` names the first bad option and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from fasttune.config.base_config import BaseConfig


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
