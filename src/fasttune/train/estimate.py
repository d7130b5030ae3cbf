"""The memory estimate of one training step: the facts of a configured run and built model that decide it (`Setup`,
`setup_of`, `model_shape`) and its predicted peak bytes by part (`Estimate`, `estimate`). train/memory.py chooses the
activation plan with it, bench/fit.py compares it with other stacks' needs.

Byte counts per token and decoder layer: train/activations.py.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from fasttune.model.build import base_model, decoder_blocks
from fasttune.model.expert_lora import act_bytes, fold_bytes
from fasttune.model.layout import attention_layout, mlp_layout, parallel
from fasttune.model.mlp import fused as fused_mlp
from fasttune.model.norm import lean as lean_norm
from fasttune.model.norm import norm_layout
from fasttune.train.activations import (
    Shape,
    activation_bytes,
    attention_workspace_bytes,
    end_of_backward_bytes,
    offloaded_bytes,
)
from fasttune.train.free import rank_ram
from fasttune.train.recompute import decoder_layers, plans_for

GiB = 2**30
SOFTCAP_BYTES = 12.0
"""Bytes per logit of a chunk at a softcapped loss's peak while tanh runs (Gemma 2): the fp32 logits, tanh's fp32
argument and tanh (measured on CPU, 256-token chunks of a 4096 vocabulary, bf16 and fp32: tests/test_memory_layers.py);
chunked_loss_bytes."""

KEEPS_EXPERTS = ("none", "attention")
"""The plans under which a MoE layer's experts keep what they save for backward (the others recompute it)."""


