"""Training memory as a plan: what activations the backward pass keeps or recomputes, what the step will need, and
whether that fits the GPU before the first step runs.

Activation plans, from least to most recomputation (`model.memory`):
- `none`: everything the backward pass needs is kept.
- `ops`: torch's selective activation checkpointing inside every decoder layer: matmul and attention outputs are
  kept, elementwise ops (RMSNorm, RoPE, SwiGLU, casts) are recomputed in backward. No matmul runs twice, and a
  Llama layer keeps about half its activations (what Liger's fused norm/SwiGLU kernels also recompute).
- `attention` / `mlp`: that block of every layer is recomputed in backward (kept: its input).
- `every:K`: every K-th decoder layer is recomputed whole (kept: its input); the others use `ops`.
- `full`: every decoder layer is recomputed whole (HF's gradient checkpointing).
- `offload`: `full`, each layer's saved input in pinned host memory until backward (train/offload.py).
`auto` takes the first of those that fits the GPU's free memory for the configured tokens per micro-batch (least
recomputation first: see CANDIDATES; `offload` only when `full` does not fit, and its pinned memory fits the host),
logs it with its predicted peak, and stops before the first step, naming the settings that would fit, when even
`offload` does not.

The step's estimate: train/estimate.py (byte counts per token and decoder layer: train/activations.py); a plan installed
on the model: train/recompute.py.
"""

from __future__ import annotations

import logging

import torch

from fasttune.config.base_config import memory_plan
from fasttune.errors import FasttuneError
from fasttune.model.build import base_model, load_model_config
from fasttune.model.layout import kept_scores
from fasttune.train.activations import recompute_flops
from fasttune.train.estimate import Estimate, GiB, Setup, estimate, runs_autocast, setup_of
from fasttune.train.free import free_memory, host_free
from fasttune.train.recompute import apply_plan

log = logging.getLogger("fasttune")

CANDIDATES = ("none", "ops", "attention", "mlp", "every:4", "every:2", "full")
"""The plans `auto` chooses from, tried in order of recomputation: `none` first, then by recomputed matmul FLOPs, then
by memory (then `offload`, which choose_plan tries last: it recomputes what `full` does and copies besides). `none`
before `ops` although `ops` recomputes no matmul: its unfused elementwise recompute costs 23% of
the step (1B shape, H200, same run: 16k-token packs with `ops` ran 42.8k tok/s in 21.5 GiB, 8k-token packs with
`none` 52.6k tok/s in 21.4 GiB; docs/BENCHMARKS.md "Memory"), so fewer tokens per micro-batch beat `ops` at equal
memory, and `auto` only takes `ops` when `none` does not fit."""
LIGER_ROPE_IN_PLACE = (
    "Liger's RoPE kernel rotates the q/k projections in place, in the storage of the matmul outputs that selective "
    "recomputation saves and hands back to the recomputed forward, which then rotates them a second time: the "
    "backward runs on wrong q/k (200 steps of `full` with flash-attn-4 + Liger, H200: ops ended 0.12 above the plain "
    "run's loss, every:2 0.06, two plain runs 0.02 apart)"
)
"""Why `auto` offers no selective plan while Liger is on (it was also the slowest there: `ops` ran 0.53x the tokens/s
of `none` at 8k-token packs), and why an explicit one runs without Liger's RoPE (train/model_prep.py)."""
HOST_HEADROOM = 0.8
"""Share of the host's available RAM (per rank on this machine) the `offload` plan may pin: pinned pages cannot be
swapped, and the process still grows (a checkpoint's state is gathered on the CPU to be written)."""
HEADROOM = 0.92
"""Share of free memory a plan may fill: the allocator's fragmentation and kernel workspaces take the rest (the
1B runs of docs/BENCHMARKS.md reserved 4-7% above their peak allocation)."""
GPU_FREE = "free on the GPU"
"""Where the no-fit messages say a GPU run's budget comes from (_may_use)."""


