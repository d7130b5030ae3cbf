"""An Alpaca record whose instruction and input are both empty has a prompt that is the template alone
("### Instruction:\n\n\n### Response:\n"): it was trained in silence, teaching the model to answer nothing with that
response. Such a record is a bad record, as one with an empty response is: left out (counted with the samples that
have no trained token), said once naming the first, and refused when every record is so."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from fixtures.tiny_tokenizer import build_tiny_tokenizer

from fasttune.config import get_experiment
from fasttune.data.pipeline import build_data
from fasttune.errors import DataError

ALPACA = [{"instruction": f"Add {i} and 3.", "input": "", "output": f"{i + 3}"} for i in range(8)]
EMPTY = [{"instruction": "", "input": "", "output": "7"}, {"instruction": " \n", "output": "9"}]


def _build(tmp_path: Path, records: list[dict], **data):
    tmp_path.mkdir()
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = get_experiment("quick")
    d = dataclasses.replace(cfg.data, path=(str(path),), max_length=64, val_fraction=0.0,
                            cache_dir=str(tmp_path / "cache"), **data)  # fmt: skip
    return path, build_data(dataclasses.replace(cfg, data=d), tokenizer=build_tiny_tokenizer())


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_alpaca_records_without_instruction_or_input_are_left_out_and_said_once(tmp_path, caplog, train_on_prompt):
    """Reference: the same data without those records trains the same samples."""
    caplog.set_level(logging.INFO, logger="fasttune")
    path, got = _build(tmp_path / "a", [*ALPACA[:3], EMPTY[0], ALPACA[3], EMPTY[1], *ALPACA[4:]],
                       train_on_prompt=train_on_prompt)  # fmt: skip
    _, ref = _build(tmp_path / "b", ALPACA, train_on_prompt=train_on_prompt)
    assert [(s.ids.tolist(), s.labels().tolist()) for s in got.train] == [
        (s.ids.tolist(), s.labels().tolist()) for s in ref.train
    ]
    assert got.summary.untrained == 2 and got.summary.train_samples == len(ALPACA)
    assert "  left out: 2 samples with no trained token (e.g. an empty response, or no instruction or input)" in (
        got.summary.lines()
    )
    said = [r.getMessage() for r in caplog.records if "empty instruction" in r.getMessage()]
    assert said == [f"{path}: 2 of 10 Alpaca records have an empty instruction and input (the first: {path} line 4), "
                    "so their prompt is the template alone: they are left out, as records with an empty response "
                    "are; fill in their instruction"], said  # fmt: skip
    assert [r.levelno for r in caplog.records if "empty instruction" in r.getMessage()] == [logging.WARNING]


def test_alpaca_data_whose_every_record_has_no_instruction_or_input_is_refused(tmp_path):
    with pytest.raises(DataError) as e:
        _build(tmp_path / "a", EMPTY)
    path = tmp_path / "a" / "a.jsonl"
    said = (f"{path}: every Alpaca record has an empty instruction and input (the first: {path} line 1), so no "
            "record has a prompt to train a response to; fill in their instructions")  # fmt: skip
    assert str(e.value) == said
