"""`fasttune train --config FILE`: the config tree read from a YAML, TOML or JSON file (a run's config.json as is).

The file holds the tree of `BaseConfig` (sections as mappings: `training: {lr: 1e-4}`), any part of it; its values
replace the preset's (the file's `experiment`, else `--experiment`, else quick) and the command line overrides both.
Every key and value is checked here, so that a mistake is one line naming the file and the key path."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import types
import typing
from pathlib import Path

from fasttune.config.argcheck import closest, options, shortened
from fasttune.config.base_config import BaseConfig
from fasttune.config.other_tools import NO_SUCH_OPTION, OTHER_NAMES
from fasttune.errors import ConfigError, one_line
from fasttune.train.run_dir import MARKER

log = logging.getLogger("fasttune")

SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}
PATHS = ("output_dir", "model.path", "data.path", "data.val_path", "data.cache_dir")
"""Keys that name a file or folder: a leading ~ is the home folder, as the shell makes it of a flag's value (left as
is, `output_dir: ~/runs/a` made a folder named ~ in the working directory)."""
MODEL_KEYS = frozenset({"model_type", "architectures"})
"""Keys of a Hugging Face model's config.json, which is no --config file (it names no section of fasttune's)."""
WHAT_CHARS = 80
"""The most characters of a wrong value an error shows (a data file given as --config held megabytes)."""
COMMAND_LINE_ONLY = ("resume", "overwrite")
"""Keys that act on the run folder rather than describe the run: taken from the command line only (a run's saved
config.json records them; read back, they would resume or clear a folder nobody asked to)."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    kind: typing.Any
    flags: tuple[str, ...]
    """The command-line options that set this key (`--training.max-steps`, its alias `--max-steps`, `--no-...`)."""


def leaves(cls: type = BaseConfig) -> dict[str, Leaf]:
    """Every option of the tree by dotted key (`training.max_steps`)."""
    return {key: Leaf(kind, flags) for key, kind, flags in options(cls)}


def _sections(cls: type = BaseConfig) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


# --- reading -----------------------------------------------------------------------------------------------------