def choose_plan(requested: str, st: Setup, free_bytes: float | None) -> Estimate:
    """The plan to run: `requested`, or for auto the first of `auto_order` whose estimate fits `free_bytes` (None: no
    GPU to measure, plan `none`), else `offload` where it fits and the host can pin its memory. Raises
    FasttuneError, before anything runs, when the chosen plan cannot fit."""
    plan = memory_plan(requested)
    if plan != "auto" and st.plans is not None and _kind(plan) not in st.plans:
        raise FasttuneError(f"model.memory={plan}: this model's decoder layers cannot take it (no layer stack, or no "
                            f"such block); choose one of: {', '.join(sorted(st.plans))}")  # fmt: skip
    _check_every(plan, st.shape.layers)
    if plan == "offload" and st.host:
        raise FasttuneError("model.memory=offload: this run trains on the CPU, whose activations are in host memory "
                            "already; use --model.memory full")  # fmt: skip
    if free_bytes is None:
        return estimate(st, "none" if plan == "auto" else plan)
    budget = free_bytes * HEADROOM
    if plan != "auto":
        est = estimate(st, plan)
        if est.total > budget:
            raise FasttuneError(_no_fit(st, est, free_bytes))
        _check_host(st, est, budget)
        return est
    for est in auto_order(st):
        if est.total <= budget:
            return est
    offload = estimate(st, "offload")
    if st.ram is not None and not st.host and offload.total <= budget:
        # full does not fit, offload would: say what the host lacks, and what else would fit (the host's lack alone
        # left 8-bit moments, LoRA, full with fewer tokens unsaid, as if freeing host memory were the only way)
        full = estimate(st, "full")
        lead = f"memory plan full needs about {full.total / GiB:.1f} GiB, but {_may_use(free_bytes, GPU_FREE)}; "
        _check_host(st, offload, budget, _fixes(st, full, budget), lead)
        return offload
    raise FasttuneError(_no_fit(st, estimate(st, "full"), free_bytes))


def refuse_every_beyond_layers(cfg) -> None:
    """_check_every before the data is read and the model built: the layer count from the config (a preset's, or
    --model's config.json). choose_plan checks again on the built model."""
    plan = memory_plan(cfg.model.memory)
    if plan.startswith("every:"):
        _check_every(plan, load_model_config(cfg.model, cfg.data.tokenizer_vocab_size).num_hidden_layers)


def _check_every(plan: str, layers: int) -> None:
    """every:K recomputes every K-th decoder layer whole: with fewer than K layers none would be, which is `ops` run
    under another name. Say so, with what this model can take instead (auto never offers such a plan: auto_order)."""
    k = _layers_per_recompute(plan)
    if k <= layers:
        return
    every = "" if layers < 2 else "every:2, " if layers == 2 else f"every:2 to every:{layers}, "
    raise FasttuneError(
        f"model.memory={plan}: every:{k} recomputes one decoder layer in {k} whole, so it needs at least {k} layers, "
        f"and this model has {layers}; pass --model.memory {every}full (every layer recomputed whole) or ops (none "
        "recomputed whole)"
    )


def _check_host(st: Setup, est: Estimate, budget: float, others: list[str] | None = None, lead: str = "") -> None:
    """Stop when the plan's pinned host memory exceeds what this rank may pin (st.ram unknown: not checked), naming
    the tokens per micro-batch with which it fits the host and the GPU's `budget`, then `others` (_fixes); `lead`
    opens the message."""
    if not est.pinned or st.ram is None or est.pinned <= st.ram * HOST_HEADROOM:
        return
    tokens = _fitting_tokens(Setup(**{**st.__dict__, "accumulating": True}), budget, est.plan)
    fewer = f"about {tokens} tokens" if tokens else "fewer tokens"  # "lower the tokens" alone left the user guessing
    also = "".join(f" or {fix}" for fix in others or ())
    raise FasttuneError(
        f"{lead}memory plan {est.plan} needs about {est.pinned / GiB:.1f} GiB of pinned host memory for {st.tokens} "
        f"tokens per micro-batch, but it may pin {st.ram * HOST_HEADROOM / GiB:.1f} GiB ({HOST_HEADROOM:.0%} of the "
        f"{st.ram / GiB:.1f} GiB of RAM this rank can take: MemAvailable over the ranks on this machine); free host "
        f"memory, or try {fewer} per micro-batch (lower --data.micro-batch-size or --data.max-length, raise "
        f"--training.grad-accum to keep the batch) with --model.memory {est.plan}{also}"
    )


