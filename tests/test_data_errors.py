"""Bad input gives one clear DataError line naming the file, the line or record, and the field; never a traceback.
The user's files are never changed. Paths and folders that are not data: test_data_folder_errors.py."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from fixtures.tiny_tokenizer import build_tiny_tokenizer
from helpers import FIXTURES, error_for

from fasttune.data.formats import load_records
from fasttune.data.sft import tokenize_records
from fasttune.errors import DataError

pytestmark = pytest.mark.usefixtures("fixtures_unchanged")


def test_malformed_json_lines_names_file_and_line():
    message = error_for(FIXTURES / "bad_json.jsonl")
    assert "bad_json.jsonl line 3: invalid JSON" in message and "column" in message


def test_malformed_json_array_names_file_and_line():
    message = error_for(FIXTURES / "bad_array.json")
    assert "bad_array.json line 4: invalid JSON" in message


def test_missing_field_names_field_and_line():
    message = error_for(FIXTURES / "missing_field.jsonl")
    assert "missing_field.jsonl line 2: missing field 'output' for format alpaca" in message
    assert "keys seen: input, instruction" in message


def test_wrong_type_names_field_line_and_type():
    # line 2 is blank, so the bad record is on line 3
    message = error_for(FIXTURES / "wrong_type.jsonl")
    assert "wrong_type.jsonl line 3: field 'completion' must be a string, got int (5)" in message


def test_bad_chat_message_names_message_index():
    message = error_for(FIXTURES / "bad_messages.jsonl")
    assert "bad_messages.jsonl line 1: messages[1].content must be a string, got null" in message


def test_content_as_a_list_of_parts_is_refused_with_how_to_fix_it(tmp_path):
    """OpenAI's layout ([{"type": "text", "text": ...}]) was refused with a bare "fix the record"."""
    path = tmp_path / "parts.jsonl"
    parts = [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}, {"role": "assistant", "content": "4"}]
    path.write_text(json.dumps({"messages": parts}) + "\n")
    message = error_for(path)
    assert "parts.jsonl line 1: messages[0].content must be a string, got list" in message
    assert message.endswith("join the text parts into one string")


def test_record_index_for_json_arrays(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ["d"]}]))
    assert f"{path} record 2: field 'completion' must be a string, got list" in error_for(path)


def test_empty_dataset():
    assert "empty.jsonl: no records found" in error_for(FIXTURES / "empty.jsonl")


def test_unknown_format_lists_formats_and_keys():
    message = error_for(FIXTURES / "unknown_format.jsonl")
    assert "unknown_format.jsonl line 1: cannot tell the data format from its keys (answer, question)" in message
    for name in ("text", "alpaca", "prompt_completion", "chat", "--data.format"):
        assert name in message


@pytest.mark.parametrize(("keys", "said"), [(("instruction", "input", "ouput"), "; 'ouput' looks like 'output'"),
                                          (("Prompt", "completion"), "; 'Prompt' looks like 'prompt'"),
                                          (("mesages",), "; 'mesages' looks like 'messages'")])  # fmt: skip
def test_a_typod_required_field_is_named_with_the_field_it_looks_like(tmp_path, keys, said):
    """A typo in a required field gave 'cannot tell the data format from its keys (input, instruction, ouput)': the
    user had to spot it among the expected keys. The key and the field it looks like are named."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({k: "x" for k in keys}) + "\n")
    message = error_for(path)
    assert message.startswith(f"{path} line 1: cannot tell the data format from its keys ({', '.join(sorted(keys))})"
                              f"{said}; expected text")  # fmt: skip
    assert "looks like" not in error_for(FIXTURES / "unknown_format.jsonl")


@pytest.mark.parametrize(
    ("record", "said"),
    [
        ({"question": "q", "answer": "a"},  # GSM8K on the Hub
         "; as prompt_completion records: rename answer to completion, question to prompt (datasets: "
         "ds.rename_columns({'answer': 'completion', 'question': 'prompt'}))"),
        ({"query": "q", "response": "a"}, "rename query to prompt, response to completion"),  # MetaMathQA
        ({"instruction": "i", "context": "c", "response": "r"},  # Dolly
         "; as alpaca records: rename context to input, response to output"),
        ({"input": "q", "output": "a"}, "rename input to prompt, output to completion"),
        ({"question": "q", "query": "q2", "answer": "a"}, None),  # two fields for prompt: no one renaming
        ({"question": "q", "label": 1}, None),  # no completion: no format
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, None),  # preference data: not a format of fasttune's
    ],
)  # fmt: skip
def test_other_data_sets_field_names_are_answered_with_the_renaming(tmp_path, record, said):
    """GSM8K's question/answer (and other sets' names) got 'rename the fields or pass --data.format', though no
    --data.format reads them: the renaming that makes the records a format's is named, with the call that does it."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    message = error_for(path)
    assert "cannot tell the data format from its keys" in message
    if said is None:
        assert "rename_columns" not in message, message
    else:
        assert said in message, message