@dataclass
class Estimate:
    """Predicted peak bytes of one training step, by part."""

    plan: str
    tokens: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    loss: float
    buckets: float = 0.0
    """DDP's gradient buckets, held for the whole run."""
    accumulating: bool = False
    """Several micro-batches per step: the gradients are held while the next ones run forward and backward."""
    end_of_backward: float = 0.0
    """Activations live beside (nearly) every gradient when backward reaches the first layers (activations.py)."""
    workspace: float = 0.0
    """The attention backward's own buffers (activations.attention_workspace_bytes)."""
    fixed: float = 0.6 * GiB  # cuBLAS and attention workspaces, allocator slack
    pinned: float = 0.0
    """Host memory the plan pins (`offload`: the layers' inputs), not part of the GPU's total."""
    remade: float = 0.0
    """LoRA on fused MoE experts: one layer's adapted expert weights, remade in backward, and their gradient
    (model/expert_lora.py), beside the activations or, at the end of backward, the gradients; none is kept."""

    @property
    def total(self) -> float:
        # Gradients replace activations as backward runs (set_to_none between steps): the peak is at the start of
        # backward or at the optimizer step (1B shape with Liger: 25.9 GiB predicted, 25.2 measured at 16k tokens;
        # 16.6 vs 15.8 at 8k; without Liger 41.1 vs 41.4, docs/BENCHMARKS.md). Accumulating, the first micro-batch's
        # gradients are there while the next one keeps its activations (2 x 8k tokens: 15.7 predicted, 15.0 measured).
        # A plan that recomputes whole layers has the first layers' recompute live beside nearly every gradient.
        acts = self.activations + self.loss
        live = self.grads + acts if self.accumulating else max(self.grads + self.end_of_backward, acts)
        return self.weights + self.optimizer + self.buckets + live + self.remade + self.workspace + self.fixed

    def parts(self) -> str:
        """The total's parts by name; the terms most plans do not have only where they count."""
        parts = (("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("loss", self.loss))  # fmt: skip
        extra = (("beside the grads at the end of backward", 0.0 if self.accumulating else self.end_of_backward),
                 ("attention backward workspace", self.workspace), ("DDP buckets", self.buckets),
                 ("MoE experts' adapted weights remade in backward", self.remade))  # fmt: skip
        return ", ".join(f"{n} {v / GiB:.1f}" for n, v in (*parts, *((n, v) for n, v in extra if v)))

    def describe(self) -> str:
        host = f" and {self.pinned / GiB:.1f} GiB of pinned host memory" if self.pinned else ""
        return f"{self.total / GiB:.1f} GiB ({self.parts()}){host}"


@dataclass(frozen=True)
class Setup:
    """What besides the plan decides the step's memory."""

    shape: Shape
    params: int
    trainable: int
    param_bytes: int
    """Bytes per parameter: the first one's dtype (under LoRA the frozen base's)."""
    optimizer_bytes: float
    """Optimizer state bytes per trainable parameter (AdamW: 2 moments in the parameter dtype; 8-bit AdamW ~2)."""
    tokens: int
    """Tokens per micro-batch (the packing budget, or samples x max_length padded)."""
    trainable_bytes: float | None = None
    """Bytes per trainable parameter and per gradient, in its own dtype (LoRA adapters: fp32); None: param_bytes."""
    liger: bool = False
    loss: str = "chunked"
    """chunked (fasttune's), liger (fused), or hf (the full logits)."""
    autocast: bool = False
    """fp32 weights under bf16 autocast (bf16 copies of the weights are cached for the step)."""
    shards: int = 1
    """FSDP2 ranks the weights, gradients and optimizer state are sharded over."""
    ddp: bool = False
    """DDP keeps its gradient buckets beside the gradients: one more copy of them."""
    optimizer: str = "adamw"
    """training.optimizer (its state is `optimizer_bytes`; named here for the no-fit advice)."""
    lora_rank: int = 0
    """Rank of the peft LoRA adapters (0: no LoRA)."""
    lora_upcast: bool = False
    """peft's own forward runs (lora.dropout > 0) with fp32 adapters on a bf16 base: each adapted input upcast."""
    fused_mlp: bool = False
    """fasttune's SwiGLU function (model/mlp.py) runs the MLPs: it keeps gate and up, not the product."""
    accumulating: bool = False
    """training.grad_accum > 1 (see Estimate.accumulating)."""
    lean_norm: bool = False
    """fasttune's lean RMSNorm (model/norm.py): norms keep their input only, their outputs are recomputed."""
    plans: frozenset[str] | None = None
    """The plans this model's layers can take (see plans_for); None: every plan."""
    scores: tuple[float, float] = (0.0, 0.0)
    """Bytes per token and layer the attention keeps for backward beyond fasttune's kernels (kept_scores): where it is
    kept whole (`none`, `mlp`), and under `ops`."""
    head_trainable: bool = True
    """The output projection trains (not under LoRA): the chunked loss accumulates its gradient in fp32."""
    gathered: float = 0.0
    """Bytes of weights FSDP2 holds all-gathered beside the shards (gathered()): the root unit (embeddings, head, final
    norm) from the forward to its backward, and two decoder blocks (the running one and the prefetched one)."""
    host: bool = False
    """The run trains on the CPU: what it may use is the machine's RAM (host_free), not a GPU's memory."""
    experts_fold: float = 0.0
    """LoRA on fused MoE experts: bytes of the largest layer's adapted expert weights (expert_lora.fold_bytes)."""
    experts_lora: float = 0.0
    """LoRA on fused MoE experts computed on the activations (model/expert_lora_act.py): bytes of the adapters' stacked
    copies in the compute dtype, all layers together (expert_lora.act_bytes), kept for backward where the experts'
    activations are (plans `none`, `attention`; the others recompute them): 41 MB a layer at the Qwen3-30B-A3B shape,
    rank 16, in bf16; fp32 copies, twice that, in fp32 without autocast (measured: tests/test_expert_lora_act.py)."""
    ram: float | None = None
    """RAM this rank may take on the host (MemAvailable over the ranks on this machine), for `offload`'s pinned
    memory; None: unknown, and `auto` does not offer `offload`."""

    @property
    def fp32_compute(self) -> bool:
        """fp32 weights without autocast (--model.dtype fp32 on a GPU, every run on the CPU): the activations are fp32
        (fp32_layers)."""
        return self.param_bytes == 4 and not self.autocast


def estimate(st: Setup, plan: str) -> Estimate:
    s = st.shape
    from fasttune.model.loss import chunk_tokens

    if st.loss == "hf":  # bf16 logits, their fp32 upcast and log-softmax, its fp32 gradient, the bf16 gradient
        loss = st.tokens * s.vocab * 16.0
    elif st.loss == "chunked":
        loss = chunked_loss_bytes(s, min(chunk_tokens(s.vocab), st.tokens), st.fp32_compute, st.head_trainable)
    else:  # Liger's kernel (CUDA only: not measured here, nor in fp32): one chunk as ours in bf16, its fp32 logits
        # beside their bf16 copy, the head's gradient accumulated in place (addmm into it), fp32 where it trains
        per_logit = SOFTCAP_BYTES if s.softcap else 6.0
        loss = min(chunk_tokens(s.vocab), st.tokens) * s.vocab * per_logit
        loss += s.vocab * s.hidden * 4.0 if st.head_trainable else 0.0
    trained = st.trainable * (st.param_bytes if st.trainable_bytes is None else st.trainable_bytes)
    frozen = (st.params - st.trainable) * st.param_bytes
    weights = (frozen + trained + (st.params * 2 if st.autocast else 0)) / st.shards + st.gathered
    grads, optimizer = trained / st.shards, st.trainable * st.optimizer_bytes / st.shards
    wide = 2.0 if st.fp32_compute else 1.0  # counted in bf16 they were half what an fp32 run keeps: an OOM, not a stop
    scores = tuple(b / wide for b in st.scores)  # in the run's dtype already (kept_scores)
    args = (st.liger, st.autocast, st.lora_rank, st.lora_upcast, st.fused_mlp, st.lean_norm, scores)
    s = fp32_layers(s) if st.fp32_compute else s
    experts_lora = st.experts_lora if plan in KEEPS_EXPERTS else 0.0
    activations = wide * activation_bytes(s, plan, st.tokens, *args) + experts_lora
    return Estimate(
        plan=plan, tokens=st.tokens, weights=weights, grads=grads, optimizer=optimizer, activations=activations,
        loss=loss, buckets=grads if st.ddp else 0.0, accumulating=st.accumulating,
        end_of_backward=wide * end_of_backward_bytes(s, plan, st.tokens, *args),
        workspace=0.0 if st.host else attention_workspace_bytes(s, st.tokens),
        fixed=0.0 if st.host else Estimate.fixed,  # no GPU workspaces; the process's own RAM is out of MemAvailable
        pinned=offloaded_bytes(s, st.tokens, st.autocast or st.fp32_compute) if plan == "offload" else 0.0,
        remade=2.0 * st.experts_fold,  # the weights and their gradient, in the weights' dtype (fp32 in fp32 runs)
    )  # fmt: skip


def chunked_loss_bytes(s: Shape, chunk: int, fp32: bool, head_trainable: bool) -> float:
    """The chunked loss's peak (model/loss.py) for chunks of `chunk` tokens, in the compute dtype (`fp32`: no
    autocast, fp32 weights). Making a chunk's gradients it holds the chunk's fp32 logits, their gradient made in
    place, its copy for the matmuls (2 bytes a logit in bf16; in fp32 `.to` makes none), a softcap's fp32 tanh, and
    with a trainable head the head-gradient matmul's output before it is added to the fp32 accumulator ([vocab,
    hidden] in the compute dtype: 1 GiB in bf16 at Llama-3.1-8B's head, beside its 2 GiB accumulator). A softcap
    may peak earlier, while tanh runs (SOFTCAP_BYTES a logit). On CPU, one 256-token chunk of a 4096 vocabulary at
    hidden 64 and 256, bf16 and fp32, softcapped or not: within 2.1% of the measured peak (tests/test_memory_layers);
    6 bytes a logit in every dtype and no matmul output before, at hidden 256 it counted 10 bytes a logit for 12.3
    kept in fp32 and 12.1 in bf16. At the 1B shape the output adds 0.12 GiB in bf16 (H200: 8B at 8k tokens, `ops`,
    75.2 GiB measured, 74.6 predicted before, 75.6 now)."""
    logits, head = chunk * s.vocab, s.vocab * s.hidden if head_trainable else 0
    copy, out = (0.0, 4.0) if fp32 else (2.0, 2.0)  # the gradient's copy, the matmul output's element
    grads = logits * (4.0 + copy + (4.0 if s.softcap else 0.0)) + head * out
    tanh = logits * SOFTCAP_BYTES if s.softcap else 0.0
    return max(grads, tanh) + head * 4.0


def fp32_layers(s: Shape) -> Shape:
    """The shape whose bf16 activation bytes (train/activations.py), doubled, are what its layers keep in fp32 without
    autocast: every kept tensor twice its bytes, but a norm's fp32 upcast is then no copy (HF's Llama RMSNorm keeps
    its input and its normalized input, 8 bytes an element, not 2 x 6; Gemma's, OLMo2's 8 and Cohere's LayerNorm 12
    are fp32 already). Within 0.3% of what Llama, Gemma 1-3, Qwen3, OLMo2 and Cohere layers keep on CPU in fp32, under
    every plan, and under LoRA, whose frozen norms keep no fp32 normalized input (lora_bytes: norm_elem 4 here is
    fp32's; tests/test_memory_layers.py)."""
    return dataclasses.replace(s, norm_elem=2 * -(-s.norm_elem // 4))


def setup_of(cfg, model: torch.nn.Module, liger: bool, chunked: bool, scores: tuple[float, float] = (0.0, 0.0),
             tokens: int | None = None, device: torch.device | None = None) -> Setup:  # fmt: skip
    """The memory-relevant facts of this configured run and built model; `tokens` per micro-batch (default: the
    packing budget, micro_batch_size x max_length); `device` the run's (default: the model's)."""
    from fasttune.train.optim import state_bytes

    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    trained = [p for p in params if p.requires_grad]
    trainable = sum(p.numel() for p in trained)
    moments = state_bytes(cfg.training.optimizer, trained)
    param_bytes = params[0].element_size() if params else 2
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the model is not wrapped yet
    shards, autocast = world if cfg.training.fsdp else 1, runs_autocast(cfg, model, device)
    head = base_model(model).get_output_embeddings()
    return Setup(
        head_trainable=head is None or head.weight.requires_grad,
        gathered=gathered(model, 2 if autocast else param_bytes) if shards > 1 else 0.0,
        shards=shards, ddp=world > 1 and not cfg.training.fsdp, shape=model_shape(model, autocast, device),
        params=n, trainable=trainable, param_bytes=param_bytes,
        trainable_bytes=sum(p.numel() * p.element_size() for p in trained) / max(1, trainable),
        optimizer_bytes=moments / max(1, trainable), tokens=tokens or cfg.data.micro_batch_size * cfg.data.max_length,
        liger=liger, optimizer=cfg.training.optimizer,
        loss="liger" if liger else ("chunked" if chunked else "hf"),
        autocast=param_bytes == 4 and cfg.model.dtype == "auto" and _device_type(model, device) == "cuda",
        lora_rank=_lora_rank(model), lora_upcast=_lora_upcast(cfg, model, param_bytes), fused_mlp=fused_mlp(model),
        lean_norm=lean_norm(model), plans=plans_for(model), accumulating=cfg.training.grad_accum > 1,
        scores=scores, host=_device_type(model, device) == "cpu", ram=rank_ram(), experts_fold=fold_bytes(model),
        experts_lora=act_bytes(model, autocast),
    )  # fmt: skip


def gathered(model: torch.nn.Module, gather_bytes: int) -> float:
    """Setup.gathered: FSDP2 (distributed._shard) shards each of transformers' decoder blocks, and the rest as one
    root unit (the whole model where it names no blocks); under bf16 autocast it gathers in bf16 (`gather_bytes` 2).
    The largest block counts twice (DeepSeek's first layers are dense, the others MoE)."""
    layers = decoder_blocks(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    layer = max((sum(p.numel() for p in block.parameters()) for block in layers), default=0)
    return float((root + 2 * layer) * gather_bytes)


def runs_autocast(cfg, model: torch.nn.Module, device: torch.device | None = None) -> bool:
    """Whether the run computes under bf16 autocast: fp32 weights or LoRA adapters on a GPU (`device`, default the
    model's: under FSDP2 it is built on the CPU or the meta device) under dtype auto."""
    fp32 = any(p.dtype == torch.float32 for p in model.parameters())
    return cfg.model.dtype == "auto" and fp32 and _device_type(model, device) == "cuda"


def _device_type(model: torch.nn.Module, device: torch.device | None) -> str:
    """`device`'s type, else where the model's weights are: "cuda" if any is, "cpu" if all are, else another."""
    if device is not None:
        return device.type
    types = {p.device.type for p in model.parameters()}
    if "cuda" in types:
        return "cuda"
    return types.pop() if len(types) == 1 else "cpu" if not types else "mixed"


def model_shape(model: torch.nn.Module, autocast: bool = False, device: torch.device | None = None) -> Shape:
    """The model's shape, its norms, attention and MLP as its first decoder layer has them (the config alone names
    neither: model/norm.py, model/layout.py); `autocast`: the run computes under bf16 autocast, on `device` (default:
    the model's)."""
    config = base_model(model).config
    shape, layers = Shape.of(config), decoder_layers(model)
    if not layers:
        return shape
    norms, elem, qk = norm_layout(layers[0], shape.hidden)
    if norms:
        shape = dataclasses.replace(shape, norms=norms, norm_elem=elem, qk_norms=qk, parallel=parallel(config, norms))
    return dataclasses.replace(shape, **attention_layout(layers[0], config), **mlp_layout(layers[0], autocast, device))


def _lora_rank(model: torch.nn.Module) -> int:
    config = getattr(model, "peft_config", {}).get("default")
    return int(config.r) if config is not None else 0


def _lora_upcast(cfg, model: torch.nn.Module, param_bytes: int) -> bool:
    """Whether peft's own forward runs in training (fasttune's fast one falls back to it under LoRA dropout) with
    fp32 adapters on a 2-byte base, upcasting each adapted input."""
    adapters = [p for p in model.parameters() if p.requires_grad]
    if not _lora_rank(model) or cfg.lora.dropout == 0 or param_bytes != 2 or not adapters:
        return False
    return adapters[0].element_size() == 4
