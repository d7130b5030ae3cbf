"""Experiment presets: plain functions returning a config, each derived from another by changing a few fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fasttune.command import Command
from fasttune.config.base_config import BaseConfig, DataConfig, ModelConfig, TrainingConfig
from fasttune.errors import ConfigError


def quick() -> BaseConfig:
    """Tiny Llama on the embedded stdlib corpus: the whole run takes a few minutes on a 2-core CPU."""
    return BaseConfig(
        experiment="quick",
        output_dir="runs/quick",
        model=ModelConfig(preset="tiny"),
        data=DataConfig(max_length=256, micro_batch_size=8, max_documents=600),
        training=TrainingConfig(max_steps=300, lr=3e-3, warmup_steps=30, eval_every=60, save_every=150),
    )


def full() -> BaseConfig:
    """The same pipeline at GPU scale: Llama-3.2-1B shape, bf16, packed 8k-token micro-batches, auto attention.

    8k, not 16k, tokens per micro-batch: with `auto` memory (no recomputation where it fits) the 1B shape then trains
    67.0k tok/s in 14.4 GiB without flash-attn-4 or Liger (16k-token packs needed 27.6 GiB before the lean RMSNorm
    for 1.05x the speed of 8k); with both, 78.5k in 14.1 GiB, less than plain transformers' leanest stack (H200,
    docs/BENCHMARKS.md "Memory": the fourth run and "The lean RMSNorm")."""
    cfg = quick()
    return dataclasses.replace(
        cfg,
        experiment="full",
        output_dir="runs/full",
        attn_implementation="auto",
        model=dataclasses.replace(cfg.model, preset="1b", dtype="bf16", liger=True),
        data=dataclasses.replace(
            cfg.data, max_length=2048, micro_batch_size=4, max_documents=None, tokenizer_vocab_size=32000
        ),
        training=dataclasses.replace(
            cfg.training, max_steps=2000, lr=3e-4, warmup_steps=100, eval_every=250, save_every=500
        ),
    )


def sft() -> BaseConfig:
    """Full supervised fine-tuning of a local HF model (--model PATH --data FILE); loss on responses only."""
    cfg = quick()
    return dataclasses.replace(
        cfg,
        experiment="sft",
        output_dir="runs/sft",
        data=dataclasses.replace(cfg.data, format="auto", max_length=1024, micro_batch_size=4, max_documents=None),
        training=dataclasses.replace(
            cfg.training, max_steps=500, lr=2e-5, warmup_steps=20, weight_decay=0.0, eval_every=100, save_every=250
        ),
    )


def lora() -> BaseConfig:
    """LoRA fine-tuning (peft) of a local HF model; saves adapters and a merged model."""
    cfg = sft()
    return dataclasses.replace(
        cfg,
        experiment="lora",
        output_dir="runs/lora",
        lora=dataclasses.replace(cfg.lora, enabled=True),
        training=dataclasses.replace(cfg.training, lr=2e-4),
    )


EXPERIMENTS: dict[str, Callable[[], BaseConfig]] = {"quick": quick, "full": full, "sft": sft, "lora": lora}


def get_experiment(name: str) -> BaseConfig:
    if name not in EXPERIMENTS:
        raise ConfigError(f"--experiment {unknown_experiment(name)}")
    return EXPERIMENTS[name]()


def unknown_experiment(name: object) -> str:
    """The rest of the line refusing experiment `name`: the preset meant when only its case or a letter differs
    (SFT, LoRA, ful), and the names."""
    import difflib

    close = difflib.get_close_matches(str(name).strip().lower(), list(EXPERIMENTS), n=1, cutoff=0.75)
    meant = f" (did you mean {close[0]}?)" if close else ""
    return f"{name!r} is unknown{meant}; choose one of: {', '.join(EXPERIMENTS)}"


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) for `fasttune experiments`."""
    return [(name, (fn.__doc__ or "").strip().splitlines()[0]) for name, fn in EXPERIMENTS.items()]


@dataclasses.dataclass
class ExperimentsArgs(Command):
    """List the experiment presets that `fasttune train --experiment NAME` starts from."""

    def run(self) -> int:
        for name, line in describe():
            print(f"{name:8s} {line}")
        return 0
