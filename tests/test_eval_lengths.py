"""`fasttune eval` and the validation loss around length: supervised samples cut at --max-length as training cuts
them (the run's own validation loss is the reference), plain text on a model whose config names no context (Bloom:
ALiBi) or names it max_seq_len (MPT), and a validation split longer than --training.eval-batches."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fixtures.tiny_tokenizer import build_tiny_tokenizer
from helpers import GSM8K, hf_piece_loss, save_base_model, sft_config, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig

from fasttune.cli import main
from fasttune.data.corpus import holdout
from fasttune.data.pipeline import build_data


def test_eval_max_length_gives_the_validation_loss_training_logged_for_truncated_samples(tmp_path):
    """Held-out Alpaca records longer than data.max_length: training validates their first max_length tokens, and
    `eval --max-length` of the same records at that length scored them whole (another number, and the option ignored
    without a word)."""
    from fasttune.train import loop

    cfg = sft_config(tmp_path, save_base_model(tmp_path / "base"), max_length=160, val_fraction=0.3, max_steps=2,
                     save_every=2, eval_every=0, eval_batches=1000)  # fmt: skip
    result = loop.train(cfg)
    records = json.loads(GSM8K.read_text())
    _, held = holdout(records, [str(i) for i in range(len(records))], 0.3)  # training's validation records
    lengths = [len(s) for s in build_data(cfg).val]
    assert max(lengths) == 160  # some were cut
    data = tmp_path / "held.json"
    data.write_text(json.dumps(held))
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(result.run_dir), "--data", str(data), "--max-length", "160",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == len(lengths)
    assert summary["loss"] == pytest.approx(result.last_val_loss, rel=1e-5)


def _bloom(path: Path) -> Path:
    tok = build_tiny_tokenizer()
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4, **ids)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_of_text_on_a_model_without_a_context_asks_for_max_length_and_scores_its_pieces(tmp_path, capsys):
    """Bloom's config names no context: eval scored each text whole in one forward pass (4 texts of ~10k tokens took
    17 GB), not in the pieces training trains; --max-length gives them, against plain HF on the same pieces."""
    model = _bloom(tmp_path / "bloom")
    text = "".join(f"Natalia sold {i} clips to her friends in April, and half as many in May. " for i in range(12))
    data = tmp_path / "book.txt"
    data.write_text(text)
    assert main(["eval", "--checkpoint", str(model), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: plain text needs --max-length here: the model's config names no context"), err
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(model), "--data", str(data), "--max-length", "64", "--output-dir",
                 str(out)]) == 0  # fmt: skip
    assert_hf_pieces(json.loads((out / "summary.json").read_text()), model, text, 64)


def assert_hf_pieces(summary: dict, model: Path, text: str, piece: int) -> None:
    """eval's summary of `text` scored by `model` equals plain HF on the text + EOS in `piece`-token pieces."""
    loss, n = hf_piece_loss(model, text, piece)
    ids = AutoTokenizer.from_pretrained(model)(text)["input_ids"]
    assert len(ids) + 1 > piece * 4 and summary["target_tokens"] == n
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)


def test_mpts_max_seq_len_is_its_context_in_training_and_eval(tmp_path, capsys):
    """MPT names its context max_seq_len (no max_position_embeddings): its ALiBi table has that many positions, and
    a longer row failed inside its attention with a traceback (the sft preset's default 1024 on a 64-position model,
    eval's texts scored whole). Now training shrinks the default to it and refuses more; eval scores pieces of it."""
    from transformers import MptConfig

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = MptConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = tmp_path / "mpt"
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    tok.save_pretrained(model)
    text = "".join(f"Natalia sold {i} clips to her friends in April, and half as many in May. " for i in range(12))
    data = tmp_path / "book.txt"
    data.write_text(text)
    train = ["train", "--experiment", "sft", "--model", str(model), "--data", str(data), "--max-steps", "1",
             "--training.eval-every", "0", "--generation.sample-prompt", ""]  # fmt: skip
    assert main([*train, "--output-dir", str(tmp_path / "run")]) == 0
    assert "data.max_length: 64, the context of" in capsys.readouterr().err
    assert main([*train, "--output-dir", str(tmp_path / "run2"), "--data.max-length", "65"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "exceeds the context of" in err and "(max_seq_len=64); pass --data.max-length 64 or less" in err, err
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(model), "--data", str(data), "--output-dir", str(out)]) == 0
    assert_hf_pieces(json.loads((out / "summary.json").read_text()), model, text, 64)


def test_a_validation_split_beyond_eval_batches_is_said_and_its_val_loss_is_of_the_batches_named(tmp_path, caplog):
    """The data summary counts every held-out sample, and val_loss was computed on the first eval_batches
    micro-batches of them without a word (eval of the held-out records then gives another number): the log says
    which share it is, and val_loss is plain HF's loss on those samples."""
    import logging

    from fasttune.data.packing import Batcher
    from fasttune.train import loop

    cfg = tiny_config(tmp_path, max_steps=1, save_every=1, eval_every=0, eval_batches=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_documents=60, val_fraction=0.3))
    caplog.set_level(logging.INFO, logger="fasttune")
    result = loop.train(cfg)
    val = build_data(cfg).val
    plan = Batcher.from_config(cfg.data, cfg.seed).plan([len(s) for s in val], epoch=0)
    samples = [val[i] for b in plan[:2] for i in b]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation: val_loss")]
    assert len(plan) > 2 and said == [
        f"validation: val_loss is computed on the first 2 of {len(plan)} micro-batches ({len(samples)} of {len(val)} "
        f"held-out samples, the same ones each time); --training.eval-batches {len(plan)} covers them all"
    ]
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint).eval()
    total, n = 0.0, 0
    for s in samples:
        x = torch.tensor(s.ids, dtype=torch.long)[None]
        with torch.no_grad():
            total += float(model(x, labels=x).loss) * (len(s) - 1)
        n += len(s) - 1
    assert result.last_val_loss == pytest.approx(total / n, rel=1e-5)
