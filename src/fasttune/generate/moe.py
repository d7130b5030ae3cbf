"""Mixture-of-experts feed-forward layers on the fused decoder (decoder.py): Mixtral (Mistral's attention), Qwen2-MoE
(Qwen2's, with a shared expert behind a sigmoid gate), Qwen3-MoE (Qwen3's, q/k norms per head) and OLMoE (q/k norms
over the whole projection, optional clip_qkv). Their dense layers (Qwen's `mlp_only_layers`, `decoder_sparse_step`)
stay decoder.py's SwiGLU.

Routing as each HF router does it (transformers 5's `*TopKRouter`): logits = x @ router.T in the model dtype, softmax
in float32 over all experts, top-k of the probabilities; then
- Mixtral: the k probabilities always renormalized to sum 1, kept in float32 (its expert outputs are weighted in
  float32, then rounded);
- Qwen2-MoE, Qwen3-MoE, OLMoE: renormalized when `norm_topk_prob`, then cast to the model dtype.
Experts are transformers 5's fused weights: `experts.gate_up_proj` (E, 2I, H), gate rows then up rows, and
`experts.down_proj` (E, H, I); expert e of token x is down[e] @ (silu(gate[e] @ x) * (up[e] @ x)). Anything else
(transposed or biased expert weights, an expert norm, another gating) is refused with the reason.

How the experts run, all in static shapes with no host sync (one CUDA graph per batch bucket):
- decode (N tokens, N = the padded batch <= 32 in practice) is memory-bound: its time is the expert weights read.
  *gathered*: the N*K chosen experts' weights copied out (index_select: read + write) and multiplied per token-slot
  (bmm: read again), ~3*N*K experts' bytes; *dense*: every expert on every token (one bmm per projection over all E)
  and a weighted sum that zeroes the unchosen ones, E experts' bytes (the extra flops are free while memory-bound:
  N <= 32 rows per expert is ~16 flop/byte in bf16, far below an H100/H200's ~200-300). So gathered wins while
  3*N*K < E (batch 1-5 of Qwen3-30B-A3B's 128 experts, top-8; batch 1 of Mixtral's 8, top-2) and dense from there on
  (at batch 32 top-8 of 128 touches ~112 distinct experts anyway). The choice is per batch size, fixed per graph.
- the prompt pass (not captured) calls HF's own experts module with the routing above: only the chosen experts run.
Legend: N tokens, E experts, K experts per token, H hidden size, I expert intermediate size, S = N*K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
GATHER_COST = 3  # experts' bytes moved per chosen (token, expert) pair on the gathered path (module docstring)


def is_sparse(mlp: torch.nn.Module) -> bool:
    """Whether a decoder layer's feed-forward module is a sparse MoE block (else a dense SwiGLU)."""
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def structure_reason(mlp: torch.nn.Module) -> str | None:
    """Why the experts of a sparse block are not transformers 5's fused SwiGLU layout the MoE path runs, or None."""
    experts, router = mlp.experts, mlp.gate
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)) or gate_up.dim() != 3:
        return f"{type(experts).__name__} has no fused 3-D gate_up_proj / down_proj expert weights"
    E, I2, H = gate_up.shape
    if down.shape != (E, H, I2 // 2) or getattr(router, "weight", None) is None or router.weight.shape != (E, H):
        shapes = f"{tuple(gate_up.shape)} / {tuple(down.shape)}"
        return f"{type(experts).__name__}: expert weights {shapes}, not (E, 2I, H) / (E, H, I) with a router (E, H)"
    layout = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
              "has_post_expert_norm": False}  # fmt: skip
    for name, plain in layout.items():
        if getattr(experts, name, plain) != plain:
            return f"{type(experts).__name__}.{name}={not plain}: only plain fused SwiGLU experts are supported"
    return None  # the activation: the config's hidden_act, checked to be SiLU (decoder.unsupported_reason)


def fused_router(mlp: torch.nn.Module) -> torch.Tensor:
    """(E [+ 1], H): the router's weight, and Qwen2-MoE's shared-expert gate as one more row (one matmul for both)."""
    shared_gate = getattr(mlp, "shared_expert_gate", None)
    return mlp.gate.weight if shared_gate is None else torch.cat([mlp.gate.weight, shared_gate.weight])


