"""What --data points at: a path that is missing, several files or a pattern in one path, a folder that mixes
files, holds several splits or cannot be read in full, a model or run folder. Each is one DataError line naming the
path and the fix; a Hugging Face dataset folder is read. The user's files are never changed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers import FIXTURES, deny, error_for

from fasttune.data.formats import load_paths, load_records
from fasttune.errors import DataError

pytestmark = pytest.mark.usefixtures("fixtures_unchanged")


def test_empty_folder(tmp_path):
    assert "folder has no text" in error_for(tmp_path)


def test_nonexistent_path():
    message = error_for("does/not/exist.jsonl")
    assert "does/not/exist.jsonl: no such file or folder" in message
    assert message.endswith("check --data") and "--data.path" not in message  # eval has only --data


def test_several_files_in_one_data_option_say_how_to_give_them(tmp_path):
    """HF datasets' data_files takes a list or a glob; --data takes several paths (tests/test_data_paths.py). A comma
    list and a quoted pattern were 'no such file'; each says how to give the files, and the paths it names read both
    files' records in order."""
    lines = (FIXTURES / "alpaca.jsonl").read_text().splitlines(keepends=True)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.jsonl").write_text("".join(lines[:2]))
    (parts / "b.jsonl").write_text("".join(lines[2:]))
    a, b = str(parts / "a.jsonl"), str(parts / "b.jsonl")
    assert error_for(f"{a},{b}").endswith(f"; --data takes several paths one after the other, not joined by commas: "
                                          f"--data {a} {b}")  # fmt: skip
    pattern = str(parts / "*.jsonl")
    assert error_for(pattern).endswith(f"; --data takes paths, not patterns: leave the pattern unquoted for the shell "
                                       f"to expand (--data {pattern}), or pass the folder")  # fmt: skip
    assert load_paths([a, b]) == load_records(str(parts)) == ([json.loads(line) for line in lines], "alpaca")
    for missing in (parts / "data[1].jsonl", parts / "*.parquet"):  # a file's name, or a pattern matching nothing
        assert error_for(str(missing)) == f"{missing}: no such file or folder; check --data"


def test_mixed_folder(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    assert "folder mixes data files (b.jsonl) and text files (a.txt)" in error_for(tmp_path)


def test_an_empty_file_of_a_data_folder_is_named_in_the_log(tmp_path, caplog):
    """An empty file named as --data is refused; one in a folder beside others (a shard an export left empty) was
    left out without a word. It still is (the others train), and the log names it."""
    caplog.set_level(logging.INFO, logger="fasttune")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "c.jsonl").write_text("\n")
    assert load_records(str(tmp_path)) == ([{"text": "x"}], "text")
    assert (f"{tmp_path}: 2 of its 3 files hold no records and are left out: {tmp_path / 'b.jsonl'}, "
            f"{tmp_path / 'c.jsonl'}") in caplog.text  # fmt: skip
    caplog.clear()
    load_records(str(tmp_path / "a.jsonl"))
    assert "no records" not in caplog.text


