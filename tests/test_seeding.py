"""Seeding: a run seeds Python's `random`, numpy and torch from --seed (checkpoint.seed_rng), and a resumed run
restores all three from its checkpoint, so what the steps draw is what an uninterrupted run draws."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from helpers import tiny_config

from fasttune.train import loop
from fasttune.train.checkpoint import seed_rng
from fasttune.train.run import Run


def _draws() -> tuple:
    return random.random(), float(np.random.random()), float(torch.rand(()))


@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 5, 2**64 - 1, -(2**63)])
def test_seed_rng_seeds_all_three_generators_for_any_valid_seed(seed):
    seed_rng(seed)
    first = _draws()
    random.random(), np.random.random(), torch.rand(())  # moved on
    seed_rng(seed)
    assert _draws() == first


@pytest.fixture
def drawing_steps(monkeypatch):
    """Each step draws from the three generators before it trains (as dropout or an augmentation would): {step: draws}
    of the steps run since the fixture was set up."""
    drawn: dict[int, tuple] = {}
    step = Run.step

    def drawing(self):
        drawn[self.state.step + 1] = _draws()
        return step(self)

    monkeypatch.setattr(Run, "step", drawing)
    return drawn


def test_a_resumed_run_draws_what_an_uninterrupted_run_draws(tmp_path, drawing_steps):
    kw = dict(max_steps=4, eval_every=0, save_every=2, warmup_steps=0)
    loop.train(tiny_config(tmp_path / "whole", **kw))
    whole = dict(drawing_steps)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # whatever the process drew in between
    drawing_steps.clear()
    cfg = tiny_config(tmp_path / "halves", **{**kw, "max_steps": 2})
    loop.train(cfg)
    assert drawing_steps == {k: whole[k] for k in (1, 2)}  # a fresh run: every generator seeded from --seed
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    training = dataclasses.replace(cfg.training, max_steps=4)
    loop.train(dataclasses.replace(cfg, resume=True, training=training))
    assert drawing_steps == whole  # steps 3 and 4 resumed from the checkpoint's generator states
