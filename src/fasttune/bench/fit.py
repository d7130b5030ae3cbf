"""Whether a benchmark's model fits this machine, before it is built: `bench train` and `bench generate` estimate
their peak with the training memory model (train/estimate.py: the same parts `fasttune train` plans with) and stop with
one line, naming a preset that fits, where it cannot (on a CPU the system kills such a run with no word)."""

from __future__ import annotations

import torch

from fasttune.config.base_config import MODEL_PRESETS
from fasttune.errors import ConfigError
from fasttune.model.build import preset_config
from fasttune.train.activations import Shape
from fasttune.train.estimate import Estimate, GiB, Setup, estimate
from fasttune.train.footprint import param_count
from fasttune.train.free import available_ram, free_memory
from fasttune.train.memory import HEADROOM

LORA_SHARE = 200
"""A LoRA run trains about 1/200 of the weights (r 16 on every linear layer of a Llama; as memory.state_changes)."""


def room(device: torch.device) -> tuple[float, str] | None:
    """(bytes a benchmark may use here, what they are) or None where the system does not say: on a GPU HEADROOM of
    its free memory (as the memory plan), on a CPU the RAM the system can give without swapping."""
    if device.type == "cpu":
        ram = available_ram()
        return None if ram is None else (ram, f"{ram / GiB:.1f} GiB of RAM available")
    free = free_memory(device)
    return None if free is None else (free * HEADROOM, f"{free * HEADROOM / GiB:.1f} GiB usable on {device} "
                                                       f"({HEADROOM:.0%} of {free / GiB:.1f} GiB free)")  # fmt: skip


def step_estimate(preset: str, vocab: int, device: torch.device, *, param_bytes: int, optimizer_bytes: float,
                  tokens: int, loss: str, plan: str, autocast: bool = False,
                  lora: bool = False) -> Estimate:  # fmt: skip
    """memory.estimate of one training step of `preset` (randomly initialised, so the config alone gives its size)."""
    config = preset_config(preset, vocab)
    n = param_count(config)
    trainable = n // LORA_SHARE if lora else n
    st = Setup(shape=Shape.of(config), params=n, trainable=trainable, param_bytes=param_bytes,
               optimizer_bytes=optimizer_bytes if not lora else 8.0, tokens=tokens, loss=loss, autocast=autocast,
               lora_rank=16 if lora else 0, head_trainable=not lora, host=device.type == "cpu",
               trainable_bytes=4.0 if lora else None)  # fp32 adapters  # fmt: skip
    return estimate(st, plan)


def generate_need(shape: str, device: torch.device, dtype: torch.dtype, batch_sizes: list[int], prompt_len: int,
                  new_tokens: int, vocab: int) -> tuple[float, str]:  # fmt: skip
    """Peak bytes of `bench generate` and the phase it is in: training the fp32 model briefly (AdamW, bf16 autocast
    on CUDA: generate_check.train_briefly's batches), or generating at the largest batch with the fp32 model and its
    `dtype` copy, HF's cache and fasttune's side by side, and the float32 score records (N x batch x vocab: HF's, on
    CUDA fasttune's too)."""
    cuda = device.type == "cuda"
    train = step_estimate(shape, vocab, device, param_bytes=4, optimizer_bytes=8.0, tokens=8 * 256 if cuda else 4 * 32,
                          loss="hf", plan="none", autocast=cuda)  # fmt: skip
    config = preset_config(shape, vocab)
    n, s = param_count(config), Shape.of(config)
    weights = n * 4 + (n * dtype.itemsize if dtype != torch.float32 else 0)
    batch = max(batch_sizes)
    caches = 2 * (2 * s.layers * s.kv * (prompt_len + new_tokens) * batch * dtype.itemsize)
    scores = (2 if cuda else 1) * new_tokens * batch * s.vocab * 4  # fasttune records its own on CUDA
    decode = weights + caches + scores + (train.fixed if cuda else 0.0)
    if train.total >= decode:
        return train.total, f"training it briefly first: {train.parts()}"
    return decode, (f"generating at batch {batch}: weights {weights / GiB:.1f}, caches {caches / GiB:.1f}, "
                    f"scores {scores / GiB:.1f}")  # fmt: skip


def by_size(vocab: int, presets=MODEL_PRESETS) -> list[str]:
    """The presets at the command's vocabulary (the published shapes keep their own), largest first."""
    return sorted(presets, key=lambda p: -param_count(preset_config(p, vocab)))


def refuse(command: str, need: float, parts: str, where: str, fixes: list[str]) -> ConfigError:
    return ConfigError(f"{command} needs about {need / GiB:.1f} GiB ({parts}), but this machine has {where}; try "
                       f"{' or '.join(fixes)}")  # fmt: skip


