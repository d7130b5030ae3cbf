"""--data.val-path: a separate validation file (TRL's eval_dataset, Axolotl's test_datasets). Its records validate as
the same records held out of one combined file do, all of --data trains, and its content counts on --resume as the
training data's does."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from helpers import GSM8K, save_base_model, sft_config

from fasttune.cli import main
from fasttune.data.corpus import holdout
from fasttune.data.pipeline import build_data
from fasttune.errors import ConfigError
from fasttune.train import loop


def _split(tmp_path: Path) -> tuple[Path, Path]:
    """GSM8K's 20 records as the train file and the validation file val_fraction 0.3 of them makes, in order."""
    records = json.loads(GSM8K.read_text())
    train, held = holdout(records, [str(i) for i in range(len(records))], 0.3)
    (t := tmp_path / "train.json").write_text(json.dumps(train))
    (v := tmp_path / "val.json").write_text(json.dumps(held))
    return t, v


def _with_val(cfg, val: Path | str | None):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_path=None if val is None else str(val)))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_base_model(tmp_path_factory.mktemp("base") / "base")


def test_a_val_file_validates_as_the_same_records_held_out_of_one_file(base, tmp_path, caplog):
    """Reference: the combined file with val_fraction 0.3. The train file without those records plus --data.val-path
    of them gives the same samples (fingerprint), the same weights and the same val_loss at every evaluation (some
    records truncated, one left out of validation: the same max_length rules); every record of --data trains though
    val_fraction is 0.3."""
    caplog.set_level(logging.INFO, logger="fasttune")
    train, val = _split(tmp_path)
    kw = dict(val_fraction=0.3, max_length=320, max_steps=4, eval_every=2, eval_batches=1000, save_every=4)
    ref = loop.train(sft_config(tmp_path / "ref", base, GSM8K, **kw))
    cfg = _with_val(sft_config(tmp_path / "ours", base, train, **kw), val)
    ours = loop.train(cfg)
    vals = [[r["val_loss"] for r in res.records if r.get("val_loss") is not None] for res in (ref, ours)]
    assert len(vals[0]) == 3 and vals[1] == pytest.approx(vals[0], rel=1e-6)
    data = build_data(cfg)
    assert data.summary.fingerprint == build_data(sft_config(tmp_path / "ref", base, GSM8K, **kw)).summary.fingerprint
    whole = build_data(sft_config(tmp_path / "whole", base, train, **{**kw, "val_fraction": 0.0}))
    assert data.train == whole.train and len(data.val) == 5  # nothing held out of --data; 1 of 6 too long to keep
    said = [r.getMessage() for r in caplog.records]
    assert any(f"validation: the 6 records of --data.val-path {val}" in m for m in said), said


def test_resume_with_an_edited_val_file_is_refused_and_with_a_moved_one_goes_on(base, tmp_path, caplog):
    """An edited --data.val-path is refused as an edited --data is, and one moved or renamed goes on as a moved
    --data does: its content decides (was: another path refused however the same its content), the move is logged
    and the new path recorded in the run's config.json."""
    caplog.set_level(logging.INFO, logger="fasttune")
    train, val = _split(tmp_path)
    cfg = _with_val(sft_config(tmp_path, base, train, val_fraction=0.3, max_steps=2, save_every=2, eval_every=1), val)
    loop.train(cfg)
    resumed = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=3))
    records = json.loads(val.read_text())
    records[0]["output"] += " Done."
    (tmp_path / "moved").mkdir()
    val.rename(other := tmp_path / "moved" / "other.json")
    val.write_text(json.dumps(records))  # an edited file at the run's own path
    (edited := tmp_path / "edited.json").write_text(json.dumps(records))  # an edited copy elsewhere
    for changed in (val, edited):
        with pytest.raises(ConfigError, match=rf"not what this run trained on \(.* or --data.val-path {changed}: rec"):
            loop.train(_with_val(resumed, changed))
    assert loop.train(_with_val(resumed, other)).records[-1]["step"] == 3
    assert f"--resume: --data.val-path moved ({val} -> {other}); its content is the one this run" in caplog.text
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["val_path"] == [str(other)]


