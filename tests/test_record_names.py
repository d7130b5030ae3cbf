"""A record refused while it is tokenized (its tools, its template, its roles) is named as the files name it: the path
it was read from and its index among that path's records, whatever split it is in and whatever paths came before."""

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
        assert said.startswith(f"{path} record {bad}: field 'tools' is a string but not JSON"), said


def test_a_record_of_several_files_is_named_by_its_file_and_its_index_there(tmp_path):
    """--data a.jsonl b.jsonl: b's record 2 was named 'a.jsonl b.jsonl record 14' (its index in the joined list, or
    in its split); so are --data.val-path's files and eval's --data."""
    from fasttune.eval.run import EvalArgs, _samples

    a = _jsonl(tmp_path / "a.jsonl", CHAT[:12])
    b = _jsonl(tmp_path / "b.jsonl", [*CHAT[12:14], BAD, *CHAT[14:]])
    said = f"{b} record 2: field 'tools' is a string but not JSON"
    assert _error(tmp_path, (a, b), val_fraction=0.2).startswith(said)
    assert _error(tmp_path, (b, a), val_fraction=0.2).startswith(said)
    assert _error(tmp_path, (a, b, _jsonl(tmp_path / "c.jsonl", CHAT[:3])), val_fraction=0.2).startswith(said)
    assert _error(tmp_path, (a,), val_path=(_jsonl(tmp_path / "v.jsonl", CHAT[:5]), b)).startswith(said)
    with pytest.raises(DataError) as e:
        _samples(EvalArgs(checkpoint="unused", data=(a, b)), build_tiny_tokenizer(), 512)
    assert str(e.value).startswith(said)