def check_generate(shape: str, device: torch.device, dtype: torch.dtype, batch_sizes: list[int], prompt_len: int,
                   new_tokens: int, vocab: int) -> None:  # fmt: skip
    """Stop before the model is built when `bench generate` cannot fit, naming the largest preset (and the largest
    batch) that would."""
    here = room(device)
    if here is None:
        return
    usable, where = here
    need, parts = generate_need(shape, device, dtype, batch_sizes, prompt_len, new_tokens, vocab)
    if need <= usable:
        return
    fixes = []
    if fits := [b for b in batch_sizes if generate_need(shape, device, dtype, [b], prompt_len, new_tokens, vocab)[0]
                <= usable]:  # fmt: skip
        fixes.append(f"--batch-sizes {','.join(map(str, fits))}")
    smaller = [p for p in by_size(vocab)
               if generate_need(p, device, dtype, batch_sizes, prompt_len, new_tokens, vocab)[0] <= usable]  # fmt: skip
    if smaller:
        fixes.append(f"--shape {smaller[0]} (the largest preset that fits)")
    if device.type == "cpu":
        fixes.append("a GPU (--device cuda)")
    raise refuse(f"bench generate --shape {shape}", need, parts, where, fixes or ["a machine with more memory"])


def train_needs(bench, runs: list[dict], preset: str | None = None) -> list[tuple[str, Estimate]]:
    """(row name, estimate) of every configuration `bench train` would run: an HF baseline at its batch of the
    longest samples, in its dtype, with its full logits, checkpointing or not; a fasttune row at the least its memory
    plan can reach (`full`, in bf16 where its dtype may fall back to it) at the packing budget."""
    from fasttune.bench.train import hf_dtype
    from fasttune.config import get_experiment

    preset, exp, cuda = preset or bench.preset, get_experiment(bench.experiment), bench.device.type == "cuda"
    out = []
    for spec in runs:
        if spec["stack"] == "HF":
            b, width = spec["baseline"], hf_dtype(bench).itemsize
            tokens = (bench.hf_micro_batch or bench.micro_batch) * max(bench.lengths)
            est = step_estimate(preset, bench.vocab, bench.device, param_bytes=width, optimizer_bytes=2.0 * width,
                                tokens=tokens, loss="hf", plan="full" if b.ckpt else "none", lora=b.lora)  # fmt: skip
        else:
            width = 2 if exp.model.dtype == "bf16" or (exp.model.dtype == "auto" and cuda) else 4
            moments = 2.0 if exp.training.optimizer == "adamw_8bit" else 2.0 * width
            est = step_estimate(preset, bench.vocab, bench.device, param_bytes=width, optimizer_bytes=moments,
                                tokens=bench.micro_batch * bench.max_length, loss="chunked", plan="full",
                                lora=bench.lora)  # fmt: skip
        out.append((spec["name"], est))
    return out


def _too_big(needs: list[tuple[str, Estimate]], usable: float, cpu: bool) -> tuple[str, Estimate] | None:
    """The row that stops the run: on a CPU the largest that cannot fit (an out-of-memory row kills the whole run);
    on a GPU the smallest when none can (one that does not fit is an OOM row, and the others still run)."""
    over = [(name, est) for name, est in needs if est.total > usable]
    if cpu and over:
        return max(over, key=lambda x: x[1].total)
    if over and len(over) == len(needs):
        return min(over, key=lambda x: x[1].total)
    return None


def check_train(bench, runs: list[dict]) -> None:
    """Stop before anything is built when `bench train`'s rows cannot fit here (see _too_big), naming the largest
    preset that would and what else lowers the need."""
    here = room(bench.device)
    if here is None or not runs:
        return
    usable, where = here
    cpu = bench.device.type == "cpu"
    stop = _too_big(train_needs(bench, runs), usable, cpu)
    if stop is None:
        return
    name, est = stop
    fixes = [f"--preset {p} (the largest preset that fits)" for p in by_size(bench.vocab)
             if _too_big(train_needs(bench, runs, p), usable, cpu) is None][:1]  # fmt: skip
    fixes.append("fewer tokens per step (--hf-micro-batch, --micro-batch, --max-length)" + (", --hf-ckpt" if
                 any(r["stack"] == "HF" for r in runs) else ""))  # fmt: skip
    if cpu:
        fixes.append("a GPU (--device cuda)")
    raise refuse(f"bench train --preset {bench.preset}: row {name!r}", est.total, est.parts(), where, fixes)
