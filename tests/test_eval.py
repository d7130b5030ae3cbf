"""`fasttune eval`: response loss against a plain-HF reference, generated answers scored (exact, GSM8K numbers)."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import GSM8K, hf_piece_loss, save_base_model, sft_config, train_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main
from fasttune.data.formats import load_records
from fasttune.data.sft import format_prompt, tokenize_records
from fasttune.eval.score import answer_number, score, split_sample, summarize_scores

SHARED_GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k_train_alpaca.json"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-eval")
    return train_tiny(tmp, save_base_model(tmp / "base"))


@pytest.fixture(scope="module")
def model(sft_run, tmp_path_factory):
    """The run's checkpoint copied out of it: a plain model folder, which eval scores with no run's data.max_length
    (supervised samples whole, plain text in pieces of the context)."""
    import shutil

    return Path(shutil.copytree(sft_run.checkpoint, tmp_path_factory.mktemp("sft-model") / "model"))


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Natalia sold 48+24 = 72 clips.\n#### 72", 72.0),
        ("so $1,200 in total", 1200.0),
        ("#### -3.5 then 7", -3.5),
        ("no digits here", None),
        ("It is 5. Then 12.", 12.0),
        ("The answer is 1,234.", 1234.0),
        ("It costs $18", 18.0),
        ("18.0", 18.0),
        ("-3", -3.0),
        ("\u22123 degrees", -3.0),  # the typographic minus
        ("#### 18\n\n### Instruction:\nTom has 5 apples and 3 pears.\n\n### Response:\n#### 8", 18.0),  # run on
        ("#### 18 #### 20", 18.0),
        ("#### **18** apples, 20 pears", 18.0),
        ("So she has 18.\n####", 18.0),
    ],  # fmt: skip
)
def test_answer_number_takes_the_gsm8k_final_answer_or_the_last_number(text, number):
    assert answer_number(text) == number


def test_scores_and_their_summary():
    assert score("The answer is 72", "She sold 72 clips\n#### 72") == {
        "exact_match": False, "numeric_match": True, "reference_number": 72.0, "completion_number": 72.0}  # fmt: skip
    assert score(" 5  apples", "5 apples") == {"exact_match": True, "numeric_match": True, "reference_number": 5.0,
                                               "completion_number": 5.0}  # fmt: skip
    assert score("no idea", "#### 5")["numeric_match"] is False and score("a", "b")["reference_number"] is None
    summary = summarize_scores([score("72", "#### 72"), score("7", "#### 8"), score("hi", "hi")])
    assert summary["exact_match"] == pytest.approx(1 / 3)
    assert summary["numeric_match"] == 0.5 and summary["numeric_samples"] == 2
    assert "numeric_match" not in summarize_scores([score("a", "b"), score("c", "d"), score("1", "1")])


def test_examples_split_at_the_trained_answer():
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=None, bos="<s>")
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ex = split_sample(tokenize_records([record], "alpaca", tok)[0], tok)
    assert ex.prompt_ids == tok(format_prompt(record, "alpaca"))["input_ids"] and ex.reference == "5"
    text = tokenize_records([{"text": "plain"}], "text", tok)[0]
    assert split_sample(text, tok) is None  # nothing to answer in plain text


def test_chat_examples_answer_the_last_assistant_turn_through_the_template():
    from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=CHATML)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]  # fmt: skip
    ex = split_sample(tokenize_records([{"messages": messages}], "chat", tok)[0], tok)
    prompt = tok.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"] and ex.reference == "5"


def _hf_response_loss(model_dir: Path, data: Path) -> tuple[float, int]:
    """Reference: plain HF forward with labels, one sample at a time, token-weighted mean over the samples that fit
    the model's context (512 positions), and how many do."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records, fmt = load_records(str(data))
    total, n = 0.0, 0
    fitting = [s for s in tokenize_records(records, fmt, tok) if len(s["input_ids"]) <= 512]
    for s in fitting:
        labels = torch.tensor([s["labels"]])
        count = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(torch.tensor([s["input_ids"]]), labels=labels).loss) * count
        n += count
    return total / n, len(fitting)


