"""The run folder: the one place that knows its file names, its marker, and when a folder may be used, resumed or
cleared. Layout:

    .fasttune-run        marker: only folders with it are ever resumed or cleared by --overwrite
    .fasttune-lock       held (flock) by the run using the folder, with its PID; the kernel releases it when that
                         process exits in any way (kill -9 included), so a lock is never stale
    config.json          the resolved config in force, its model and data paths absolute (rewritten on resume)
    base-model.json      a LoRA run's base model as the run started from it (model/identity.py): a resume given it at
                         another path is checked against it
    metrics.jsonl        one JSON record per logged step
    loss.png, throughput.png, tensorboard/
    checkpoints/step-N/  complete checkpoints (see fasttune.train.checkpoint)
    adapter/, merged/    LoRA adapters and the merged model
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fasttune.config import BaseConfig, to_dict
from fasttune.config.base_config import as_paths, may_change_on_resume, shown
from fasttune.data.formats import FORMAT_NAMES
from fasttune.errors import ConfigError, FasttuneError

if TYPE_CHECKING:
    from fasttune.data.pipeline import DataBundle

log = logging.getLogger("fasttune")

MARKER = ".fasttune-run"
LOCK = ".fasttune-lock"
_OURS_BEFORE_MARKER = re.compile(r"^(\.fasttune-lock|\.write-test-.*)$")
"""What may be in a folder before its marker is written: our lock, our write test (both hidden)."""
_STALE = re.compile(r"^\.(tmp|old|pruned)-(step-\d+|adapter|merged)-\d+$")
"""Temporaries of checkpoint saving and pruning, and of a LoRA run's adapter/ and merged/ (checkpoint.write_folder),
that a killed run can leave behind: in checkpoints/ and in the run folder."""
_CHECKPOINT = re.compile(r"^(step-\d+|\.(tmp|old|pruned)-step-\d+-\d+)$")
"""What fasttune writes in checkpoints/ (--overwrite removes these alone: a copy of yours there stays)."""


class RunLock:
    """An exclusive flock on `<run folder>/.fasttune-lock`, held for the whole run. The file keeps the holder's PID
    for the message a second run gets; the lock itself dies with the process, so no stale-lock cleanup is needed."""

    def __init__(self, path: Path, created: Path | None = None):
        self.path, self.created = path, created  # created: the topmost folder this run made (prepare), or None
        self.fd: int | None = None
        while self.fd is None:
            path.parent.mkdir(parents=True, exist_ok=True)  # a run that gave up may have just removed it
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder()
                self.release()
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FasttuneError(f"--output-dir {path.parent}: cannot lock it ({e.strerror or e})") from None
                raise FasttuneError(
                    f"--output-dir {path.parent} is in use by another fasttune run (PID {holder}); wait for it to "
                    "finish, stop it, or choose another --output-dir"
                ) from None
            if not self._still_linked():  # a run that gave up unlinked the file just locked: lock the one there now
                self.release()
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def _still_linked(self) -> bool:
        try:
            return os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self, tidy: bool = False) -> None:
        """Unlock; `tidy`: the run never started (no marker written), so take the lock file away too (while still
        holding it: a run waiting for it sees it gone and locks a new one) and the folders the run created, those
        left empty: a failed start leaves nothing behind."""
        if self.fd is None:
            return
        if tidy:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None
        if tidy and self.created is not None:
            for folder in (self.path.parent, *self.path.parent.parents):
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break
                if folder == self.created:
                    break


@dataclasses.dataclass(frozen=True)
class RunFolder:
    path: Path

    marker = property(lambda self: self.path / MARKER)
    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    base_model = property(lambda self: self.path / "base-model.json")

    @property
    def has_checkpoint(self) -> bool:
        """Whether a checkpoint folder exists: step-N (complete or not: --resume says which), or the .old-step-N-*
        copy of one that a killed re-save left (the next start puts it back)."""
        root = self.checkpoints
        names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        return any(re.fullmatch(r"step-\d+", n) or n.startswith(".old-step-") for n in names)

    tensorboard = property(lambda self: self.path / "tensorboard")
    adapter = property(lambda self: self.path / "adapter")
    merged = property(lambda self: self.path / "merged")
    loss_plot = property(lambda self: self.path / "loss.png")
    throughput_plot = property(lambda self: self.path / "throughput.png")

    @property
    def artifacts(self) -> tuple[Path, ...]:
        """Everything fasttune writes here (what --overwrite clears; the user's own files stay)."""
        return (self.config, self.base_model, self.metrics, self.checkpoints, self.loss_plot, self.throughput_plot,
                self.tensorboard, self.adapter, self.merged)  # fmt: skip

    @property
    def is_run(self) -> bool:
        return self.marker.is_file()

    def __str__(self) -> str:
        return str(self.path)

    def prepare(self, cfg: BaseConfig) -> RunLock:
        """Check the folder up front and lock it for this run (nothing is deleted here but the temporaries of a
        dead run): writable, an existing run is only touched by --resume or --overwrite, and a folder of someone
        else's files never. The caller releases the returned lock when the run ends."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output-dir {path} is a file; choose a folder")
        self._refuse_inside_run()
        self._refuse_foreign()  # before the lock file is created: nothing of ours goes into someone else's folder
        self._refuse_resume_without_run(cfg)  # nor a folder created for a mistyped --resume path
        missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as e:
            why = e.strerror or e
            raise ConfigError(f"--output-dir {path} is not writable ({why}); choose another folder") from None
        lock = RunLock(path / LOCK, missing[-1] if missing else None)
        try:
            self._refuse_foreign()  # again under the lock: another run may have started in between
            if self.is_run and not (cfg.resume or cfg.overwrite):
                if not self.has_checkpoint:
                    raise ConfigError(
                        f"--output-dir {path} holds a run that stopped before its first checkpoint (nothing to "
                        "resume); pass --overwrite to start it again, or choose another --output-dir"
                    )
                raise ConfigError(
                    f"--output-dir {path} already holds a run; pass --resume to continue it, --overwrite "
                    "to replace it, or choose another --output-dir"
                )
            self._refuse_resume_without_run(cfg)
            if cfg.overwrite and self.is_run:
                self._refuse_clearing_inputs(cfg)
            self.clean_stale()
        except BaseException:
            lock.release(tidy=True)
            raise
        return lock

    def _refuse_clearing_inputs(self, cfg: BaseConfig) -> None:
        """--overwrite deletes the run's checkpoints and merged model: never the model or data this run reads."""
        given = _flat(to_dict(cfg))
        for key, option in INPUTS.items():
            for value in filter(None, input_paths(given[key])):
                where = Path(value).resolve()
                for artifact in self.artifacts:
                    artifact = artifact.resolve()
                    if where == artifact or artifact in where.parents:
                        raise ConfigError(
                            f"{option} {value} lies in {artifact}, which --overwrite would delete; copy it out of "
                            f"{self.path} first, or train into another --output-dir"
                        )

    def _refuse_resume_without_run(self, cfg: BaseConfig) -> None:
        if cfg.resume and not self.is_run:
            raise ConfigError(f"--resume: {self.path} holds no run to resume; run without --resume")

    def _refuse_inside_run(self) -> None:
        """A folder in (or one of) another run's checkpoints/, adapter/ or merged/ (a checkpoint given as HF Trainer's
        resume_from_checkpoint names one, or a new folder in it): that run deletes or rewrites those, with this run
        inside; --resume continues the run itself, from its latest checkpoint. The path is resolved: typed relative to
        a working folder inside checkpoints/, or through a symlink to a checkpoint, it is still in there."""
        if (owner := run_owning(self.path)) is not None:
            parent, inside = owner
            raise ConfigError(
                f"--output-dir {self.path} lies in {inside.name}/ of the fasttune run {parent}, which that "
                f"run deletes or rewrites (keep-last pruning, saving, --overwrite); to continue that run, pass "
                f"--output-dir {parent} --resume (from its latest checkpoint); to start a new run from one of "
                "its checkpoints, pass that as --model and an --output-dir outside the run"
            )

    def _refuse_foreign(self) -> None:
        """A non-empty folder without our marker is someone else's: never train into it (--overwrite neither)."""
        if not self.path.is_dir() or self.is_run:
            return
        theirs = sorted(p.name for p in self.path.iterdir() if not _OURS_BEFORE_MARKER.match(p.name))
        if theirs:
            shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
            raise ConfigError(
                f"--output-dir {self.path} is not empty ({shown}) and is not a fasttune run folder; fasttune "
                f"never writes into (or clears) a folder of other files: pass a new or empty folder, e.g. "
                f"--output-dir {self.path / 'run'}"
            )

    def clean_stale(self) -> None:
        """Remove what a killed run left in checkpoints/ and beside adapter/ and merged/ (under the lock, so no live
        run owns it): half-written `.tmp-*` and half-deleted `.pruned-step-*` folders. An `.old-NAME-*` folder is a
        complete one moved aside while NAME was written again: it is put back when NAME is missing, else removed."""
        places = [p for p in (self.checkpoints, self.path) if p.is_dir()]
        for p in sorted(q for place in places for q in place.iterdir()):
            m = _STALE.match(p.name)
            if not m or (p.parent == self.path) != (m.group(2) in ("adapter", "merged")):
                continue
            final = p.parent / m.group(2)
            if m.group(1) == "old" and not final.exists():
                os.rename(p, final)
                log.warning("restored checkpoint %s (a save of the same step was interrupted)", final)
            else:
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed %s (left by a run that was killed)", p)

    def check_resume(self, cfg: BaseConfig, origin: dict[str, str] | None = None) -> None:
        """--resume continues the run as it was configured: options that change the data, tokenizer, model or
        schedule must match the run's config.json (fields marked `may_change_on_resume` may differ). `origin`: the
        file a key's value was read from (--config), named in the refusal. A data or validation file at another path
        is left to the content check after tokenizing (moved_data)."""
        saved = {**BEFORE_KEY, **_flat(self.saved_config())}
        free, moved = may_change_on_resume(), _moved_from(saved, cfg)
        for key, value in _flat(to_dict(cfg)).items():
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
        return _moved_from(_flat(self.saved_config()), cfg)

    def resumed(self, cfg: BaseConfig) -> BaseConfig:
        """The config a resumed run goes on with (after check_resume): a data.overlong the run recorded before `auto`
        was the default (split, truncate) rather than what `auto` gives its data now (a text file that `sft`
        truncated would be split: other samples)."""
        old = _flat(self.saved_config()).get("data.overlong")
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
            saved = _flat(json.loads(self.config.read_text())) if self.is_run else {}
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

    def start(self, cfg: BaseConfig) -> None:
        """Called once everything is checked: clear an old run for --overwrite (only fasttune's files), mark the
        folder as a fasttune run and write the resolved config."""
        if cfg.overwrite:
            for p in self.artifacts:
                if p == self.checkpoints and p.is_dir():
                    self._clear_checkpoints()
                else:
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        self.marker.write_text("fasttune run directory; see config.json\n")
        self.write_config(cfg)
        if cfg.lora.enabled and cfg.model.path:  # what its adapters are trained on, for a resume that finds it moved
            from fasttune.model.identity import identify

            self.base_model.write_text(json.dumps(identify(cfg.model), indent=2) + "\n")

    def _clear_checkpoints(self) -> None:
        """--overwrite: the step-N folders and their temporaries go; anything else in checkpoints/ is the user's (a
        copy of a best checkpoint, notes) and stays, said once."""
        kept = []
        for p in sorted(self.checkpoints.iterdir()):
            if _CHECKPOINT.match(p.name) and p.is_dir():
                shutil.rmtree(p)
            else:
                kept.append(p.name)
        if kept:
            log.info("--overwrite: kept what fasttune did not write in %s: %s", self.checkpoints, ", ".join(kept))
        else:
            self.checkpoints.rmdir()

    def write_config(self, cfg: BaseConfig) -> None:
        """config.json, with the model, data and validation paths made absolute (as typed they were relative to the
        directory training ran in: `fasttune eval --checkpoint RUN` from elsewhere found the data "gone"). The model's
        is resolved (a symlink repointed later does not swap the run's model); a data file's is not: its name says its
        format, and a Hugging Face cache file's link (snapshots/REV/train.json) names a blob without a suffix."""
        config = to_dict(cfg)
        for key in INPUTS:
            section, name = key.split(".")
            if (given := config[section][name]) is None:
                continue
            made = [str(Path(p).resolve() if key == "model.path" else Path(p).absolute()) if Path(p).exists() else p
                    for p in input_paths(given)]  # fmt: skip
            config[section][name] = made[0] if key == "model.path" else made
        self.config.write_text(json.dumps(config, indent=2) + "\n")


def run_owning(path: Path) -> tuple[Path, Path] | None:
    """(run folder, its checkpoints/, adapter/ or merged/) when `path` (resolved: relative, through a symlink) is one
    of those folders of a fasttune run or lies in one: the run deletes or rewrites them (pruning, saving, --resume,
    --overwrite), and whatever else is in them with them."""
    path = path.resolve()
    for parent in path.parents:
        run = RunFolder(parent)
        inside = [a for a in (run.checkpoints, run.adapter, run.merged) if a == path or a in path.parents]
        if run.is_run and inside:
            return parent, inside[0]
    return None


def refuse_writing_into_run(path: Path, option: str, fix: str) -> None:
    """Results (eval's, generate's) are never written where a run deletes or rewrites them (run_owning)."""
    if (owner := run_owning(path)) is not None:
        run, inside = owner
        raise FasttuneError(
            f"{option} {path} lies in {inside.name}/ of the fasttune run {run}, which that run deletes or rewrites "
            f"(keep-last pruning, --resume, --overwrite) with what is in it; {fix}"
        )


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
    given = _flat(to_dict(cfg))
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
    return all(Path(a).resolve() == Path(b).resolve() for a, b in zip(old, new, strict=True))


def _same_value(key: str, old, new) -> bool:
    """A value the run recorded and one given on --resume that differ as written, not as the run reads them: the
    same paths spelled another way (_same_path), another name of the data format read (formats.FORMAT_NAMES:
    sharegpt, conversational and chat_template read what chat reads; auto names none), or the value an older run
    recorded where the default is now auto (SAME_DATA)."""
    if key == "data.format":
        return old in FORMAT_NAMES and FORMAT_NAMES[old] == FORMAT_NAMES.get(new)
    return _same_path(key, old, new) or old in SAME_DATA.get((key, new), ())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


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
