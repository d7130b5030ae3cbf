"""Reading every supported input kind and detecting its format."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasttune.data.formats import load_records
from fasttune.errors import DataError


@pytest.mark.parametrize(
    "name, fmt, count",
    [
        ("alpaca.jsonl", "alpaca", 3),
        ("alpaca_lines.json", "alpaca", 3),
        ("alpaca.csv", "alpaca", 2),
        ("prompt_completion.jsonl", "prompt_completion", 2),
        ("chat.jsonl", "chat", 2),
        ("text.jsonl", "text", 2),
        ("gsm8k_alpaca_20.json", "alpaca", 20),
    ],
)
def test_detects_format(name, fmt, count):
    records, detected = load_records(str(FIXTURES / name))
    assert (detected, len(records)) == (fmt, count)


def test_csv_keeps_strings_and_multiline_cells():
    records, _ = load_records(str(FIXTURES / "alpaca.csv"))
    assert records[0] == {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert records[1]["instruction"] == "Multi\nline" and records[1]["output"] == "Answer, with comma"


def test_text_folder_one_record_per_file():
    records, fmt = load_records(str(FIXTURES / "text_folder"))
    # sorted paths; whitespace-only empty.txt skipped, ignored.bin not a text type
    assert fmt == "text"
    assert [r["text"] for r in records] == [
        "Plain text file one.\n",
        "# Markdown\n\nSecond file.\n",
        "def f():\n    return 1\n",
    ]


def test_single_text_file():
    records, fmt = load_records(str(FIXTURES / "text_folder" / "sub" / "c.py"))
    assert (records, fmt) == ([{"text": "def f():\n    return 1\n"}], "text")


def test_named_format_overrides_detection(tmp_path):
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"text": "whole", "prompt": "p", "completion": "c"}) + "\n")
    assert load_records(str(path))[1] == "prompt_completion"
    assert load_records(str(path), "text") == ([{"text": "whole", "prompt": "p", "completion": "c"}], "text")


def test_parquet_with_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "chat.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    records, fmt = load_records(str(tmp_path / "chat.parquet"))
    assert fmt == "chat" and records == rows


def test_save_to_disk_folders(tmp_path, caplog):
    """A DatasetDict's train split is read, and the log says that its others (TRL evaluates on `test`) are not."""
    import datasets

    caplog.set_level("INFO", logger="fasttune")
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds")) == (rows, "prompt_completion")
    assert "DatasetDict" not in caplog.text
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(rows[:1]))
    splits.save_to_disk(str(tmp_path / "dd"))
    assert load_records(str(tmp_path / "dd")) == (rows, "prompt_completion")
    said = f"{tmp_path / 'dd'}: a DatasetDict of splits train, test: its 'train' split is read, the others are not "
    assert said in caplog.text


def test_folder_of_data_shards(tmp_path):
    for i in range(2):
        shutil.copy(FIXTURES / "alpaca.jsonl", tmp_path / f"part-{i}.jsonl")
    records, fmt = load_records(str(tmp_path))
    assert fmt == "alpaca" and len(records) == 6


def test_real_gsm8k_slice():
    """20 records of the public GSM8K train split in Alpaca form (shipped in the repo, so the test always runs)."""
    records, fmt = load_records(str(FIXTURES / "gsm8k_alpaca_20.json"))
    assert fmt == "alpaca" and len(records) == 20
    assert all(r["input"] == "" and r["instruction"] and r["output"] for r in records)


_SUFFIXES = [".jsonl", ".json", ".csv", ".parquet", ".txt"]


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), suffix=st.sampled_from(_SUFFIXES))
def test_random_bytes_never_crash(data, suffix):
    _assert_reads_or_data_error(data, suffix)


_valid = (FIXTURES / "alpaca.jsonl").read_bytes()


@settings(max_examples=50, deadline=None, database=None)
@given(pos=st.integers(0, len(_valid) - 1), byte=st.integers(0, 255), suffix=st.sampled_from(_SUFFIXES[:3]))
def test_corrupted_file_never_crashes(pos, byte, suffix):
    _assert_reads_or_data_error(_valid[:pos] + bytes([byte]) + _valid[pos + 1 :], suffix)


@settings(max_examples=30, deadline=None, database=None)
@given(depth=st.integers(1, 100_000))
def test_deep_nesting_is_a_data_error(depth):
    _assert_reads_or_data_error(b"[" * depth, ".json")


def _assert_reads_or_data_error(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        try:
            records, fmt = load_records(str(path))
        except DataError as e:
            assert "\n" not in str(e) and str(path) in str(e)
        else:
            assert records and fmt in ("text", "alpaca", "prompt_completion", "chat")
        assert path.read_bytes() == data
