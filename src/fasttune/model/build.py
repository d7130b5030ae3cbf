"""Models: HF `LlamaForCausalLM` built from a named size preset, or a local HF model folder (no downloads)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from fasttune.config import ModelConfig
from fasttune.errors import ConfigError

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


def head_dim(config: PretrainedConfig) -> int:
    """Per-head width: the config's `head_dim` when it sets one (Gemma, Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def flops_per_token(config: PretrainedConfig, lora: bool = False) -> float:
    """Training FLOPs per token of the dense layers: 6 * (non-embedding params + lm head), or 4x with LoRA (frozen
    weights need no weight gradients; the adapters are negligible). Activation recompute is not counted (MFU
    counts model FLOPs). Attention's sequence-length-dependent part is added per batch by `attention_flops`."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    attn = h * head_dim(config) * (2 * heads + 2 * kv)
    mlp = 3 * h * config.intermediate_size
    return (4.0 if lora else 6.0) * (n_layers * (attn + mlp) + h * config.vocab_size)


def attention_flops(config: PretrainedConfig, seq_lens: list[int]) -> float:
    """Training FLOPs of causal attention scores and values for documents of these lengths (fwd + bwd = 3x fwd;
    fwd = 2 matmuls * 2 flops * L^2/2 causal * head_dim * heads)."""
    heads = config.num_attention_heads
    return 3.0 * 2 * 2 * 0.5 * heads * head_dim(config) * config.num_hidden_layers * sum(n * n for n in seq_lens)
