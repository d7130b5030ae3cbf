"""`fasttune generate` / `chat` after fine-tuning: run folders, prompt files, chat sessions (the run's prompt format:
test_prompt_format.py; adapters and damaged model folders: test_model_folders.py; how a prompt file is read and its
errors: test_generate_prompt_files.py). References: the training samples' own prompt tokens, and plain HF
`generate` on the same checkpoint."""

import errno
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_base_model, train_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main
from fasttune.data.sft import ALPACA_PROMPT_NO_INPUT, format_prompt
from fasttune.errors import DataError, FasttuneError
from fasttune.generate.chat import chat_loop
from fasttune.generate.prompts import read_prompts, write_jsonl
from fasttune.generate.template import prompt_ids


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    return train_tiny(tmp, save_base_model(tmp / "base"))


def _hf_greedy(model_dir: Path, ids: list[int], n: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_sft_checkpoint_carries_the_alpaca_format_for_plain_hf(sft_run):
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    messages = [{"role": "user", "content": "Why?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Why?")
    assert text == tok.bos_token + prompt and prompt == format_prompt({"instruction": "Why?"}, "alpaca")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tok(prompt)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # one BOS, as trained


def test_generate_on_a_run_folder_answers_in_the_trained_format_like_hf(sft_run, capsys, prompts_seen):
    question = "How many clips did Natalia sell?"
    rc = main(["generate", "--checkpoint", str(sft_run.run_dir), "--prompt", question, "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    ids = tok(format_prompt({"instruction": question}, "alpaca"))["input_ids"]  # BOS + the Alpaca prompt, as trained
    assert rc == 0 and prompts_seen == [ids] and out == _hf_greedy(sft_run.checkpoint, ids, 6) + "\n"
    assert f"using its latest complete checkpoint {sft_run.checkpoint}" in err and "prompt format: alpaca" in err


def test_generate_raw_continues_the_text(sft_run, capsys):
    rc = main(["generate", "--checkpoint", str(sft_run.checkpoint), "--prompt", "Natalia", "--raw",
               "--max-new-tokens", "5"])  # fmt: skip
    out = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    assert rc == 0 and out == "Natalia" + _hf_greedy(sft_run.checkpoint, tok("Natalia")["input_ids"], 5) + "\n"


def test_generate_notice_is_a_line_before_the_streamed_text(sft_run, monkeypatch):
    both = io.StringIO()  # stdout and stderr in one stream, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    rc = main(["generate", "--checkpoint", str(sft_run.checkpoint), "--prompt", "Natalia", "--raw",
               "--max-new-tokens", "3"])  # fmt: skip
    text = both.getvalue()
    at = text.find("generate: HF generate (the fast path needs a CUDA GPU)\n")
    assert rc == 0 and at >= 0 and (at == 0 or text[at - 1] == "\n") and at < text.index("Natalia"), text


def test_prompt_file_is_batched_and_matches_one_prompt_at_a_time(sft_run, tmp_path, capsys, prompts_seen):
    prompts = tmp_path / "prompts.jsonl"
    lines = ['"Natalia sold clips"', json.dumps({"instruction": "Add the numbers.", "input": "2 and 3"}),
             "", json.dumps({"prompt": "Weng earns $12 an hour for babysitting. How much?"})]  # fmt: skip
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--checkpoint", str(sft_run.run_dir), "--prompts", str(prompts), "--output", str(out),
               "--batch-size", "2", "--max-new-tokens", "6"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("prompt", r.get("instruction")) for r in rows] == [
        "Natalia sold clips", "Add the numbers.", "Weng earns $12 an hour for babysitting. How much?"]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    for row in rows:
        record = {"instruction": row.get("instruction") or row["prompt"], "input": row.get("input", "")}
        ids = tok(format_prompt(record, "alpaca"))["input_ids"]
        assert ids in prompts_seen and row["completion"] == _hf_greedy(sft_run.checkpoint, ids, 6)
    assert len(prompts_seen) == 3
    err = capsys.readouterr().err
    assert "3 completions" in err and "\r" not in err and "prompt/s" not in err  # no bar in a redirected stderr
    assert main(["generate", "--checkpoint", str(sft_run.run_dir), "--prompts", str(prompts), "--output",
                 str(out)]) == 2  # fmt: skip
    assert "already exists; choose another path or pass --overwrite" in capsys.readouterr().err


def test_a_prompt_files_own_completion_is_kept_as_the_reference(sft_run, tmp_path):
    """Prompt/completion records (a test set in the format the model trained on) lost their reference answer: the
    output's "completion" replaced it. It is kept as "reference", beside the model's completion."""
    prompts = tmp_path / "test.jsonl"
    records = [{"prompt": "Natalia sold clips", "completion": "72", "id": 7}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", str(sft_run.checkpoint), "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    [row] = [json.loads(x) for x in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    ids = tok(format_prompt({"instruction": "Natalia sold clips"}, "alpaca"))["input_ids"]
    assert row["completion"] == _hf_greedy(sft_run.checkpoint, ids, 4)
    assert {k: row[k] for k in ("prompt", "reference", "id")} == {"prompt": "Natalia sold clips", "reference": "72",
                                                                   "id": 7}  # fmt: skip


def test_a_conversational_prompt_completion_record_is_answered_with_its_completion_as_reference(
    sft_run, tmp_path, prompts_seen
):
    """TRL's conversational prompt/completion (training reads it as chat): its prompt messages are the conversation
    to answer, its completion is kept as the reference, as for a string prompt/completion record."""
    question = "Natalia sold clips"
    completion = [{"role": "assistant", "content": "72"}]
    prompts = tmp_path / "test.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": question}], "completion": completion}))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", str(sft_run.checkpoint), "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    [row] = [json.loads(x) for x in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    assert prompts_seen == [tok(format_prompt({"instruction": question}, "alpaca"))["input_ids"]]
    assert row["reference"] == completion and isinstance(row["completion"], str)


def test_a_json_array_of_prompts_is_read_as_its_records(sft_run, tmp_path):
    """An Alpaca .json test set (a JSON array, as training and `eval --data` read it) stopped with "line 1: no
    prompt" (one line) or "line 1: invalid JSON" (pretty-printed): its records are answered as the same JSONL's."""
    records = [{"instruction": "Natalia sold clips", "input": "", "output": "72"}, "How many clips?"]
    lines, array = tmp_path / "p.jsonl", tmp_path / "p.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    outs = []
    for path, text in ((lines, None), (array, json.dumps(records)), (array, json.dumps(records, indent=2))):
        if text is not None:
            path.write_text(text)
        outs.append(tmp_path / f"out{len(outs)}.jsonl")
        assert main(["generate", "--checkpoint", str(sft_run.checkpoint), "--prompts", str(path), "--output",
                     str(outs[-1]), "--max-new-tokens", "3"]) == 0  # fmt: skip
    rows = [[json.loads(x) for x in out.read_text().splitlines()] for out in outs]
    assert len(rows[0]) == 2 and rows[0] == rows[1] == rows[2]
    array.write_text(json.dumps(records, indent=2).replace('"input"', "input", 1))
    with pytest.raises(DataError, match="p.json line 4: invalid JSON"):
        read_prompts(array)
    array.write_text(json.dumps([{"answer": 1}]))
    with pytest.raises(DataError, match="p.json record 1: no prompt"):
        read_prompts(array)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, command):
    """The write failed only after every completion was generated, and its message said to free disk space."""
    (tmp_path / "p.jsonl").write_text('"q"\n')
    readonly = tmp_path / "ro"
    readonly.mkdir()
    path_open = Path.open

    def denied(self, mode="r", *args, **kwargs):  # chmod 555 as a user other than root (tests run as root)
        if self.parent == readonly and mode != "r":
            raise PermissionError(13, "Permission denied", str(self))
        return path_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    option, value = ("--output", readonly / "out.jsonl") if command == "generate" else ("--output-dir", readonly)
    inputs = (
        ["--prompts", str(tmp_path / "p.jsonl")] if command == "generate" else ["--data", str(tmp_path / "p.jsonl")]
    )
    # a checkpoint that does not exist: the output is checked first, before minutes of loading and generating
    assert main([command, "--checkpoint", str(tmp_path / "none"), *inputs, option, str(value)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {option}: cannot write in {readonly} (Permission denied); make the folder writable "
                   "(chmod u+w) or choose another path\n")  # fmt: skip
    assert list(readonly.iterdir()) == []


@pytest.mark.parametrize(
    ("error", "fix"),
    [
        (errno.EACCES, "make the folder writable"),
        (errno.ENOSPC, "free disk space"),
        (errno.EROFS, "that file system is read-only"),
    ],
)
def test_a_failed_write_names_its_cause_and_the_fix_for_it(tmp_path, monkeypatch, error, fix):
    def fail(*args):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(FasttuneError, match=f"could not write .*out.jsonl \\({os.strerror(error)}\\); {fix}"):
        write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    assert list(tmp_path.iterdir()) == []


def _short_base(path: Path, chat_template=None) -> Path:
    """A model of 32 positions whose tokenizer knows it (model_max_length, as training saves it)."""
    base = save_base_model(path, chat_template=chat_template, context=32)
    AutoTokenizer.from_pretrained(base, model_max_length=32).save_pretrained(base)
    return base


def _transformers_length_warning(caplog) -> bool:
    """transformers' "Token indices sequence length is longer than..." (its handler writes to the stderr it found at
    import, past capsys: read from the log records)."""
    return any("Token indices sequence length" in r.getMessage() for r in caplog.records)


def test_prompt_longer_than_the_context_is_one_line(tmp_path, capsys, caplog):
    base = _short_base(tmp_path / "short")
    rc = main(["generate", "--checkpoint", str(base), "--prompt", "word " * 40, "--raw"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --prompt is ") and "context is 32" in err[-1]
    assert not _transformers_length_warning(caplog)  # it came before fasttune's own line


def test_chat_message_longer_than_the_context_is_ours_alone_and_reset_says_so(tmp_path, capsys, caplog):
    """A message longer than the context gets fasttune's one line, not transformers' "Token indices sequence length"
    warning first; /reset confirms with one line."""
    from fixtures.tiny_tokenizer import CHATML

    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(_short_base(tmp_path / "short", chat_template=CHATML))
    lines = iter(["word " * 40, "/reset"])
    assert chat_loop(model, tok, max_new_tokens=3, read=lambda prompt: next(lines, None) or _eof()) == 0
    err = capsys.readouterr().err
    assert "error: the message is " in err and not _transformers_length_warning(caplog), err
    assert err.strip().splitlines()[-1] == "(history cleared)"


def _eof():
    raise EOFError  # what Ctrl-D gives input()


def test_chat_forgets_the_oldest_exchange_before_it_cuts_a_reply_short(tmp_path, monkeypatch):
    """A conversation near the end of the context kept its old turns and cut each later reply to the few tokens left
    (a warning every turn). Reference: a fresh session's reply to the same message alone, at full --max-new-tokens:
    the second turn is generated as that one, its history forgotten."""
    from fixtures.tiny_tokenizer import CHATML

    import fasttune.generate.chat as chat_mod
    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(save_base_model(tmp_path / "m", chat_template=CHATML, context=52))
    calls, real = [], chat_mod.generate_ids

    def seen(m, t, ids, **k):
        calls.append((ids, k["max_new_tokens"]))
        return real(m, t, ids, **k)

    monkeypatch.setattr(chat_mod, "generate_ids", seen)

    def session(*lines: str) -> None:
        it = iter(lines)
        assert chat_loop(model, tok, max_new_tokens=6, read=lambda prompt: next(it, None) or _eof()) == 0

    session("a b c d", "e f")
    first = [{"role": "user", "content": "a b c d"}, {"role": "assistant", "content": "\n" * 6}]
    assert 52 - 6 < len(chat_mod.prompt_ids(tok, [*first, {"role": "user", "content": "e f"}])) < 52  # fits, no room
    session("e f")
    assert calls[0][1] == 6 and calls[1] == calls[2], calls


def test_chat_is_multi_turn_with_a_chat_template_and_exits_on_eof(tmp_path, capsys, monkeypatch):
    from fixtures.tiny_tokenizer import CHATML

    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(save_base_model(tmp_path / "chat", chat_template=CHATML))
    lines = iter(["Hello", "", "And you?"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:  # what Ctrl-D gives input()
            raise EOFError from None

    import fasttune.generate.chat as chat_mod

    calls, real = [], chat_mod.prompt_ids
    monkeypatch.setattr(chat_mod, "prompt_ids", lambda t, m, raw=False: calls.append(m) or real(t, m, raw))
    assert chat_loop(model, tok, max_new_tokens=3, read=read) == 0
    assert [m["content"] for m in calls[0]] == ["Hello"]
    assert [m["role"] for m in calls[1]] == ["user", "assistant", "user"] and calls[1][-1]["content"] == "And you?"
    assert "multi-turn" in capsys.readouterr().err


def test_chat_ctrl_c_at_the_prompt_exits_cleanly(sft_run, capsys):
    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(sft_run.run_dir)

    def interrupt(prompt):
        raise KeyboardInterrupt

    assert chat_loop(model, tok, read=interrupt) == 0
    err = capsys.readouterr().err
    assert "answered on its own" in err and "--system" not in err  # alpaca: single exchanges, as trained
    assert chat_loop(model, tok, system=" ", read=interrupt) == 0  # a blank system message drops nothing


def _no_model_load(monkeypatch) -> None:
    """A refusal that needs the tokenizer only comes before the model loads (minutes for a large one)."""
    from fasttune.model import load

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(load, "load_model", never)


def test_chat_system_that_the_format_would_drop_is_refused_as_training_refuses_it(sft_run, tmp_path, capsys,
                                                                                  monkeypatch):  # fmt: skip
    """An Alpaca run's checkpoint has no place for a system message (training on chat data through it refuses one):
    `chat --system` is one line and exit 2, before the model loads, not a note and a conversation without it; so is
    --system with --raw or with a model that has no chat template."""
    with monkeypatch.context() as m:
        _no_model_load(m)
        rc = main(["chat", "--checkpoint", str(sft_run.run_dir), "--system", "Be brief."])  # refused before input
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --system: the conversation has a 'system' message, which the tokenizer's chat "
                           "template drops: it is the alpaca prompt format")  # fmt: skip
    assert "drop --system" in err
    assert main(["chat", "--checkpoint", str(sft_run.run_dir), "--system", "Be brief.", "--raw"]) == 2
    assert "error: --system goes with a chat template, and --raw sends each message without one" in (
        capsys.readouterr().err
    )
    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(save_base_model(tmp_path / "plain"))  # no chat template: plain text continued
    with pytest.raises(FasttuneError, match="--system: this model has no chat template.*drop --system"):
        chat_loop(model, tok, system="Be brief.", read=lambda prompt: "")


def test_generate_refuses_a_system_message_the_trained_format_would_drop(sft_run, tmp_path, capsys, prompts_seen):
    """generate --prompts on an Alpaca run's checkpoint: a messages record with a system message rendered as the
    Alpaca prompt without it (silently); training refuses it (data/sft.py, the same check), so generate does too,
    naming the line, before generating anything. A blank system message drops nothing and is answered."""
    turns = [{"role": "user", "content": "How many clips did Natalia sell?"}]
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Answer in French."}, *turns]}) + "\n")  # fmt: skip
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(sft_run.checkpoint), "--prompts", str(prompts), "--output", str(out),
            "--max-new-tokens", "2"]  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        _no_model_load(m)  # refused before the model loads
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: {prompts} line 2 has a 'system' message, which the tokenizer's chat template drops: it is the alpaca "
        "prompt format a fasttune run trained this model on (user and assistant turns only); remove it from that line "
        "(write what it says into the user message if it matters)"
    )
    assert not out.exists() and prompts_seen == []
    prompts.write_text(json.dumps({"messages": [{"role": "tool", "content": "42"}, *turns]}) + "\n")
    assert main(argv) == 2 and "line 1 has a 'tool' message" in capsys.readouterr().err
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": ""}, *turns]}) + "\n")
    assert main(argv) == 0 and len(prompts_seen) == 1
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    assert prompts_seen[0] == tok(format_prompt({"instruction": turns[0]["content"]}, "alpaca"))["input_ids"]


def test_generate_raw_refuses_a_record_whose_other_messages_it_would_drop(sft_run, tmp_path, capsys, prompts_seen):
    """--raw sends the last message's text alone: a system message or earlier turns of a messages record were dropped
    silently; refused naming the line. One message (or blank others) is sent as is."""
    user = {"role": "user", "content": "How many clips did Natalia sell?"}
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": "Answer in French."}, user]}) + "\n")
    argv = ["generate", "--checkpoint", str(sft_run.checkpoint), "--prompts", str(prompts), "--output",
            str(tmp_path / "out.jsonl"), "--max-new-tokens", "2", "--raw"]  # fmt: skip
    assert main(argv) == 2 and prompts_seen == []
    assert f"{prompts} line 1 has 2 messages, and without a chat template" in capsys.readouterr().err
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": " "}, user]}) + "\n")
    assert main(argv) == 0
    tok = AutoTokenizer.from_pretrained(sft_run.checkpoint)
    assert prompts_seen == [tok(user["content"])["input_ids"]]


def test_train_from_a_run_folder_starts_from_its_latest_checkpoint(sft_run, tmp_path):
    result = train_tiny(tmp_path, sft_run.run_dir)
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["model"]["path"] == str(sft_run.checkpoint)


def test_fast_engine_path_streams_what_it_returns(sft_run):
    """The decode engine (fast.py's Generator, here without graphs on the CPU) behind generate_ids: the streamed
    text is the returned text, rows of a batch match their own single-prompt runs."""
    from fasttune.generate.fast import Generator
    from fasttune.generate.generate import generate_ids
    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(sft_run.checkpoint)
    engine = Generator(model, use_graphs=False)
    assert engine.reason is None
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("Add 2 and 3.", "How many clips?")]
    pieces = []
    one = generate_ids(model, tok, prompts[:1], max_new_tokens=20, on_text=pieces.append, engine=engine)[0]
    assert "".join(pieces) == one.text and one.new_tokens == 20 or one.finished
    alone = [generate_ids(model, tok, [p], max_new_tokens=8, engine=engine)[0].text for p in prompts]
    batched = [g.text for g in generate_ids(model, tok, prompts, max_new_tokens=8, engine=engine)]
    assert batched == alone


def test_chat_ctrl_c_during_a_reply_stops_it_and_keeps_the_session(sft_run, capsys, monkeypatch):
    import fasttune.generate.chat as chat_mod
    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(sft_run.run_dir)
    lines = iter(["first", "second"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_mod, "generate_ids", interrupted)
    assert chat_loop(model, tok, read=read) == 0
    assert capsys.readouterr().out.count("[stopped]") == 2  # both messages were read: the session went on


def test_a_txt_file_holds_plain_prompts_one_per_line(sft_run, tmp_path):
    """`--prompts questions.txt` (one plain prompt per line, as users keep them) stopped with "line 1: invalid JSON":
    each line that is not blank is a prompt, answered as the same prompt as a JSON string."""
    texts = ["Natalia sold clips to 48 of her friends.", '{"not": "json"} is text here', "How many clips?"]
    txt, jsonl = tmp_path / "q.txt", tmp_path / "q.jsonl"
    txt.write_text(f"{texts[0]}\n\n{texts[1]}\r\n{texts[2]}")
    jsonl.write_text("".join(json.dumps(t) + "\n" for t in texts))
    where = ["line 1", "line 3", "line 4"]  # the blank line 2 is skipped; the CRLF ending is not part of a prompt
    assert [(r["prompt"], r["_where"]) for r in read_prompts(txt)] == list(zip(texts, where, strict=True))
    assert main(["generate", "--checkpoint", str(sft_run.checkpoint), "--prompts", str(txt),
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    assert main(["generate", "--checkpoint", str(sft_run.checkpoint), "--prompts", str(jsonl), "--output",
                 str(tmp_path / "from-jsonl.jsonl"), "--max-new-tokens", "3"]) == 0  # fmt: skip
    rows = [[json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
            for name in ("q.completions.jsonl", "from-jsonl.jsonl")]  # fmt: skip
    assert [r["prompt"] for r in rows[0]] == texts and rows[0] == rows[1]
