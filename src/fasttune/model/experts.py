"""MoE experts under autocast: their matmuls in the autocast dtype, as nn.Linear's are.

transformers holds an MoE layer's experts as 3-D parameters (Mixtral, Qwen-MoE, OLMoE, DeepSeek, ...) and runs them
with torch's grouped matmul, which autocast does not cover (pytorch/pytorch#174763); transformers casts the input to
the weights' dtype instead. With fp32 master weights under bf16 autocast (fasttune's default on CUDA) the experts
then run in fp32: slower, and their activations take twice the memory the plan counts. Here each experts module
sees bf16 copies of its 3-D weights while autocast is on, the copies autocast makes of an nn.Linear's weight; the
gradients flow back to the fp32 weights through the casts.

Experts with biases (gpt-oss) that run transformers' grouped matmul take their forward here too, under `ops`
(train/recompute.py, `bias_out_of_place`), autocast or not: transformers adds the bias in place onto the grouped
matmul's output, which `ops` keeps (torch refuses a kept tensor mutated); this forward is transformers' own with the
bias added out of place (model/expert_lora_act.py's, no adapters).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _per_expert(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weights that hold one slice per expert (3-D matmul weights, and their [experts, out] biases):
    those of a transformers experts module (its `num_experts` slices), else none."""
    n = getattr(module, "num_experts", None)
    params = {k: p for k, p in module._parameters.items() if p is not None and p.is_floating_point()}
    if not isinstance(n, int) or not any(p.dim() >= 3 and p.shape[0] == n for p in params.values()):
        return {}
    return {k: p for k, p in params.items() if p.dim() >= 2 and p.shape[0] == n}


def _has_bias_grouped(module: nn.Module) -> bool:
    """Whether `module` is a transformers experts module with biases run by its grouped matmul, which adds them in
    place onto the matmul's output (model/expert_lora_act.py runs it with the bias added out of place)."""
    from fasttune.model import expert_lora_act

    return bool(getattr(module, "has_bias", False)) and bool(_per_expert(module)) and expert_lora_act.runs(module, [])


def _forward(self, *args, **kwargs):
    weights = _per_expert(self)
    device = next(iter(weights.values())).device.type
    autocast = torch.is_autocast_enabled(device)
    if not kwargs and len(args) == 3 and _has_bias_grouped(self):  # (x, top-k index, top-k weights)
        from fasttune.model import expert_lora_act

        dtype = torch.get_autocast_dtype(device) if autocast else None
        own = {k: p.to(dtype) if dtype is not None else p for k, p in weights.items()}
        return expert_lora_act.forward(self, {}, own, *args)
    if not autocast:
        return type(self).forward(self, *args, **kwargs)
    dtype = torch.get_autocast_dtype(device)
    own = {k: p for k, p in weights.items() if p.dtype != dtype}
    self._parameters.update({k: p.to(dtype) for k, p in own.items()})  # what nn.Module.__getattr__ returns
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        self._parameters.update(own)


_forward.__name__ = "forward"  # pickle (torch.save of the model) stores the bound method as getattr(module, "forward")


def apply(model: nn.Module) -> int:
    """Give every transformers experts module (3-D weights, one slice per expert) the autocast-aware forward; returns
    how many got it. A module whose forward was already replaced (another patch) keeps it."""
    return _install(model, lambda module: bool(_per_expert(module)))


def bias_out_of_place(model: nn.Module) -> int:
    """Give every experts module with biases run by transformers' grouped matmul this module's forward (its bias
    added out of place, see the docstring): `ops` keeps the matmul's output. Returns how many got it."""
    return _install(model, _has_bias_grouped)


def _install(model: nn.Module, wanted) -> int:
    """`_forward` on each transformers module of `model` that is `wanted` and whose forward no patch replaced yet."""
    count = 0
    for module in model.modules():
        theirs = type(module).__module__.startswith("transformers.") and "forward" not in vars(module)
        if theirs and wanted(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def runs_autocast(module: nn.Module) -> bool:
    """Whether `module` has the autocast-aware forward `apply` installs."""
    return getattr(vars(module).get("forward"), "__func__", None) is _forward