def test_a_hugging_face_dataset_folder_is_read_without_its_dataset_card(tmp_path):
    """A dataset repository as downloaded (README.md, data/train-00000-of-00001.parquet) was refused as a folder that
    mixes data and text files; the card is skipped as `datasets` skips it, another text file is still refused."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# my data set\n")
    (tmp_path / ".gitattributes").write_text("*.parquet filter=lfs\n")
    assert load_records(str(tmp_path)) == ([{"text": "x"}, {"text": "y"}], "text")
    (tmp_path / "notes.md").write_text("mine")
    assert "folder mixes data files (train-00000-of-00001.jsonl) and text files (notes.md)" in error_for(tmp_path)


def test_a_folder_with_a_held_out_split_is_refused_naming_the_files(tmp_path):
    """train.jsonl beside test.jsonl (or HF's data/train-00000-of-00001.parquet beside test-...) was read as one data
    set: the test records were trained on (and `fasttune eval --data` of the folder scored training records). The fix
    for training's --data keeps both splits (test_a_folder_of_splits_names_the_fix_that_trains_on_one_and_validates_on
    _the_other); eval's --data and --data.val-path are pointed at the held-out split's file."""
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy(FIXTURES / "alpaca.jsonl", tmp_path / name)
    message = error_for(tmp_path)
    assert "several splits: test (test.jsonl), train (train.jsonl)" in message
    for flag in ("--data", "--data.val-path"):  # eval's --data, training's --data.val-path: the split scored
        with pytest.raises(DataError) as info:
            load_records(str(tmp_path), split=None, flag=flag)
        assert str(info.value).endswith(f"point {flag} at one split's file (e.g. {tmp_path / 'test.jsonl'}) or keep "
                                        "each split in its own folder")  # fmt: skip
    assert load_records(str(tmp_path / "train.jsonl"))[1] == "alpaca"  # the fix it names works
    (tmp_path / "test.jsonl").unlink()
    shutil.copy(FIXTURES / "alpaca.jsonl", tmp_path / "more.jsonl")  # shards of no held-out split still read
    assert len(load_records(str(tmp_path))[0]) == 6
    repo = tmp_path / "repo"  # a Hugging Face dataset repository: its card beside data/ shards
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("# card\n")
    for name in ("test-00000-of-00001.jsonl", "train-00000-of-00001.jsonl"):
        shutil.copy(FIXTURES / "alpaca.jsonl", repo / "data" / name)
    assert f"--data {repo / 'data' / 'train-00000-of-00001.jsonl'} --data.val-path" in error_for(repo)  # not "mixes"
    shards = [repo / "data" / f"train-0000{i}-of-00005.jsonl" for i in range(1, 5)]
    shutil.copy(FIXTURES / "alpaca.jsonl", shards[0])  # a sharded train split: one of its files alone would train
    message = error_for(repo)  # on part of it
    assert "train (2 files: data/train-00000-of-00001.jsonl, ...)" in message and "e.g." not in message
    assert message.endswith(f"to train on the train split and validate on the test split, pass --data "
                            f"{repo / 'data' / 'train-00000-of-00001.jsonl'} {shards[0]} --data.val-path "
                            f"{repo / 'data' / 'test-00000-of-00001.jsonl'}")  # fmt: skip
    train = [str(repo / "data" / "train-00000-of-00001.jsonl"), str(shards[0])]  # the fix named reads both
    assert load_paths(train)[0] == load_records(str(FIXTURES / "alpaca.jsonl"))[0] * 2
    for shard in shards[1:]:  # many shards: counted, not listed
        shutil.copy(FIXTURES / "alpaca.jsonl", shard)
    assert error_for(repo).endswith("pass the 5 files of the train split as --data and the 1 of the test split as "
                                    "--data.val-path (each takes several paths)")  # fmt: skip
    with pytest.raises(DataError) as info:
        load_records(str(repo), split=None)
    assert str(info.value).endswith(
        "point --data at one split's file (e.g. "
        f"{repo / 'data' / 'test-00000-of-00001.jsonl'}) or keep each split in its own folder"
    )


def test_a_folder_of_splits_names_the_fix_that_trains_on_one_and_validates_on_the_other(tmp_path, capsys):
    """A folder of train.jsonl and validation.jsonl given as --data was refused with "point --data at one split's
    file": the validation split was lost. The message names --data and --data.val-path, and the command it names
    trains on the one and validates on the other."""
    from fasttune.cli import main

    records = [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(12)]
    (folder := tmp_path / "ds").mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:9]))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[9:]))
    run = ["--max-steps", "1", "--output-dir", str(tmp_path / "run"), "--data.tokenizer-vocab-size", "300",
           "--data.cache-dir", str(tmp_path / "cache"), "--model.preset", "micro"]  # fmt: skip
    assert main(["train", "--data", str(folder), *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    fix = f"pass --data {folder / 'train.jsonl'} --data.val-path {folder / 'validation.jsonl'}"
    assert len(err) == 1 and err[0].endswith(f"to train on train.jsonl and validate on validation.jsonl, {fix}"), err
    assert main(["train", *fix.split()[1:], *run]) == 0
    out = capsys.readouterr().err
    assert "samples: 9 train, 3 validation" in out and "validation: the 3 records of --data.val-path" in out, out


def test_a_data_folder_that_cannot_be_listed_is_one_line_naming_it(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "alpaca.jsonl", data / "a.jsonl")
    deny(monkeypatch, data)
    message = error_for(data)
    assert message.startswith(f"{data}: permission denied") and f"chmod -R u+rX {data}" in message


def test_an_unreadable_subfolder_is_an_error_not_data_silently_left_out(tmp_path, monkeypatch):
    """Path.rglob skipped a subfolder it could not list: the run trained on half the data without a word."""
    for sub in ("a", "b", ".hidden"):
        (tmp_path / sub).mkdir()
        shutil.copy(FIXTURES / "alpaca.jsonl", tmp_path / sub / "data.jsonl")
    deny(monkeypatch, tmp_path / ".hidden")  # hidden folders are never read, so never refused
    assert len(load_records(str(tmp_path))[0]) == 2 * len(load_records(str(FIXTURES / "alpaca.jsonl"))[0])
    deny(monkeypatch, tmp_path / "b")
    message = error_for(tmp_path)
    assert message.startswith(f"{tmp_path / 'b'}: permission denied") and f"chmod -R u+rX {tmp_path}" in message


def test_a_data_file_in_a_folder_that_cannot_be_looked_into_is_one_line(tmp_path, monkeypatch):
    deny(monkeypatch, tmp_path / "locked")
    (tmp_path / "locked").mkdir()
    message = error_for(tmp_path / "locked" / "a.jsonl")
    assert message.startswith(f"{tmp_path / 'locked' / 'a.jsonl'}: permission denied")
    assert f"(chmod -R u+rX {tmp_path / 'locked'})" in message


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_an_unreadable_file_of_a_data_folder_is_a_permission_problem_naming_the_option(tmp_path, monkeypatch, suffix):
    """A file of a --data.val-path folder the user may not read: pyarrow's PermissionError was 'not a readable Parquet
    file ...; re-export it', a .jsonl's 'cannot read', neither naming the option; now the readers' permission line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in (FIXTURES / "alpaca.jsonl").read_text().splitlines()]
    data = tmp_path / "val"
    data.mkdir()
    for name in ("a", "b"):
        if suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(records), data / f"{name}.parquet")
        else:
            shutil.copy(FIXTURES / "alpaca.jsonl", data / f"{name}.jsonl")
    denied, read_table, read_bytes = data / f"b{suffix}", pq.read_table, Path.read_bytes

    def fake_read_table(path, *args, **kwargs):  # pyarrow raises OSError(errno, message): a PermissionError, no file
        if Path(path) == denied:
            raise OSError(13, f"Failed to open local file '{path}'. Detail: [errno 13] Permission denied")
        return read_table(path, *args, **kwargs)

    def fake_read_bytes(self):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pq, "read_table", fake_read_table)
    monkeypatch.setattr(Path, "read_bytes", fake_read_bytes)
    with pytest.raises(DataError) as info:
        load_records(str(data), flag="--data.val-path")
    assert str(info.value) == (f"{denied}: permission denied, so the data cannot be read in full; make it readable "
                               f"(chmod -R u+rX {data}) or point --data.val-path elsewhere")  # fmt: skip


def test_a_model_or_run_folder_given_as_data_is_named_as_such(tmp_path):
    """--data at a model folder (or a run's) read its config.json and tokenizer.json as records and said "cannot tell
    the data format from its keys (architectures, ...); rename the fields": fields of no data."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"")
    assert error_for(model) == (
        f"{model} is a model folder (config.json and weights: model.safetensors), not data; point --data at your data "
        "file or folder"
    )
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".fasttune-run").write_text("")
    (run / "config.json").write_text("{}")
    assert error_for(run) == (
        f"{run} is a fasttune run folder, not data; point --data at your data file or folder (its "
        f"{run / 'config.json'} names the data the run trained on)"
    )