@pytest.mark.parametrize("typo", ["content ", "Content", "contnet"])
def test_a_typod_message_key_is_named(tmp_path, typo):
    """A message whose `content` key is misspelt was 'messages[1].content must be a string, got null (missing
    value)': the key the record does hold is named."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", typo: "yo"}]}))
    assert error_for(path) == (f"{path} line 1: messages[1].content must be a string, got null (missing value) (the "
                               f"message has {typo!r}, which looks like 'content'); fix the record")  # fmt: skip


def test_invalid_format_name():
    message = error_for(FIXTURES / "alpaca.jsonl", "sharegtp")
    assert message == ("--data.format='sharegtp' is not valid (did you mean sharegpt?); choose one of: auto, text, "
                       "alpaca, prompt_completion, chat, sharegpt, conversational, chat_template")  # fmt: skip


def test_text_files_cannot_be_read_as_alpaca():
    assert "plain text files are read as format 'text'" in error_for(FIXTURES / "text_folder", "alpaca")


def test_chat_without_chat_template(tmp_path):
    """The line names the model folder and a fix that works on transformers 5, which saves a template as
    chat_template.jinja (it named tokenizer_config.json): saving one as it says makes the data tokenize."""
    from fixtures.tiny_tokenizer import CHATML
    from transformers import AutoTokenizer

    records, fmt = load_records(str(FIXTURES / "chat.jsonl"))
    build_tiny_tokenizer(chat_template=None).save_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    with pytest.raises(DataError) as err:
        tokenize_records(records, fmt, tok, source="chat.jsonl")
    said = f"chat.jsonl is chat data but the tokenizer of {tmp_path / 'm'} has no chat template; fine-tune an "
    assert str(err.value).startswith(said + "instruct model's folder, save a template in it")
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "chat_template.jinja").is_file()
    assert tokenize_records(records, fmt, AutoTokenizer.from_pretrained(tmp_path / "m"), source="chat.jsonl")


LONG_REASON = "roles must alternate user/assistant/user/assistant " * 6 + "; fix the data"


@pytest.mark.parametrize(
    ("reason", "said"),
    [("roles must alternate", "roles must alternate"), (LONG_REASON.replace(" ", "\\n"), LONG_REASON),
     ("", "TemplateError")],
)  # fmt: skip
def test_chat_template_that_raises_names_the_record(reason, said):
    """The template's own message, whole and on one line (it may say the fix); its error's type when it says none."""
    tokenizer = build_tiny_tokenizer(chat_template=f"{{{{ raise_exception('{reason}') }}}}")
    records, fmt = load_records(str(FIXTURES / "chat.jsonl"))
    with pytest.raises(DataError) as caught:
        tokenize_records(records, fmt, tokenizer, source="data")
    assert str(caught.value) == f"data record 1: the chat template rejected this conversation ({said})"


def test_tokenize_validates_records_too():
    with pytest.raises(DataError, match=r"ds record 2: missing field 'completion'"):
        tokenize_records([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "prompt_completion", None, source="ds")


@pytest.mark.parametrize("name, line", [("latin1.txt", 1), ("latin1.jsonl", 2)])
def test_non_utf8_names_byte_offset(name, line):
    message = error_for(FIXTURES / name)
    offset = (FIXTURES / name).read_bytes().index(b"\xe9")
    assert f"{name}: not UTF-8 text (byte 0xe9 at byte offset {offset}, line {line})" in message
    assert "UTF-8" in message


def test_unsupported_extension():
    message = error_for(FIXTURES / "table.xlsx")
    assert "table.xlsx: unsupported file type '.xlsx'" in message and ".jsonl" in message


def test_csv_row_with_extra_values():
    assert "bad_row.csv line 3: more values than the 2 header columns" in error_for(FIXTURES / "bad_row.csv")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    assert "broken.parquet: not a readable Parquet file" in error_for(path)


def test_chat_without_assistant_turn(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "c.jsonl line 1: no message has role 'assistant'" in error_for(path)


@pytest.mark.parametrize(("role", "hint"), [("usr", "rename it"), ("human", "ShareGPT's 'human' is 'user': rename it"),
                                            ("gpt", "ShareGPT's 'gpt' is 'assistant'")])  # fmt: skip
def test_a_message_with_an_unknown_role_is_named_with_the_valid_roles(tmp_path, role, hint):
    """A typo ("usr") was rendered by the template as a role of its own and trained on; ShareGPT's human/gpt gave "no
    message has role 'assistant'" (or, with gpt beside an assistant turn, a silent run)."""
    path = tmp_path / "c.jsonl"
    turns = [{"role": role, "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    message = error_for(path)
    assert message.startswith(f"{path} line 1: messages[0].role is {role!r}, not a chat role (system, user, assistant")
    assert hint in message


@pytest.mark.parametrize("role", ["tool_results", "tool_response", "observation", "environment"])
def test_tool_output_roles_of_real_chat_templates_are_read(tmp_path, role):
    """Mistral v0.3 (tool_results), Granite 3 (tool_response), GLM-4 (observation) and InternLM2 (environment) have
    their templates render these roles: data written for them was refused as "not a chat role"."""
    path = tmp_path / "c.jsonl"
    turns = [{"role": "user", "content": "2+2?"}, {"role": role, "content": "4"}, {"role": "assistant", "content": "4"}]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    records, fmt = load_records(str(path))
    assert fmt == "chat" and records[0]["messages"] == turns


def test_sharegpt_data_is_read_as_the_chat_records_it_converts_to(tmp_path):
    """ShareGPT records (Axolotl's and Unsloth's usual chat data: OpenHermes, SlimOrca) were refused with a recipe to
    convert them to messages; they are read as that conversion: from -> role (human -> user, gpt -> assistant), value
    -> content, a turn's other keys and the record's kept; role/content turns under 'conversations' (Axolotl's
    field_messages) and from/value turns under 'messages' too."""
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
             {"from": "gpt", "value": "yo", "weight": 1}]  # fmt: skip
    converted = {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "yo", "weight": 1}]}  # fmt: skip
    path = tmp_path / "s.jsonl"
    for record in ({"id": 7, "conversations": turns}, {"id": 7, "messages": turns},
                   {"id": 7, "conversations": converted["messages"]}):  # fmt: skip
        path.write_text(json.dumps(record) + "\n")
        assert load_records(str(path)) == ([converted], "chat")
    path.write_text(json.dumps({"conversations": [{"from": "bing", "value": "hi"}, *turns[2:]]}) + "\n")
    assert error_for(path) == (f"{path} line 1: conversations[0].from is 'bing', neither ShareGPT's human/gpt nor a "
                               "chat role (system, user, assistant, tool, developer, ipython, function, tool_results, "
                               "tool_response, observation, environment); rename it")  # fmt: skip
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": ["hi"]}, *turns[2:]]}) + "\n")
    assert error_for(path).startswith(f"{path} line 1: conversations[0].value must be a string, got list")
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    assert "no message has role 'assistant'" in error_for(path)


