"""A .json file whose records sit under one key of its top-level object ({"version": ..., "data": [...]}, as SQuAD and
many exports hold them; datasets' load_dataset("json", field="data")) is read as those records; several such keys
are refused, naming them and --data.field."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from helpers import GSM8K, tiny_config

from fasttune import cli
from fasttune.data.formats import load_records
from fasttune.data.pipeline import build_data
from fasttune.errors import ConfigError, DataError

RECORDS = json.loads(GSM8K.read_text())
CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def _write(path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def _build(cfg, path: str, field: str | None = None):
    data = dataclasses.replace(cfg.data, path=path, field=field, max_length=1024, val_fraction=0.2)
    return build_data(dataclasses.replace(cfg, data=data))


def test_records_under_one_key_train_as_the_same_records_in_an_array(tmp_path, caplog):
    cfg = tiny_config(tmp_path)  # the tokenizer is trained on the records, as a run without --model trains it
    keyed = _write(tmp_path / "squad_style.json", {"version": "1.0", "data": RECORDS})
    caplog.set_level(logging.INFO, logger="fasttune")
    ours = _build(cfg, keyed)
    assert f"{keyed}: read the records under the top-level JSON key 'data' (20 records)" in caplog.text
    assert load_records(_write(tmp_path / "tagged.json", {"tags": [], "data": RECORDS}))[0] == RECORDS  # not two
    ref = _build(cfg, _write(tmp_path / "array.json", RECORDS))
    assert ours.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    for got, want in ((ours.train, ref.train), (ours.val, ref.val)):
        assert [s["input_ids"] for s in got] == [s["input_ids"] for s in want]
        assert [s["labels"] for s in got] == [s["labels"] for s in want]
    assert ours.summary.fingerprint == ref.summary.fingerprint
    assert ours.summary.lines()[1:] == ref.summary.lines()[1:]
    # --data.field picks the key too, also where another key holds a list of records
    picked = _write(tmp_path / "splits.json", {"train": RECORDS, "test": RECORDS[:2]})
    assert ours.summary.fingerprint == _build(cfg, picked, field="train").summary.fingerprint


def test_one_record_in_an_object_is_still_one_record(tmp_path):
    """A chat record's only key (messages) holds a list of objects too; it is a record, not a container."""
    assert load_records(_write(tmp_path / "one.json", CHAT)) == ([CHAT], "chat")
    conversational = {"prompt": CHAT["messages"][:1], "completion": CHAT["messages"][1:]}
    records, fmt = load_records(_write(tmp_path / "conv.json", conversational))
    assert fmt == "chat" and records[0]["messages"] == CHAT["messages"]


def test_several_keys_holding_records_are_refused_naming_them_and_the_option(tmp_path, capsys):
    path = _write(tmp_path / "splits.json", {"version": 2, "train": RECORDS, "test": RECORDS[:2]})
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(e.value) == (f"{path}: the top-level JSON object has several keys holding lists of records ('train', "
                            "'test'); pass --data.field KEY to pick one (e.g. --data.field train)")  # fmt: skip
    assert cli.main(["train", "--data", path, "--output-dir", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "pass --data.field KEY to pick one" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    with pytest.raises(DataError, match=r"pass --field KEY to pick one \(e.g. --field train\)$"):
        load_records(path, option="--format")  # eval's option


@pytest.mark.parametrize(
    ("value", "field", "error"),
    [
        ({"version": "1", "data": RECORDS}, "train",
         "no key 'train' in the top-level JSON object (keys: 'version', 'data'); pass --data.field data"),
        ({"version": "1", "data": RECORDS}, "version",
         "key 'version' holds str ('1'), not a list of records; pass --data.field data"),
        ({"a": RECORDS, "b": RECORDS}, "c",
         "no key 'c' in the top-level JSON object (keys: 'a', 'b'); pass --data.field with the key that holds the "
         "records"),
        (RECORDS, "data", "--data.field data names a key of a top-level JSON object, and the file holds a JSON "
         "array; drop --data.field"),
        ({"data": [RECORDS[0], 3]}, None, "record 2 of 'data': expected a JSON object, got int (3); each record is "
         'an object of its format\'s fields (e.g. {"text": ...}); for plain text, one document per file, use .txt '
         "files"),
    ],
)  # fmt: skip
def test_a_field_the_file_does_not_have_is_one_line_naming_the_keys(tmp_path, value, field, error):
    path = _write(tmp_path / "d.json", value)
    with pytest.raises(DataError) as e:
        load_records(path, field=field)
    assert str(e.value) == f"{path}{'' if error.startswith('record') else ':'} {error}"


def test_the_field_option_is_refused_where_there_is_no_json_object(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: --data.field data names a key .* this is a .jsonl file; drop"):
        load_records(str(jsonl), field="data")
    with pytest.raises(ConfigError, match=r"data.field='' is not valid"):
        cli.parse_train_args(["--data", str(jsonl), "--data.field", ""])
    with pytest.raises(ConfigError, match=r"no --data is given \(the embedded corpus\); pass --data FILE.json"):
        build_data(dataclasses.replace(tiny_config(tmp_path), data=dataclasses.replace(tiny_config(tmp_path).data,
                                                                                        field="data")))  # fmt: skip


def test_eval_reads_the_key_its_field_option_names(tmp_path):
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.data.sft import tokenize_records
    from fasttune.eval import run

    tok = build_tiny_tokenizer()
    path = _write(tmp_path / "splits.json", {"train": RECORDS[:3], "test": RECORDS[3:5]})
    samples, _, fmt, _, _ = run._samples(run.EvalArgs(checkpoint="unused", data=path, field="test"), tok, 512)
    assert fmt == "alpaca" and [s.record for s in samples] == [0, 1]
    assert [s["input_ids"] for s in samples] == [s["input_ids"] for s in tokenize_records(RECORDS[3:5], fmt, tok)]


def test_the_field_option_may_be_given_on_resume_when_it_picks_the_same_data(tmp_path):
    """A run started on {"data": [...]} without --data.field (the one key was found) resumes with --data.field data;
    a field that picks other records is refused by the data check."""
    from fasttune.train.loop import train

    keyed = _write(tmp_path / "keyed.json", {"data": RECORDS})
    cfg = tiny_config(tmp_path, max_steps=2, save_every=2, eval_every=0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=keyed, max_length=256))
    train(cfg)
    again = dataclasses.replace(cfg, resume=True, data=dataclasses.replace(cfg.data, field="data"))
    again = dataclasses.replace(again, training=dataclasses.replace(cfg.training, max_steps=3))
    assert [r["step"] for r in train(again).records if "loss" in r][-1] == 3
    _write(tmp_path / "keyed.json", {"data": RECORDS, "test": RECORDS[:12]})
    other = dataclasses.replace(again, data=dataclasses.replace(again.data, field="test"))
    with pytest.raises(ConfigError, match="the data is not what this run trained on"):
        train(dataclasses.replace(other, training=dataclasses.replace(other.training, max_steps=4)))
