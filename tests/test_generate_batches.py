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


LONG = "Natalia sold clips " * 40  # ~200 tokens: longer than the 128-token context


def _out(prompts: Path) -> Path:
    return prompts.with_suffix(".out.jsonl")


def _generate(model: Path, prompts: Path, *extra: str) -> int:
    return main(["generate", "--checkpoint", str(model), "--prompts", str(prompts), "--output", str(_out(prompts)),
                 "--batch-size", "8", *extra])  # fmt: skip


def _rows(prompts: Path) -> list[dict]:
    return [json.loads(x) for x in _out(prompts).read_text().splitlines()]


def test_prompts_longer_than_the_context_or_empty_are_skipped_and_the_rest_answered_as_alone(short_model, tmp_path,
                                                                                          capsys):  # fmt: skip
    """One prompt longer than the context stopped the whole file (none answered). Now it is skipped, as eval leaves
    such a record out, and so is an empty one: every other prompt gets what HF gives it alone, the output keeps a
    line per prompt in the input order (a skipped one's "completion" is null, "skipped" says why), one line counts
    them."""
    fitting = [r["prompt"] for r in _records()]
    lines = [fitting[0], fitting[1], LONG, fitting[2], "", fitting[3], LONG + "?", "   ", *fitting[4:]]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines[:4]) + "\n"  # a blank line: no prompt (line 5)
                       + "".join(json.dumps(x) + "\n" for x in lines[4:]))  # fmt: skip
    assert _generate(short_model, prompts, "--max-new-tokens", str(MAX_NEW)) == 0
    rows = _rows(prompts)
    assert [r["prompt"] for r in rows] == lines
    tok = AutoTokenizer.from_pretrained(short_model)
    answered = [r["completion"] for r in rows if r["prompt"] in fitting]
    assert answered == _hf_one_at_a_time(short_model, [tok(p)["input_ids"] for p in fitting])
    long = len(tok(LONG)["input_ids"])
    assert [r.get("skipped") for r in rows if r["prompt"] not in fitting] == [
        f"longer than the model's context of 128 tokens: {long} tokens", "empty: no text",
        f"longer than the model's context of 128 tokens: {long + 1} tokens", "empty: no text"]  # fmt: skip
    assert all(r["completion"] is None and r["new_tokens"] == 0 for r in rows if r["prompt"] not in fitting)
    said, out = [x for x in capsys.readouterr().err.splitlines() if x.startswith("skipped")], _out(prompts)
    assert said == [f"skipped 4 of {len(lines)} prompts: 2 longer than the model's context of 128 tokens (the first: "
                    f"{prompts} line 3, {long} tokens): shorten them (or use a model with a longer context); 2 empty "
                    f"(the first: {prompts} line 6, no text): give them some text or remove them; their lines in "
                    f'{out} have "completion": null and "skipped" saying why']  # fmt: skip


def test_a_skipped_prompt_leaves_the_others_sampled_answers_as_they_were(short_model, tmp_path):
    """Each prompt samples from its place in the input: the answers around a skipped prompt are those the file gives
    once that prompt is shortened (not those of the prompts renumbered without it)."""
    fitting = [r["prompt"] for r in _records()]
    for name, third in (("skips", LONG), ("fits", "Natalia sold clips")):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in [*fitting[:2], third, *fitting[2:]])
        )
        assert _generate(short_model, tmp_path / f"{name}.jsonl", "--max-new-tokens", "6", "--temperature", "1") == 0
    skips, fits = _rows(tmp_path / "skips.jsonl"), _rows(tmp_path / "fits.jsonl")
    assert skips[2]["completion"] is None and fits[2]["completion"]
    assert [r["completion"] for r in skips[:2] + skips[3:]] == [r["completion"] for r in fits[:2] + fits[3:]]