def test_eval_loss_matches_hf_and_generation_is_scored_and_written(model, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(model), "--data", str(GSM8K), "--generate", "--output-dir",
               str(out), "--max-new-tokens", "4", "--batch-size", "7"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(model) and summary["max_length"] is None  # samples scored whole
    reference, fitting = _hf_response_loss(model, GSM8K)
    assert summary["loss"] == pytest.approx(reference, rel=1e-4)
    assert summary["perplexity"] == pytest.approx(math.exp(reference), rel=1e-3)
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    records = json.loads(GSM8K.read_text())
    assert len(rows) == summary["samples"] == summary["generated_samples"] == fitting
    assert summary["skipped_longer_than_context"] == len(records) - fitting > 0
    assert all(r["reference"] == records[r["index"]]["output"].strip() for r in rows)  # index: the record's line
    assert all(r["reference_number"] == answer_number(r["reference"]) for r in rows)
    assert all(r["completion_number"] == answer_number(r["completion"]) for r in rows)
    assert all(r["finished"] or r["new_tokens"] == 4 for r in rows)  # cut at --max-new-tokens
    assert summary["cut_at_max_new_tokens"] == sum(not r["finished"] for r in rows)
    assert (summary["max_new_tokens"], summary["temperature"], summary["seed"]) == (4, 0.0, 0)
    tok = AutoTokenizer.from_pretrained(model)  # each stored prompt is the model's input, special
    seen = {tuple(tok(format_prompt(r, "alpaca"))["input_ids"]) for r in records}  # tokens included
    assert all(tuple(tok(r["prompt"], add_special_tokens=False)["input_ids"]) in seen for r in rows)
    assert summary["exact_match"] == sum(r["exact_match"] for r in rows) / len(rows)
    assert "numeric_match" in summary  # GSM8K answers end in a number
    printed = capsys.readouterr()
    assert "fasttune eval" in printed.out
    assert "0 (greedy)" in printed.out and not any(k in printed.out for k in ("top_k", "top_p", "seed"))
    assert "\r" not in printed.err and "sample/s" not in printed.err  # no progress bars in a redirected stderr
    rc = main(["eval", "--checkpoint", str(model), "--data", str(GSM8K), "--output-dir", str(out), "--generate"])
    assert rc == 2 and "already holds completions.jsonl, summary.json" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(model), "--data", str(GSM8K), "--output-dir", str(out)])
    assert rc == 2 and "already holds summary.json;" in capsys.readouterr().err  # it writes no completions.jsonl


def test_eval_generate_on_plain_text_says_what_it_needs(sft_run, tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "Natalia sold clips to her friends."}) + "\n")
    rc = main(["eval", "--checkpoint", str(sft_run.run_dir), "--data", str(data), "--generate"])
    assert rc == 2 and "--generate needs supervised data" in capsys.readouterr().err


def test_eval_of_samples_longer_than_the_context_says_what_to_do(model, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "Count: ", "completion": "one two three " * 400}) + "\n")
    assert main(["eval", "--checkpoint", str(model), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "longer than the model's context (512 tokens)" in err and "split them into several" in err, err


def test_one_sample_left_out_as_too_long_is_said_in_the_singular(model, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"prompt": "Count: ", "completion": "one two three " * 400}) + "\n"
                    + json.dumps({"prompt": "Count: ", "completion": "one"}) + "\n")  # fmt: skip
    assert main(["eval", "--checkpoint", str(model), "--data", str(data)]) == 0
    assert "1 sample longer than the model's context (512 tokens) is left out" in capsys.readouterr().err


