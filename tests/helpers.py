"""Small configs for end-to-end tests: micro model (2 layers, hidden 64), a 40-file slice of the embedded corpus."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fasttune.config import BaseConfig, get_experiment


def tiny_config(tmp_path: Path, **training) -> BaseConfig:
    cfg = get_experiment("quick")
    return dataclasses.replace(
        cfg,
        output_dir=str(tmp_path / "run"),
        model=dataclasses.replace(cfg.model, preset="micro"),
        data=dataclasses.replace(
            cfg.data,
            max_documents=40,
            tokenizer_vocab_size=384,
            max_length=64,
            micro_batch_size=4,
            cache_dir=str(tmp_path.parent / "tok-cache"),
        ),
        training=dataclasses.replace(
            cfg.training,
            **{
                "max_steps": 6,
                "warmup_steps": 2,
                "eval_every": 3,
                "eval_batches": 2,
                "save_every": 3,
                "log_every": 1,
                "lr": 1e-3,
                **training,
            },
        ),
        generation=dataclasses.replace(cfg.generation, sample_prompt=""),
    )


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def save_micro_model(path: Path) -> Path:
    """A micro Llama (seed 0) with the tiny tokenizer, saved like any local HF model folder; returns `path`."""
    import torch
    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from fasttune.model.build import preset_config

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config("micro", len(tok), max_position_embeddings=512)).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    return path
