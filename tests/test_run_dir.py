"""Run directories: --overwrite clears only fasttune's files and only after every check passed; --resume refuses
options that would change the run; a torn metrics line does not stop a resume; a double save stays atomic."""

import dataclasses

import pytest
from helpers import losses, tiny_config

from fasttune.errors import ConfigError, DataError
from fasttune.train import checkpoint, loop


@pytest.fixture
def finished(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=3, save_every=3, eval_every=0)
    return cfg, loop.train(cfg)


def test_overwrite_with_bad_data_keeps_the_old_run(finished, tmp_path):
    cfg, result = finished
    bad = dataclasses.replace(cfg, overwrite=True, data=dataclasses.replace(cfg.data, path=str(tmp_path / "nope")))
    with pytest.raises(DataError):
        loop.train(bad)
    assert checkpoint.list_checkpoints(result.run_dir)  # nothing deleted before the checks passed


def test_overwrite_without_disk_space_keeps_the_old_run(finished, monkeypatch):
    """The disk check runs before --overwrite clears anything."""
    import shutil

    from fasttune.errors import FasttuneError

    cfg, result = finished
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(FasttuneError, match="free"):
        loop.train(dataclasses.replace(cfg, overwrite=True))
    assert checkpoint.list_checkpoints(result.run_dir) and (result.run_dir / "metrics.jsonl").is_file()


def test_overwrite_replaces_run_but_keeps_user_files(finished):
    cfg, result = finished
    (result.run_dir / "notes.txt").write_text("mine")
    again = loop.train(dataclasses.replace(cfg, overwrite=True))
    assert (result.run_dir / "notes.txt").read_text() == "mine"
    assert losses(again.records) == losses(result.records)


def test_folder_of_someone_elses_files_is_never_used(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = dataclasses.replace(tiny_config(tmp_path), output_dir=str(folder), overwrite=True)
    with pytest.raises(ConfigError, match="holds files that fasttune did not write"):
        loop.train(cfg)
    assert (folder / "config.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("data", "max_documents", 30), ("data", "packing", False), ("model", "preset", "tiny"), (None, "seed", 5)],
)
def test_resume_refuses_changed_options(finished, section, field, value):
    cfg, _ = finished
    if section:
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
    else:
        changed = dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ConfigError, match=f"--resume: {section + '.' if section else ''}{field} is"):
        loop.train(dataclasses.replace(changed, resume=True))


def test_resume_may_extend_max_steps_and_survives_a_torn_metrics_line(finished):
    cfg, result = finished
    with (result.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # what a kill -9 in the middle of a write leaves
    longer = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=5))
    resumed = loop.train(longer)
    assert sorted(losses(resumed.records)) == [1, 2, 3, 4, 5]


def test_saving_the_same_step_twice_never_leaves_it_missing(finished, monkeypatch):
    _, result = finished
    ckpt = result.checkpoint
    calls = []
    real_rename = checkpoint.os.rename

    def spy(src, dst):
        calls.append((str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", spy)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    state = checkpoint.load_trainer_state(ckpt)
    checkpoint.save_checkpoint(result.run_dir, 3, model, tok, {k: state[k] for k in state if k != "rng"}, 2)
    # the complete old folder is moved aside before the new one takes its name: never a moment without step-3
    assert calls[0][0].endswith("step-000003") and ".old-step-000003" in calls[0][1]
    assert [p.name for p in checkpoint.list_checkpoints(result.run_dir)] == ["step-000003"]
