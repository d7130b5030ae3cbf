"""How `fasttune generate --prompts` reads its file: the table files `--data` reads (Parquet, CSV), whose rows are the
prompt records answered as the same records in JSON lines; a JSON object's records; the errors that name a record's
line and the fix (JSON arrays and .txt files answered through a fine-tuned run: test_generate_cli.py)."""

import datetime
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import deny_file, save_base_model

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


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no prompts \\(the file is empty\\)"),
        ("\n\n", "no prompts"),
        ('"ok"\n{"prompt": "x\n', "line 2: invalid JSON"),
        ('{"answer": 1}\n', "line 1: no prompt"),
        (
            '"ok"\n{"prompt": 3}\n',
            'line 2: "prompt" must be text \\(a JSON string\\) or a list of messages, not a number: 3',
        ),
        (
            '{"prompt": ["a"]}\n',
            'line 1: "prompt" must be text \\(a JSON string\\) or a list of messages, not a list of text: \\["a"\\]',
        ),
        ('{"instruction": null}\n', 'line 1: "instruction" must be text \\(a JSON string\\), not null'),
        ('{"text": true, "id": 1}\n', 'line 1: "text" must be text \\(a JSON string\\), not a boolean: true'),
        (
            '{"messages": [{"role": "user", "content": 5}]}\n',
            'line 1: "messages" must be a list of messages with '
            'text content, not a list of messages without text: \\[\\{"role": "user", "content": 5\\}\\]',
        ),
        # the fields read beside the prompt: Alpaca's input was sent as the digits of a number, the JSON of a list
        (
            '"ok"\n{"instruction": "Add.", "input": 3}\n',
            'line 2: "input" must be text \\(a JSON string\\) or null, '
            "not a number: 3; write the input as a JSON string",
        ),
        ('{"instruction": "Add.", "input": ["2", "3"]}\n', '"input" must be .*, not a list of text: \\["2", "3"\\]'),
        # every message of the list sent, as training checks it: one that was not an object was dropped, a number
        # as content sent as its digits, a role no template knows rendered as it is
        ('{"messages": [{"role": "user", "content": "Hi"}, "oops"]}\n', "line 1: messages\\[1\\] must be an object"),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": 5}]}\n',
            "line 1: messages\\[1\\].content must be a string, got int \\(5\\)",
        ),
        (
            '{"prompt": [{"role": "human", "content": "Hi"}]}\n',
            "line 1: prompt\\[0\\].role is 'human', not a chat role",
        ),
    ],  # fmt: skip
)
def test_bad_prompt_files_name_the_line_and_fix(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_plain_text_piped_as_prompts_is_told_to_send_json_strings_not_to_use_a_txt_file(tmp_path):
    """`echo 'What is 2+2?' | fasttune generate --prompts -` was told to put its prompts "in a .txt file": a pipe has
    no file name to give. Reference: the same text in a .jsonl file, whose fix names the .txt file."""
    import os
    import threading

    text = "What is 2+2?\n"
    (file := tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(DataError) as in_file:
        read_prompts(file)
    os.mkfifo(pipe := tmp_path / "pipe")
    threading.Thread(target=pipe.write_text, args=(text,)).start()  # the writer a pipe's reader waits for
    with pytest.raises(DataError) as piped:
        read_prompts(pipe)
    said = "invalid JSON (Expecting value at column 1); "
    assert str(in_file.value).endswith(said + "write one JSON value per line (or plain prompts, one per line, in a "
                                       ".txt file)")  # fmt: skip
    assert str(piped.value) == (f'{pipe} line 1: {said}pipe one JSON value per line: a plain prompt as a JSON string '
                                '("What is 2 + 3?")')  # fmt: skip


def test_errors_about_prompts_piped_to_dash_name_standard_input_not_dev_stdin():
    """`echo hi | fasttune generate --prompts -`: its errors named /dev/stdin, a path the user never typed."""
    import subprocess
    import sys

    code = "from fasttune.generate.prompts import read_prompts; read_prompts('-')"
    for text, said in (("What is 2+2?\n", "standard input line 1: invalid JSON"), ("", "--prompts -: no prompts")):
        out = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True)
        assert out.returncode != 0 and f"DataError: {said}" in out.stderr and "/dev/stdin" not in out.stderr


def test_the_fields_read_beside_the_prompt_take_what_training_takes(tmp_path):
    """An empty or null "input" (no input, as training reads it), an "input" beside no instruction (not read), and a
    conversation ending in its reference answer are prompts, kept as they are."""
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    records = [
        {"instruction": "Add.", "input": ""},
        {"instruction": "Add.", "input": None},
        {"text": "Hi", "input": 3},
        chat,
    ]
    got = read_prompts(_jsonl(tmp_path / "p.jsonl", records))
    assert [{k: v for k, v in r.items() if k != "_where"} for r in got] == records


def test_an_unreadable_prompt_file_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('"q"\n')
    deny_file(monkeypatch, "read_text", path)
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --prompts {path}: permission denied; make it readable (chmod u+r {path})\n"


def test_prompts_under_one_key_of_a_json_object_are_read_as_its_records(tmp_path):
    """{"version": .., "data": [...]} (SQuAD-style, as training and `eval --data` read it) stopped with "line 1: no
    prompt" or "invalid JSON": its records are the prompts, named by their key; several such keys are refused."""
    records = [{"instruction": "Natalia sold clips", "input": "", "output": "72"}, {"prompt": "How many clips?"}]
    lines, wrapped = tmp_path / "p.jsonl", tmp_path / "p.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    for indent in (None, 2):
        wrapped.write_text(json.dumps({"version": "1", "data": records}, indent=indent))
        got = read_prompts(wrapped)
        assert [r.pop("_where") for r in got] == ["record 1 of 'data'", "record 2 of 'data'"]
        assert got == [{k: v for k, v in r.items() if k != "_where"} for r in read_prompts(lines)]
    wrapped.write_text(json.dumps({"train": records, "test": records}))
    with pytest.raises(DataError, match="several keys holding lists \\('train', 'test'\\)"):
        read_prompts(wrapped)
    wrapped.write_text(json.dumps({"data": [{"answer": 1}]}))
    with pytest.raises(DataError, match="p.json record 1 of 'data': no prompt"):
        read_prompts(wrapped)
    wrapped.write_text(json.dumps({"question": "2 + 3?", "choices": ["4", "5"]}))  # one record, not a container
    with pytest.raises(DataError, match="p.json line 1: no prompt"):
        read_prompts(wrapped)


def test_one_prompt_record_in_a_json_file_is_that_record_not_a_container_of_its_messages(tmp_path):
    """A record's own list of messages is not a list of prompts: a chat record with content parts (OpenAI's layout)
    was refused as "record 0 of 'messages': no prompt", naming a key as if the file held records under it; and one
    record pretty-printed over several lines (a .json file as training reads it) was "line 1: invalid JSON"."""
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(chat, indent=2))
    assert read_prompts(path) == [{**chat, "_where": "record 1"}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}]}
    path.write_text(json.dumps(parts) + "\n")
    with pytest.raises(DataError, match=r'one.json line 1: "messages" must be a list of messages with text content'):
        read_prompts(path)