def _offload_fits(st: Setup, budget: float) -> bool:
    """Whether `offload` fits the GPU's budget and the host's RAM (known)."""
    return st.ram is not None and not st.host and _fits(st, estimate(st, "offload"), budget)


def _fits(st: Setup, est: Estimate, budget: float) -> bool:
    """Whether `est` fits the GPU's budget and its pinned host memory what this rank may pin (_check_host): advice
    that fits the GPU alone would stop again on the host."""
    return est.total <= budget and (not est.pinned or st.ram is None or est.pinned <= st.ram * HOST_HEADROOM)


def selective(plan: str) -> bool:
    """Whether `plan` runs torch's selective checkpointing (`ops`, and the layers `every:K` does not recompute whole),
    which hands saved matmul outputs back to the recomputed forward. `plan` as memory_plan normalises it."""
    return plan == "ops" or plan.startswith("every:")


def auto_order(st: Setup) -> list[Estimate]:
    """CANDIDATES' estimates, least recomputation first (`none`, then recomputed matmul FLOPs, then memory). With
    Liger, no selective plan (see LIGER_ROPE_IN_PLACE); no every:K with fewer than K layers."""
    plans = [p for p in CANDIDATES if not (st.liger and selective(p)) and _layers_per_recompute(p) <= st.shape.layers
             and (st.plans is None or _kind(p) in st.plans)]  # fmt: skip
    ests = [estimate(st, p) for p in plans]
    return sorted(ests, key=lambda e: (*_recomputation(st, e.plan), e.total))


def _kind(plan: str) -> str:
    """every:K is one kind of plan (what plans_for lists); offload is full's kind."""
    return "every:K" if plan.startswith("every:") else "full" if plan == "offload" else plan


def _layers_per_recompute(plan: str) -> int:
    return int(plan.split(":")[1]) if plan.startswith("every:") else 1


def _no_fit(st: Setup, est: Estimate, free_bytes: float) -> str:
    """The estimate, what a plan may use, and what would fit instead (_fixes)."""
    budget = free_bytes * HEADROOM
    fixes = _fixes(st, est, budget)
    if st.host:
        fixes.append("a GPU")
    where = "of RAM this machine can give (MemAvailable, and the weights it holds)" if st.host else GPU_FREE
    return (f"this run needs about {est.total / GiB:.1f} GiB with memory plan {est.plan} ({est.parts()}) for "
            f"{st.tokens} tokens per micro-batch, but {_may_use(free_bytes, where)}; "
            f"try {' or '.join(fixes)}")  # fmt: skip


def _may_use(free_bytes: float, where: str) -> str:
    """What a plan may use of `free_bytes` (HEADROOM of it), for the no-fit messages."""
    use, free = free_bytes * HEADROOM / GiB, free_bytes / GiB
    return f"a plan may use {use:.1f} GiB ({HEADROOM:.0%} of the {free:.1f} GiB {where})"