@pytest.mark.parametrize("max_length", [None, 100])
def test_eval_of_a_text_file_longer_than_the_context_scores_it_in_pieces(model, tmp_path, max_length):
    """A .txt file training reads (split into data.max_length pieces) is scored in pieces of --max-length, else of
    the model's context (512): every token, against plain HF on the same pieces. It was refused as too long."""
    text = "".join(f"Natalia sold {i} clips to her friends in April, and half as many in May. " for i in range(120))
    data = tmp_path / "book.txt"
    data.write_text(text)
    out = tmp_path / "eval"
    argv = ["--max-length", str(max_length)] if max_length else []
    rc = main(["eval", "--checkpoint", str(model), "--data", str(data), "--output-dir", str(out), *argv])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    reference, targets = hf_piece_loss(model, text, max_length or 512)
    assert targets > 512 and summary["target_tokens"] == targets and summary["skipped_longer_than_context"] == 0
    assert summary["loss"] == pytest.approx(reference, rel=1e-4)


def test_eval_max_length_beyond_the_context_is_refused(sft_run, tmp_path, capsys):
    data = tmp_path / "book.txt"
    data.write_text("Natalia sold clips. " * 10)
    assert main(["eval", "--checkpoint", str(sft_run.run_dir), "--data", str(data), "--max-length", "4096"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max-length 4096 is longer than the model's context (512 tokens)" in err, err


@pytest.mark.parametrize(("record", "what"), [({"instruction": "What is 2+2?", "output": ""}, "response"),
                                              ({"text": ""}, "text")])  # fmt: skip
def test_eval_of_data_with_nothing_to_score_is_an_error_not_a_null_loss(sft_run, tmp_path, capsys, record, what):
    """Every response empty: eval exited 0 with loss null and target_tokens 0 (training refuses the same data)."""
    data = tmp_path / "empty.jsonl"
    data.write_text((json.dumps(record) + "\n") * 2)
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(sft_run.run_dir), "--data", str(data), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {data}: no sample has a token to score (every {what} is empty), so there is no loss to "
                   f"report; fill in the {what}s")  # fmt: skip
    assert not (out / "summary.json").exists()


def test_a_failed_eval_or_generate_leaves_no_folder_it_created(sft_run, tmp_path, capsys):
    """The output folder is made before the work (to fail early when it cannot be written); a command that then
    failed (a wrong --checkpoint, data with nothing to score) left it and its parents behind, empty."""
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"instruction": "What is 2+2?", "output": ""}) + "\n")
    kept = tmp_path / "kept"
    kept.mkdir()
    for out, argv in ((tmp_path / "a" / "b", ["--checkpoint", str(tmp_path / "nope"), "--data", str(GSM8K)]),
                      (tmp_path / "c" / "d", ["--checkpoint", str(sft_run.run_dir), "--data", str(data)]),
                      (kept / "e", ["--checkpoint", str(sft_run.run_dir), "--data", str(data)])):  # fmt: skip
        assert main(["eval", *argv, "--output-dir", str(out)]) == 2
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompts", str(GSM8K), "--output",
                 str(tmp_path / "f" / "answers.jsonl")]) == 2  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "kept"]
    assert list(kept.iterdir()) == []  # the user's folder stays; only what the command made went


