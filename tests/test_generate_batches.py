"""Batched generation (`eval --generate`, `generate --prompts`) against plain HF `generate`, one prompt at a time:
the same greedy answers whatever --batch-size, also for prompts near the end of the model's context."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import save_base_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main

CONTEXT, MAX_NEW = 128, 100


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    """An untrained micro model with a 128-token context: it rarely writes EOS, so answers run to their budget."""
    return save_base_model(tmp_path_factory.mktemp("short") / "base", context=CONTEXT)


def _records() -> list[dict]:
    """Prompt/completion records whose prompts take from 8 to ~75 tokens: most leave fewer than MAX_NEW tokens."""
    return [{"prompt": "Natalia sold clips " * n + "?", "completion": f" {n}"} for n in (1, 12, 3, 9, 6, 15, 2)]


def _hf_one_at_a_time(model_dir: Path, prompts: list[list[int]]) -> list[str]:
    """Reference: plain HF greedy generate per prompt, with what the context leaves it, stopping at EOS."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for ids in prompts:
        x, budget = torch.tensor([ids]), min(MAX_NEW, CONTEXT - len(ids))
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, max_new_tokens=budget)  # fmt: skip
        out.append(tok.decode(y[0, len(ids) :], skip_special_tokens=True))
    return out


def test_eval_answers_near_the_context_end_do_not_depend_on_the_batch(short_model, tmp_path):
    """Every prompt of a batch got the budget of its longest one (the context minus its length): with --batch-size 8,
    short prompts' answers were cut tens of tokens before what one at a time (and HF) gives them."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(short_model), "--data", str(data), "--generate", "--batch-size", "8",
                 "--max-new-tokens", str(MAX_NEW), "--output-dir", str(out)]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(short_model)
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    assert len({min(MAX_NEW, CONTEXT - len(p)) for p in prompts}) > 3  # budgets differ inside one batch of 8
    assert [r["completion"] for r in rows] == [t.strip() for t in _hf_one_at_a_time(short_model, prompts)]


def test_generate_prompts_near_the_context_end_do_not_depend_on_the_batch(short_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in _records()))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", str(short_model), "--prompts", str(prompts), "--output", str(out),
                 "--batch-size", "8", "--max-new-tokens", str(MAX_NEW)]) == 0  # fmt: skip
    tok = AutoTokenizer.from_pretrained(short_model)
    ids = [tok(r["prompt"])["input_ids"] for r in _records()]  # no chat template: the text as is, after BOS
    got = [json.loads(x)["completion"] for x in out.read_text().splitlines()]
    assert got == _hf_one_at_a_time(short_model, ids)


def test_the_prompts_cut_short_by_the_context_are_counted_in_the_warning(caplog):
    from transformers import LlamaConfig

    from fasttune.generate.generate import length_batches

    model = type("M", (), {"config": LlamaConfig(max_position_embeddings=32)})()
    for prompts, said in (([[1] * 30, [1] * 4], "1 prompt: prompt + --max-new-tokens 8 exceed the context 32; its "
                           "answer gets"), ([[1] * 30, [1] * 28], "2 prompts: prompt + --max-new-tokens 8 exceed the "
                           "context 32; their answers get")):  # fmt: skip
        caplog.clear()
        list(length_batches(model, prompts, 4, 8))
        assert said in caplog.text


def test_an_empty_prompt_in_a_file_is_refused_naming_its_line(tmp_path, capsys):
    """--raw on a tokenizer that adds no BOS: an empty line's prompt has no token. It stopped with "a prompt is empty
    after tokenization" (which one?) after the batches before it were generated; now one line names it, before any."""
    from helpers import save_micro_model

    model = save_micro_model(tmp_path / "m")  # ChatML, no BOS
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"Natalia sold clips"\n{"prompt": ""}\n')
    rc = main(["generate", "--checkpoint", str(model), "--prompts", str(prompts), "--raw", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: {prompts} line 2: the prompt is empty"), err
    assert not (tmp_path / "p.completions.jsonl").exists()


def test_output_to_a_named_pipe_or_dev_stdout_is_written_into_not_replaced(short_model, tmp_path):
    """--output /dev/stdout (piped, or redirected to a file) or a named pipe is a stream: its reader gets the
    completions and it stays what it was. It was refused as existing, and with --overwrite replaced by a regular file
    (as root, /dev/stdout itself). A symlink's target gets them, the link is kept (it was replaced)."""
    import stat

    prompts, fifo = tmp_path / "p.jsonl", tmp_path / "out.fifo"
    prompts.write_text('"Natalia sold clips"\n"Add the numbers."\n')
    run = ["generate", "--checkpoint", str(short_model), "--prompts", str(prompts), "--max-new-tokens", "3", "--output"]
    want = ["Natalia sold clips", "Add the numbers."]
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waiting, as `| head` is
    try:
        assert main([*run, str(fifo)]) == 0
        got = os.read(reader, 1 << 16).decode().splitlines()
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and [json.loads(x)["prompt"] for x in got] == want
    with (tmp_path / "redirected.jsonl").open("w") as f:  # `> redirected.jsonl`: the fd's /dev path is a regular file
        assert main([*run, f"/dev/fd/{f.fileno()}"]) == 0
    assert [json.loads(x)["prompt"] for x in (tmp_path / "redirected.jsonl").read_text().splitlines()] == want
    (tmp_path / "real.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real.jsonl")
    assert main([*run, str(tmp_path / "link.jsonl"), "--overwrite"]) == 0
    assert (tmp_path / "link.jsonl").is_symlink() and len((tmp_path / "real.jsonl").read_text().splitlines()) == 2


def test_prompts_piped_on_stdin_give_completions_on_stdout(short_model, tmp_path):
    """`--prompts -` (or /dev/stdin, a pipe) was refused as not a regular file; the completions go to stdout."""
    import subprocess
    import sys

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"Natalia sold clips"\n{"prompt": "Add the numbers."}\n')
    args = ["generate", "--checkpoint", str(short_model), "--max-new-tokens", "3", "--prompts"]
    assert main([*args, str(prompts), "--output", str(tmp_path / "ref.jsonl")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "fasttune", *args, "-"], input=prompts.read_text(), text=True,
                          capture_output=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == (tmp_path / "ref.jsonl").read_text() and "2 completions -> /dev/stdout" in done.stderr


def test_ctrl_c_keeps_the_completions_made_so_far(short_model, tmp_path, monkeypatch, capsys):
    """Ctrl-C during `generate --prompts` lost every completion made: the file was written at the end only."""
    from fasttune.generate import generate

    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _records()[:3]))
    args = ["generate", "--checkpoint", str(short_model), "--prompts", str(prompts), "--max-new-tokens", "3",
            "--batch-size", "1"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "ref.jsonl")]) == 0
    whole = [json.loads(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    calls, real = [], generate.generate_ids

    def interrupted_at_the_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(generate, "generate_ids", interrupted_at_the_third_batch)
    assert main([*args, "--output", str(out)]) == 130
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(kept) == 2 and all(row in whole for row in kept)
    assert [whole.index(row) for row in kept] == sorted(whole.index(row) for row in kept)  # in the prompts' order
    assert "interrupted: the 2 of 3 completions made so far -> " in capsys.readouterr().err