def test_chat_in_csv_gets_a_hint(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('messages\n"[{""role"": ""user""}]"\n')
    assert "c.csv line 2: field 'messages' is a string" in error_for(path)


def test_invalid_json_message_reads_once(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": "broken,}\n')
    assert error_for(tmp_path / "a.jsonl").startswith(
        f"{tmp_path / 'a.jsonl'} line 2: invalid JSON (Unterminated string starting at column 10); each line"
    )  # json's own message ends in "starting at": never "at at"
    (tmp_path / "b.json").write_text('[{"text": "ok"},\n {"text": }]')
    assert "line 2: invalid JSON (Expecting value at column 11); fix the file" in error_for(tmp_path / "b.json")


def test_a_huge_record_is_refused_before_parsing_with_the_limit(tmp_path, monkeypatch):
    from fasttune.data import readers

    monkeypatch.setattr(readers, "MAX_RECORD_MB", 1)  # the same check at 1 MB keeps the test small
    big = "x" * 1_200_000
    (tmp_path / "big.jsonl").write_text('{"text": "ok"}\n' + json.dumps({"text": big}) + "\n")
    message = error_for(tmp_path / "big.jsonl")
    assert message.startswith(f"{tmp_path / 'big.jsonl'} line 2: a record of 1.2 MB of text; the limit is 1 MB")
    assert "split the text into several records" in message
    (tmp_path / "big.json").write_text(json.dumps([{"instruction": "q", "output": big}]))
    assert "record 1: a record of 1.2 MB of text; the limit is 1 MB" in error_for(tmp_path / "big.json")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "y" * 900_000}) + "\n")
    assert load_records(str(tmp_path / "ok.jsonl"))[0][0]["text"] == "y" * 900_000  # under the limit: read


