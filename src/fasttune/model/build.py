"""Models: HF `LlamaForCausalLM` built from a named size preset, or a local HF model folder (no downloads)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from fasttune.config import ModelConfig
from fasttune.errors import ConfigError
from fasttune.model.flops import head_dim  # noqa: F401 (the model's shape facts, imported from here too)

log = logging.getLogger("fasttune")

# (hidden, layers, heads, kv_heads, intermediate, tie_embeddings). `1b` is the Llama-3.2-1B-like shape that the
# baselines in docs/BENCHMARKS.md use (untied embeddings, ~1.1B parameters at a 32k vocabulary).
PRESETS: dict[str, tuple[int, int, int, int, int, bool]] = {
    "micro": (64, 2, 4, 2, 128, True),  # smoke tests
    "tiny": (256, 4, 8, 4, 688, True),
    "small": (512, 8, 8, 4, 1376, True),
    "125m": (768, 12, 12, 4, 2048, True),
    "350m": (1024, 24, 16, 8, 2816, True),
    "1b": (2048, 16, 32, 8, 8192, False),
}


def preset_config(preset: str, vocab_size: int, max_position_embeddings: int = 4096) -> LlamaConfig:
    hidden, layers, heads, kv, inter, tie = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    )


def load_model_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    if cfg.path is None:
        return preset_config(cfg.preset, vocab_size)
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model {cfg.path}: no config.json there; pass a local Hugging Face model folder "
            "(saved with save_pretrained) or leave --model out to build model.preset"
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except ValueError as e:
        raise ConfigError(
            f"--model {cfg.path}: {str(e).splitlines()[0]} (model code from the folder runs only "
            "with --model.trust-remote-code)"
        ) from None


def build_preset(preset: str, vocab_size: int, attn_implementation: str, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> PreTrainedModel:  # fmt: skip
    """A randomly initialised preset model, initialised on `device` itself (a 1B init on the CPU plus the copy took
    ~40 s on the H100 machine)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            preset_config(preset, vocab_size), attn_implementation=attn_implementation, dtype=dtype
        )
    return model.to(device)  # a no-op unless this transformers ignored the device context


def build_model(cfg: ModelConfig, vocab_size: int, attn_implementation: str, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> PreTrainedModel:  # fmt: skip
    """A fresh model from a preset, or the pretrained weights of a local folder, in `dtype` on `device`."""
    if cfg.path is None:
        model = build_preset(cfg.preset, vocab_size, attn_implementation, dtype, device)
    else:
        load_model_config(cfg, vocab_size)  # clear error before transformers' own
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
        if model.config.vocab_size < vocab_size:
            model.resize_token_embeddings(vocab_size)
        model = model.to(device)
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s, %.1fM parameters, attention %s", cfg.path or f"preset {cfg.preset}", n / 1e6, attn_implementation
    )
    return model