def test_results_are_never_written_where_a_run_deletes_them(sft_run, tmp_path, capsys):
    """eval's --output-dir and generate's --output in a run's checkpoint (or checkpoints/, adapter/, merged/, reached
    through a symlink too): keep-last pruning, --resume's rewrite and --overwrite delete those folders whole, and the
    results in them went too. Refused before any work, naming the run; an eval/ folder beside them is fine."""
    run, ckpt = sft_run.run_dir, sft_run.checkpoint
    (tmp_path / "link").symlink_to(ckpt)
    for out in (ckpt, ckpt / "eval", run / "checkpoints", run / "merged" / "eval", tmp_path / "link" / "eval"):
        assert main(["eval", "--checkpoint", str(run), "--data", str(GSM8K), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--output-dir {out} lies in" in err and f"of the fasttune run {run}" in err, err
        assert not (out / "summary.json").exists() and not (ckpt / "eval").exists()
    answers = ckpt / "answers.jsonl"
    assert main(["generate", "--checkpoint", str(run), "--prompts", str(GSM8K), "--output", str(answers)]) == 2
    assert f"--output {answers} lies in checkpoints/ of the fasttune run {run}" in capsys.readouterr().err
    assert not answers.exists()
    assert main(["eval", "--checkpoint", str(run), "--data", str(GSM8K), "--output-dir", str(run / "eval")]) == 0
    assert (run / "eval" / "summary.json").is_file()


def test_eval_data_errors_name_evals_own_options(sft_run, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "How many?", "answer": "3"}) + "\n")
    for argv in ([], ["--format", "alpaca"]):  # unknown keys; a missing field for the format given
        assert main(["eval", "--checkpoint", str(sft_run.run_dir), "--data", str(data), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--format" in err and "--data.format" not in err, err


def test_eval_of_a_dataset_dict_is_of_the_split_named_not_its_train_split(model, tmp_path, capsys):
    """A save_to_disk DatasetDict of train and test splits was evaluated on its train split, silently: the loss of
    records the model trained on. Now the folder is refused naming the split folder, which scores the test records as
    plain HF does."""
    import datasets

    records = json.loads(GSM8K.read_text())
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(records[4:]),
                                  test=datasets.Dataset.from_list(records[:4]))  # fmt: skip
    splits.save_to_disk(str(tmp_path / "dd"))
    capsys.readouterr()  # datasets' progress bars
    assert main(["eval", "--checkpoint", str(model), "--data", str(tmp_path / "dd")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert f"splits train, test; pass the folder of the one to use, e.g. --data {tmp_path / 'dd' / 'test'}" in err
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(model), "--data", str(tmp_path / "dd" / "test"),
                 "--output-dir", str(out)]) == 0  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps(records[:4]))
    reference, fitting = _hf_response_loss(model, tmp_path / "test.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == fitting and summary["loss"] == pytest.approx(reference, rel=1e-4)


@pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="the shared GSM8K file (../shared/data) is not here")
def test_eval_reads_the_real_gsm8k_file(model, tmp_path):
    assert main(["eval", "--checkpoint", str(model), "--data", str(SHARED_GSM8K), "--limit", "24",
                 "--output-dir", str(tmp_path)]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples"] + summary["skipped_longer_than_context"] == 24 and summary["target_tokens"] > 100


def test_training_scores_generation_on_held_out_samples(tmp_path):
    import dataclasses

    from fasttune.train import loop

    cfg = sft_config(tmp_path, save_base_model(tmp_path / "base"), max_steps=2, save_every=0, eval_every=0,
                     eval_generate_every=1, eval_generate_samples=3)  # fmt: skip
    cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, max_new_tokens=3))
    result = loop.train(cfg)
    scored = [r for r in result.records if "gen_exact_match" in r]
    assert [r["step"] for r in scored] == [1, 2] and all(r["gen_samples"] == 3 for r in scored)
    logged = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "gen_exact_match" in r] == [1, 2]


def test_training_scores_leave_out_held_out_answers_cut_by_max_length(tmp_path, monkeypatch):
    """Held-out samples are cut to data.max_length like training ones: a cut answer ("...the monster ate") scored
    as the reference would make gen_numeric_match wrong. Only whole answers are scored."""
    from fasttune.eval import in_training
    from fasttune.train import loop

    seen = []

    def spy(model, tokenizer, examples, **kw):
        seen.extend(examples)
        return [], {"exact_match": 0.0, "generate_tokens_per_s": 1.0}

    monkeypatch.setattr(in_training, "generate_answers", spy)
    cfg = sft_config(tmp_path, save_base_model(tmp_path / "base"), max_length=400, val_fraction=0.5, max_steps=1,
                     save_every=0, eval_every=0, eval_generate_every=1, eval_generate_samples=20)  # fmt: skip
    loop.train(cfg)
    whole = {r["output"].strip() for r in json.loads(GSM8K.read_text())}
    assert seen and all(ex.reference in whole for ex in seen), [ex.reference[-40:] for ex in seen]


