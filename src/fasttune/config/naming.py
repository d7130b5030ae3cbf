"""Errors name every config option the way the user gave it. A check anywhere (a section's `__post_init__`, a
cross-field check, training's device or memory checks) names an option by its dotted key (`model.memory=offload does
not run under training.compile`); `OptionNames.rewrite`, called where the CLI turns an error into its one line
(cli.py), and on every warning the command logs, names each key as the user set it:

- typed on the command line: the flag typed, an alias as such (`--epochs=0.0`, not `--training.epochs=0.0`), with
  dashes as every error writes flags (`--model.gradient-checkpointing` for `--model.gradient_checkpointing`), a
  switch without the value it sets (`--model.no-gradient-checkpointing`, not `...=False`);
- set in a --config file: the key, its value and the file (`training.compile: true in run.yaml`), and so for a key
  that `--resume --config FILE` takes from the run's own config.json (`... in runs/a/config.json`);
- set by the experiment preset: `the sft preset's data.max_length=1024`;
- a default no one set: the key as written.

A message that starts with a flag (`--variant 'x': ...`) already names what the user gave (a variant's keys are the
variant's, not the command line's), unless the option is one the --config file set (`--model nowhere: no such folder`
becomes `run.yaml: model.path nowhere: no such folder`); a key of a file the message already names (`run.yaml:
training.max_steps and training.epochs ...`) is left as it is. `--resume: ...` compares the options given with the
run's: its keys are named like any message's (`--resume: --training.lr is 0.5 but the run was started with 0.001`),
but where it names the --config file or the run's config.json it quotes that record (`the run trained with
data.max_length 4096 (in runs/a/config.json)`) and names the option it refuses itself: left as written."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from fasttune.config.argcheck import typed_flag

_VALUE = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\([^)]*\)|\[[^\]]*\]|[^\s;,)]+?(?=[\s;,)]|:\s|:?$)"""
_KEY = re.compile(
    rf"(?<![\w./'-])(?:(?P<key>[a-z]\w*\.[a-z]\w*)(?:=(?P<value>{_VALUE}))?|(?P<top>[a-z]\w*)=(?P<topvalue>{_VALUE}))"
    r"(?![\w/-]|\.\w)"
)
"""A dotted key (`section.field`), with its `=value` when the message gives one, or a top-level key with its value
(`attn_implementation='nope'`: a bare `seed` or `force` is a word); not part of a flag, a path or a file name
(`--model.memory`, `runs/model.bin`, `model.safetensors.index`)."""

_FLAG = re.compile(r"--[\w-]+(?:\.[\w-]+)*")
NAMES_OPTIONS = {"names_options": True}
"""`extra=` for a log line below WARNING whose option keys the CLI names as the user gave them, as it names every
warning's (`log.info("... %s", length_option(t), extra=NAMES_OPTIONS)`); other info lines are left as written."""


def shown(value: object) -> str:
    """A config value as a YAML file writes it (true, null, [a, b])."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def value_of(cfg: object, key: str) -> object:
    """The value of dotted `key` in the config `cfg`."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def preset_keys(name: str) -> frozenset[str]:
    """The dotted keys the experiment preset `name` sets to other than their default."""
    from fasttune.config.argcheck import options
    from fasttune.config.base_config import BaseConfig
    from fasttune.config.experiments import get_experiment

    preset, default = get_experiment(name), BaseConfig()
    keys = (key for key, _, _ in options(BaseConfig) if key != "experiment")
    return frozenset(k for k in keys if value_of(preset, k) != value_of(default, k))


def _is_switch(flags: Sequence[str]) -> bool:
    """Whether an option's `flags` are a true/false switch: a flag and its --no- form (--data.packing,
    --data.no-packing)."""
    return any(f.rpartition(".")[2].removeprefix("--").startswith("no-") for f in flags)


@dataclasses.dataclass(frozen=True)
class OptionNames:
    """How the user gave each option of one command line."""

    args: Sequence[str]
    flags: Mapping[str, Sequence[str]]
    """Dotted key -> the command-line flags that set it (its aliases, its --no- form)."""
    file: str | None = None
    from_file: frozenset[str] = frozenset()
    """The keys whose value comes from the --config `file` (no flag of theirs typed)."""
    values: Mapping[str, object] = dataclasses.field(default_factory=dict)
    """Dotted key -> its value, for the keys of `file`."""
    preset: str | None = None
    by_preset: frozenset[str] = frozenset()
    """The keys the `preset` set (no flag typed, not in the file)."""
    run_file: str | None = None
    from_run: frozenset[str] = frozenset()
    """--resume --config FILE: the keys whose value comes from the run's own config.json, `run_file` (not in FILE, no
    flag typed); their values are in `values` too."""

    def named(self, key: str, value: str | None = None) -> str | None:
        """Option `key` (with `value`, as the message writes it) as the user gave it; None: a default, as written."""
        if key not in self.flags:
            return None
        typed = typed_flag(self.args, self.flags[key])
        if typed is not None:  # a switch (--x.y, --x.no-y) is typed without its value: it is the value
            return typed if value is None or _is_switch(self.flags[key]) else f"{typed}={value}"
        for keys, file in ((self.from_file, self.file), (self.from_run, self.run_file)):
            if key in keys:
                return f"{key}: {shown(self.values[key]) if key in self.values else value} in {file}"
        if key in self.by_preset:
            return f"the {self.preset} preset's {key}" + ("" if value is None else f"={value}")
        return None

    def rewrite(self, message: str) -> str:
        """`message` with every dotted key of an option named as the user gave it (see the module's docstring)."""
        resume = message.startswith("--resume: ")  # the options given against the run's: named like any other
        if message.startswith("--") and not resume:
            return self._opening_flag(message)
        sources = ((self.from_file, self.file), (self.from_run, self.run_file))
        record = resume and any(file and file in message for _, file in sources)

        def name(m: re.Match) -> str:
            key, value = (m["key"], m["value"]) if m["key"] else (m["top"], m["topvalue"])
            if record or any(key in keys and file and file in message for keys, file in sources):
                return m[0]
            return self.named(key, value) or m[0]

        return _KEY.sub(name, message)

    def _opening_flag(self, message: str) -> str:
        """A message that opens with a flag (`--model nowhere: no such folder`) names the option as typed; for an
        option the user set in the --config file (or a --resume's run config.json) instead, as the file's key
        (`run.yaml: model.path nowhere: ...`), the rest as written."""
        if (opening := _FLAG.match(message)) is None:  # dashes, no flag: a path the user named so (--.jsonl)
            return message
        flag = opening[0]
        key = next((k for k, flags in self.flags.items() if flag in (f.replace("_", "-") for f in flags)), None)
        if key is None or typed_flag(self.args, self.flags[key]) is not None:
            return message
        for keys, file in ((self.from_file, self.file), (self.from_run, self.run_file)):
            if key in keys:
                return f"{file}: {key}{message[len(flag) :]}"
        return message
