"""`fasttune eval` and its data: fields it does not read are said as training says them, and summary.json accounts
for every record (the samples scored, and those --max-length or the context left out)."""

import json
from pathlib import Path

import pytest
from helpers import GSM8K, save_base_model
from transformers import AutoTokenizer

from fasttune.cli import main
from fasttune.data.sft import tokenize_records


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_base_model(tmp_path_factory.mktemp("eval-data") / "base")


def _summary(model, tmp_path, data, *extra) -> dict:
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(model), "--data", str(data), "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_eval_says_a_misspelt_field_it_leaves_out_as_training_does(model, tmp_path, capsys):
    """Alpaca records with 'inptu' for 'input': training warns that their text is not read; eval scored the same
    records without a word, on prompts that lack the input (the loss of records that have no input field at all)."""
    records = [{"instruction": "Add the numbers.", "inptu": f"{i} and 3", "output": f"{i + 3}"} for i in range(3)]
    typo, plain = tmp_path / "typo.jsonl", tmp_path / "plain.jsonl"
    typo.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "inptu"}) + "\n" for r in records))
    summary = _summary(model, tmp_path / "a", typo)
    err = capsys.readouterr().err
    assert (f"{typo}: 3 of 3 records have a 'inptu' field and no 'input': it is not read (a misspelt 'input'?); "
            "rename it to evaluate with its text") in err, err  # fmt: skip
    assert summary["loss"] == _summary(model, tmp_path / "b", plain)["loss"]  # what the warning says: not read
    assert "records have a" not in capsys.readouterr().err  # the records without it: nothing to say


def test_eval_says_an_alpaca_system_field_it_leaves_out(model, tmp_path, capsys):
    data = tmp_path / "sys.jsonl"
    data.write_text(json.dumps({"system": "Be terse.", "instruction": "Add 2 and 3.", "output": "5"}) + "\n")
    _summary(model, tmp_path, data)
    assert "1 of 1 records have a 'system' field" in capsys.readouterr().err


def test_eval_max_length_counts_every_record_in_summary_json(model, tmp_path):
    """With --max-length the loss scores truncated samples and leaves out those whose prompt alone fills it, as
    training does: summary.json said neither (skipped_longer_than_context 0, max_length absent), so its samples did not
    add up to the records and two summaries at different lengths read alike."""
    tok = AutoTokenizer.from_pretrained(model)
    records = json.loads(GSM8K.read_text())
    whole = tokenize_records(records, "alpaca", tok)  # the reference: where each sample's response starts
    starts = [next(i for i, t in enumerate(s["labels"]) if t != -100) for s in whole]
    long = [start for s, start in zip(whole, starts, strict=True) if len(s["input_ids"]) > 160]
    summary = _summary(model, tmp_path, GSM8K, "--max-length", "160")
    assert (summary["max_length"], summary["skipped_longer_than_context"]) == (160, 0)
    assert summary["truncated_to_max_length"] == sum(start < 160 for start in long) > 0
    assert summary["skipped_prompt_fills_max_length"] == sum(start >= 160 for start in long) > 0
    assert summary["samples"] + summary["skipped_prompt_fills_max_length"] == len(records)
    whole_summary = _summary(model, tmp_path / "whole", GSM8K)
    assert whole_summary["max_length"] is None and "truncated_to_max_length" not in whole_summary


@pytest.mark.parametrize("records", [[{"instruction": "Add 2 and 3.", "input": ""}], []])
def test_eval_says_a_data_error_before_the_model_loads(model, tmp_path, capsys, monkeypatch, records):
    """A record without its output, an empty file: said after the model had loaded (minutes for a large one)."""
    from fasttune.model import load

    loaded = []
    real = load.load_for_inference
    monkeypatch.setattr(load, "load_for_inference", lambda *a, **k: loaded.append(1) or real(*a, **k))
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", "--checkpoint", str(model), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}") and loaded == [], err
    assert main(["eval", "--checkpoint", str(model), "--data", str(GSM8K), "--limit", "2"]) == 0 and loaded == [1]


