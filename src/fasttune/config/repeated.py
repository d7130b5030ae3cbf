"""An option given twice on one command line is refused before anything runs: argparse (under tyro) keeps the last
value silently, so `--output-dir A ... --output_dir B` wrote to B and `--data a.jsonl --data b.jsonl` trained on b
alone. The spellings of one option are one option: `--a-b`, `--a_b`, `--a-b=VALUE`, an alias (`--max-steps` for
`--training.max-steps`) and a switch's `--no-` form. An option that repeats by design (tyro's append action:
`--stop`, bench train's `--variant`) is left alone; one that takes several values takes them after one flag."""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence

import tyro

from fasttune.config.argcheck import options
from fasttune.errors import ConfigError


def _metadata(cls: type, key: str) -> tuple:
    """The Annotated metadata of the field at dotted `key` of the dataclass `cls` (tyro's markers)."""
    hint: typing.Any = cls
    for part in key.split("."):
        hint = typing.get_type_hints(cls, include_extras=True)[part]
        cls = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    return getattr(hint, "__metadata__", ())


def _several(kind) -> bool:
    """Whether an option of type `kind` takes several values after its flag (`--data a.jsonl b.jsonl`)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    return typing.get_origin(kind) in (list, tuple)


def _given(args: Sequence[str], flags: dict[str, tuple[str, typing.Any]]) -> dict[str, list[tuple[str, str]]]:
    """Dotted key -> each (flag as typed, with dashes; its value as typed) of the options of `flags` in `args`. A token
    after an option that takes a value is that value (`--stop --`), unless it is an option itself."""
    given: dict[str, list[tuple[str, str]]] = {}
    i = 0
    while i < len(args):
        head, eq, value = args[i].partition("=")
        flag, i = head.replace("_", "-"), i + 1
        if not args[i - 1].startswith("--") or flag not in flags:
            continue
        key, kind = flags[flag]
        if kind is not bool and not eq:
            values = []
            while i < len(args) and args[i].partition("=")[0].replace("_", "-") not in flags:
                if values and not (_several(kind) and not args[i].startswith("-")):
                    break
                values, i = [*values, args[i]], i + 1
            value = " ".join(values) or flag  # --train-on-prompt: its value may be left out
        given.setdefault(key, []).append((flag, flag if kind is bool else value))
    return given


def refuse_repeated(args: Sequence[str], cls: type) -> None:
    """ConfigError naming the first option of the command `cls` that `args` (the command line after the command's
    name) gives more than once, with each value as given; options that repeat by design (tyro's append action) and
    those that are no option of `cls` (tyro names them) are not counted."""
    table = list(options(cls))
    flags = {flag: (key, kind) for key, kind, fs in table for flag in fs}
    for key, typed in _given(args, flags).items():
        meta = _metadata(cls, key)
        if len(typed) < 2 or any(m in meta for m in (tyro.conf.UseAppendAction, tyro.conf.Suppress)):
            continue
        names = list(dict.fromkeys(flag for flag, _ in typed))
        kind = flags[names[0]][1]
        times = "twice" if len(typed) == 2 else f"{len(typed)} times"
        what = (f"{names[0]} was given {times}" if len(names) == 1 or kind is bool
                else f"{' and '.join(names)} are the same option, given {times}")  # fmt: skip
        values = [_as_typed(value) for _, value in typed]
        shown = ", ".join(values[:-1]) + ", then " + values[-1]
        fix = "keep one"
        if _several(kind):
            fix += f", with all its values after one flag ({names[0]} {' '.join(values)})"
        raise ConfigError(f"{what} ({shown}): {fix}")


def _as_typed(value: str) -> str:
    """A typed value for the one-line error: as typed, or quoted (repr) where it is empty or holds a line break, a tab
    or other whitespace that the line would hide."""
    return value if value and value.isprintable() and value.strip() == value else repr(value)
