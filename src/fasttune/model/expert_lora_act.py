"""LoRA on fused MoE experts computed on the activations: no adapted weight is built, not even for one layer.

peft adapts transformers 5's 3-D expert weights (gate_up_proj [E, 2I, H], down_proj [E, H, I]) by folding W' = W +
scaling * lhs @ rhs per layer (model/expert_lora.py's recipes make it again in backward instead of keeping it): a
weight-sized tensor made per layer and step, 1.2 GB a layer at the Qwen3-30B-A3B shape in bf16, and its
weight-sized gradient in backward. Here, where the experts run transformers' grouped matmul
(`config._experts_implementation == "grouped_mm"`), each adapted projection is y = x @ W_e^T (transformers' own
grouped matmul, unchanged) + scaling * (x @ A_e^T) @ B_e^T: two more grouped matmuls over the same tokens sorted by
expert and the same offsets, through rank r. peft's factors per expert (`ParamWrapper.get_delta_factors`): A_e is rows
e*r .. e*r+r-1 of lora_A.weight [E*r, in], B_e column j*E+e (j < r) of lora_B.weight [out, r*E], the same product
whichever way transformers stores the weight (tests/test_expert_lora_act.py checks it against peft's delta).

The rank is padded with zeros to a multiple of 16 bytes: CUDA's grouped matmul wants its operands' rows aligned, and
the [tokens, r] intermediate is one. Autograd keeps, per adapted projection, the factors' stacks in the compute dtype
(bf16 copies of fp32 adapters on a GPU: Setup.experts_lora in train/estimate.py counts them under the plans that keep
the experts' activations) and the [tokens x top-k, r] intermediate; no weight-sized tensor. Biases (gpt-oss) are
transformers' own, added out of place to its output. The factors' reshaping is one custom op
(`fasttune::expert_lora_factors`, contiguous outputs whatever inductor would choose; see `_stack`), so this forward
compiles with the decoder layer, with no graph break of its own.

The forward mirrors transformers' `grouped_mm_experts_forward` (integrations/moe.py) without its expert-parallel
sentinels: a module sharded by expert parallelism, or whose wrappers are not plain (expert_lora._chain), runs the
recipes or peft's forward instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

enabled = True
"""False: every experts module runs model/expert_lora.py's recipes (tests/test_expert_lora.py keeps testing them)."""

RANKS: set[int] = set()
"""The padded ranks of the adapters given the fast forward (`register`): train/recompute.py's `ops` recomputes a
grouped matmul from rank r to an expert's full width (its output is as wide as the base one's) instead of keeping
it."""

_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def runs(module: nn.Module, names: list[str]) -> bool:
    """Whether the experts `module`, its parameters `names` adapted, runs here: transformers' grouped-matmul experts
    (`use_experts_implementation`'s attributes, its config's implementation), no expert parallelism."""
    config = getattr(module, "config", None)
    return (
        enabled
        and getattr(config, "_experts_implementation", None) == "grouped_mm"
        and hasattr(module, "is_transposed")
        and not getattr(module, "_is_expert_parallel", False)
        and set(names) <= set(_PROJECTIONS)
        and len(set(names)) == len(names)
    )


def padded_rank(r: int, dtype: torch.dtype) -> int:
    """r rounded up to a multiple of 16 bytes of `dtype`."""
    step = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-r // step) * step


def register(wrapper: nn.Module) -> None:
    """Add a ParamWrapper's ranks, padded for each dtype it may run in, to RANKS: as its forward is installed, not as
    it runs (compiled, the recompute policy reads RANKS while compiling, before the traced forward ever ran)."""
    for adapter in wrapper.lora_A:
        r = wrapper.lora_A[adapter].weight.shape[0] // wrapper.num_experts
        RANKS.update(padded_rank(r, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16))