def test_eval_overwrite_without_generate_leaves_no_older_completions_beside_its_summary(model, tmp_path, capsys):
    """--overwrite replaced summary.json and left the completions.jsonl of an earlier --generate beside it: the folder
    read as one eval whose answers were another's. The files an eval writes are replaced together, and one it does
    not write goes under --overwrite, said."""
    out = tmp_path / "eval"
    run = ["eval", "--checkpoint", str(model), "--data", str(GSM8K), "--limit", "2", "--output-dir", str(out)]
    assert main([*run, "--generate", "--max-new-tokens", "2"]) == 0
    assert "generated_samples" in json.loads((out / "summary.json").read_text())
    assert (out / "completions.jsonl").is_file()
    capsys.readouterr()
    assert main([*run, "--overwrite"]) == 0
    assert not (out / "completions.jsonl").exists()
    assert "generated_samples" not in json.loads((out / "summary.json").read_text())
    assert f"--overwrite: removed the older {out / 'completions.jsonl'}" in capsys.readouterr().err


def test_an_older_completions_file_does_not_stop_an_eval_that_writes_none(model, tmp_path, capsys):
    """A completions.jsonl alone (an earlier eval's answers) stopped an eval without --generate, which writes no
    completions.jsonl: it goes on, keeps the file (no --overwrite) and says it is not this eval's; one that would
    write it is still stopped."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "completions.jsonl").write_text('{"index": 0}\n')
    run = ["eval", "--checkpoint", str(model), "--data", str(GSM8K), "--limit", "2", "--output-dir", str(out)]
    assert main(run) == 0
    assert (out / "summary.json").is_file() and (out / "completions.jsonl").read_text() == '{"index": 0}\n'
    assert f"{out / 'completions.jsonl'} is of an earlier eval" in capsys.readouterr().err
    (out / "summary.json").unlink()
    assert main([*run, "--generate"]) == 2
    assert f"--output-dir {out} already holds completions.jsonl;" in capsys.readouterr().err.strip().splitlines()[-1]


def test_completions_name_the_file_each_record_came_from(model, tmp_path):
    """--data a.jsonl parts/: completions.jsonl's index is the record's position in the paths' records joined, which
    no file holds (index 3 is b.jsonl's file_index 1, its second record); each line names its file (a folder's: the
    file in it) and its index there, and keeps index. Reference: each file read on its own."""
    answers = [{"instruction": f"Add {i} and 3.", "output": f"{i + 3}"} for i in range(5)]
    files = {tmp_path / "a.jsonl": answers[:2], tmp_path / "parts" / "b.jsonl": answers[2:4],
             tmp_path / "parts" / "c.jsonl": answers[4:]}  # fmt: skip
    for path, records in files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(model), "--data", str(tmp_path / "a.jsonl"), str(tmp_path / "parts"),
                 "--generate", "--max-new-tokens", "1", "--output-dir", str(out)]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert [(r["file"], r["file_index"]) for r in rows] == [
        (str(p), i) for p, rs in files.items() for i in range(len(rs))
    ]
    assert all(r["reference"] == files[Path(r["file"])][r["file_index"]]["output"] for r in rows)
    assert list(rows[0])[:3] == ["index", "file", "file_index"]


def test_eval_generate_counts_and_says_the_samples_it_has_nothing_to_answer_or_score(model, tmp_path, capsys):
    """--generate left a record with "prompt": "" out in silence (not in summary.json, not in the log) and answered
    "prompt": "   ", a prompt of nothing but spaces; a record with an empty completion was left out in silence too.
    Both are left out, counted in summary.json and said in one line each, as samples too long for the context are.
    Reference: the one record with a prompt and a response is the one answered."""
    records = [{"prompt": "", "completion": " 4"}, {"prompt": "   ", "completion": " 5"},
               {"prompt": "What is 2+2?", "completion": " 4"}, {"prompt": "Q", "completion": ""}]  # fmt: skip
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = _summary(model, tmp_path, data, "--generate", "--max-new-tokens", "2")
    err = capsys.readouterr().err
    assert summary["generated_samples"] == 1
    assert (summary["generate_skipped_empty_prompt"], summary["generate_skipped_no_response"]) == (2, 1)
    assert "eval: --generate leaves out 2 of 4 samples: their prompt is empty, so there is nothing to answer" in err
    assert "eval: --generate leaves out 1 of 4 samples: their response is empty, so there is nothing to score" in err
    rows = [json.loads(x) for x in (tmp_path / "eval" / "completions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reference"]) for r in rows] == [(2, "4")]
