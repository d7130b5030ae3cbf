"""A resumed run with no step left to train: decided from its config.json and its newest checkpoint alone, before the
data is read and the model built (the same command run again after the run finished, e.g. a scheduler's retry), and
said in one line: complete (at which step, where its model is, how to train further; exit 0), or refused when the length
given ends before the step it reached (nothing could be trained as asked; exit 2). Such a run reads no data and loads
no model: either may be gone since."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from fasttune.config import BaseConfig, TrainingConfig
from fasttune.config.naming import NAMES_OPTIONS
from fasttune.errors import ConfigError, FasttuneError, PeerFailed
from fasttune.model.resolve import merged_step
from fasttune.train.length import length_option
from fasttune.train.run import RunResult
from fasttune.train.run_dir import RunFolder

log = logging.getLogger("fasttune")


def nothing_to_train(cfg: BaseConfig, folder: RunFolder, latest: Path | None, saved: dict | None) -> RunResult | None:
    """A resumed run whose newest checkpoint is at (or past) its last step, known from its config.json and that
    checkpoint alone: said in one line, and its result; None: the run goes on (train/loop.py). --epochs other than
    the run's come to steps counted from the batched data: left to the loop, which counts them. A LoRA run whose
    adapter/ (and merged/) are not of that step goes on too: its end writes them."""
    if (left := _no_step_left(cfg, folder, latest, saved)) is None:
        return None
    t, step = left
    say_nothing_to_train(dataclasses.replace(cfg, training=t), folder, step, latest)
    merged = cfg.lora.enabled and cfg.lora.merge_on_save
    return RunResult(run_dir=folder.path, steps=step, checkpoint=latest, model_dir=folder.merged if merged else latest)


def _no_step_left(cfg: BaseConfig, folder: RunFolder, latest: Path | None,
                  saved: dict | None) -> tuple[TrainingConfig, int] | None:  # fmt: skip
    """(the run's length, its checkpoint's step) when nothing_to_train ends it; None: the run goes on."""
    if latest is None:
        return None
    t, step, was = cfg.training, int(saved["state"]["step"]), folder.saved_config().get("training", {})
    if t.epochs is not None:
        if t.epochs != was.get("epochs") or not isinstance(was.get("max_steps"), int):
            return None
        t = dataclasses.replace(t, max_steps=was["max_steps"])  # the steps its epochs came to (run_length checks)
    written = [folder.adapter, *([folder.merged] if cfg.lora.merge_on_save else [])] if cfg.lora.enabled else []
    if step < t.max_steps or any(merged_step(f) != step for f in written):  # adapter/ records its step as merged/
        return None
    return t, step


def own_model_gone(cfg: BaseConfig) -> bool:
    """--resume with the model folder the run recorded in its config.json, gone since (removed, or the project moved):
    a finished run loads no model, so train/loop.py resolves it only once the run has steps to train (refused there in
    resolve's one line). A --model given anew is not the run's: resolved at once (a typo refused)."""
    path = cfg.model.path
    if not (cfg.resume and path) or os.path.exists(path):
        return False
    recorded = RunFolder(cfg.run_dir).recorded_inputs().get("model.path", ())
    return any(Path(p).resolve() == Path(path).resolve() for p in recorded)


def is_finished(cfg: BaseConfig) -> bool:
    """--resume of `cfg` ends as nothing_to_train ends it (nothing said here): the run reads no data and loads no
    model, so the command line lets its data and model paths be gone. False where its newest checkpoint cannot be
    used (the resume says why)."""
    from fasttune.train.checkpoint import newest_usable

    folder = RunFolder(cfg.run_dir)
    try:
        return _no_step_left(cfg, folder, *newest_usable(folder)) is not None
    except FasttuneError:
        return False


def say_nothing_to_train(cfg: BaseConfig, folder: RunFolder, step: int, latest: Path | None,
                         main: bool = True) -> None:  # fmt: skip
    """The one line of a resumed run with no step left: complete (where its model is, how to train further), or past
    the length given: refused (ConfigError; on a torchrun rank but the first, `main` False, PeerFailed with its exit
    code: rank 0 says it)."""
    t = cfg.training
    if step > t.max_steps:  # e.g. a 3000-step run stopped at 106, resumed with --max-steps 30: not "complete"
        if not main:
            raise PeerFailed("rank 0 refused the resume (its error above)", exit_code=ConfigError.exit_code)
        raise ConfigError(_already_past(folder, t, step))
    final = f"its final checkpoint is {latest}"
    if cfg.lora.enabled:
        final += f", its adapter {folder.adapter}"
        if cfg.lora.merge_on_save:
            final += f", its merged model {folder.merged}"
    if t.epochs is None:
        further = "a larger --max-steps (or --epochs)"
    else:
        further = f"a larger --epochs (or --max-steps above {step})"
    log.info("the run in %s is already complete (step %d of %s); %s; to train further, resume with %s", folder, step,
             length_option(t), final, further, extra=NAMES_OPTIONS)  # fmt: skip


def _already_past(folder, t: TrainingConfig, step: int) -> str:
    """A resume whose length (`t`, as typed) ends before the step the run reached: why it is refused, in the option
    typed."""
    if t.epochs is None:
        past, fix = f"step {t.max_steps}", f"--max-steps above {step} (e.g. its original --max-steps)"
    else:
        past, fix = length_option(t), f"a larger --epochs (e.g. its original one) or --max-steps above {step}"
    return f"the run in {folder} is already past {past} (stopped at step {step}); to continue it, resume with {fix}"
