"""`fasttune eval` and its data: fields it does not read are said as training says them, and summary.json accounts
for every record (the samples scored, and those --max-length or the context left out)."""

import json

import pytest
from helpers import save_base_model

from fasttune.cli import main


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
