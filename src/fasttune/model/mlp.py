"""The SwiGLU MLP, down(silu(gate(x)) * up(x)), as one autograd function that keeps only x, gate(x) and up(x) for
backward and recomputes the product there.

What the MLP keeps per token (bf16, I the MLP width): HF's modules 8I (gate, silu(gate), up, and the product that
down_proj keeps as its input), Liger's SwiGLU 6I (it recomputes silu(gate), but down_proj still keeps the product),
this function 4I. The product is one elementwise pass over gate and up, so recomputing it costs one extra memory-bound
kernel per layer in backward and no matmul: on the 1B shape (I 8192) at 8k tokens per micro-batch it frees 2.0 GiB
against Liger (1.8 measured on an H200) and 4.0 GiB against HF's modules (docs/BENCHMARKS.md, "Memory").

On CUDA two small Triton kernels compute the product and its gradient in float32 (rounded where torch's ops round);
elsewhere (CPU; Triton missing) the same math runs as torch ops. The function saves no tensor it later writes into,
so torch's selective checkpointing, which hands saved matmul outputs back to the recomputed forward, stays exact.

Installed by `apply(model)` on the decoder layers of architectures whose MLP is exactly that SwiGLU (SWIGLU_TYPES),
with plain bias-free nn.Linear projections (LoRA-wrapped ones keep their own forward).
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.model.build import base_model

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: torch ops
    triton = None

SWIGLU_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2")
"""model_type values whose decoder MLP computes down_proj(silu(gate_proj(x)) * up_proj(x)) (hidden_act silu)."""


def on_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit  # n is a multiple of 16 (the MLP width is): one compile, vectorised masked loads
    def _swiglu_fwd_kernel(g_ptr, u_ptr, c_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=live, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(c_ptr.dtype.element_ty).to(tl.float32)  # torch rounds silu's output
        tl.store(c_ptr + offs, (s * u).to(c_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _swiglu_bwd_kernel(dc_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        dc = tl.load(dc_ptr + offs, mask=live, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=live, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        s = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)
        ds = (dc * u).to(dg_ptr.dtype.element_ty).to(tl.float32)  # autograd's mul backward rounds it
        tl.store(du_ptr + offs, (dc * s).to(du_ptr.dtype.element_ty), mask=live)
        tl.store(dg_ptr + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=live)


BLOCK = 2048


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u."""
    if not on_triton(g):
        return F.silu(g) * u
    c = torch.empty_like(g)
    n = g.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, c, n, BLOCK=BLOCK)
    return c


def swiglu_backward(dc: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of silu(g) * u with respect to g and u, given the product's gradient dc."""
    if not on_triton(g):
        s = F.silu(g)
        return torch.ops.aten.silu_backward(dc * u, g), dc * s
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dc.contiguous(), g, u, dg, du, n, BLOCK=BLOCK)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """y = down(silu(x gate^T) * (x up^T)); keeps x, gate(x), up(x) and the weights (no copies) for backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w_gate, w_up, w_down):
        g, u = F.linear(x, w_gate), F.linear(x, w_up)  # under autocast: in the autocast dtype, as nn.Linear would
        y = F.linear(swiglu(g, u), w_down)
        kept = None  # x serves the gate/up weight gradients only (frozen under LoRA on the attention alone)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            kept = x if x.dtype == g.dtype else x.to(g.dtype)  # autocast: the bf16 copy nn.Linear would keep
        ctx.save_for_backward(kept, g, u, w_gate, w_up, w_down)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # g and u are saved detached: no double backward
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad
        dy2, g2, u2 = dy.reshape(-1, dy.shape[-1]), g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        cast = g.dtype  # autocast: the saved weights are fp32, the activations bf16
        dw_down = dy2.t().to(cast) @ swiglu(g2, u2) if need_down else None  # the product, recomputed
        dg, du = swiglu_backward((dy2.to(cast) @ w_down.to(cast)), g2, u2)
        dx = torch.addmm(dg @ w_gate.to(cast), du, w_up.to(cast)).view(ctx.x_shape) if need_x else None  # autograd
        # casts dx (and the weight gradients) to their inputs' dtypes
        x2 = x.reshape(-1, x.shape[-1]).to(cast) if x is not None else None
        dw_gate = dg.t() @ x2 if need_gate else None
        dw_up = du.t() @ x2 if need_up else None
        return dx, dw_gate, dw_up, dw_down


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


_forward.__name__ = "forward"  # pickle (torch.save of the model) stores the bound method as getattr(mlp, "forward")


def transformers_mlp(mlp: nn.Module, kind: str) -> bool:
    """The MLP class is transformers' own for that model type (not remote code reusing the model type's name)."""
    return type(mlp).__module__ == f"transformers.models.{kind}.modeling_{kind}"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused MLP cannot replace `model`'s MLPs, or None when it can."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SWIGLU_TYPES:
        return f"model type {kind!r} (the fused MLP knows {', '.join(SWIGLU_TYPES)})"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish") or getattr(config, "mlp_bias", False):
        return f"MLP activation {config.hidden_act!r} / MLP bias (the fused MLP is SwiGLU without bias)"
    return None


def plain(mlp: nn.Module) -> bool:
    """gate/up/down projections that are plain bias-free nn.Linear (not LoRA-wrapped, quantised, ...)."""
    projections = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(type(p) is nn.Linear and p.bias is None for p in projections)


def apply(model: nn.Module) -> int:
    """Give each decoder layer's SwiGLU MLP the fused forward (replacing HF's or Liger's); returns how many got it."""
    base = base_model(model)
    if unsupported_reason(base) is not None:
        return 0
    count = 0
    for layer in getattr(getattr(base, "model", None), "layers", None) or []:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and plain(mlp) and transformers_mlp(mlp, base.config.model_type):
            mlp.forward = types.MethodType(_forward, mlp)
            count += 1
    return count


def fused(model: nn.Module) -> bool:
    """Whether `apply` installed the fused MLP on `model`."""
    base = base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None) or []
    mlp = getattr(layers[0], "mlp", None) if len(layers) else None
    forward = vars(mlp).get("forward") if mlp is not None else None
    return getattr(forward, "__func__", None) is _forward
