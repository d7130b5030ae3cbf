"""A run's health checks survive a crash and --resume: the recent healthy losses an exploding loss is measured
against are part of the checkpoint's trainer state, so the resumed run decides as the uninterrupted one did."""

import dataclasses

import pytest
import torch
from helpers import losses, tiny_config

from fasttune.errors import FasttuneError
from fasttune.train import checkpoint, loop, run
from fasttune.train.checkpoint import list_checkpoints

SPIKES = (4, 7)
"""Steps whose reported loss is 1e6 x its real value (an exploding loss: the update itself is the real one)."""
REAL_UPDATE = run.Run._update


def _spike(monkeypatch, crash_at: int | None = None):
    """Steps in SPIKES report an exploding loss; with `crash_at`, that step's forward+backward raises."""

    def update(self, micro):
        step = self.state.step + 1
        if step == crash_at:
            raise RuntimeError("simulated crash")
        reading, tokens, targets = REAL_UPDATE(self, micro)
        if step in SPIKES:
            reading.host = reading.host * torch.tensor([1e6, 1.0], dtype=reading.host.dtype)
        return reading, tokens, targets

    monkeypatch.setattr(run.Run, "_update", update)


def _config(tmp_path):
    return tiny_config(tmp_path, max_steps=9, max_bad_steps=1)  # checkpoints at 3, 6, 9


def test_a_resumed_run_makes_the_health_decisions_of_the_uninterrupted_one(tmp_path, monkeypatch, caplog):
    """Spikes at steps 4 and 7 with --training.max-bad-steps 1: the uninterrupted run stops at step 7. Crashed at
    step 5 and resumed from step 3, the run forgot the losses of steps 1-3: with fewer than 3 recent losses nothing
    counts as exploding, so step 4's spike passed unseen and the resumed run trained all 9 steps."""
    _spike(monkeypatch)
    straight = _config(tmp_path / "straight")
    with pytest.raises(FasttuneError, match="stopped at step 7: 2 unhealthy steps.*exploding") as want:
        loop.train(straight)
    cfg = _config(tmp_path / "resumed")
    _spike(monkeypatch, crash_at=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000003"]
    _spike(monkeypatch)
    with pytest.raises(FasttuneError, match="stopped at step 7") as got:
        loop.train(dataclasses.replace(cfg, resume=True))
    assert str(got.value).replace(str(cfg.run_dir), "") == str(want.value).replace(str(straight.run_dir), "")
    assert _metrics(cfg.run_dir) == _metrics(straight.run_dir)  # bit-identical on CPU
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000003", "step-000006"]


def _metrics(run_dir):
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return losses(records), {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}


def test_a_checkpoint_without_a_loss_history_still_resumes(tmp_path):
    """Checkpoints written before the history was saved resume as before: with an empty history."""
    cfg = tiny_config(tmp_path, max_steps=3)
    loop.train(cfg)
    ckpt = list_checkpoints(cfg.run_dir)[-1]
    state = checkpoint.load_trainer_state(ckpt)
    assert len(state["state"].pop("loss_history")) == 3  # what this fasttune saves
    torch.save(state, ckpt / checkpoint.STATE_FILE)
    longer = dataclasses.replace(cfg.training, max_steps=4)
    result = loop.train(dataclasses.replace(cfg, resume=True, training=longer))
    assert sorted(losses(result.records)) == [1, 2, 3, 4]
