"""The run folder: the one place that knows its file names, its marker, and when a folder may be used, resumed or
cleared (what a --resume must keep of the run: resume.py, whose checks are RunFolder's methods). Layout:

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
from pathlib import Path

from fasttune.config import BaseConfig, to_dict
from fasttune.errors import ConfigError, FasttuneError
from fasttune.train.resume import INPUTS, ResumeChecks, flat, input_paths

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
_TENSORBOARD = re.compile(r"^events\.out\.tfevents\..+$")
"""What fasttune writes in tensorboard/ (torch's SummaryWriter's event files; --overwrite removes these alone)."""


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
class RunFolder(ResumeChecks):
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
        given = flat(to_dict(cfg))
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
        """Names the runs beside the folder: without --output-dir, --resume looks in the preset's (runs/quick) while
        the user's run may be runs/sft."""
        if cfg.resume and not self.is_run:
            runs = runs_beside(self.path)
            shown = ", ".join(map(str, runs[:5])) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
            other = f"the runs beside it: {shown}; pass --output-dir RUN to resume one, or " if runs else ""
            raise ConfigError(f"--resume: {self.path} holds no run to resume; {other}run without --resume")

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

    def start(self, cfg: BaseConfig) -> None:
        """Called once everything is checked: clear an old run for --overwrite (only fasttune's files), mark the
        folder as a fasttune run and write the resolved config."""
        if cfg.overwrite:
            for p in self.artifacts:
                if p == self.checkpoints and p.is_dir():  # the step-N folders and their temporaries
                    self._clear_ours(p, _CHECKPOINT, folders=True)
                elif p == self.tensorboard and p.is_dir():
                    self._clear_ours(p, _TENSORBOARD)
                else:
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        self.marker.write_text("fasttune run directory; see config.json\n")
        self.write_config(cfg)
        if cfg.lora.enabled and cfg.model.path:  # what its adapters are trained on, for a resume that finds it moved
            from fasttune.model.identity import identify

            self.base_model.write_text(json.dumps(identify(cfg.model), indent=2) + "\n")

    def _clear_ours(self, root: Path, ours: re.Pattern, folders: bool = False) -> None:
        """--overwrite in `root` (checkpoints/, tensorboard/): what fasttune wrote there (names matching `ours`:
        folders, or files) goes; anything else is the user's (a copy of a best checkpoint, notes) and stays, said
        once."""
        kept = []
        for p in sorted(root.iterdir()):
            if ours.match(p.name) and p.is_dir() == folders:
                shutil.rmtree(p) if folders else p.unlink()
            else:
                kept.append(p.name)
        if kept:
            log.info("--overwrite: kept what fasttune did not write in %s: %s", root, ", ".join(kept))
        else:
            root.rmdir()

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


def runs_beside(path: Path) -> list[Path]:
    """The run folders (with the marker) in `path`'s parent folder, but `path`, by name."""
    parent = path.parent
    try:
        folders = sorted(p for p in parent.iterdir() if p.name != path.name and p.is_dir())
    except OSError:  # no such folder, or not readable: nothing to name
        return []
    return [p for p in folders if RunFolder(p).is_run]


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
