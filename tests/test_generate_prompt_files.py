"""`fasttune generate --prompts` on the table files `--data` reads (Parquet, CSV): their rows are the prompt records,
answered as the same records in JSON lines (JSON, .txt and the line-by-line errors: test_generate_cli.py)."""

import datetime
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import save_base_model

from fasttune.cli import main
from fasttune.errors import DataError
from fasttune.generate.prompts import read_prompts

RECORDS = [
    {"prompt": "Natalia sold clips to 48 of her friends.", "completion": "72"},
    {"prompt": "How many clips did she sell?", "completion": "24"},
    {"prompt": "Weng earns $12 an hour.", "completion": "10"},
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_parquet_and_csv_rows_are_answered_as_the_same_json_lines(tmp_path):
    """A Parquet test set (TRL's, the Hub's) stopped with "not UTF-8 text ...; save it as UTF-8", a CSV one with
    "line 1: invalid JSON": both are read as training and `eval --data` read them, and answered as the JSONL."""
    model = save_base_model(tmp_path / "model")
    when = [datetime.date(2024, 7, 26)] * len(RECORDS)  # a column with no JSON type of its own is kept, as text
    pq.write_table(pa.table({**{k: [r[k] for r in RECORDS] for k in RECORDS[0]}, "day": when}), tmp_path / "q.parquet")
    (tmp_path / "q.csv").write_text("prompt,completion\n" + "".join(f'"{r["prompt"]}",{r["completion"]}\n'
                                                                    for r in RECORDS))  # fmt: skip
    _jsonl(tmp_path / "q.jsonl", RECORDS)
    assert [r["_where"] for r in read_prompts(tmp_path / "q.csv")] == ["line 2", "line 3", "line 4"]
    assert [r["_where"] for r in read_prompts(tmp_path / "q.parquet")] == ["record 1", "record 2", "record 3"]
    rows = {}
    for name in ("q.jsonl", "q.parquet", "q.csv"):
        assert main(["generate", "--checkpoint", str(model), "--prompts", str(tmp_path / name),
                     "--max-new-tokens", "4"]) == 0  # fmt: skip
        out = tmp_path / name.replace(".", "_")
        (tmp_path / "q.completions.jsonl").rename(out)
        rows[name] = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.pop("day") for r in rows["q.parquet"]] == ["2024-07-26"] * len(RECORDS)
    assert rows["q.parquet"] == rows["q.csv"] == rows["q.jsonl"]
    assert [r["reference"] for r in rows["q.jsonl"]] == [r["completion"] for r in RECORDS]


def test_a_table_file_without_prompts_names_its_row(tmp_path):
    (tmp_path / "q.csv").write_text('question,answer\n"How many?",72\n')
    with pytest.raises(DataError, match=r"q.csv line 2: no prompt"):
        read_prompts(tmp_path / "q.csv")


def test_a_binary_file_of_another_type_is_told_what_prompts_reads_not_to_save_it_as_utf8(tmp_path):
    path = tmp_path / "q.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(tmp_path / "q.jsonl", RECORDS).read_bytes()))
    with pytest.raises(DataError, match=r"not UTF-8 text .*; --prompts reads JSON lines, .*\.parquet or \.csv$"):
        read_prompts(path)
    latin = tmp_path / "latin.jsonl"  # a JSON lines file in another encoding: saving it as UTF-8 is the fix
    latin.write_bytes('"Qu\u00e9 hora es?"\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text .*; save it as UTF-8$"):
        read_prompts(latin)