def _fixes(st: Setup, est: Estimate, budget: float) -> list[str]:
    """What would fit `budget` instead of `est`: a plan with more recomputation, fewer tokens per micro-batch, and,
    only when no plan fits these tokens, bf16 weights, 8-bit moments or LoRA where that change makes the run fit;
    else a smaller model or sharding."""
    fixes = []
    fits = [e.plan for e in auto_order(st) if e.total <= budget] or (["offload"] if _offload_fits(st, budget) else [])
    if fits:
        fixes.append(f"--model.memory {fits[0]}")
    acc = Setup(**{**st.__dict__, "accumulating": True})  # the advice raises --training.grad-accum
    plan = est.plan if _fitting_tokens(acc, budget, est.plan) else "full"
    tokens = _fitting_tokens(acc, budget, plan)
    if tokens and tokens < st.tokens:
        fixes.append(f"about {tokens} tokens per micro-batch (lower --data.micro-batch-size or --data.max-length, "
                     f"raise --training.grad-accum to keep the batch) with --model.memory {plan}")  # fmt: skip
    if not fits:
        fixes += [fix for text, change in state_changes(st) if (fix := _with_change(st, acc, text, change, budget))]
    if not fixes:
        fixes.append("a smaller model, or several GPUs sharding the weights (torchrun ... --training.fsdp)")
    return fixes


def state_changes(st: Setup) -> list[tuple[str, dict]]:
    """(advice, the Setup fields it changes) for what shrinks the weights, gradients and optimizer state."""
    changes = []
    if st.param_bytes == 4 and st.trainable < st.params:  # LoRA: the adapters stay fp32 (model/lora.py)
        changes.append(("--model.dtype bf16 (halves the frozen weights)", {"param_bytes": 2, "autocast": False}))
    elif st.param_bytes == 4:
        moments = st.optimizer_bytes / 2 if st.optimizer == "adamw" else st.optimizer_bytes  # 8-bit ones stay
        what = "weights, gradients and AdamW moments" if st.optimizer == "adamw" else "weights and gradients"
        bf16 = {"param_bytes": 2, "trainable_bytes": None, "optimizer_bytes": moments, "autocast": False}
        changes.append((f"--model.dtype bf16 (halves {what})", bf16))
    if st.optimizer == "adamw":
        changes.append((f"--training.optimizer adamw_8bit (8-bit moments: 2 bytes per parameter instead of "
                        f"{st.optimizer_bytes:.0f}; needs torchao)", {"optimizer_bytes": 2.0}))  # fmt: skip
    if st.trainable == st.params:  # a bf16 base, fp32 adapters of ~0.5% of its size
        moments = 8.0 if st.optimizer == "adamw" else st.optimizer_bytes
        lora = {"trainable": st.params // 200, "lora_rank": 16, "param_bytes": 2, "trainable_bytes": 4.0,
                "optimizer_bytes": moments, "autocast": False, "head_trainable": False}  # fmt: skip
        changes.append(("--lora.enabled (no gradients or optimizer state for the frozen weights)", lora))
    return changes


def _with_change(st: Setup, acc: Setup, text: str, change: dict, budget: float) -> str:
    """The advice `text` for a state change, with what else it needs to fit: nothing when some plan fits the run's
    tokens (then that plan, where it is not `none`), else the tokens per micro-batch with which `full` fits (the
    change alone would stop again); "" when it does not fit at all."""
    changed = Setup(**{**st.__dict__, **change})
    fits = next((e.plan for e in auto_order(changed) if e.total <= budget), None)
    if fits:
        return text if fits == "none" else f"{text} with --model.memory {fits}"
    tokens = _fitting_tokens(Setup(**{**acc.__dict__, **change}), budget, "full")
    return f"{text} with about {tokens} tokens per micro-batch and --model.memory full" if tokens else ""


def _fitting_tokens(st: Setup, budget: float, plan: str) -> int:
    """The most tokens per micro-batch (st.tokens halved, down to 256) with which `plan` fits (_fits); 0 if none."""

    def fits(tokens: int) -> bool:
        changed = Setup(**{**st.__dict__, "tokens": tokens})
        return _fits(changed, estimate(changed, plan), budget)

    tokens = st.tokens
    while tokens > 256 and not fits(tokens):
        tokens //= 2
    return tokens if fits(tokens) else 0


