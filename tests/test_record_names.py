"""A record refused while it is tokenized (its tools, its template, its roles) is named as the files name it when they
are read: the file it was read from (a folder's: the file in it) and its line there (JSON lines, CSV) or its number
among the file's records (from 1), whatever split it is in and whatever paths came before."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fixtures.tiny_tokenizer import build_tiny_tokenizer

from fasttune.config import get_experiment
from fasttune.data.corpus import holdout
from fasttune.data.pipeline import build_data
from fasttune.errors import DataError

CHAT = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
        for i in range(20)]  # fmt: skip
BAD = {**CHAT[0], "tools": "[oops"}  # refused by the tokenizer step alone (record_tools)


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _error(tmp_path: Path, path: tuple[str, ...], **data) -> str:
    cfg = get_experiment("quick")
    d = dataclasses.replace(cfg.data, path=path, max_length=64, cache_dir=str(tmp_path / "cache"), **data)
    with pytest.raises(DataError) as e:
        build_data(dataclasses.replace(cfg, data=d), tokenizer=build_tiny_tokenizer())
    return str(e.value)


def test_a_record_of_one_file_is_named_by_its_index_in_the_file_not_in_its_split(tmp_path):
    """The training split's records were numbered among themselves: a record after a held-out one was named by
    another's index (d.jsonl record 2 for the file's record 3), and a held-out record by its index among the
    held-out ones."""
    train, val = holdout(list(range(20)), [str(i) for i in range(20)], 0.2)
    after = next(i for i in train if i > val[0])  # a training record with a held-out one before it
    for bad in (after, val[1]):
        path = _jsonl(tmp_path / "d.jsonl", [BAD if i == bad else r for i, r in enumerate(CHAT)])
        said = _error(tmp_path, (path,), val_fraction=0.2)
        assert said.startswith(f"{path} line {bad + 1}: field 'tools' is a string but not JSON"), said


def test_a_record_of_several_files_is_named_by_its_file_and_its_index_there(tmp_path):
    """--data a.jsonl b.jsonl: b's record 2 was named 'a.jsonl b.jsonl record 14' (its index in the joined list, or
    in its split), then 'b.jsonl record 2' where reading names it 'b.jsonl line 3'; so are --data.val-path's files and
    eval's --data."""
    from fasttune.eval.run import EvalArgs, _samples

    a = _jsonl(tmp_path / "a.jsonl", CHAT[:12])
    b = _jsonl(tmp_path / "b.jsonl", [*CHAT[12:14], BAD, *CHAT[14:]])
    said = f"{b} line 3: field 'tools' is a string but not JSON"
    assert _error(tmp_path, (a, b), val_fraction=0.2).startswith(said)
    assert _error(tmp_path, (b, a), val_fraction=0.2).startswith(said)
    assert _error(tmp_path, (a, b, _jsonl(tmp_path / "c.jsonl", CHAT[:3])), val_fraction=0.2).startswith(said)
    assert _error(tmp_path, (a,), val_path=(_jsonl(tmp_path / "v.jsonl", CHAT[:5]), b)).startswith(said)
    with pytest.raises(DataError) as e:
        _samples(EvalArgs(checkpoint="unused", data=(a, b)), build_tiny_tokenizer(), 512)
    assert str(e.value).startswith(said)


def test_a_record_is_named_at_tokenize_time_as_reading_names_it(tmp_path):
    """Tokenizing named a record "PATH record I" (I its index among PATH's records) where reading names it by its line
    (JSON lines, CSV) and a folder's by the file in it: "d.jsonl record 1" for the record on line 5 after blank
    lines, "rows record 2" for c.csv's row on line 5. Reference: Table.where, the name reading gives each record."""
    from fasttune.data.formats import load_paths, record_names
    from fasttune.data.readers import read_tables

    lines = tmp_path / "d.jsonl"  # blank lines between records: runs of consecutive lines, not one
    lines.write_text("\n".join(["", json.dumps(CHAT[0]), "", "", json.dumps(CHAT[1]), json.dumps(CHAT[2]), "",
                                json.dumps(CHAT[3])]))  # fmt: skip
    keyed = tmp_path / "k.json"
    keyed.write_text(json.dumps({"data": CHAT[:3]}))
    rows = tmp_path / "rows"  # a folder: its CSV's rows by line, a cell over several lines between them
    rows.mkdir()
    (rows / "c.csv").write_text('prompt,completion\n"multi\nline",x\ny,z\n"a\nb\nc",d\n')
    texts = tmp_path / "texts"  # a folder of text files: a record each
    texts.mkdir()
    for name in ("x.txt", "y.txt"):
        (texts / name).write_text("some text")
    by_key = [f"{keyed} record {i} of 'data'" for i in (1, 2, 3)]
    said = {
        (lines, keyed): [f"{lines} line {n}" for n in (2, 5, 6, 8)] + by_key,
        (rows,): [f"{rows / 'c.csv'} line {n}" for n in (2, 4, 5)],
        (texts,): [f"{texts / 'x.txt'} record 1", f"{texts / 'y.txt'} record 1"],
    }
    for paths, names in said.items():
        places: list = []
        records, _ = load_paths([str(p) for p in paths], places=places)
        read = [t.where(i) for p in paths for t in read_tables(p, "train") for i in range(len(t.records))]
        assert [record_names(places)(i) for i in range(len(records))] == read == names
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", CHAT[:2])
    _jsonl(folder / "b.jsonl", [CHAT[0], BAD])
    assert _error(tmp_path, (str(folder),), val_fraction=0.0).startswith(f"{folder / 'b.jsonl'} line 2: field 'tools'")


def test_records_are_numbered_from_one_as_an_editor_counts_them(tmp_path):
    """A JSON array's, a keyed JSON object's or a Parquet file's record was named by its 0-based index ("arr.json
    record 7" for the 8th record) while JSON lines and CSV rows are named by their 1-based line: a user counting by hand
    landed on the record after the one meant. Reference: the 8th record, counted from 1 as editors count lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fasttune.data.formats import load_paths
    from fasttune.data.sft import tokenize_records

    records = [{"prompt": f"q{i}", "completion": "a"} for i in range(10)]
    records[7] = {"prompt": "q7", "completion": ["a"]}  # the 8th
    arr, keyed, table = tmp_path / "arr.json", tmp_path / "k.json", tmp_path / "t.parquet"
    arr.write_text(json.dumps(records))
    keyed.write_text(json.dumps({"data": records}))
    pq.write_table(pa.Table.from_pylist([{**r, "completion": None} if i == 7 else r for i, r in enumerate(records)]),
                   table)  # fmt: skip
    said = {arr: f"{arr} record 8:", keyed: f"{keyed} record 8 of 'data':", table: f"{table} record 8:"}
    for path, name in said.items():
        with pytest.raises(DataError) as e:
            load_paths([str(path)])
        assert str(e.value).startswith(name), e.value
    with pytest.raises(DataError, match=r"^ds record 2: missing field 'completion'"):  # tokenize_records' own names
        tokenize_records([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "prompt_completion", None, source="ds")
