"""The disk check before training counts what the saves really hold at their fullest: measured during real runs
(every complete step-N folder and the one being written, at the moment before it is renamed into place)."""

import pytest
import torch
from helpers import tiny_config

from fasttune.errors import FasttuneError
from fasttune.train import checkpoint, footprint, loop, run

REAL_UPDATE = run.Run._update


def _measure(monkeypatch) -> dict:
    """Spy on the run: `counted` is the number of new checkpoints the disk check counted, `peak` the most step-N
    folders (complete or being written) that were in checkpoints/ at once."""
    seen = {"counted": None, "peak": 0}
    real_needed, real_write = footprint.bytes_needed, checkpoint.write_folder

    def bytes_needed(per_ckpt, merged, new):
        seen["counted"] = new
        return real_needed(per_ckpt, merged, new)

    def write_folder(final, write, what, fix):
        def counted(tmp):
            write(tmp)
            held = [p for p in final.parent.iterdir() if p.name.startswith(("step-", ".tmp-step-"))]
            seen["peak"] = max(seen["peak"], len(held))

        real_write(final, counted, what, fix)

    monkeypatch.setattr(footprint, "bytes_needed", bytes_needed)
    monkeypatch.setattr(checkpoint, "write_folder", write_folder)
    return seen


def test_a_healthy_run_holds_keep_last_plus_the_one_being_written(tmp_path, monkeypatch):
    seen = _measure(monkeypatch)
    loop.train(tiny_config(tmp_path, max_steps=5, save_every=1, keep_last=2, eval_every=0, max_bad_steps=1))
    assert seen["peak"] == 3 == seen["counted"]


def test_a_diverging_run_also_holds_the_last_healthy_checkpoint(tmp_path, monkeypatch):
    """Exploding losses at steps 4 and 5 (keep_last 1, max_bad_steps 2): step 5 is written while step 4 (the newest)
    and step 3 (the last healthy one, which pruning keeps) are on disk: three at once. The check counted two."""

    def update(self, micro):
        reading, tokens, targets = REAL_UPDATE(self, micro)
        if self.state.step + 1 >= 4:
            reading.host = reading.host * torch.tensor([1e6, 1.0], dtype=reading.host.dtype)
        return reading, tokens, targets

    monkeypatch.setattr(run.Run, "_update", update)
    seen = _measure(monkeypatch)
    with pytest.raises(FasttuneError, match="stopped at step 6"):
        loop.train(tiny_config(tmp_path, max_steps=8, save_every=1, keep_last=1, eval_every=0, max_bad_steps=2))
    assert seen["peak"] == 3 == seen["counted"]
