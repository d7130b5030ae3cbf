"""A damaged newest checkpoint (truncated weights, a lost shard, a garbage or missing trainer state): --resume and
run folders given to generate/eval fall back to the previous complete one, naming the file; with none usable, one
line. Reference: the uninterrupted run's losses."""

import dataclasses
import json
import logging
import os
import shutil

import pytest
from helpers import losses

from fasttune.errors import FasttuneError
from fasttune.model.resolve import latest_checkpoint
from fasttune.train import checkpoint, loop


def _damage(ckpt, how: str) -> str:
    if how == "truncated weights":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return "model.safetensors is truncated or damaged"
    if how == "missing shard":  # the weights as save_pretrained shards a large model, one shard lost
        return _shard_and_lose_one(ckpt)
    if how == "garbage trainer state":
        (ckpt / "trainer_state.pt").write_bytes(os.urandom(512))
        return "trainer_state.pt is damaged"
    (ckpt / "trainer_state.pt").unlink()
    return "trainer_state.pt is missing"


def _shard_and_lose_one(ckpt) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors is missing"


@pytest.mark.parametrize(
    "how", ["truncated weights", "missing shard", "garbage trainer state", "missing trainer state"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, how, caplog):
    caplog.set_level(logging.INFO, logger="fasttune")
    cfg, result = two_checkpoints
    expected = _damage(result.checkpoint, how)
    if "weights" in how or "shard" in how:  # generate/eval --checkpoint RUN skip it too
        assert latest_checkpoint(result.run_dir) == result.checkpoint.parent / "step-000002"
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=5))
    resumed = loop.train(more)
    assert f"skipping a damaged checkpoint: {result.checkpoint / expected.split()[0]}" in caplog.text
    assert "resumed from" in caplog.text and "step-000002 (step 2)" in caplog.text
    got, want = losses(resumed.records), losses(result.records)
    assert sorted(got) == [1, 2, 3, 4, 5]
    # steps 3 and 4 ran again from step 2's state; their learning rates do not depend on max_steps (the cosine
    # starts at step 3), so they repeat the first run exactly
    assert (got[3], got[4]) == (want[3], want[4])


def test_no_usable_checkpoint_is_one_line_naming_the_file_and_never_unsafe_advice(two_checkpoints):
    cfg, result = two_checkpoints
    for ckpt in checkpoint.list_checkpoints(result.run_dir):
        _damage(ckpt, "garbage trainer state")
    with pytest.raises(FasttuneError) as e:
        loop.train(dataclasses.replace(cfg, resume=True))
    msg = str(e.value)
    assert "\n" not in msg and "step-000004/trainer_state.pt is damaged" in msg and "--overwrite" in msg
    assert "weights_only" not in msg


@pytest.mark.parametrize("how", ["missing", "garbage"])
def test_a_lost_run_config_names_a_way_on_that_keeps_the_checkpoints(two_checkpoints, how):
    """A run whose config.json is gone or garbled: the only way out said was --overwrite, which deletes the
    checkpoints that are intact; a new run from the newest keeps the training done."""
    cfg, result = two_checkpoints
    config = result.run_dir / "config.json"
    config.unlink() if how == "missing" else config.write_text("{")
    with pytest.raises(FasttuneError) as e:
        loop.train(dataclasses.replace(cfg, resume=True))
    msg = str(e.value)
    newest = result.run_dir / "checkpoints" / "step-000004"
    assert msg.startswith(f"--resume: cannot read {config} (") and "\n" not in msg
    assert msg.endswith(f"which holds the run's options; to train on from its newest checkpoint, start a new run with "
                        f"--model {newest} and another --output-dir, or start over with --overwrite (which deletes "
                        "its checkpoints)")  # fmt: skip
    assert checkpoint.list_checkpoints(result.run_dir)[-1] == newest


@pytest.mark.parametrize("how", ["missing", "garbage"])
def test_a_lost_run_config_names_the_way_on_from_the_command_line_too(two_checkpoints, how, tmp_path, capsys):
    """`fasttune train --output-dir RUN --resume` reads the run's config.json as its options before the run folder
    is checked: a garbled one was 'JSON syntax error' alone, without the way on that keeps the checkpoints."""
    from fasttune.cli import main

    _, result = two_checkpoints
    run = tmp_path / "copy"
    shutil.copytree(result.run_dir, run)
    config = run / "config.json"
    config.unlink() if how == "missing" else config.write_text("{")
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: cannot read {config} (") and err.count("\n") == 1, err
    assert f"start a new run with --model {run / 'checkpoints' / 'step-000004'} and another --output-dir" in err


def test_a_run_folder_given_to_generate_skips_a_damaged_newest_checkpoint(two_checkpoints, caplog):
    """generate/eval/--model take a run folder's newest checkpoint whose weights load, as --resume does, naming the
    one skipped (the weights are checked by their headers, not loaded)."""
    from fasttune.model.resolve import resolve

    _, result = two_checkpoints
    _damage(result.checkpoint, "truncated weights")
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        src = resolve(result.run_dir)
    assert src.model_dir.name == "step-000002"
    assert f"skipping a damaged checkpoint: {result.checkpoint / 'model.safetensors'}" in caplog.text
