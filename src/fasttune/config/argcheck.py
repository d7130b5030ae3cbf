"""Command-line parsing with one-line errors. tyro parses (one parser for every subcommand, see `fasttune.cli`); its
parse-error events become a `ConfigError` naming the option and the fix, never a help panel or a traceback.

Also used by `fasttune bench train --variant` to apply `section.field=value` overrides to a config."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import io
import types
import typing
from collections.abc import Iterator, Sequence

from fasttune.config.base_config import BaseConfig
from fasttune.config.other_tools import (
    GENERATION_MISSING,
    GENERATION_NAMES,
    GENERATION_NOTES,
    NO_SUCH_OPTION,
    OTHER_NAMES,
)
from fasttune.errors import ConfigError

SHORT_FLAGS = ("--model", "--data", "--output-dir", "--max-steps", "--epochs", "--save-every",
               "--attn-implementation", "--resume", "--overwrite")  # fmt: skip
"""The stable short flags of `fasttune train` (its --help lists them from here; the README lists the same): tyro
aliases of nested options (`tyro.conf.arg(aliases=...)`) and top-level options. Each is in `option_table()`."""

_STEPS = "--max-steps"
"""A flag of train's alone: a table that has it is train's (other tools' training names apply), else generate's."""


def _unwrap(kind) -> tuple[typing.Any, str | None, tuple[str, ...]]:
    """(type without Annotated, tyro's name override or None, tyro's aliases)."""
    name, aliases = None, ()
    if typing.get_origin(kind) is typing.Annotated:
        for meta in kind.__metadata__:
            name = getattr(meta, "name", None) if hasattr(meta, "aliases") else name
            aliases = tuple(getattr(meta, "aliases", None) or ()) or aliases
        kind = typing.get_args(kind)[0]
    return kind, name, aliases


def options(
    cls: type = BaseConfig, prefix: str = "", key: str = ""
) -> Iterator[tuple[str, typing.Any, tuple[str, ...]]]:
    """Every option of the dataclass `cls` as (dotted key of its field, `training.max_steps`; its type; the `--flags`
    tyro accepts for it: the flag, its aliases and, for a switch, `--no-flag`)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        kind, name, aliases = _unwrap(hints[f.name])
        name = f.name if name is None else name
        if dataclasses.is_dataclass(kind):
            yield from options(kind, f"{prefix}{name}." if name else prefix, f"{key}{f.name}.")
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and any(
            dataclasses.is_dataclass(a) for a in typing.get_args(kind)
        ):
            continue  # nested subcommands
        leaf = name.replace("_", "-")
        yield key + f.name, kind, (f"--{prefix}{leaf}", *aliases, *((f"--{prefix}no-{leaf}",) if kind is bool else ()))


def option_table(cls: type = BaseConfig, prefix: str = "") -> dict[str, type]:
    """Every `--flag` tyro accepts for the dataclass `cls` -> the field's type (switches also as `--no-flag`).
    Only used to word errors (suggestions, "is a switch"): tyro does the parsing."""
    return {flag: kind for _, kind, flags in options(cls, prefix) for flag in flags}


def _flag(argument, args: Sequence[str] = ()) -> str:
    """The option's flag as the user typed it in `args` (--epochs, not --training.epochs), else its longest."""
    flags = [f for f in argument.lowered.name_or_flags if f.startswith("--")]
    typed = typed_flag(args, flags)
    return typed or (max(flags, key=len) if flags else argument.display_name())


def typed_flag(args: Sequence[str], flags: Sequence[str]) -> str | None:
    """The last of `flags` (or its spelling with underscores) in `args`, with dashes, as `--name` or `--name=VALUE`
    typed it; None when none is there."""
    names = {f.replace("_", "-") for f in flags}
    heads = [a.partition("=")[0].replace("_", "-") for a in args if a.startswith("--")]
    return next((h for h in reversed(heads) if h in names), None)


def _value(args: Sequence[str], flags: Sequence[str]) -> str | None:
    for i, a in enumerate(args):
        head, eq, value = a.partition("=")
        if head in flags:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _type_name(kind) -> str:
    return {int: "integer", float: "number", str: "string"}.get(kind, getattr(kind, "__name__", str(kind)))


def _switch_hint(switch: str, token: str) -> str:
    head, _, leaf = switch[2:].rpartition(".")
    leaf, head = leaf.removeprefix("no-"), head + "." if head else ""
    on, off = f"--{head}{leaf}", f"--{head}no-{leaf}"
    return f"{switch} is a switch and takes no value ({token!r}): write {on} to turn it on, {off} to turn it off"


def _unrecognized(token: str, args: Sequence[str], table: dict[str, type], command: str, commands) -> str:
    flag = token.partition("=")[0]
    if flag in ("--prompt", "--prompts") and command == "fasttune chat":  # it said only "unknown option"
        return (f"unknown option {flag}; chat reads your messages as you type them (or piped into it); for answers "
                f"to given prompts: fasttune generate --checkpoint PATH {flag} ...")  # fmt: skip
    if token.startswith("-"):
        return f"unknown option {flag}; {_suggestion(flag, table)}see `{command} --help` for the list"
    for i, a in enumerate(args):
        head, eq, value = a.partition("=")
        head = head.replace("_", "-") if head.startswith("--") else head  # tyro takes --model.fused_mlp too
        if table.get(head) is bool and ((eq and value == token) or (not eq and args[i + 1 : i + 2] == [token])):
            return _switch_hint(head, token)
    from fasttune.config.experiments import EXPERIMENTS

    if token in EXPERIMENTS and _STEPS in table:  # `fasttune train sft`: train's options
        return f"unexpected argument {token!r}: name the experiment with --experiment {token}"
    if commands and token in args and args.index(token) == command.count(" "):
        where = f" for `{command}`" if " " in command else ""
        close = difflib.get_close_matches(token, list(commands), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown command {token!r}{where}{hint}; choose one of: {', '.join(commands)}"
    return f"unexpected argument {token!r}; options look like --name VALUE (see `{command} --help`)"


def _unknown_flags(args: Sequence[str], table: dict[str, type]) -> list[str]:
    """The `--flags` in `args` that are no option in `table` (tyro reports a missing required option before them),
    a value after an option that takes one (`--stop --`) not counted."""
    unknown, value_next = [], False
    for a in args:
        head = a.partition("=")[0].replace("_", "-")
        if not value_next and a.startswith("--") and head not in table and head != "--help":
            unknown.append(a.partition("=")[0])
        value_next = head in table and table[head] is not bool and "=" not in a
    return unknown


def _suggestion(flag: str, table: dict[str, type]) -> str:
    """The hint for an unknown flag ("did you mean X? "): the fasttune option for another tool's name (OTHER_NAMES),
    the one option of that name in another section (--lr: --training.lr), else the closest spelling; "" for none."""
    typed = flag.replace("_", "-")
    leaf = typed.lstrip("-").rpartition(".")[2].lower()
    if leaf in NO_SUCH_OPTION and _STEPS in table:
        return NO_SUCH_OPTION[leaf] + "; "
    if leaf in OTHER_NAMES and _STEPS in table:  # train's options (bench has its own --epochs)
        target = OTHER_NAMES[leaf]
        if target in table:
            return f"did you mean {target}? "
    if leaf in GENERATION_NAMES and _STEPS not in table:
        target = GENERATION_NAMES[leaf]
        if target is None:
            return GENERATION_MISSING.get(leaf, "fasttune has no such option") + "; "
        if target in table:
            return f"did you mean {target}? " + GENERATION_NOTES.get(leaf, "")
    close = closest(typed, leaf, list(table))
    return f"did you mean {close}? " if close else ""


def _several_unknown(flags: list[str], table: dict[str, type], command: str) -> str:
    """One line for several unknown options (a TRL or Axolotl command line has them): each with fasttune's name."""
    named = ", ".join(shortened(f, _suggestion(f, table)) for f in flags)
    return f"{len(flags)} unknown options: {named} (fasttune's names after ->; see `{command} --help` for the list)"


def shortened(name: str, hint: str) -> str:
    """An unknown option or --config key with its `hint` (the line for one unknown name gives it whole), for the line
    that names several: `--learning-rate -> --training.lr`, `report_to (fasttune has no such option)`, or the name
    alone when there is no hint."""
    hint = hint.strip().removeprefix("; ")
    if hint.startswith("did you mean "):  # "did you mean X (fasttune's name for Y)? a note"
        return f"{name} -> {hint.removeprefix('did you mean ').partition('?')[0].partition(' (')[0]}"
    return f"{name} (fasttune has no such option)" if hint else name


def closest(typed: str, leaf: str, valid: list[str]) -> str | None:
    """The one name in `valid` (flags or dotted keys) whose leaf is `leaf` (typed's, normalised) in another section
    (--lr: --training.lr), else the closest spelling of `typed`; None for none."""
    same = [v for v in valid if v.rpartition(".")[2].lstrip("-") == leaf and v != typed]
    close = same if len(same) == 1 else difflib.get_close_matches(typed, valid, n=1)
    return close[0] if close else None


def message(event, args: Sequence[str], table: dict[str, type], command: str, commands: Sequence[str] = ()) -> str:
    """One line for one of tyro's parse-error events (tyro._errors). `command`: the subcommand as typed
    (`fasttune bench train`), `table`: its options (`option_table`), `commands`: the names it takes after it."""
    from tyro import _errors as e

    if isinstance(event, e.UnrecognizedArgs):
        flags = [t.partition("=")[0] for t in event.tokens if t.startswith("--")]
        if event.tokens[0].startswith("--") and len(flags) > 1:
            return _several_unknown(flags, table, command)
        return _unrecognized(event.tokens[0], args, table, command, commands)
    if isinstance(event, e.MissingSubcommand):
        names = ", ".join(event.subcommand_spec.parser_from_name)
        return f"`{command}` needs a command: one of {names} (see `{command} --help`)"
    if isinstance(event, e.InvalidChoice):
        return f"{_flag(event.argument, args)}={event.value!r} is not valid; choose one of: {', '.join(event.choices)}"
    if isinstance(event, e.BadValue):
        flag = _flag(event.argument, args)
        if event.reason == "too_few_values":
            return f"{flag} needs a value (see `{command} --help`)"
        return f"{flag} takes no value ({event.offending_value!r}); see `{command} --help`"
    if isinstance(event, e.MissingArgs):
        if unknown := _unknown_flags(args, table):  # `generate --model M`: M is what --checkpoint wanted
            return _several_unknown(unknown, table, command) if len(unknown) > 1 else _unrecognized(
                unknown[0], args, table, command, commands)  # fmt: skip
        names = ", ".join(_flag(a.arg) for a in event.missing_arguments)
        return f"`{command}` needs {names} (see `{command} --help`)"
    if isinstance(event, e.InstantiationFailure) and event.argument is not None:
        flag = _flag(event.argument, args)
        value = _value(args, event.argument.lowered.name_or_flags)
        kind = event.argument.field.type_stripped
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)
        if optional and len(typing.get_args(kind)) == 2:  # int | None: the number, or None for "no limit"
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind in (int, float) and value is not None:
            whole = " (a whole number)" if kind is int else ""
            none = " or None" if optional else ""
            return f"{flag}: {value!r} is not a valid {_type_name(kind)}{whole}{none}"
        return f"{flag}: {' '.join(str(event.message).split())}"
    return f"invalid arguments; see `{command} --help`"


def paragraphs(text: str) -> str:
    """A docstring as --help shows it: each paragraph (blank-line separated) on one line for the terminal to wrap, a
    line opening a list item ("- ", "* ") kept on its own. tyro's own joining keeps a break before every line that
    does not start with a letter: the indented continuation lines of fasttune's docstrings all broke, mid-sentence,
    wherever the source does (ragged at any terminal width)."""
    out: list[str] = []
    for line in inspect.cleandoc(text).split("\n"):
        line = line.strip()
        if not line:
            out.append("\n\n" if out and out[-1] != "\n\n" else "")
        elif out and out[-1] not in ("", "\n\n") and not line.startswith(("- ", "* ")):
            out.append(" " + line)
        else:
            out.append(("\n" if out and out[-1] not in ("", "\n\n") else "") + line)
    return "".join(out).strip()


def _help_in_paragraphs() -> None:
    """Have tyro join docstring lines with `paragraphs` (its private helper: when a tyro release moves it, --help
    only keeps the source's line breaks)."""
    try:
        from tyro import _strings
    except ImportError:  # pragma: no cover
        return
    if hasattr(_strings, "remove_single_line_breaks"):
        _strings.remove_single_line_breaks = paragraphs


def parse(kind, args: Sequence[str], *, prog: str, table: dict[str, type], command: str = "", commands=(),
          **kw):  # fmt: skip
    """`tyro.cli(kind, args=args, ...)`; a parse error raises ConfigError with one line (see `message`). A value a
    section's check refuses is named by its key (`training.epochs=0.0`): the CLI names it as the user gave it
    (config/naming.py)."""
    import tyro

    args, command = list(args), command or prog
    try:
        from tyro import _errors  # tyro >= 1.0.17: structured parse-error events (private but versioned API)
    except ImportError:  # pragma: no cover - older tyro: a generic line
        _errors = None

    def hook(event) -> None:
        raise ConfigError(message(event, args, table, command, commands))

    wants_help = any(a in ("-h", "--help") for a in args)
    _help_in_paragraphs()
    # Without the hook (older tyro), tyro's panel is swallowed and replaced by a generic line.
    quiet = contextlib.nullcontext() if wants_help or _errors else contextlib.redirect_stderr(io.StringIO())
    registered = _errors.on_parse_error(hook) if _errors else contextlib.nullcontext()
    try:
        with quiet, registered:
            return tyro.cli(kind, args=args, prog=prog, **kw)
    except SystemExit as exc:
        if wants_help or exc.code in (0, None):
            raise
        raise ConfigError(f"invalid arguments; see `{command} --help`") from None


def parse_overrides(base: BaseConfig, args: list[str], prog: str = "fasttune train") -> BaseConfig:
    """`base` with `args` (`--section.field VALUE`, `--flag`, `--no-flag`) applied and validated."""
    cfg = parse(BaseConfig, args, prog=prog, table=option_table(), default=base)
    return cfg.validate()


def split_assignments(text: str) -> list[str]:
    """ "a.b=1,c.d=[x,y]" -> ["a.b=1", "c.d=[x,y]"]: split at the commas outside brackets (a list value is written
    section.field=[a,b], its items comma-separated as on the command line's --section.field a,b)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ConfigError(
                f"{text!r}: a {'stray ]' if depth < 0 else 'nested ['}; write a list as section.field=[a,b]"
            )
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"{text!r}: a '[' without its ']'; write a list as section.field=[a,b]")
    return [p for p in (*parts, text[start:]) if p.strip()]


def _is_list(kind) -> bool:
    return typing.get_origin(kind) in (list, tuple)


def assignments_to_args(assignments: list[str]) -> list[str]:
    """["section.field=value", ...] -> tyro arguments; booleans become --section.field / --section.no-field, a list
    section.field=[a,b] becomes --section.field a b."""
    table = option_table()
    args = []
    for assignment in assignments:
        path, eq, value = assignment.strip().partition("=")
        flag = "--" + path.replace("_", "-")
        if not eq:
            raise ConfigError(f"{assignment!r} is not section.field=value (a list value: section.field=[a,b])")
        if value.startswith("[") or value.endswith("]"):
            if not _is_list(table.get(flag)):
                raise ConfigError(f"{assignment!r}: {path} takes one value, not a list")
            if not (value.startswith("[") and value.endswith("]")):
                raise ConfigError(f"{assignment!r}: write the list as {path}=[a,b]")
            args += [flag, *(item.strip() for item in value[1:-1].split(",") if item.strip())]
            continue
        if table.get(flag) is bool:
            if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError(f"{assignment!r}: {path} is a switch; write {path}=true or {path}=false")
            on = value.lower() in ("1", "true", "yes", "on")
            head, _, leaf = flag[2:].rpartition(".")
            args.append(flag if on else "--" + (head + "." if head else "") + "no-" + leaf)
        else:
            args += [flag, value]
    return args