def test_an_epoch_is_the_training_files(base, tmp_path):
    """--epochs 1 with a val file trains the steps of --data alone (val_fraction 0), not of --data less 30%."""
    train, val = _split(tmp_path)
    kw = dict(val_fraction=0.3, epochs=1.0, eval_every=0, save_every=0, grad_accum=1, micro_batch_size=1)
    ours = loop.train(_with_val(sft_config(tmp_path / "ours", base, train, **kw), val))
    whole = loop.train(sft_config(tmp_path / "whole", base, train, **{**kw, "val_fraction": 0.0}))
    held = loop.train(sft_config(tmp_path / "held", base, train, **kw))
    assert ours.steps == whole.steps > held.steps


def _train(tmp_path: Path, base: Path, *args: str) -> list[str]:
    return ["train", "--experiment", "sft", "--model", str(base), "--max-steps", "1", "--output-dir",
            str(tmp_path / "run"), *args]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: p / "nope.jsonl", "{v}: no such file or folder; check --data.val-path"),
        (lambda p: (p / "empty.jsonl").write_text("") and None or p / "empty.jsonl",
         "{v}: no records found (empty file or folder); add data or point --data.val-path elsewhere"),
        (lambda p: (p / "bad.jsonl").write_text('{"text": 1\n') and None or p / "bad.jsonl",
         "{v} line 1: invalid JSON"),
        (lambda p: (p / "pc.jsonl").write_text('{"prompt": "a", "completion": "b"}\n') and None or p / "pc.jsonl",
         "--data.val-path {v}: its records are prompt_completion but --data {t}'s are alpaca; give a validation file"),
    ],
)  # fmt: skip
def test_a_bad_val_file_gets_one_line_naming_the_option(base, tmp_path, capsys, make, said):
    train, _ = _split(tmp_path)
    v = make(tmp_path)
    assert main([*_train(tmp_path, base, "--data", str(train)), "--data.val-path", str(v)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: " + said.format(v=v, t=train)), errors


@pytest.mark.parametrize(
    ("which", "said"),
    [
        ("val", "{v}: no such file or folder; check --data.val-path"),
        ("data", "{t}: no such file or folder; check --data"),
        ("val-unreadable", "{v}: permission denied, so the data cannot be read in full; make it readable (chmod -R "
                           "u+rX {v}) or point --data.val-path elsewhere"),
    ],
)  # fmt: skip
def test_a_missing_or_unreadable_path_is_refused_before_anything_is_loaded(base, tmp_path, capsys, monkeypatch,
                                                                            which, said):  # fmt: skip
    """As a missing --model is: before the run folder is locked, the tokenizer and model loaded, or all of --data read
    only for a missing validation file to stop the run, in the readers' own line."""
    from helpers import deny_file

    train, val = _split(tmp_path)
    if which == "val":
        val = tmp_path / "nope.json"
    elif which == "data":
        train = tmp_path / "nope.json"
    else:
        deny_file(monkeypatch, "open", val)

    def too_late(*args, **kwargs):
        raise AssertionError("the run folder was prepared before the data paths were checked")

    monkeypatch.setattr(loop.RunFolder, "prepare", too_late)
    assert main([*_train(tmp_path, base, "--data", str(train)), "--data.val-path", str(val)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: " + said.format(v=val, t=train)], errors


@pytest.mark.parametrize("case", ["same file", "file of the data folder", "other spelling"])
def test_a_val_file_that_data_trains_on_is_refused(base, tmp_path, capsys, case):
    """--data.val-path naming a file --data reads (a TRL eval_dataset copied from the train one) scored val_loss on
    the records the run trained on, with no word: refused in one line naming the file, before the run folder."""
    train, _ = _split(tmp_path)
    data, val = {"same file": (train, train), "file of the data folder": (tmp_path, train),
                 "other spelling": (train, tmp_path / "." / train.name)}[case]  # fmt: skip
    assert main([*_train(tmp_path / "out", base, "--data", str(data)), "--data.val-path", str(val)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --data.val-path {val}: {train} is also read by --data, so val_loss would score "
                      "records the run trains on; give validation records of their own, or drop --data.val-path to "
                      "hold out --data.val-fraction of --data"], errors  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_saved_datasets_test_split_validates_its_train_split(base, tmp_path):
    """The documented pairing: --data DIR (a save_to_disk DatasetDict: its train split trains) and --data.val-path
    DIR/test is no overlap; it validates as the same records in a file of their own do."""
    import datasets

    train, val = _split(tmp_path)
    splits = {"train": json.loads(train.read_text()), "test": json.loads(val.read_text())}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    cfg = _with_val(sft_config(tmp_path / "a", base, tmp_path / "dd"), tmp_path / "dd" / "test")
    loop.check_paths(cfg.data)  # no overlap: training's own check passes
    ours, ref = build_data(cfg), build_data(_with_val(sft_config(tmp_path / "b", base, train), val))
    assert (ours.train, ours.val) == (ref.train, ref.val) and len(ours.val) > 0


def test_a_val_file_without_data_is_refused(tmp_path, capsys):
    _, val = _split(tmp_path)
    argv = ["train", "--experiment", "quick", "--max-steps", "1", "--output-dir", str(tmp_path / "run"),
            "--data.val-path", str(val)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no --data is given (the embedded corpus); pass --data or drop --data.val-path" in err, err


def test_a_config_file_and_the_flag_set_the_same_val_file(tmp_path, monkeypatch):
    """`data: {val_path: ~/v.json}` in a --config file is --data.val-path, ~ the home folder as for data.path."""
    from fasttune import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    (f := tmp_path / "run.yaml").write_text("experiment: sft\ndata: {path: ~/t.json, val_path: ~/v.json}\n")
    got = cli.parse(["train", "--config", str(f)]).config.validate()
    flags = ["--experiment", "sft", "--data", str(tmp_path / "t.json"), "--data.val-path", str(tmp_path / "v.json")]
    assert got == cli.parse(["train", *flags]).config.validate()
    assert got.data.val_path == (str(tmp_path / "v.json"),)


def test_a_val_file_left_out_whole_by_max_length_is_said_with_its_fix(base, tmp_path, caplog):
    """Its every sample too long to keep: no val_loss, and the warning names the file, not val_fraction (which the
    warning blamed: 'no sample is held out (the data is too small to hold one out)')."""
    caplog.set_level(logging.INFO, logger="fasttune")
    train, _ = _split(tmp_path)
    (val := tmp_path / "long.json").write_text(json.dumps([{"instruction": "x " * 400, "input": "", "output": "y"}]))
    result = loop.train(_with_val(sft_config(tmp_path, base, train, max_steps=1, eval_every=1, save_every=0), val))
    assert all(r.get("val_loss") is None for r in result.records)
    assert (
        f"no validation: every sample of --data.val-path {val} was left out (too long for --data.max-length"
        in caplog.text
        and "raise --data.max-length or fix the validation file" in caplog.text
    )


def test_a_val_folder_whose_name_holds_the_flag_is_named_as_it_is(tmp_path):
    """The readers' messages name --data.val-path themselves: its path is never rewritten (a folder `my--data` was
    named `my--data.val-path`, when --data in the readers' messages was replaced by the option afterwards)."""
    from fasttune.data.formats import load_records
    from fasttune.errors import DataError

    (folder := tmp_path / "my--data").mkdir()
    (folder / "a.jsonl").write_text('{"text": "a"}\n')
    (folder / "b.txt").write_text("b")
    with pytest.raises(DataError) as e:
        load_records(str(folder), flag="--data.val-path")
    assert str(e.value) == (f"{folder}: folder mixes data files (a.jsonl) and text files (b.txt); point "
                            "--data.val-path at one file or keep one kind per folder")  # fmt: skip


def test_the_data_summary_counts_the_overlong_validation_samples_on_a_line_of_their_own(base, tmp_path):
    """The overlong line counts the training split's samples; the validation split's (held out of --data, or
    --data.val-path) get their own line, with the counts its records give read as training data (the reference)."""
    train, val = _split(tmp_path)
    kw = dict(val_fraction=0.0, max_length=240)

    def overlong(cfg) -> list[str]:
        return [line for line in build_data(cfg).summary.lines() if line.startswith("  overlong")]

    (as_train,) = overlong(sft_config(tmp_path / "t", base, train, **kw))
    (as_val,) = overlong(sft_config(tmp_path / "v", base, val, **kw))
    assert "1 truncated (" in as_val  # some validation sample is cut
    as_val = as_val.replace("overlong samples", "overlong validation samples").replace("trained)", "scored)")
    expected = [as_train.replace("overlong samples", "overlong training samples"), as_val]
    assert overlong(_with_val(sft_config(tmp_path / "f", base, train, **kw), val)) == expected
    assert overlong(sft_config(tmp_path / "h", base, GSM8K, **{**kw, "val_fraction": 0.3})) == expected  # held out