def route(config, logits_NE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (N, K), experts (N, K)) from router logits (N, E), as the model's HF router (module docstring)."""
    w_NK, idx_NK = logits_NE.float().softmax(-1).topk(top_k, dim=-1)
    if config.model_type == "mixtral":
        return w_NK / w_NK.sum(-1, keepdim=True), idx_NK
    if config.norm_topk_prob:
        w_NK = w_NK / w_NK.sum(-1, keepdim=True)
    return w_NK.to(logits_NE.dtype), idx_NK


def gathers(batch: int, top_k: int, experts: int) -> bool:
    """Whether a decode step of `batch` tokens runs the gathered path (module docstring), else the dense one."""
    return GATHER_COST * batch * top_k < experts


def _gathered(x_NH: torch.Tensor, experts: torch.nn.Module, w_NK: torch.Tensor, idx_NK: torch.Tensor,
              silu_mul: Callable) -> torch.Tensor:  # fmt: skip
    N, K = idx_NK.shape
    idx_S = idx_NK.reshape(-1)
    x_SH1 = x_NH[:, None].expand(N, K, x_NH.shape[1]).reshape(N * K, -1, 1)  # token n's row at slots n*K .. n*K+K-1
    gate_up_S2I = torch.bmm(experts.gate_up_proj.index_select(0, idx_S), x_SH1)[..., 0]
    act_SI1 = silu_mul(gate_up_S2I)[:, :, None]
    down_SH = torch.bmm(experts.down_proj.index_select(0, idx_S), act_SI1)[..., 0]
    return (down_SH * w_NK.reshape(-1, 1)).view(N, K, -1).sum(1).to(x_NH.dtype)


def _dense(x_NH: torch.Tensor, experts: torch.nn.Module, w_NK: torch.Tensor, idx_NK: torch.Tensor,
           silu_mul: Callable) -> torch.Tensor:  # fmt: skip
    E, N = experts.gate_up_proj.shape[0], x_NH.shape[0]
    gate_up_EN2I = torch.matmul(x_NH, experts.gate_up_proj.transpose(1, 2))  # x broadcast over the experts
    act_ENI = silu_mul(gate_up_EN2I.reshape(E * N, -1)).view(E, N, -1)
    down_ENH = torch.bmm(act_ENI, experts.down_proj.transpose(1, 2))
    w_NE = torch.zeros((N, E), dtype=w_NK.dtype, device=x_NH.device).scatter(1, idx_NK, w_NK)
    chosen_EN1 = torch.zeros((N, E), dtype=torch.bool, device=x_NH.device).scatter(1, idx_NK, True).t()[..., None]
    # unchosen experts' outputs are zeroed, not multiplied by 0: an overflow there (fp16) must not reach the sum
    return (down_ENH * w_NE.t()[..., None]).masked_fill(~chosen_EN1, 0.0).sum(0).to(x_NH.dtype)


def forward(config, mlp: torch.nn.Module, fused: dict, x_NH: torch.Tensor, prefill: bool,
            silu_mul: Callable) -> torch.Tensor:  # fmt: skip
    """The sparse block's output (N, H) for its normed input `x_NH`: routed experts (+ Qwen2-MoE's gated shared
    expert, whose gate/up are `fused["gate_up"]`)."""
    experts = mlp.experts
    E, top_k = experts.gate_up_proj.shape[0], config.num_experts_per_tok
    logits_NF = F.linear(x_NH, fused["router"])
    w_NK, idx_NK = route(config, logits_NF[:, :E], top_k)
    if prefill:  # HF's own experts module: only the chosen experts run (host syncs: fine outside a graph)
        out_NH = experts(x_NH, idx_NK, w_NK)
    else:
        path = _gathered if gathers(x_NH.shape[0], top_k, E) else _dense
        out_NH = path(x_NH, experts, w_NK, idx_NK, silu_mul)
    if fused["gate_up"] is not None:  # Qwen2-MoE: sigmoid(gate) * shared expert, added to the routed ones
        shared_NH = F.linear(silu_mul(F.linear(x_NH, fused["gate_up"])), mlp.shared_expert.down_proj.weight)
        out_NH = out_NH + torch.sigmoid(logits_NF[:, E:]) * shared_NH
    return out_NH