def factors(wrapper: nn.Module, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A stacked [E, in, r'], B stacked [E, r', out], scaling) of one ParamWrapper in `dtype`, r' the padded rank:
    x @ A_e^T @ B_e^T is x's product with the expert's adapter delta, as peft folds it (see the module's docstring)."""
    a, b, experts = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, wrapper.num_experts
    rank = padded_rank(a.shape[0] // experts, dtype)
    a_EIR, b_ERO = torch.ops.fasttune.expert_lora_factors(a, b, experts, rank, dtype)
    return a_EIR, b_ERO, wrapper.scaling[adapter]


@torch.library.custom_op("fasttune::expert_lora_factors", mutates_args=())
def _stack(a: torch.Tensor, b: torch.Tensor, experts: int, rank: int, dtype: torch.dtype) -> tuple[
        torch.Tensor, torch.Tensor]:  # fmt: skip
    """lora_A [E x r, in] and lora_B [out, r x E] as contiguous stacks [E, in, rank] and [E, rank, out] in `dtype`,
    zero-padded from r to `rank`. An op of its own, with fixed contiguous outputs: inductor otherwise laid the stacks
    out as the permuted views they are made from (its grouped matmul asks for no strides), and a second backward
    (create_graph) handed the grouped matmul such a view of a gradient; torch's kernel refuses both (neither of the
    last two dims of stride 1). Its backward is `_unstack`, whose backward is this op: contiguous at every order."""
    r = a.shape[0] // experts
    a_EIR = a.to(dtype).reshape(experts, r, a.shape[-1]).transpose(1, 2)
    b_ERO = b.to(dtype).reshape(b.shape[0], r, experts).permute(2, 1, 0)
    return _fresh(F.pad(a_EIR, (0, rank - r)), a), _fresh(F.pad(b_ERO, (0, 0, 0, rank - r)), b)


def _fresh(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and not sharing `source`'s storage (a custom op's outputs may not alias its inputs: a cast to the
    same dtype, a pad by 0), copied only where it is not already."""
    if t.is_contiguous() and t.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@_stack.register_fake
def _(a, b, experts, rank, dtype):
    return a.new_empty(experts, a.shape[-1], rank, dtype=dtype), b.new_empty(experts, rank, b.shape[0], dtype=dtype)


@torch.library.custom_op("fasttune::expert_lora_factors_grad", mutates_args=())
def _unstack(a_EIR: torch.Tensor, b_ERO: torch.Tensor, r: int, a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[
        torch.Tensor, torch.Tensor]:  # fmt: skip
    """`_stack`'s adjoint: the stacks (their gradients) back to lora_A's and lora_B's layout and dtypes, unpadded."""
    experts = a_EIR.shape[0]
    a = a_EIR[..., :r].transpose(1, 2).reshape(experts * r, a_EIR.shape[1]).to(a_dtype)
    b = b_ERO[:, :r].permute(2, 1, 0).reshape(b_ERO.shape[-1], r * experts).to(b_dtype)
    return _fresh(a, a_EIR), _fresh(b, b_ERO)


@_unstack.register_fake
def _(a_EIR, b_ERO, r, a_dtype, b_dtype):
    experts = a_EIR.shape[0]
    return a_EIR.new_empty(experts * r, a_EIR.shape[1], dtype=a_dtype), b_ERO.new_empty(b_ERO.shape[-1], r * experts,
                                                                                        dtype=b_dtype)  # fmt: skip


def _stack_context(ctx, inputs, output):
    a, b, experts, rank, dtype = inputs
    ctx.r, ctx.dtypes = a.shape[0] // experts, (a.dtype, b.dtype)


def _stack_backward(ctx, grad_a, grad_b):
    grads = torch.ops.fasttune.expert_lora_factors_grad(grad_a, grad_b, ctx.r, *ctx.dtypes)
    return *grads, None, None, None


def _unstack_context(ctx, inputs, output):
    a_EIR, b_ERO, r, a_dtype, b_dtype = inputs
    ctx.experts, ctx.rank, ctx.dtype = a_EIR.shape[0], a_EIR.shape[-1], a_EIR.dtype


def _unstack_backward(ctx, grad_a, grad_b):
    grads = torch.ops.fasttune.expert_lora_factors(grad_a, grad_b, ctx.experts, ctx.rank, ctx.dtype)
    return *grads, None, None, None


_stack.register_autograd(_stack_backward, setup_context=_stack_context)
_unstack.register_autograd(_unstack_backward, setup_context=_unstack_context)


def _linear(x, weight, offsets, bias, transposed: bool, lora) -> torch.Tensor:
    """transformers' grouped matmul on the base weight (its bias added out of place: `ops` keeps the matmul's output,
    which transformers' in-place add would change), plus the adapter's two thin grouped matmuls."""
    from transformers.integrations.moe import _grouped_mm

    out = _grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offs=offsets)
    if bias is not None:
        out = out + bias
    if lora is None:
        return out
    a, b, scaling = lora
    return out + _grouped_mm(_grouped_mm(x, a, offs=offsets), b, offs=offsets) * scaling


def forward(module: nn.Module, adapters: dict[str, tuple], weights: dict[str, torch.Tensor], hidden_states:
            torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """transformers' grouped-matmul experts forward, each projection in `adapters` ({name: factors(...)}) adapted;
    `weights`: the module's weights and biases to use (bf16 copies under autocast, model/experts.py)."""
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights, expert_ids = top_k_weights.reshape(-1), top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    counts = expert_ids_g.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(counts, bins=module.num_experts, min=0, max=module.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)

    up = "gate_up_proj" if module.has_gate else "up_proj"
    bias = weights[f"{up}_bias"][expert_ids_g] if module.has_bias else None
    out = _linear(selected, weights[up], offsets, bias, module.is_transposed, adapters.get(up))
    out = module._apply_gate(out) if module.has_gate else module.act_fn(out)
    bias = weights["down_proj_bias"][expert_ids_g] if module.has_bias else None
    out = _linear(out, weights["down_proj"], offsets, bias, module.is_transposed, adapters.get("down_proj"))
    if getattr(module, "has_post_expert_norm", False):  # transformers 5.17 has no such attribute
        out = module.post_expert_norm(out)

    weighted = out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def copy_bytes(wrapper: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of one wrapper's stacked factors in `dtype` (padded rank): what autograd keeps of them until backward."""
    a, b = (next(iter(d.values())).weight for d in (wrapper.lora_A, wrapper.lora_B))
    r = a.shape[0] // wrapper.num_experts
    size = torch.empty((), dtype=dtype).element_size()
    return (a.numel() + b.numel()) * padded_rank(r, dtype) // r * size
