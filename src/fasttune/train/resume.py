"""What --resume holds a run to: its config.json against the options given (a change refused, naming the option
and both values; what may change on resume passes), its inputs (INPUTS) moved or gone (data by its content, the
model by its identity: model/identity.py), and its data's fingerprint. RunFolder (run_dir.py) has the checks of its
config.json as methods (ResumeChecks); the data's, which need the tokenized data, are functions the loop calls."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fasttune.config import BaseConfig, to_dict
from fasttune.config.base_config import as_paths, may_change_on_resume, shown
from fasttune.data.formats import FORMAT_NAMES
from fasttune.errors import ConfigError

if TYPE_CHECKING:
    from fasttune.data.pipeline import DataBundle

log = logging.getLogger("fasttune")


class ResumeChecks:
    """RunFolder's checks of a --resume against the run's config.json (its file names, config and base_model, and is_run
    are RunFolder's)."""

    def check_resume(self, cfg: BaseConfig, origin: dict[str, str] | None = None) -> None:
        """--resume continues the run as it was configured: options that change the data, tokenizer, model or
        schedule must match the run's config.json (fields marked `may_change_on_resume` may differ). `origin`: the
        file a key's value was read from (--config), named in the refusal. A data or validation file at another path
        is left to the content check after tokenizing (moved_data)."""
        saved = {**BEFORE_KEY, **flat(self.saved_config())}
        free, moved = may_change_on_resume(), _moved_from(saved, cfg)
        for key, value in flat(to_dict(cfg)).items():
            if key in free or key not in saved or key in moved or _model_moved(key, saved[key], value):
                continue
            old = saved[key]
            old = as_paths(old) if key in MOVABLE else tuple(old) if isinstance(old, list) else old
            if old != value and not _same_value(key, old, value):
                source = f" (set by {origin[key]})" if origin and key in origin else ""
                value, old = (shown(v) if key in MOVABLE and v else v for v in (value, old))
                raise ConfigError(
                    f"--resume: {key} is {value!r}{source} but the run was started with {old!r}; resume with the "
                    "same value (or start a new run with another --output-dir)"
                )

    def moved_data(self, cfg: BaseConfig) -> dict[str, str]:
        """{data.path and/or data.val_path: the file the run was started with} for each that --resume names another
        file for (moved or renamed): the run goes on only if the tokenized data is the same (the checkpoint's
        fingerprint; train/loop.py). Empty: the same files."""
        return _moved_from(flat(self.saved_config()), cfg)

    def resumed(self, cfg: BaseConfig) -> BaseConfig:
        """The config a resumed run goes on with (after check_resume): a data.overlong the run recorded before `auto`
        was the default (split, truncate) rather than what `auto` gives its data now (a text file that `sft`
        truncated would be split: other samples)."""
        old = flat(self.saved_config()).get("data.overlong")
        if cfg.data.overlong == "auto" and old in SAME_DATA[("data.overlong", "auto")]:
            return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, overlong=old))
        return cfg

    def check_moved_model(self, cfg: BaseConfig, latest: Path | None) -> None:
        """A --model given for the run's gone one (check_resume took it) is the run's model, as far as its config (and
        for LoRA its weights) against `latest`'s config or the run's base-model.json tell (model/identity.py)."""
        if not _model_moved("model.path", was := self.saved_config().get("model", {}).get("path"), cfg.model.path):
            return
        from fasttune.model.identity import check_moved_model, read_record

        check_moved_model(cfg.model, was, cfg.lora.enabled, read_record(self.base_model), self.base_model, latest)

    def recorded_inputs(self) -> dict[str, tuple[str, ...]]:
        """{key of INPUTS: the paths config.json records (input_paths)} of a run folder; empty where there is none or
        it cannot be read (resume says why)."""
        try:
            saved = flat(json.loads(self.config.read_text())) if self.is_run else {}
        except (OSError, ValueError, AttributeError):
            return {}
        return {key: input_paths(saved[key]) for key in INPUTS if input_paths(saved.get(key))}

    def saved_config(self) -> dict:
        """The config.json of the run as it was last started (--resume reads it before writing its own)."""
        try:
            return json.loads(self.config.read_text())
        except PermissionError:  # not damage: --overwrite would throw the run away for a permission
            raise ConfigError(f"--resume: {self.config} cannot be read (permission denied); make it readable "
                              f"(chmod u+r {self.config}) and resume again") from None  # fmt: skip
        except (OSError, ValueError) as e:
            from fasttune.train.checkpoint import list_checkpoints  # torch: on this error alone

            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            done = list_checkpoints(self)  # intact: --overwrite alone would throw the training done away
            way_on = ""
            if done:
                way_on = f"to train on from its newest checkpoint, start a new run with --model {done[-1]} and another "
                way_on += "--output-dir, or "
            raise ConfigError(
                f"--resume: cannot read {self.config} ({reason}), which holds the run's options; {way_on}start over "
                "with --overwrite (which deletes its checkpoints)"
            ) from None


BEFORE_KEY = {"training.adam_beta1": 0.9, "training.adam_beta2": 0.95, "training.adam_epsilon": 1e-8}
"""What a run whose config.json predates an option ran with (fasttune's fixed AdamW betas and eps before
--training.adam-*): such a run resumes with them, and another value is refused like any change (the optimizer state
would bring the run's own back, leaving the new value unused)."""
SAME_DATA = {("data.overlong", "auto"): ("split", "truncate")}
"""Values an older run may have recorded where the default is now `auto`: it resumes with the value it recorded
(RunFolder.resumed)."""


