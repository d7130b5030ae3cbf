"""The run's length: `training.max_steps`, or with `training.epochs` the steps that many passes over the training
data take, counted from the micro-batches the loop trains (Batcher.plan, the same plan DataStream steps through) and
the micro-batches each optimizer step takes (`micro_batches_per_step`, what Run.step draws)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from fractions import Fraction

from fasttune.config import BaseConfig, TrainingConfig
from fasttune.data.packing import Batcher
from fasttune.data.sample import Sample
from fasttune.errors import ConfigError
from fasttune.words import count

log = logging.getLogger("fasttune")


def micro_batches_per_step(grad_accum: int, world: int) -> int:
    """The micro-batches of one optimizer step, over all ranks: each rank trains grad_accum of them."""
    return grad_accum * world


def steps_per_epoch(batcher: Batcher, samples: Sequence[Sample], per_step: int) -> Fraction:
    """Optimizer steps in one pass over `samples`: the micro-batches of an epoch's plan (their number is the same in
    every epoch: packing and grouping depend on the lengths alone, the seed only orders them) over `per_step`. Not
    always whole: a step then takes the rest of one epoch and the start of the next, as DataStream.next does."""
    return Fraction(len(batcher.plan([len(s) for s in samples], epoch=0)), per_step)


def epochs_to_steps(epochs: float, per_epoch: Fraction) -> int:
    """ceil(epochs x per_epoch), exactly (0.1 x 30 is 3 steps, not the 4 of a float product): the fewest steps that
    pass over every sample `epochs` times."""
    return max(1, math.ceil(Fraction(repr(float(epochs))) * per_epoch))


def _number(x: Fraction | float) -> str:
    return f"{float(x):.4g}"


def epochs(n: Fraction | float) -> str:
    """The count of epochs in words: 1 epoch, 2.5 epochs."""
    return count(n, "epoch", shown=_number(n))


def length_option(t: TrainingConfig) -> str:
    """The option that set the run's length, by its key: "training.max_steps=40", "training.epochs=2 (26 steps)"; the
    CLI names it as the user gave it (`--max-steps=40`, `training.epochs: 2 in run.yaml`: config/naming.py), in an
    error, a warning, or an info line logged with `extra=NAMES_OPTIONS`."""
    if t.epochs is None:
        return f"training.max_steps={t.max_steps}"
    return f"training.epochs={_number(t.epochs)} ({count(t.max_steps, 'step')})"


def run_length(cfg: BaseConfig, samples: Sequence[Sample], batcher: Batcher, world: int,
               saved: dict | None = None) -> BaseConfig:  # fmt: skip
    """`cfg` with training.max_steps = the steps of training.epochs (unchanged without epochs), said in one line.
    `saved`: the resumed run's config.json; with the epochs it was started with, the total must come out as the one
    it recorded (else the schedule and the steps left would silently change): a different one is refused."""
    t = cfg.training
    if t.epochs is None:
        return cfg
    per_step = micro_batches_per_step(t.grad_accum, world)
    per_epoch = steps_per_epoch(batcher, samples, per_step)
    total = epochs_to_steps(t.epochs, per_epoch)
    was = (saved or {}).get("training", {})
    if was.get("epochs") == t.epochs and was.get("max_steps") not in (None, total):
        raise ConfigError(
            f"--resume: {epochs(t.epochs)} {'is' if t.epochs == 1 else 'are'} {count(total, 'step')} now "
            f"({_number(per_epoch)} per epoch at {count(world, 'rank')} x grad_accum {t.grad_accum}) but the run was "
            f"started as {count(was['max_steps'], 'step')}; "
            f"resume with the ranks x --training.grad-accum it had, or pass --max-steps {was['max_steps']} to keep "
            "its length"
        )
    micro = count(per_epoch * per_step, "micro-batch", "micro-batches")
    how = "" if per_epoch.denominator == 1 else f": {micro}, {per_step} per step"
    log.info("%s = %s (%s per epoch%s)", epochs(t.epochs), count(total, "step"), _number(per_epoch), how)
    return dataclasses.replace(cfg, training=dataclasses.replace(t, max_steps=total))
