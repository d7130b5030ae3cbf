"""Install an activation plan on a model's decoder layers (train/memory.py chooses it): each layer, or its attention
or MLP block, runs under torch's non-reentrant activation checkpointing; `ops` keeps matmul and attention outputs
and recomputes the elementwise ops in backward (torch's selective activation checkpointing); `offload` is `full`
with each layer's saved input in host memory (train/offload.py)."""

from __future__ import annotations

import functools
import inspect

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from fasttune.model.build import base_model, decoder_blocks
from fasttune.train.offload import HostOffload

_SAVE = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_grouped_mm")  # _grouped_mm: MoE experts (transformers 5)


def _keep_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """`ops`: keep matmul and attention outputs (costly to recompute), recompute everything else (elementwise)."""
    name = str(func)  # "aten.mm.default", "aten._flash_attention_forward.default", ...
    parts = name.split(".")
    if len(parts) > 1 and parts[1] == "baddbmm" and args and isinstance(args[0], torch.nn.Parameter):
        # LoRA's fold onto a 3-D experts weight (W + scaling * lhs @ rhs: model/expert_lora.py, peft's): its output
        # is a whole weight a layer to keep, remade in one cheap baddbmm
        return CheckpointPolicy.PREFER_RECOMPUTE
    if len(parts) > 1 and parts[1] == "_grouped_mm" and _widens_rank(args):
        # LoRA's rank-r intermediate back to an expert's full width (model/expert_lora_act.py): an output as large as
        # the base grouped matmul's, remade from the saved [tokens, r] one at 1/in of that matmul's cost
        return CheckpointPolicy.PREFER_RECOMPUTE
    if (len(parts) > 1 and parts[1] in _SAVE) or "attention" in name or "attn" in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _widens_rank(args) -> bool:
    """Whether a grouped matmul's operands are a LoRA [tokens, r] intermediate and the stacked B [E, r, out] factors
    (r a padded rank expert_lora_act registered; out wider). A base matmul whose inner size is such a rank (far below
    the experts' widths in practice) would be recomputed too: slower, not wrong."""
    from fasttune.model.expert_lora_act import RANKS

    if len(args) < 2 or not all(isinstance(t, torch.Tensor) for t in args[:2]) or args[1].dim() != 3:
        return False
    return args[0].shape[-1] in RANKS and args[1].shape[-1] > args[1].shape[-2] == args[0].shape[-1]


def _ops_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


_LEGACY_HOOKS = {"respect_saved_tensors_hooks": False} if "respect_saved_tensors_hooks" in inspect.signature(
    checkpoint).parameters else {}  # fmt: skip
"""torch >= 2.14 asks whether what `ops` saves goes through the saved-tensor hooks around it (the lean RMSNorm's, see
model/norm.py) and warns until told: no, as every earlier torch did and the tests check (a future default flips)."""


def _checkpoint_forward(module: torch.nn.Module, selective: bool, offload: bool = False) -> None:
    """Wrap this module instance's forward in non-reentrant activation checkpointing (selective: keep matmuls;
    offload: the inputs it saves go to host memory)."""
    forward = module.forward
    context = {"context_fn": _ops_context, **_LEGACY_HOOKS} if selective else {}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not (torch.is_grad_enabled() and module.training):
            return forward(*args, **kwargs)
        if offload:  # the checkpoint saves the inputs under these hooks, its inside under its own
            with HostOffload():
                return checkpoint(forward, *args, use_reentrant=False, **context, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **context, **kwargs)

    module.forward = run


BLOCKS = {"attention": ("self_attn", "attn", "self_attention", "attention"), "mlp": ("mlp", "feed_forward")}
"""What the `attention` and `mlp` plans recompute, by the attribute names transformers' decoder layers use."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers: transformers' own unsplittable blocks (model.build.decoder_blocks), else `model.layers`;
    [] when there are none."""
    base = base_model(model)
    return decoder_blocks(base) or list(getattr(getattr(base, "model", None), "layers", None) or [])


def _block(layer: torch.nn.Module, plan: str) -> torch.nn.Module | None:
    return next((b for n in BLOCKS[plan] if isinstance(b := getattr(layer, n, None), torch.nn.Module)), None)


def plans_for(model: torch.nn.Module) -> frozenset[str]:
    """The plans (every:K as one) that this model's layers can take: `none` always; the rest need a decoder stack,
    and `attention` / `mlp` that block in every layer (OPT's layers have no MLP block: fc1 and fc2 sit in it)."""
    layers = decoder_layers(model)
    if not layers:
        return frozenset({"none"})
    plans = {"none", "ops", "every:K", "full"}
    plans |= {p for p in BLOCKS if all(_block(layer, p) is not None for layer in layers)}
    return frozenset(plans)


def apply_plan(model: torch.nn.Module, plan: str) -> None:
    """Install `plan` (a name from choose_plan, not auto, one plans_for allows) on the decoder layers, in place."""
    if plan == "none":
        return
    layers = decoder_layers(model)
    k = int(plan.split(":")[1]) if plan.startswith("every:") else 1
    if plan == "ops" or plan.startswith("every:"):  # selective layers keep grouped matmul outputs: bias out of place
        from fasttune.model import experts

        experts.bias_out_of_place(model)
    for n, layer in enumerate(layers):
        if plan in BLOCKS:
            _checkpoint_forward(_block(layer, plan), selective=False)
        elif plan in ("full", "offload") or (k > 1 and (n + 1) % k == 0):
            _checkpoint_forward(layer, selective=False, offload=plan == "offload")
        else:  # ops, and the layers every:K does not recompute whole
            _checkpoint_forward(layer, selective=True)