INPUTS = {"model.path": "--model", "data.path": "--data", "data.val_path": "--data.val-path"}
"""The files and folders a run reads, by key, with their options."""

MOVABLE = {key: option for key, option in INPUTS.items() if key != "model.path"}
"""The files a resumed run may find at another path, their content deciding (the checkpoint's fingerprint)."""


def input_paths(value: object) -> tuple[str, ...]:
    """The paths a key of INPUTS holds, as a config or its config.json gives it: model.path one string, data.path and
    data.val_path a list (an older run's config.json: a string); () for none."""
    paths = as_paths(value) if isinstance(value, str | list | tuple) else None
    return tuple(p for p in paths or () if isinstance(p, str))


def _moved_from(saved: dict, cfg: BaseConfig) -> dict[str, str]:
    """{key: the saved (flattened) path} for each of MOVABLE that cfg names another file for, not the same one
    spelled another way (a path given where the run had none, or none where it had one, is a change, not a move)."""
    given = flat(to_dict(cfg))
    moved = {}
    for key in MOVABLE:
        old, new = input_paths(saved.get(key)), input_paths(given[key])
        if old and new and not _same_path(key, old, new):
            moved[key] = shown(old)
    return moved


def _model_moved(key: str, old, new) -> bool:
    """model.path given anew for one the run recorded that is gone (the project folder moved or was renamed: its
    config.json records the path absolute): taken if it is the run's model (RunFolder.check_moved_model)."""
    if key != "model.path" or not (isinstance(old, str) and isinstance(new, str)) or Path(old).exists():
        return False
    return Path(new).exists()


def _same_path(key: str, old, new) -> bool:
    """model.path / data.path / data.val_path spelled another way (./m/, an absolute path) but naming the same files
    and folders, in the same order."""
    if key not in INPUTS:
        return False
    old, new = input_paths(old), input_paths(new)
    if not old or len(old) != len(new):
        return False
    return all(_local(a).resolve() == _local(b).resolve() for a, b in zip(old, new, strict=True))


def _local(path: str) -> Path:
    """The folder a path reads: a Hub id given as --model, its copy in the Hugging Face cache (what the run recorded,
    model/resolve.py), else the path itself."""
    from fasttune.errors import hub_cache_folder

    return Path(path) if Path(path).exists() else hub_cache_folder(path) or Path(path)


def _same_value(key: str, old, new) -> bool:
    """A value the run recorded and one given on --resume that differ as written, not as the run reads them: the
    same paths spelled another way (_same_path), another name of the data format read (formats.FORMAT_NAMES:
    sharegpt, conversational and chat_template read what chat reads; auto names none), or the value an older run
    recorded where the default is now auto (SAME_DATA)."""
    if key == "data.format":
        return old in FORMAT_NAMES and FORMAT_NAMES[old] == FORMAT_NAMES.get(new)
    return _same_path(key, old, new) or old in SAME_DATA.get((key, new), ())


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_given_data(cfg: BaseConfig, moved: dict[str, str]) -> None:
    """The data and validation files a --resume names anew (`moved`: RunFolder.moved_data's keys) can be read, else
    refused in the readers' one line (a typo): before a finished run, which reads no data, says it is complete."""
    from fasttune.data.formats import check_readable

    for key in moved:
        for path in input_paths(getattr(cfg.data, key.removeprefix("data."))):
            check_readable(path, MOVABLE[key])


def check_moved_data(cfg: BaseConfig, moved: dict[str, str], saved: dict | None, data: DataBundle) -> None:
    """A resumed run given its data or validation file at another path (`moved`: {key: the path it was started
    with}) goes on when the tokenized data is the one it trained on (the fingerprint check after this); a checkpoint
    without a fingerprint has nothing to compare: refused as before."""
    for key, old in moved.items():
        new = shown(getattr(cfg.data, key.removeprefix("data.")))
        if not (saved and saved.get("data") and data.summary.fingerprint):
            raise ConfigError(
                f"--resume: {key} is {new!r} but the run was started with {old!r}, and its checkpoint holds no "
                "fingerprint of the data to check it against; resume with the same path (or start a new run with "
                "another --output-dir)"
            )
        if saved["data"] == data.summary.fingerprint:
            log.info("--resume: %s moved (%s -> %s); its content is the one this run trained on", MOVABLE[key], old,
                     new)  # fmt: skip


def check_same_data(saved: dict | None, data: DataBundle, latest, val_path: Sequence[str] | None = None) -> None:
    """A resumed run's data must be what it trained on (its checkpoint's fingerprint, where it has one: the training
    and validation samples, so an edited --data.val-path is refused as an edited --data is)."""
    if not (saved and saved.get("data") and data.summary.fingerprint) or saved["data"] == data.summary.fingerprint:
        return
    from fasttune.data.sft import MASKING_RULES, masking_changes_since  # transformers: not at this module's import

    if (rules := saved.get("masking_rules", 1)) != MASKING_RULES:
        raise ConfigError(
            f"--resume: this run was started by an earlier fasttune that trained other tokens of the same data "
            f"(since then: {masking_changes_since(rules)}); finish it with that version, or start a new run from "
            f"its checkpoint with --model {latest} and another --output-dir"
        )
    raise ConfigError(
        f"--resume: the data is not what this run trained on ({data.summary.source}"
        f"{f' or --data.val-path {shown(val_path)}' if val_path else ''}: records added, removed or "
        "edited since, or read differently); restore it, or start a new run from the checkpoint with --model "
        f"{latest} and another --output-dir"
    )
