"""MoE experts under autocast: their matmuls in the autocast dtype, as nn.Linear's are.

transformers holds an MoE layer's experts as 3-D parameters (Mixtral, Qwen-MoE, OLMoE, DeepSeek, ...) and runs them
with torch's grouped matmul, which autocast does not cover (pytorch/pytorch#174763); transformers casts the input to
the weights' dtype instead. With fp32 master weights under bf16 autocast (fasttune's default on CUDA) the experts
then run in fp32: slower, and their activations take twice the memory the plan counts. Here each experts module
sees bf16 copies of its 3-D weights while autocast is on, the copies autocast makes of an nn.Linear's weight; the
gradients flow back to the fp32 weights through the casts.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _grouped(module: nn.Module) -> bool:
    return any(p is not None and p.is_floating_point() and p.dim() >= 3 for p in module._parameters.values())


def _forward(self, *args, **kwargs):
    params = self._parameters
    first = next(p for p in params.values() if p is not None)
    device = first.device.type
    if not torch.is_autocast_enabled(device):
        return type(self).forward(self, *args, **kwargs)
    dtype = torch.get_autocast_dtype(device)
    own = {n: p for n, p in params.items() if p is not None and p.is_floating_point() and p.dtype != dtype}
    params.update({n: p.to(dtype) for n, p in own.items()})  # what nn.Module.__getattr__ returns for the call
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        params.update(own)


_forward.__name__ = "forward"  # pickle (torch.save of the model) stores the bound method as getattr(module, "forward")


def apply(model: nn.Module) -> int:
    """Give every transformers module with 3-D weights (grouped MoE experts) the autocast-aware forward; returns how
    many got it."""
    count = 0
    for module in model.modules():
        if type(module).__module__.startswith("transformers.") and _grouped(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