def test_nothing_to_answer_is_said_once_before_training_in_every_run(tmp_path, caplog):
    """It was said at the first evaluation, once per process and run folder (a module-level set): a second run in
    the same folder (--overwrite, a notebook's next run) went without it."""
    import dataclasses

    from helpers import tiny_config

    from fasttune.train import loop

    caplog.set_level("INFO", logger="fasttune")
    cfg = tiny_config(tmp_path, max_steps=2, save_every=0, eval_every=0, eval_generate_every=1)  # plain text
    for run in (cfg, dataclasses.replace(cfg, overwrite=True)):
        caplog.clear()
        result = loop.train(run)
        said = [r.getMessage() for r in caplog.records]
        warned = [i for i, m in enumerate(said) if "no held-out sample with a prompt to answer (text data)" in m]
        assert len(warned) == 1 and warned[0] < next(i for i, m in enumerate(said) if m.startswith("step 1/2"))
        assert not any("gen_exact_match" in r for r in result.records)


def test_eval_answers_each_conversations_last_turn_also_when_trained_turn_by_turn(tmp_path):
    """A template that rewrites earlier turns (Qwen3's reasoning) trains a conversation as a sample per assistant
    turn: --generate answered every turn (a ChatML run answers the last only) and numbered rows by sample, not by
    the record they came from. Now each conversation's last turn is answered, under its record's index."""
    from test_chat_templates import REASONED, REASONING

    base = save_base_model(tmp_path / "base", chat_template=REASONING)
    data = tmp_path / "chat.jsonl"
    records = [{"messages": [{"role": "user", "content": "Hi " * 300}, {"role": "assistant", "content": "1"}]},
               {"messages": REASONED}, {"messages": REASONED[:2]}]  # the first is longer than the context  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(base), "--data", str(data), "--generate", "--max-new-tokens", "2",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reference"]) for r in rows] == [(1, "<think>x</think>12"), (2, "<think>add</think>4")]
    tok = AutoTokenizer.from_pretrained(base)
    assert rows[0]["prompt"] == tok.apply_chat_template(REASONED[:3], tokenize=False, add_generation_prompt=True)


def test_eval_tokenizes_chat_data_trained_turn_by_turn_once(tmp_path, monkeypatch):
    """Eval numbered the samples of conversations trained turn by turn by tokenizing each record again on its own
    (twice the data prep); tokenizing gives each sample's record now."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from test_chat_templates import REASONED, REASONING

    from fasttune.eval import run

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n\n" for m in (REASONED, REASONED[:2], REASONED)))
    calls, real = [], run.tokenize_records
    monkeypatch.setattr(run, "tokenize_records", lambda records, *a, **k: calls.append(len(records)) or real(records,
                        *a, **k))  # fmt: skip
    tok = build_tiny_tokenizer(chat_template=REASONING)
    _, samples, fmt, too_long, _ = run._samples(run.EvalArgs(checkpoint="unused", data=str(data)), tok, 512)
    assert calls == [3] and (fmt, too_long) == ("chat", (0, 0))
    assert [(s.record, s.last_turn) for s in samples] == [(0, False), (0, True), (1, True), (2, False), (2, True)]


def _table_rows(summary: dict, capsys) -> dict[str, str]:
    from fasttune.eval.report import print_table

    print_table(summary)
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines()]
    return {c[0]: c[1] for c in cells if len(c) == 2}


def test_the_printed_table_shows_only_the_sampling_settings_that_apply(capsys):
    """A greedy run printed `top_k None`, `top_p 1.0` and a seed that it never read."""
    settings = {"exact_match": 0.5, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": None, "seed": 0}
    assert _table_rows(settings, capsys) == {"exact_match": "50.00%", "max_new_tokens": "4",
                                              "temperature": "0 (greedy)"}  # fmt: skip
    sampled = {**settings, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 5}
    assert _table_rows(sampled, capsys) == {"exact_match": "50.00%", "max_new_tokens": "4", "temperature": "0.8",
                                             "top_p": "0.9", "top_k": "50", "seed": "5"}  # fmt: skip
    assert "top_k" not in _table_rows({**sampled, "top_k": None}, capsys)  # a model without top-k: none applies
