"""Plain Hugging Face training baselines: the minimal loop people write with transformers alone.

Each step: collate (right padding, or transformers' own `DataCollatorWithFlattening` for packing), forward with
labels and `use_cache=False`, backward, gradient clipping to 1.0 (the HF Trainer default), fused AdamW step,
`loss.item()`. Pure bf16 weights on CUDA (docs/BENCHMARKS.md). Nothing of fasttune's runs here except
the shared micro-batch order (8 samples per step, shuffled per epoch) so both sides see the same samples.

With `--lora` every baseline is wrapped with `peft.get_peft_model(model, LoraConfig(...))` as a peft user writes it
(LORA: the settings fasttune's rows get too), and the optimizer holds only the trainable (adapter) parameters.

Every packed baseline is checked for cross-document attention before it counts (a leaky configuration is never a
baseline: fast, but it computes another model): a small model of the same attention setup scores two documents
packed and each alone.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch

from fasttune.attention import available
from fasttune.attention.probe import import_status
from fasttune.config.base_config import LoraConfig
from fasttune.data.packing import Batcher, collate_padded
from fasttune.data.pipeline import DataBundle
from fasttune.data.sample import Sample
from fasttune.model.build import build_preset
from fasttune.model.flops import step_flops
from fasttune.quiet import PEFT_READS_DEPRECATED, ignore_warning
from fasttune.train.metrics import peak_flops

LORA = LoraConfig(enabled=True, rank=16, alpha=32, dropout=0.0)
"""`bench train --lora` on both sides: r 16, alpha 32, no dropout, every linear layer of the decoder (q, k, v, o, gate,
up, down: LoraConfig's targets); lm_head, embeddings and norms frozen."""
LEAK_TOLERANCE = 0.05  # relative max logit error; a leak measures 0.3-0.7 (Llama, sdpa, use_cache on), bf16 noise ~1e-2


@dataclass(frozen=True)
class Baseline:
    name: str
    attn: str  # transformers attn_implementation
    packed: bool
    liger: bool = False
    ckpt: bool = False
    """HF's gradient checkpointing (every decoder layer recomputed): the HF setting that fits at 8B."""
    lora: bool = False
    """Wrapped with peft LoRA adapters (LORA); only they train."""

    @property
    def flash_kwargs(self) -> bool:
        """Packed flash attention gets cu_seq_lens/max_length kwargs (FA4 crashes from position_ids alone)."""
        return self.packed and self.attn.startswith("flash")


def baselines(device: torch.device, ckpt: bool = False, lora: bool = False) -> tuple[list[Baseline], list[str]]:
    """The baselines that can run here, and a note for each one that cannot; `ckpt` adds each packed one again with
    gradient checkpointing; `lora` wraps every one with peft ("HF + peft ..." rows)."""
    found, notes = _baselines(device)
    if ckpt:
        found += [Baseline(f"{b.name} + grad ckpt", b.attn, True, b.liger, ckpt=True) for b in found if b.packed]
    if lora:
        found = [dataclasses.replace(b, name=b.name.replace("HF ", "HF + peft ", 1), lora=True) for b in found]
    return found, notes


def _baselines(device: torch.device) -> tuple[list[Baseline], list[str]]:
    found = [Baseline("HF sdpa padded", "sdpa", False), Baseline("HF sdpa packed (4D mask)", "sdpa", True)]
    notes = []
    if device.type != "cuda":
        notes.append("- HF flash_attention_4 baselines: need CUDA")
    elif (why := available(device, torch.bfloat16, 128, run=True)["flash_attention_4"]) is not None:
        notes.append(f"- HF flash_attention_4 baselines: {why}")  # the same probe as fasttune's own backend
    else:
        found.append(Baseline("HF FA4 packed (cu_seq_lens)", "flash_attention_4", True))
        if (why := import_status("liger_kernel")) is None:
            found.append(Baseline("HF FA4 packed + Liger", "flash_attention_4", True, liger=True))
        else:
            notes.append(f"- HF FA4 + Liger baseline: {why}")
    return found, notes


def _build(preset: str, vocab: int, b: Baseline, device: torch.device, dtype: torch.dtype):
    model = build_preset(preset, vocab, b.attn, dtype, device)
    if b.liger:
        from fasttune.model import liger

        liger.apply(model)
    if b.ckpt:  # transformers >= 5.2x renamed it
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if b.lora:
        model = _peft_wrap(model)
    return model.train()


def _peft_wrap(model):
    """What a peft user writes. Gradient checkpointing is non-reentrant here (_build), which needs no
    `enable_input_require_grads()` for the frozen embeddings; peft keeps the adapters in fp32 on a bf16 base (its
    default autocast_adapter_dtype), as in fasttune's own LoRA (model/lora.py)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                        target_modules=list(LORA.targets), bias="none", task_type="CAUSAL_LM")  # fmt: skip
    with warnings.catch_warnings():
        ignore_warning(*PEFT_READS_DEPRECATED)  # peft's own FutureWarning, as in model/lora.py (--debug shows it)
        return get_peft_model(model, config)


def _collate(samples: list[Sample | dict], b: Baseline, device: torch.device) -> dict:
    if b.packed:
        from transformers import DataCollatorWithFlattening

        rows = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]  # HF's collator reads dicts
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=b.flash_kwargs)(rows, return_tensors="pt")
    else:
        batch = collate_padded(samples, pad_id=0)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def leak_error(b: Baseline, device: torch.device, vocab: int = 512) -> float:
    """Relative max logit error of two documents packed (as this baseline packs them) against each alone."""
    if not b.packed:
        return 0.0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _build("small", vocab, Baseline(b.name, b.attn, True), device, dtype)  # head dim 64: every kernel takes it
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (37, 53)]
    batch = _collate([{"input_ids": d, "labels": d} for d in docs], b, device)
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0].float()
        alone = [model(input_ids=torch.tensor([d], device=device), use_cache=False).logits[0].float() for d in docs]
    ref = torch.cat(alone)
    return float((packed - ref).abs().max() / ref.abs().max())


def run_baseline(
    b: Baseline,
    preset: str,
    data: DataBundle,
    device: torch.device,
    *,
    micro_batch: int,
    warmup_steps: int,
    steps: int,
    seed: int,
    dtype: torch.dtype | None = None,
) -> dict:
    """Train `steps` measured steps after `warmup_steps`; returns aggregate real tokens/s, samples/s, MFU, memory.
    `dtype`: of the weights, gradients and optimizer state (default bf16 on CUDA, fp32 on a CPU)."""
    vocab = len(data.tokenizer)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = _build(preset, vocab, b, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    lengths = [len(s) for s in data.train]
    peak = peak_flops(device)
    batcher = Batcher(packing=False, micro_batch_size=micro_batch, max_length=0, seed=seed)  # the same sample order
    plan, epoch, per_step = [], 0, []
    for step in range(warmup_steps + steps):
        if not plan:
            plan = batcher.plan(lengths, epoch=epoch)
            epoch += 1
        idx = plan.pop(0)
        t0 = time.perf_counter()
        samples = [data.train[i] for i in idx]
        batch = _collate(samples, b, device)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the usual per-step logging read; also ends the step on the host clock
        dt = time.perf_counter() - t0
        if step >= warmup_steps:
            seq = [lengths[i] for i in idx]
            per_step.append((dt, sum(seq), len(seq), step_flops(model.config, seq, lora=b.lora)))
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    del model, optimizer, params
    return {**aggregate(per_step, peak), "trained_params": trained}


def aggregate(per_step: list[tuple[float, int, int, float]], peak: float | None) -> dict:
    """(seconds, real tokens, samples, FLOPs) per step -> totals over the measured steps (not a mean of rates), and
    how much the rate moved within the measurement (`spread_pct`)."""
    seconds = sum(s for s, *_ in per_step)
    tokens_per_s = sum(t for _, t, _, _ in per_step) / seconds
    return {
        "steps": len(per_step),
        "tokens_per_step": sum(t for _, t, _, _ in per_step) / len(per_step),
        "tokens_per_s": tokens_per_s,
        "samples_per_s": sum(n for _, _, n, _ in per_step) / seconds,
        "mfu": sum(f for *_, f in per_step) / seconds / peak if peak else None,
        "spread_pct": spread_pct(per_step, tokens_per_s),
    }


SPREAD_PARTS = 4


def spread_pct(per_step: list[tuple[float, int, int, float]], tokens_per_s: float) -> float | None:
    """Half the range of tokens/s over SPREAD_PARTS consecutive parts of the measured steps, in % of the whole rate:
    how far one stretch of the measurement strays from another (a ratio of two rows is no surer than their spreads).
    None under 2 steps per part."""
    n = len(per_step)
    if n < 2 * SPREAD_PARTS:
        return None
    rates = []
    for i in range(SPREAD_PARTS):
        part = per_step[i * n // SPREAD_PARTS : (i + 1) * n // SPREAD_PARTS]
        rates.append(sum(t for _, t, _, _ in part) / sum(s for s, *_ in part))
    return 50.0 * (max(rates) - min(rates)) / tokens_per_s
