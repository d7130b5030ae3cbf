"""`fasttune eval` of a run trained with --data.train-on-prompt scores what that run's val_loss scores: the prompt
tokens too (every token but the BOS), by default when --checkpoint is the run; `--train-on-prompt off` scores the
responses only."""

import json

import pytest
import torch
from helpers import GSM8K, save_base_model, sft_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main
from fasttune.data.corpus import holdout
from fasttune.data.sft import tokenize_records

LENGTH = 160


def _hf_loss(model_dir, records: list[dict], every_token: bool) -> float:
    """Plain HF on the samples' tokens cut at LENGTH: every token after the BOS is a target (every_token), else the
    labels fasttune trains without --train-on-prompt (the responses)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    for s in tokenize_records(records, "alpaca", tok):
        ids = torch.tensor([s["input_ids"][:LENGTH]])
        labels = ids.clone() if every_token else torch.tensor([s["labels"][:LENGTH]])
        if every_token and ids[0, 0] == tok.bos_token_id:
            labels[0, 0] = -100  # the BOS is never a target (nor, after the shift, a label at all)
        count = int((labels[:, 1:] != -100).sum())
        if not count:
            continue
        with torch.no_grad():
            total += float(model(ids, labels=labels).loss) * count
        n += count
    return total / n


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    from fasttune.train import loop

    tmp = tmp_path_factory.mktemp("prompt-run")
    cfg = sft_config(tmp, save_base_model(tmp / "base"), max_length=LENGTH, val_fraction=0.3, train_on_prompt=True,
                     max_steps=2, save_every=2, eval_every=0, eval_batches=1000)  # fmt: skip
    records = json.loads(GSM8K.read_text())
    _, held = holdout(records, [str(i) for i in range(len(records))], 0.3)  # training's validation records
    data = tmp / "held.json"
    data.write_text(json.dumps(held))
    return loop.train(cfg), held, data


def _eval(tmp_path, checkpoint, data, *extra) -> dict:
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--max-length", str(LENGTH),
                 "--output-dir", str(out), *extra]) == 0  # fmt: skip
    return json.loads((out / "summary.json").read_text())


def test_eval_of_a_run_trained_on_prompts_gives_its_val_loss(prompt_run, tmp_path):
    result, held, data = prompt_run
    summary = _eval(tmp_path, result.run_dir, data, "--generate", "--max-new-tokens", "2")
    assert summary["train_on_prompt"] is True
    tok = AutoTokenizer.from_pretrained(result.checkpoint)
    whole = [s for s in tokenize_records(held, "alpaca", tok) if len(s) <= 512]  # the context: answered whole
    assert summary["generated_samples"] == len(whole) > 0  # the prompts are still split off to be answered
    assert summary["loss"] == pytest.approx(result.last_val_loss, rel=1e-5)
    assert summary["loss"] == pytest.approx(_hf_loss(result.checkpoint, held, every_token=True), rel=1e-4)


def test_eval_train_on_prompt_off_scores_the_responses_only(prompt_run, tmp_path):
    """The option wins over the run's setting both ways; a checkpoint folder of the run reads the run's setting."""
    result, held, data = prompt_run
    off = _eval(tmp_path / "off", result.run_dir, data, "--train-on-prompt", "off")
    assert off["train_on_prompt"] is False
    assert off["loss"] == pytest.approx(_hf_loss(result.checkpoint, held, every_token=False), rel=1e-4)
    assert off["loss"] != pytest.approx(result.last_val_loss, rel=1e-3)
    assert _eval(tmp_path / "ckpt", result.checkpoint, data)["loss"] == pytest.approx(result.last_val_loss, rel=1e-5)


def test_eval_generate_of_a_run_trained_on_prompts_reads_the_data_once(prompt_run, tmp_path, monkeypatch):
    """--generate with --train-on-prompt: the records are read and checked once (the loss-side checks, which refused
    the run when --max-length held prompts alone and said each truncation twice, are not made again for the
    answers), the loss is that of every token within --max-length, and every whole sample is answered."""
    from fasttune.data import formats

    result, held, data = prompt_run
    reads = []
    real = formats.load_records
    monkeypatch.setattr(formats, "load_records", lambda *args, **kw: reads.append(args) or real(*args, **kw))
    tok = AutoTokenizer.from_pretrained(result.checkpoint)
    prompt = min(s.pairs()[-1][0] for s in tokenize_records(held, "alpaca", tok) if len(s.spans))  # all fill it
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(result.run_dir), "--data", str(data), "--max-length", str(prompt),
                 "--output-dir", str(out), "--generate", "--max-new-tokens", "2"]) == 0  # fmt: skip
    assert len(reads) == 1
    summary = json.loads((out / "summary.json").read_text())
    whole = [s for s in tokenize_records(held, "alpaca", tok) if len(s) <= 512]
    assert summary["train_on_prompt"] is True and summary["generated_samples"] == len(whole) > 0


@pytest.mark.parametrize("cut", [False, True])
def test_eval_train_on_prompt_generate_counts_what_each_side_left_out(tmp_path, capsys, cut):
    """--train-on-prompt tokenizes a record whole for the loss but its prompt apart for --generate: a sample can fit
    the context on one side and not the other. Each side says how many it left out, and summary.json records both
    (it said the loss's count for both)."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.eval.run import EvalArgs, _tokenized

    split = {"prompt": "Natalia so", "completion": "ld clips to her friends in April"}  # its prompt ends mid-token
    records = [split, {"prompt": "Count:", "completion": " one"}, {"prompt": "Count:", "completion": " one" * 80}]
    tok, a = build_tiny_tokenizer(chat_template=None, bos="<s>"), EvalArgs(checkpoint="unused", data="unused")
    loss_side, answer_side = (_tokenized(a, records, "prompt_completion", tok, p) for p in (True, False))
    context = len(loss_side[0])  # the split record fits the loss side exactly, its answer side is longer
    assert len(answer_side[0]) > context and len(loss_side[1]) < context < len(answer_side[2]) <= len(loss_side[2])
    model = save_base_model(tmp_path / "base", context=context)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    length = ["--max-length", str(context)] if cut else []
    assert main(["eval", "--checkpoint", str(model), "--data", str(data), "--train-on-prompt", "on", "--generate",
                 "--max-new-tokens", "1", "--output-dir", str(tmp_path / "out"), *length]) == 0  # fmt: skip
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["generated_samples"] == 1 and summary["generate_skipped_longer_than_context"] == 2
    assert f"2 samples longer than the model's context ({context} tokens) are left out of --generate" in err
    if cut:  # the loss scores every record, cut to --max-length: none left out
        assert summary["samples"] == 3 and summary["skipped_longer_than_context"] == 0
        assert "left out of the loss" not in err
    else:
        assert summary["samples"] == 2 and summary["skipped_longer_than_context"] == 1
        assert f"1 sample longer than the model's context ({context} tokens) is left out of the loss" in err