def _yaml_loader():
    """PyYAML's safe loader, with YAML 1.2 floats (YAML 1.1 reads `lr: 1e-4`, no dot, as the string '1e-4') and a key
    set twice in one mapping refused (PyYAML keeps the last: a second `training:` drops the first's options)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.keys: dict = {}  # a mapping node -> the dotted key it is the value of ("training.")

        def construct_mapping(self, node, deep=False):
            """Runs for a mapping before the mappings in it: their keys are named from its own."""
            prefix = self.keys.get(node, "")
            pairs = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]  # `<<:` overrides: YAML's
            keys = [self.construct_object(k, deep=True) for k, _ in pairs]
            if (twice := _repeated(keys)) is not None:
                (again, _), (first, _) = (pairs[i] for i in twice)
                raise _Twice(f"line {again.start_mark.line + 1}: {_again(prefix, *(keys[i] for i in twice))} (first "
                             f"on line {first.start_mark.line + 1}): keep one")  # fmt: skip
            for key, (_, value) in zip(keys, pairs, strict=True):
                if isinstance(value, yaml.MappingNode):
                    self.keys.setdefault(value, f"{prefix}{key}.")  # an alias's mapping: named where it is first
            return super().construct_mapping(node, deep=deep)

    exponent = r"[eE][-+]?[0-9]+"
    number = rf"[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:{exponent})?|[0-9][0-9_]*{exponent}|\.[0-9_]+(?:{exponent})?)"
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^{number}$"), list("-+0123456789."))
    return Loader


def _repeated(keys: list) -> tuple[int, int] | None:
    """(index of the first key of `keys` that one before it already set, index of that one), else None: a key with -
    sets the one with _ (`max-steps` and `max_steps`), as on the command line."""
    seen: dict = {}
    for i, key in enumerate(keys):
        if not isinstance(key, typing.Hashable):
            continue  # PyYAML names it as unhashable
        field = str(key).replace("-", "_")
        if field in seen:
            return i, seen[field]
        seen[field] = i
    return None


def _again(prefix: str, key, first) -> str:
    same = str(key) == str(first)
    return f"{prefix}{key} is set again" if same else f"{prefix}{key} sets {prefix}{first} again"


class _Twice(ValueError):
    """A file sets one key twice in one mapping (its message without the file's name)."""


def _parse(text: str, kind: str, name: str):
    if kind == "JSON":
        try:
            return _twice_in(json.loads(text, object_pairs_hook=_Object.of))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: line {e.lineno}, column {e.colno}: JSON syntax error: {e.msg}") from None
        except _Twice as e:
            raise ConfigError(f"{name}: {e}") from None
    if kind == "TOML":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{name}: {_toml_twice(text, str(e)) or f'TOML syntax error: {e}'}") from None
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except _Twice as e:
        raise ConfigError(f"{name}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise ConfigError(f"{name}: {where}YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: YAML syntax error: {one_line(e)}") from None


_TOML_TWICE = re.compile(r"(?:Cannot overwrite a value|Cannot declare (\(.*\)) twice) \(at line (\d+), column \d+\)")
"""tomllib's words for a key (or [table]) set twice; 'declare' names the table's key path, 'overwrite' nothing."""
_TOML_PART = r"""(?:[\w-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_TOML_KEY = re.compile(rf"\s*({_TOML_PART}(?:\s*\.\s*{_TOML_PART})*)\s*=")
"""The key of a TOML `key = value` line (bare, quoted or dotted)."""


def _toml_twice(text: str, error: str) -> str | None:
    """tomllib's error for a key set twice ("Cannot overwrite a value (at line 5, column 4)") as YAML's reads: its
    line, its dotted key, the line that set it first and the fix; None for another error, or one whose key and first
    line this cannot place (tomllib's own words are kept then)."""
    import ast

    m = _TOML_TWICE.fullmatch(error)
    if not m:
        return None
    lines, at = text.splitlines(), int(m[2])
    path = ast.literal_eval(m[1]) if m[1] else _toml_path(lines[:at])
    held = next((n for n in range(1, at) if _toml_holds(lines[:n], path)), None) if path else None
    if held is None:
        return None
    first = next(n for n in range(held, 0, -1) if _toml_holds(lines[: n - 1], ()))  # where that value begins
    return f"line {at}: {'.'.join(path)} is set again (first on line {first}): keep one"


def _toml_path(lines: list[str]) -> tuple[str, ...] | None:
    """The key path the last of `lines` sets: its own [table] header's, or its key's under the header above it."""
    table: tuple[str, ...] | None = ()
    for line in lines[:-1]:
        if line.lstrip().startswith("["):
            table = _toml_keys(line)
    if lines[-1].lstrip().startswith("["):
        return _toml_keys(lines[-1])
    key = _TOML_KEY.match(lines[-1])
    return table + own if key and table is not None and (own := _toml_keys(f"{key[1]} = 0")) else None


def _toml_keys(source: str) -> tuple[str, ...] | None:
    """The key path of one TOML line (a `[a."b"]` header, an `a.b = 0` key), read by tomllib itself."""
    import tomllib

    try:
        value = tomllib.loads(source)
    except tomllib.TOMLDecodeError:
        return None
    path = []
    while isinstance(value, list | dict) and len(value) == 1:  # an [[array of tables]]: its one table
        if isinstance(value, dict):
            path.append(next(iter(value)))
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    return tuple(path)


def _toml_holds(lines: list[str], path: tuple[str, ...]) -> bool:
    """Whether `lines`, read as TOML, set the key `path` (in an array of tables, its last table); () whether they
    are TOML at all."""
    import tomllib

    try:
        value = tomllib.loads("\n".join(lines))
    except tomllib.TOMLDecodeError:
        return False  # a value that goes on past these lines
    for key in path:
        value = value[-1] if isinstance(value, list) and value else value
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


class _Object(dict):
    """A JSON object, with the keys its text gave (json keeps the last value of a key given twice)."""

    given: list

    @classmethod
    def of(cls, pairs: list) -> _Object:
        obj = cls(pairs)
        obj.given = [k for k, _ in pairs]
        return obj


def _twice_in(value, prefix: str = ""):
    """`value` (json's), or _Twice naming the first key an object in it sets twice, by its dotted key."""
    if isinstance(value, _Object) and (twice := _repeated(value.given)) is not None:
        raise _Twice(f"{_again(prefix, *(value.given[i] for i in twice))}: keep one")
    for key, item in value.items() if isinstance(value, dict) else ():
        _twice_in(item, f"{prefix}{key}.")
    return value


def read(path: str) -> dict:
    """The mapping a --config file holds; ConfigError (one line naming the file) when it cannot be used."""
    p = Path(path)
    kind = SUFFIXES.get(p.suffix.lower())
    if p.is_dir():
        hint = f" (a run's settings are its {p / 'config.json'})" if (p / "config.json").is_file() else ""
        raise ConfigError(f"--config {path} is a folder; pass a .yaml, .toml or .json file{hint}")
    if not p.exists():
        raise ConfigError(f"--config {path}: no such file")
    if kind is None:
        raise ConfigError(f"--config {path}: unknown file type {p.suffix!r}; use .yaml/.yml (YAML), .toml or .json")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; save it as UTF-8") from None
    except PermissionError:
        raise ConfigError(f"--config {path}: permission denied; make it readable (chmod u+r {path})") from None
    data = _parse(text, kind, path)
    if data is None or data == {}:  # an empty YAML or TOML file (or only comments), or {}: an unsaved file?
        raise ConfigError(f"--config {path} sets no option (it is empty); write the run's options in it (e.g. "
                          "experiment: sft, training: {lr: 1e-4}), or drop --config")  # fmt: skip
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        raise ConfigError(
            f"{path} holds a list of {len(data):,} records, not a mapping of options: a data file? "
            f"pass it as --data {path} (a --config file sets options: training: {{lr: 1e-4}})"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options and sections at the top (e.g. training: {{lr: "
                          f"1e-4}}), not {_what(data)}")  # fmt: skip
    if MODEL_KEYS & set(data) and not set(data) & set(_sections()):
        raise ConfigError(f"{path} is a model's config.json (model_type, architectures), not fasttune options: pass "
                          f"its folder as --model {Path(path).parent}")  # fmt: skip
    return data


# --- checking ----------------------------------------------------------------------------------------------------


def _what(value) -> str:
    """`value` as the message shows it, with its type; a long one (a list of records) cut to its start."""
    if value is None:
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}  # fmt: skip
    shown = repr(value)
    shown = shown if len(shown) <= WHAT_CHARS else shown[: WHAT_CHARS - 3] + "..."
    return f"{shown} ({names.get(type(value), type(value).__name__)})"


def _expected(kind) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not type(None)) + ' or null ("None" in TOML)'
    if typing.get_origin(kind) is tuple:
        return "a string or a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _coerce(value, kind, key: str, name: str):
    """`value` as the field's type, or ConfigError naming the file, the key and the type expected."""
    declared = kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None or value == "None":  # TOML has no null: "None", as on the command line
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if typing.get_origin(kind) is tuple:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return tuple(items)
    elif ok.get(kind):
        return float(value) if kind is float else value
    raise ConfigError(f"{name}: {key}: expected {_expected(declared)}, got {_what(value)}")


def _flag_to_key() -> dict[str, str]:
    return {flag: key for key, leaf in leaves().items() for flag in leaf.flags}


def _suggestion(key: str) -> str:
    """The hint for an unknown key: fasttune's name for another tool's (OTHER_NAMES), the one key of that name in
    another section (lr: training.lr), else the closest spelling; "" for none."""
    leaf = key.rpartition(".")[2]
    other = leaf.lower().replace("_", "-")
    if other in NO_SUCH_OPTION:
        return "; " + NO_SUCH_OPTION[other]
    meant, renamed = _meant(key)
    alias = f" (fasttune's name for {leaf})" if renamed else ""
    return f"; did you mean {meant}{alias}?" if meant else ""


def _meant(key: str) -> tuple[str | None, bool]:
    """(the key an unknown `key` stands for, or None; whether it is another tool's name for it)."""
    leaf = key.rpartition(".")[2]
    target = OTHER_NAMES.get(leaf.lower().replace("_", "-"))
    if target in (flags := _flag_to_key()):
        found = flags[target] + (": false" if target.rpartition(".")[2].startswith("no-") else "")
        return found, found.rpartition(".")[2] != leaf
    return closest(key.replace("-", "_"), leaf.replace("-", "_"), list(leaves()) + list(_sections())), False


def _unknown(keys: list[str], name: str) -> ConfigError:
    """One line for every unknown key of the file (a TRL or Axolotl file has several: each named at once, not one
    per run)."""
    if len(keys) == 1:
        return ConfigError(f"{name}: unknown key {keys[0]}{_suggestion(keys[0])} (options: `fasttune train --help`)")
    named = ", ".join(shortened(key, _suggestion(key)) for key in keys)
    return ConfigError(f"{name}: {len(keys)} unknown keys: {named} (fasttune's names after ->; options: `fasttune "
                       "train --help`)")  # fmt: skip


def _unknown_keys(cls: type, data: dict, prefix: str = "") -> list[str]:
    """The dotted keys of `data` (a section of class `cls`) that name no option or section, in file order."""
    table, sections, out = leaves(), _sections(cls), []
    for raw, value in data.items():
        field = str(raw).replace("-", "_")
        if field in sections and isinstance(value, dict):
            out += _unknown_keys(sections[field], value, prefix + field + ".")
        elif field not in sections and prefix + field not in table:
            out.append(prefix + str(raw))
    return out


def _path_hint(key: str, value: object) -> str:
    """For a section given a string (`model: ./my-llama`, as the flag --model takes it): the key it means."""
    if not isinstance(value, str) or f"{key}.path" not in leaves():
        return ""
    return f"; for its folder or file write {key}: {{path: {value}}} (the flag --{key} is {key}.path)"


def _fields(cls: type, data: dict, prefix: str, name: str, overridden: frozenset[str] = frozenset()) -> dict:
    """{field: value} of one section of the file, checked (keys with - are read as _, as on the command line). The
    `overridden` keys (set on the command line, which wins) are left out unchecked: their value is never used."""
    if (twice := _repeated(list(data))) is not None:  # TOML's `max-steps` beside `max_steps` (YAML, JSON: as read)
        raise ConfigError(f"{name}: {_again(prefix, *(list(data)[i] for i in twice))}: keep one")
    if not prefix and (unknown := _unknown_keys(cls, data)):
        raise _unknown(unknown, name)
    table = leaves()
    sections = _sections(cls)
    out = {}
    for raw, value in data.items():
        field = str(raw).replace("-", "_")
        key = prefix + field
        if field in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: {key}: expected a section (a mapping of its options), got {_what(value)}"
                                  f"{_path_hint(key, value)}")  # fmt: skip
            out[field] = _fields(sections[field], value, key + ".", name, overridden)
        elif key in overridden:
            continue
        elif key in table:
            out[field] = _coerce(value, table[key].kind, key, name)
            if key in PATHS and isinstance(out[field], str):
                out[field] = os.path.expanduser(out[field])
            elif key in PATHS and isinstance(out[field], tuple):  # data.path: [a.jsonl, ~/b.jsonl]
                out[field] = tuple(map(os.path.expanduser, out[field]))
        else:
            raise _unknown([prefix + str(raw)], name)
    return out


def _command_line_only(path: str, key: str, given: bool) -> str:
    """What the run does with a COMMAND_LINE_ONLY key its --config file sets: what the command line says."""
    verb, base = {"resume": ("resumes", "resume"), "overwrite": ("overwrites", "overwrite")}[key]
    if given:
        return (f"{path} sets {key}: true; this run {verb} because --{key} is on the command line (resume and "
                "overwrite are read from there, never from a file)")  # fmt: skip
    return (
        f"{path} sets {key}: true, which only the command line can ask: this run does not {base}; pass --{key} for it"
    )


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A --config file, read and checked: `values` is its nested mapping of options, without `experiment` and the
    COMMAND_LINE_ONLY keys."""

    path: str
    values: dict
    experiment: str | None

    @classmethod
    def load(cls, path: str, quiet: bool = False, typed: tuple[str, ...] = ()) -> ConfigFile:
        """`quiet`: say nothing of the COMMAND_LINE_ONLY keys it sets (a run's own config.json read for --resume);
        `typed`: the flags on the command line, which decide those keys (the notice says what the run does) and
        override the file's: a value the command line overrides is never used, so never checked (its key is)."""
        from fasttune.config.experiments import EXPERIMENTS, unknown_experiment

        own = ("experiment", *COMMAND_LINE_ONLY)  # checked against the command line below and in base()
        over = frozenset(k for k, leaf in leaves().items() if set(leaf.flags) & set(typed) and k not in own)
        values = _fields(BaseConfig, read(path), "", path, over)
        experiment = values.pop("experiment", None)
        if experiment is not None and experiment not in EXPERIMENTS:
            raise ConfigError(f"{path}: experiment: {unknown_experiment(experiment)}")
        ignored = [k for k in COMMAND_LINE_ONLY if values.pop(k, False)]
        if "output_dir" not in over and _is_runs_config(path):
            values["output_dir"] = str(Path(path).parent)  # a run's own: its folder, not a cwd-relative output_dir
        if not quiet and os.environ.get("RANK", "0") == "0":  # torchrun: said once
            for key in ignored:
                log.info("%s", _command_line_only(path, key, f"--{key}" in typed))
        return cls(path, values, experiment)

    def keys(self) -> list[str]:
        """The dotted keys the file sets."""

        return _keys(self.values)

    def base(self, typed: str | None) -> str:
        """The preset the file changes: its `experiment`; a --experiment typed on the command line must agree."""
        if typed and self.experiment and typed != self.experiment:
            run = _is_runs_config(self.path)  # --resume reads it, or --config names it
            fix = "a run keeps the preset it was started with" if run else "or change the file's experiment"
            raise ConfigError(
                f"--experiment {typed} disagrees with {self.path}, which changes the {self.experiment} preset "
                f"(experiment: {self.experiment}); drop --experiment{':' if run else ''} {fix}"
            )
        return typed or self.experiment or "quick"

    def apply(self, cfg: BaseConfig) -> BaseConfig:
        """`cfg` with the file's values; a value the checks refuse is named with the file."""
        try:
            return _replace(cfg, self.values)
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from None


def _replace(obj, values: dict):
    changes = {k: _replace(getattr(obj, k), v) if isinstance(v, dict) else v for k, v in values.items()}
    return dataclasses.replace(obj, **changes)


def _is_runs_config(path: str | Path) -> bool:
    """Whether `path` is a fasttune run's own config.json (its folder holds the run marker)."""
    return Path(path).name == "config.json" and (Path(path).parent / MARKER).is_file()


def _keys(d: dict, prefix: str = "") -> list[str]:
    return [k for f, v in d.items() for k in (_keys(v, f"{prefix}{f}.") if isinstance(v, dict) else [prefix + f])]