@pytest.mark.parametrize(
    ("lines", "said"),
    [([LONG, LONG + "?"], "every prompt is longer than the model's context of 128 tokens, so none is generated (the "
      "first: line 1, {n} tokens); shorten them (or use a model with a longer context)"),
     (["", " "], "every prompt is empty, so none is generated (the first: line 1, no text); give them some text or "
      "remove them"),
     ([LONG, ""], "every prompt is empty or longer than the model's context, so none is generated (the first: line 1, "
      "{n} tokens); shorten them (or use a model with a longer context), and give the empty ones text")],
)  # fmt: skip
def test_every_prompt_skipped_is_one_line_and_no_output(short_model, tmp_path, capsys, monkeypatch, lines, said):
    """Said before the model loads (seconds to minutes for a large one): blank prompts are known from the file, long
    ones from the tokenizer and the model's config.json."""
    from fasttune.model import load

    def never(*_a, **_k):
        raise AssertionError("the model was loaded for a file whose every prompt is skipped")

    monkeypatch.setattr(load, "load_model", never)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _generate(short_model, prompts) == 2
    n = len(AutoTokenizer.from_pretrained(short_model)(LONG)["input_ids"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --prompts {prompts}: " + said.format(n=n)
    assert not _out(prompts).exists()


def test_an_empty_prompt_with_raw_or_a_chat_template_is_skipped_naming_its_line(tmp_path, capsys):
    """--raw on a tokenizer that adds no BOS: an empty prompt has no token. It stopped with "a prompt is empty
    after tokenization" (which one?) after the batches before it were generated, and through a chat template an
    empty user message was answered; both skip it now, as eval leaves out a record without a prompt."""
    from helpers import save_micro_model

    model = save_micro_model(tmp_path / "m")  # ChatML, no BOS
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"Natalia sold clips"\n{"prompt": ""}\n')
    for raw in (["--raw"], []):
        assert _generate(model, prompts, "--max-new-tokens", "2", "--overwrite", *raw) == 0
        rows = _rows(prompts)
        assert rows[0]["new_tokens"] > 0 and rows[1] == {"prompt": "", "completion": None, "new_tokens": 0,
                                                         "finished": None, "stop": None,
                                                         "skipped": "empty: no text"}  # fmt: skip
        said = f"1 empty (the first: {prompts} line 2, no text): give it some text or remove it;"
        assert said in capsys.readouterr().err


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
    """Ctrl-C during `generate --prompts` lost every completion made: the file was written at the end only. The lines
    of the prompts skipped (empty, longer than the context) are kept too, in their places: they were left out."""
    from fasttune.generate import generate

    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    records = _records()[:3]
    records[1:1] = [{"prompt": " "}, {"prompt": "Natalia sold clips " * 60}]  # skipped: empty, over the context
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
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
    assert len(kept) == 4 and all(row in whole for row in kept) and whole[1] in kept and whole[2] in kept
    assert whole[1]["completion"] is whole[2]["completion"] is None  # the two skipped prompts' lines
    assert [whole.index(row) for row in kept] == sorted(whole.index(row) for row in kept)  # in the prompts' order
    err = capsys.readouterr().err
    assert "interrupted: the 2 of 3 completions made so far -> " in err and "with the 2 skipped prompts' lines" in err


def test_limit_generates_the_first_n_prompts_as_the_whole_file_does(short_model, tmp_path, capsys):
    """`generate --prompts FILE --limit N`, as `eval --limit N`: the first N prompts of the file, a skipped one among
    them counted (its line kept); each answers as it does in the whole file (sampling included: a prompt's random
    numbers follow its place). A --limit beyond the file is the whole file; without --prompts, or not above 0, one
    line."""
    fitting = [r["prompt"] for r in _records()]
    lines = [fitting[0], LONG, *fitting[1:]]
    (whole := tmp_path / "whole.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (first := tmp_path / "first.jsonl").write_text(whole.read_text())
    sampled = ("--max-new-tokens", "6", "--temperature", "1")
    assert _generate(short_model, whole, *sampled) == 0
    capsys.readouterr()
    assert _generate(short_model, first, *sampled, "--limit", "4") == 0
    assert _rows(first) == _rows(whole)[:4] and _rows(first)[1]["completion"] is None
    assert "3 completions" in (err := capsys.readouterr().err) and "skipped 1 of 4 prompts" in err, err
    assert _generate(short_model, first, *sampled, "--limit", "100", "--overwrite") == 0
    assert _rows(first) == _rows(whole)
    capsys.readouterr()
    for argv, said in ((["--prompts", str(first), "--limit", "0"], "--limit=0 is not valid; it must be > 0"),
                       (["--prompt", "Hi", "--limit", "2"], "--limit goes with --prompts FILE")):  # fmt: skip
        assert main(["generate", "--checkpoint", str(short_model), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {said}") and err.count("\n") == 1, err