def _choose_with_liger_norms(cfg, model: torch.nn.Module, requested: str, st: Setup, free: float | None) -> Estimate:
    """choose_plan, where Liger's RMSNorms may have their outputs recomputed (model/norm.py; model.lean_norm): only
    when that lets the run fit with less recomputation than otherwise (it costs ~4% of the step: docs/BENCHMARKS.md,
    "Memory")."""
    from fasttune.model import norm

    if not (cfg.model.lean_norm and not cfg.training.compile and norm.has_liger_norms(model)):
        return choose_plan(requested, st, free)
    lean = Setup(**{**st.__dict__, "lean_norm": True})
    try:
        est = choose_plan(requested, st, free)
    except FasttuneError:  # when even the lean norms do not fit, their error: what the run needs at the least
        return _tag_liger_norms(model, choose_plan(requested, lean, free))
    if requested != "auto" or est.plan == "none":
        return est
    lean_est = choose_plan(requested, lean, free)
    if _recomputation(st, lean_est.plan) < _recomputation(st, est.plan):
        return _tag_liger_norms(model, lean_est)
    return est


def _recomputation(st: Setup, plan: str) -> tuple[float, bool]:
    """How auto_order ranks a plan's recomputation."""
    return recompute_flops(st.shape, plan), plan != "none"


def _tag_liger_norms(model: torch.nn.Module, est: Estimate) -> Estimate:
    from fasttune.model import norm

    count = norm.apply(model, liger=True)
    log.info("model.lean_norm: Liger's %d RMSNorm outputs recomputed in backward (less memory for ~4%% of the step)",
             count)  # fmt: skip
    return est


def plan_memory(cfg, model: torch.nn.Module, device: torch.device, free_bytes: float | None = None,
                attention: str | None = None, bounds: tuple[int, int] | None = None) -> Estimate:  # fmt: skip
    """Choose and install the run's memory transforms: the chunked loss (Liger's fused one when Liger is on) and the
    activation plan (`model.memory`; `model.gradient_checkpointing` means full). `free_bytes` replaces the
    measured free memory (tests simulate GPUs with it); `bounds` (tokens per micro-batch, widest row) as the run
    batches (data.packing.Batcher.bounds; None: data.packing's packing budget, or padded rows of data.max_length)."""
    from fasttune.model.loss import apply_chunked_loss

    base = base_model(model)
    liger = cfg.model.liger and "forward" in vars(base)  # Liger's fused loss patched this instance's forward
    if liger:
        apply_chunked_loss(base, liger=True)  # Liger's kernel, on the tokens with a target only
    chunked = cfg.model.chunked_loss and not liger and apply_chunked_loss(base)
    requested = "full" if cfg.model.gradient_checkpointing and cfg.model.memory == "auto" else cfg.model.memory
    free = free_bytes if free_bytes is not None else host_free(model) if device.type == "cpu" else free_memory(device)
    d = cfg.data
    budget = d.micro_batch_size * d.max_length
    tokens, row = bounds or (budget, budget if d.packing else d.max_length)
    scores = kept_scores(model, attention, row, runs_autocast(cfg, model, device), device)
    st = setup_of(cfg, model, liger, chunked, scores, tokens, device)
    est = _choose_with_liger_norms(cfg, model, requested, st, free)
    why = "least recomputation that fits" if requested == "auto" else "as configured"
    where = "no GPU to measure" if free is None else f"{free / GiB:.1f} GiB {'of RAM' if st.host else 'free'}"
    log.info("memory plan: %s (%s, %s); predicted peak %s for %d tokens per micro-batch", est.plan, requested if
             requested != est.plan else why, where, est.describe(), st.tokens)  # fmt: skip
    apply_plan(model, est.plan)
    return est