def test_a_prompt_that_fills_max_length_is_left_out_and_counted_once():
    """A sample whose prompt alone fills max_length is left out (not dropped) and counted as that alone, not also as
    truncated: what trains and what is left out add up to the samples read."""
    from fasttune.data.pipeline import DataSummary, fit_length, no_samples_left
    from fasttune.data.sample import Sample

    long_prompt = Sample(range(12), [(10, 12)])  # response beyond 8 tokens
    long_answer = Sample(range(12), [(4, 12)])  # cut to 8 tokens, 4 of them trained
    fine = Sample(range(6), [(3, 6)])
    empty = Sample(range(4))  # nothing to train even untruncated
    summary = DataSummary("d.jsonl", "alpaca")
    kept = fit_length([long_prompt, long_answer, fine, empty], 8, "truncate", summary)
    assert kept == [long_answer.cut(0, 8), fine]
    assert (summary.truncated, summary.no_response, summary.untrained, summary.dropped) == (1, 1, 1, 0)
    assert len(kept) + summary.no_response + summary.untrained + summary.dropped == 4
    text = "\n".join(summary.lines())
    # the cut one that trains: 12 tokens cut to 8, its trained tokens 8-11 lost
    assert "overlong samples: 1 truncated (4 tokens cut, 4 of them trained), 0 split, 0 dropped" in text
    assert "left out: 1 overlong sample whose prompt alone filled max_length (no response token left to train)" in text
    assert "left out: 1 sample with no trained token" in text
    two_turns = Sample(range(20), [(2, 5), (15, 18)])  # its first reply kept, the second of its 12 cut tokens lost
    both = DataSummary("d.jsonl", "chat")
    assert fit_length([long_answer, two_turns, fine], 8, "truncate", both) == [long_answer.cut(0, 8),
                                                                               two_turns.cut(0, 8), fine]  # fmt: skip
    assert "overlong samples: 2 truncated (16 tokens cut, 7 of them trained), 0 split" in "\n".join(both.lines())
    lone = DataSummary("d.jsonl", "alpaca")
    assert fit_length([long_prompt], 8, "truncate", lone) == []
    assert "0 truncated, 0 split" in "\n".join(lone.lines())  # left out whole: nothing said cut
    message = no_samples_left("d.jsonl", lone)
    assert "dropped" not in message and "1 truncated to data.max_length with no response token left" in message
    assert message.endswith("; raise --data.max-length or shorten the prompts")


