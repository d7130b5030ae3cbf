"""What a run holds besides activations and writes to disk: whether fp32 master weights leave room on the GPU
(`model.dtype auto`), the parameter count of a config, and the bytes of its checkpoints (checked before the first
step: train/checkpoint.check_disk)."""

from __future__ import annotations

import logging

import torch

from fasttune.errors import FasttuneError
from fasttune.model.flops import experts, mlp_matrices
from fasttune.train.activations import Shape
from fasttune.train.estimate import GiB
from fasttune.train.free import available_ram, free_memory
from fasttune.train.memory import HEADROOM

log = logging.getLogger("fasttune")

FP32_STATE_SHARE = 0.5
"""fp32 master weights are chosen by `model.dtype auto` only while their training state (fp32 weights, gradients,
two AdamW moments and the bf16 autocast copies: 18 bytes per parameter, 12 with 8-bit moments) takes at most this
share of the GPU: the rest is for activations. An 8B model needs 144 GB that way, 64 GB held in bf16 (H200: 139
GiB)."""


def param_count(config) -> int:
    """Parameters of a decoder-only config (embeddings, attention with optional q/k/v biases, MLP, norms); an MoE
    layer's MLP: every expert (not the top-k a token runs through), its shared experts and its router."""
    s = Shape.of(config)
    qkv_bias = getattr(config, "attention_bias", False) or config.model_type in ("qwen2", "qwen2_moe")
    bias = (s.q + 2 * s.kv) if qkv_bias else 0
    n_experts = experts(config)
    width = n_experts * s.intermediate + s.shared if n_experts else s.intermediate
    mlp = mlp_matrices(config) * s.hidden * width + s.hidden * n_experts + _shared_gate(config, s)
    layer = s.hidden * (2 * s.q + 2 * s.kv) + bias + mlp + 2 * s.hidden
    heads = 1 if getattr(config, "tie_word_embeddings", False) else 2
    return s.layers * layer + heads * s.vocab * s.hidden + s.hidden


def _shared_gate(config, s: Shape) -> int:
    """Qwen-MoE's shared expert has a gate of its own (hidden -> 1)."""
    return s.hidden if getattr(config, "shared_expert_intermediate_size", None) else 0


def fp32_master_fits(
    config, device: torch.device, lora: bool = False, free_bytes: float | None = None, optimizer: str = "adamw"
) -> bool:
    """Whether fp32 master weights (+ bf16 autocast) leave room for activations on this GPU; True off CUDA."""
    free = free_memory(device) if free_bytes is None else free_bytes
    if free is None:
        return True
    n = param_count(config)
    moments = 2 if optimizer == "adamw_8bit" else 8  # two int8 moments (scales: +1.6%) or two fp32 ones
    need = n * (6 if lora else 10 + moments)  # LoRA: frozen fp32 weights + their bf16 copies only
    if need <= FP32_STATE_SHARE * free:
        return True
    log.warning("model.dtype auto: fp32 master weights would hold %.0f GiB of %.0f GiB free for %.2fB parameters; "
                "training in pure bf16 (weights, gradients and optimizer state; checkpoints in bf16)", need / GiB,
                free / GiB, n / 1e9)  # fmt: skip
    return False


def planned_saves(max_steps: int, save_every: int, save_final: bool, start_step: int = 0) -> int:
    """Checkpoints this run will write: every save_every steps, plus the last step when save_final."""
    steps = set(range(save_every, max_steps + 1, save_every)) if save_every else set()
    if save_final:
        steps.add(max_steps)
    return len([s for s in steps if s > start_step])


def checkpoint_bytes(model: torch.nn.Module, optimizer: str = "adamw") -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of a merged LoRA model): weights in the dtype they are held in (or only the
    trainable adapters) plus the optimizer state (AdamW's two moments in the same dtype, or 8-bit ones: see
    optim.state_bytes); the merged model holds the frozen base's weights in their dtype, the adapters folded in.
    safetensors and torch.save add ~nothing."""
    from fasttune.train.optim import state_bytes

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    lora = trainable_bytes < weights
    ckpt = int((trainable_bytes if lora else weights) + state_bytes(optimizer, trainable))
    return ckpt, weights - trainable_bytes if lora else 0


def disk_needed(model: torch.nn.Module, keep_last: int, saves: int, optimizer: str = "adamw") -> int:
    """Bytes on disk at the fullest moment: a new checkpoint is complete before the oldest is pruned, so up to
    keep_last + 1 exist at once, never more than the run writes; plus the merged LoRA model at the end."""
    per_ckpt, merged = checkpoint_bytes(model, optimizer)
    return bytes_needed(per_ckpt, merged, min(keep_last + 1, saves))


def bytes_needed(per_ckpt: int, merged: int, new: int) -> int:
    """Disk for `new` checkpoints of per_ckpt bytes and a merged model; +2% and 50 MB: tokenizer, filesystem slack."""
    return int(1.02 * per_ckpt * new + merged + 50e6) if new or merged else 0


def check_weights_fit(config, device: torch.device, dtype: torch.dtype, source: str, free_bytes: float | None = None,
                      lora: bool = False) -> None:  # fmt: skip
    """Stop before building a model that cannot fit: on a GPU its weights alone beyond what a plan may use (loading
    them would end in CUDA's out-of-memory traceback before the memory plan could say what fits); on the CPU its
    training state (weights, and unless `lora` their gradients and AdamW's two moments) beyond the RAM available (the
    system would kill the run, with no word)."""
    if device.type == "cpu":
        _check_ram(config, dtype, source, available_ram() if free_bytes is None else free_bytes, lora)
        return
    free = free_memory(device) if free_bytes is None else free_bytes
    need = param_count(config) * dtype.itemsize
    if free is None or need <= free * HEADROOM:
        return
    smaller = "--model.dtype bf16 (half the bytes), " if dtype.itemsize > 2 else ""
    raise FasttuneError(
        f"{source}: its weights alone take about {need / GiB:.1f} GiB in {str(dtype).removeprefix('torch.')}, but a "
        f"plan may use {free * HEADROOM / GiB:.1f} GiB ({HEADROOM:.0%} of the {free / GiB:.1f} GiB free on the GPU); "
        f"try {smaller}a smaller model, or several GPUs sharding the weights (torchrun ... --training.fsdp)"
    )


def _check_ram(config, dtype: torch.dtype, source: str, available: float | None, lora: bool) -> None:
    need = param_count(config) * dtype.itemsize * (1 if lora else 4)
    if available is None or need <= available:
        return
    what = "its frozen weights" if lora else "its weights, gradients and AdamW moments"
    raise FasttuneError(
        f"{source}: {what} take about {need / GiB:.1f} GiB, and this machine has {available / GiB:.1f} GiB of RAM "
        "available; train it on a GPU, or pick a smaller model"
    )