@pytest.mark.parametrize(
    ("data", "max_length", "message"),
    [
        # both records (one per split) counted; the fix is for empty responses, not for lengths
        ('{"instruction": "q", "output": ""}\n' * 2, 64, "(2 with an empty response, so nothing to train on); fill "
         "in the responses (or pass --data.train-on-prompt to train on the prompts too)"),
        ('{"text": ""}\n' * 2, 64, "(2 with no text); add text to the records"),
        (None, 1, "(data.max_length 1 leaves samples of one token, with no next token to predict); raise "
         "--data.max-length to 2 or more"),  # the embedded corpus: no prompts to shorten
    ],
)  # fmt: skip
def test_no_samples_left_says_why_and_the_fix_for_that_cause(tmp_path, data, max_length, message):
    from fasttune.config import get_experiment
    from fasttune.data.pipeline import build_data

    cfg = get_experiment("quick")
    path = None
    if data is not None:
        path = tmp_path / "d.jsonl"
        path.write_text(data)
    d = dataclasses.replace(cfg.data, path=path and str(path), max_length=max_length, max_documents=4,
                            tokenizer_vocab_size=384, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(DataError) as e:
        build_data(dataclasses.replace(cfg, data=d), tokenizer=build_tiny_tokenizer())
    assert str(e.value) == f"{path or 'embedded corpus'}: no training samples left {message}"


def test_a_model_folder_without_tokenizer_files_is_one_line(tmp_path):
    """Before: five lines of transformers' text ending in 'install sentencepiece or tiktoken'."""
    from fasttune.config import get_experiment
    from fasttune.data.pipeline import build_data

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4))
    cfg = get_experiment("sft")
    cfg.data.path, cfg.model.path = str(data), str(tmp_path / "model")
    with pytest.raises(DataError) as err:
        build_data(cfg.validate())
    assert str(err.value) == (f"--model {tmp_path / 'model'}: no tokenizer files there (tokenizer.json, "
                              "tokenizer_config.json, tokenizer.model, vocab.json); save the model's tokenizer into "
                              "that folder with tokenizer.save_pretrained")  # fmt: skip


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_conversational_prompt_completion_mistakes_name_the_record_and_field(tmp_path):
    """TRL's conversational prompt/completion is read as chat; what is wrong with one record is one line naming it
    and the field (prompt[j], completion), as for chat data."""
    q, a = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    bad = [
        ([{"prompt": [q], "completion": [a]}, {"prompt": "2+2?", "completion": "4"}],
         "line 2: prompt and completion are not both lists of messages, as in .* line 1"),
        ([{"prompt": [q], "completion": [q]}], "line 1: no message of 'completion' has role 'assistant'"),
        ([{"prompt": [{"role": "user"}], "completion": [a]}], r"line 1: prompt\[0\].content must be a string"),
        ([{"prompt": [], "completion": [a]}], "line 1: field 'prompt' must be a non-empty list"),
        ([{"prompt": "2+2?", "completion": "4"}, {"prompt": [q], "completion": [a]}],
         "line 2: prompt and completion are lists of messages .* but the data's first record holds strings"),
    ]  # fmt: skip
    for n, (records, message) in enumerate(bad):
        assert re.search(message, error_for(_jsonl(tmp_path / f"bad{n}.jsonl", records))), message


def test_a_split_texts_one_token_tail_is_not_called_an_empty_response():
    from fasttune.data.pipeline import DataSummary, fit_length
    from fasttune.data.sample import Sample

    text = Sample(range(9), [(0, 9)])  # 8 + a last piece of one token: no target
    summary = DataSummary("notes.txt", "text")
    assert len(fit_length([text], 8, "split", summary)) == 1
    assert summary.untrained == 1
    line = next(x for x in summary.lines() if "no trained token" in x)
    assert "last piece of one token" in line and "empty response" not in line


def test_a_format_the_records_lack_names_the_missing_field_and_the_option(tmp_path):
    """--data.format chat on Alpaca records said "field 'messages' must be a non-empty list, got null": a field the
    record never had, and no fix."""
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add 2 and 3.", "input": "", "output": "5"}) + "\n")
    assert error_for(path, "chat") == (
        f'{path} line 1: missing field \'messages\' for format chat {{"messages": [{{"role", "content"}}]}} '
        "(keys seen: input, instruction, output); add it or pass the right --data.format"
    )


def test_a_utf16_file_is_named_as_such_with_its_conversion(tmp_path):
    """A UTF-16 file (Windows editors, PowerShell's `>`) was told to convert from latin1, which garbles it."""
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-16")
    message = error_for(path)
    assert message.startswith(f"{path}: UTF-16 text, not UTF-8;") and "iconv -f utf-16 -t utf-8" in message
    assert "latin1" not in message


def test_messages_written_as_a_string_in_json_lines_is_not_told_about_csv(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"messages": json.dumps([{"role": "user", "content": "hi"}])}) + "\n")
    message = error_for(path)
    assert message.startswith(f"{path} line 1: field 'messages' is a string, not a list of {{role, content}} objects")
    assert "store it as a JSON list" in message


def test_a_line_that_is_not_an_object_says_what_a_record_is(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('"hello"\n"world"\n')
    assert error_for(path) == (
        f"{path} line 1: expected a JSON object, got str ('hello'); each record is an object of its format's fields "
        '(e.g. {"text": ...}); for plain text, one document per file, use .txt files'
    )
