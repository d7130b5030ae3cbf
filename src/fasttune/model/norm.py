"""RMSNorm that keeps only its input for backward, and norm outputs recomputed in backward instead of kept.

What a Llama decoder layer keeps per token for its two RMSNorms (bf16, h the hidden size):
- HF's RMSNorm module keeps its fp32 upcast (4h) and the bf16 normalized product (2h): 6h each. `RMSNormFunction`
  computes the same (HF's rounding: fp32 statistics, the normalized input rounded to the input dtype, then the
  weight) and keeps its input and the fp32 inverse RMS (2h + 4 bytes), recomputing the rest in backward: one more
  elementwise pass. Liger's RMSNorm keeps the same.
- The norm's output is the input of the next matmuls (q/k/v, gate/up), which keep it for their weight gradients: 2h
  per norm more. While the norm keeps its input, that output can be recomputed from it in backward instead:
  `apply` tags each norm's output, and a saved-tensor hook (torch.autograd.graph.saved_tensors_hooks, installed
  around the model's forward) stores a recipe in place of any saved tensor that is a tagged output (or a view of
  it); backward reruns the norm (same kernel, no grad: the same bits) the first time one of its users unpacks it.

Together: 12h per layer less than HF's modules, 4h less than Liger's (1B shape, 8k tokens per micro-batch: 3.0 and
1.0 GiB less over its 16 layers, as measured: docs/BENCHMARKS.md "The lean RMSNorm").

The hooks hold nothing alive themselves (a norm's input is held from the first save of its output on), stand aside
under outer saved-tensor hooks (save_on_cpu, a checkpoint around the whole model) and where hooks are disabled, tag
only norms over the hidden size (not Qwen3's per-head q/k norms), and do autograd's check for tensors written in
place after they were saved, which installed hooks switch off. No double backward (like the fused MLP), and no
torch.func transforms over the model (use --model.no-lean-norm for either).

Installed by `apply(model)`: fasttune's function replaces modules whose forward is, line for line, transformers'
LlamaRMSNorm.forward (Llama, Mistral, Qwen2/3, Granite and ~140 more share it). On CUDA two Triton kernels compute
it (one pass over the row forward, one backward: the default install's `full` trains 1.16x faster in 3.0 GiB less
than with HF's norm, docs/BENCHMARKS.md); elsewhere torch ops. Liger's patched RMSNorms are already fused: only
the memory planner tags them (`apply(model, liger=True)`), when the run needs that memory, since recomputing their
outputs costs ~4% of the step (1B shape, 8k tokens: 1.0 GiB less). Other norms (Gemma's 1 + weight, LayerNorm) are
left alone.
"""

from __future__ import annotations

import inspect
import threading
import types
import weakref

import torch
from torch import nn

from fasttune.model.build import base_model
from fasttune.model.mlp import on_triton, triton

if triton is not None:
    import triton.language as tl

    @triton.jit  # one row per program: HF's rounding (the normalized row in x's dtype, then the weight)
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=live)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit  # a block of rows per program; the weight gradient summed per program, then over programs by torch
    def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, n, PER: tl.constexpr,
                        WGRAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < n
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, PER):
            row = pid * PER + i
            here = live & (row < rows)  # the last program's rows past the end load zeros and store nothing
            x = tl.load(x_ptr + row * n + cols, mask=here, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n + cols, mask=here, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
            normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            if WGRAD:  # autograd's mul backward rounds dy * normed to the output's dtype
                dw += (dy * normed).to(dy_ptr.dtype.element_ty).to(tl.float32)
            dn = (dy * w).to(dy_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty).to(tl.float32)
            coef = tl.sum(dn * x, axis=0) * rstd * rstd * rstd / n
            tl.store(dx_ptr + row * n + cols, (dn * rstd - x * coef).to(dx_ptr.dtype.element_ty), mask=here)
        if WGRAD:
            tl.store(dw_ptr + pid * n + cols, dw, mask=live)


def _settings(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, 16 if block >= 8192 else (8 if block >= 2048 else 4)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The output (in the dtype HF's `weight * normed` has) and the fp32 inverse RMS of each row."""
    if not on_triton(x) or weight.device != x.device or x.numel() == 0:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (xf * rstd).to(x.dtype), rstd
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block, warps = _settings(n)
    _rms_fwd_kernel[(x2.shape[0],)](x2, weight, y, rstd, n, eps, BLOCK=block, num_warps=warps)
    return y.view(x.shape), rstd.view(*x.shape[:-1], 1)


def _norm_backward(dy, x, weight, rstd, wgrad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input gradient and (wgrad) the weight gradient, as autograd computes them through HF's forward."""
    if not on_triton(x) or weight.device != x.device or x.numel() == 0:
        xf = x.float()
        normed = (xf * rstd).to(x.dtype)
        dw = (dy * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype) if wgrad else None
        dn = (dy * weight).to(x.dtype).float()  # the gradient of the rounded normalized input, then of its upcast
        # xf * rstd: dn * rstd directly, and through rstd = rsqrt(mean(xf^2) + eps): -rstd^3 / h * sum(dn * xf) * xf
        coef = (dn * xf).sum(-1, keepdim=True) * rstd.pow(3) / xf.shape[-1]
        return (dn * rstd - xf * coef).to(x.dtype), dw
    n = x.shape[-1]
    x2, dy2 = x.reshape(-1, n).contiguous(), dy.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    units = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    programs = max(1, min(rows, 4 * units))
    per = triton.next_power_of_2(triton.cdiv(rows, programs))  # rows per program: a compile-time constant, so
    programs = triton.cdiv(rows, per)  # a power of two (few compiles across batch sizes)
    dx = torch.empty_like(x2)
    dw = torch.empty((programs, n), dtype=torch.float32, device=x.device) if wgrad else dx
    block, warps = _settings(n)
    _rms_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw, rows, n, PER=per, WGRAD=wgrad, BLOCK=block,
                                 num_warps=warps)  # fmt: skip
    return dx.view(x.shape), (dw.sum(0).to(weight.dtype) if wgrad else None)


class RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)), rounded as HF's LlamaRMSNorm rounds; keeps x and the inverse RMS."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _norm_backward(dy, x, weight, rstd, ctx.needs_input_grad[1])
        return dx if ctx.needs_input_grad[0] else None, dw, None


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad):
        out = RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    else:
        out = _norm(hidden_states, self.weight, self.variance_epsilon)[0]
    return _tag(self, hidden_states, out)


def _tagged_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A norm that keeps its input anyway (Liger's): its own forward, the output tagged for recompute."""
    return _tag(self, hidden_states, self._fasttune_norm(self, hidden_states))


_lean_forward.__name__ = _tagged_forward.__name__ = "forward"  # pickle stores the bound method by that name

# -- recompute: saved-tensor hooks ------------------------------------------------------------------------------
# While hooks are installed autograd no longer checks saved tensors for in-place writes: _pack/_unpack do it (the
# version each tensor had when saved), so a model that writes into a saved tensor still fails as it does without.


class _State(threading.local):
    outputs: dict | None = None  # {data pointer: _Entry} of the norm outputs tagged in this forward, while it packs
    hooks = None  # the saved_tensors_hooks context this thread installed
    owner = 0  # id() of the model whose forward installed them
    depth = 0  # forwards of hooked models nested inside the one that installed them


_state = _State()


class _Entry:
    """One tagged norm output: weak references (nothing is kept alive by the tag itself), and the recipe made when a
    matmul first saves the output."""

    __slots__ = ("out", "version", "module", "x", "x_version", "weight", "recipe")

    def __init__(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor):
        self.out, self.version, self.module = weakref.ref(out), out._version, module
        self.x, self.x_version, self.weight, self.recipe = weakref.ref(x), x._version, module.weight, None


class _Recipe:
    """How to remake one norm output in backward: the module, its input (which the norm keeps anyway) and weight."""

    __slots__ = ("module", "x", "x_version", "weight", "out")

    def __init__(self, entry: _Entry, x: torch.Tensor):
        self.module, self.x, self.x_version, self.weight = entry.module, x, entry.x_version, entry.weight
        self.out = None

    def remake(self) -> torch.Tensor:
        if self.out is None:  # once for all its users (q, k and v keep the same output)
            check_version(self.x, self.x_version, _NORM_FIX)
            with torch.no_grad():
                m = self.module
                lean = vars(m)["forward"].__func__ is _lean_forward
                self.out = _norm(self.x, self.weight, m.variance_epsilon)[0] if lean else m._fasttune_norm(m, self.x)
        return self.out


_NORM_FIX = "fasttune's lean RMSNorm recomputes from it: --model.no-lean-norm runs HF's norm"


def check_version(t: torch.Tensor, version: int, fix: str = "") -> None:
    """Autograd's check that a saved tensor was not written in place since it was saved (saved-tensor hooks switch
    it off: hooks that keep a tensor as it is call this when they unpack it); `fix`: what the user can do."""
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"{type(t).__name__} {list(t.shape)} is at version {t._version}; expected version {version} instead"
            + (f" ({fix})" if fix else "")
        )


def _tag(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    outputs = _state.outputs
    if outputs is not None and out.requires_grad and out.is_contiguous() and module.__dict__.get("_fasttune_tag"):
        outputs[out.data_ptr()] = _Entry(module, x, out)
    return out


def _pack(t: torch.Tensor):
    """Called for every tensor the forward saves: kept cheap."""
    try:
        entry = _state.outputs.get(t.data_ptr()) if _state.outputs else None
    except RuntimeError:  # a tensor without storage (a functional wrapper): not a norm output
        entry = None
    if entry is None:
        return t, t._version
    out = entry.out()
    # only a whole, contiguous view of a live output (the 2-D views the projections keep), never written in place
    # since the norm made it (kernels that write into a tensor without bumping its version, as Liger's RoPE does,
    # write into transposed head views, which do not match)
    if out is None or out.dtype != t.dtype or out.device != t.device or t.numel() != out.numel():
        return t, t._version
    if not t.is_contiguous() or t._version != entry.version:
        return t, t._version
    if entry.recipe is None:
        x = entry.x()
        if x is None:
            return t, t._version
        entry.recipe = _Recipe(entry, x)  # the input is held from the first save of the output on
    return entry.recipe, t.shape


def _unpack(saved):
    kept, meta = saved
    if isinstance(kept, _Recipe):
        return kept.remake().view(meta)
    check_version(kept, meta, _NORM_FIX)
    return kept


def _hooks_usable() -> bool:
    """Saved-tensor hooks are enabled here (not under torch.func's transforms), and no outer hooks are installed
    (those of save_on_cpu, or of a checkpoint around the whole model, which inner hooks would bypass)."""
    autograd = torch._C._autograd
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", lambda: True)()
    top = getattr(autograd, "_top_saved_tensors_default_hooks", lambda _: None)(False)
    return bool(enabled) and top is None


def _enter(module, args) -> None:
    if _state.outputs is not None:
        if not (_state.owner == id(module) and _state.depth == 0 and _ours_on_top()):
            _state.depth += 1  # a forward nested in the hooked one: its _exit must not remove the hooks
            return
        _remove()  # the same model again: its last forward ended in a KeyboardInterrupt, which skips forward hooks
    if not torch.is_grad_enabled() or not _hooks_usable():
        return
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
    try:
        hooks.__enter__()
    except RuntimeError:  # hooks disabled after all: the forward runs without the recompute
        return
    _state.outputs, _state.hooks, _state.owner, _state.depth = {}, hooks, id(module), 0


def _exit(module, args, output) -> None:
    """After the forward, or an exception in it (always_call)."""
    if _state.outputs is None:
        return
    if _state.depth:
        _state.depth -= 1
        return
    _remove()


def _ours_on_top() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: None)(False)
    return top is not None and top[0] is _pack


def _remove() -> None:
    hooks = _state.hooks
    _state.outputs = _state.hooks = None
    hooks.__exit__(None, None, None)


# -- installing ---------------------------------------------------------------------------------------------------

_LLAMA_FORWARD: str | None = None


def _llama_forward_source() -> str:
    global _LLAMA_FORWARD
    if _LLAMA_FORWARD is None:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        _LLAMA_FORWARD = inspect.getsource(LlamaRMSNorm.forward)
    return _LLAMA_FORWARD


def llama_rmsnorm(module: nn.Module) -> bool:
    """The module computes exactly HF's LlamaRMSNorm: that class's forward, line for line, and its attributes."""
    if "forward" in vars(module) or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    if not isinstance(getattr(module, "variance_epsilon", None), float):
        return False
    try:
        return inspect.getsource(type(module).forward) == _llama_forward_source()
    except (OSError, TypeError):
        return False


def liger_rmsnorm(module: nn.Module) -> bool:
    forward = vars(module).get("forward")
    return getattr(getattr(forward, "__func__", None), "__qualname__", "") == "LigerRMSNorm.forward"


QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm")
"""Names of the norms of q and k in transformers' attention modules (per head, per projection, or a list of them:
StableLM's q_layernorm.norms.0)."""


def norm_layout(layer: nn.Module, hidden: int) -> tuple[int, int, bool]:
    """(norms over the hidden size, the most bytes one keeps an element, whether q/k norms exist) of one built
    decoder layer, as the memory estimate counts them (train/activations.py `Shape`). HF's Llama RMSNorm (lean or
    not) and Liger's count 6 bytes an element; torch's LayerNorm 2, its bf16 input (mean and inverse deviation are a
    value a row; under autocast it runs in fp32 on the fp32 stream: train/activations.py `stream_bytes`); another
    RMSNorm 8, as Gemma's and OLMo2's keep (fp32 products); another LayerNorm 12, as Cohere's keeps (its centred input
    twice)."""
    norms, elems, qk = 0, [], False
    for name, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if "Norm" not in type(module).__name__ or not isinstance(weight, torch.Tensor):
            continue
        if any(part in QK_NORMS for part in name.split(".")):
            qk = True
        elif weight.numel() == hidden:  # not MLA's low-rank norms (the estimate has no term for them)
            norms += 1
        else:
            continue
        elems.append(_norm_elem(module))
    return norms, max(elems, default=6), qk


def _norm_elem(module: nn.Module) -> int:
    forward = getattr(vars(module).get("forward"), "__func__", None)
    if llama_rmsnorm(module) or liger_rmsnorm(module) or forward in (_lean_forward, _tagged_forward):
        return 6
    if isinstance(module, nn.LayerNorm) and forward is None and type(module).forward is nn.LayerNorm.forward:
        return 2
    return 12 if "LayerNorm" in type(module).__name__ else 8


def apply(model: nn.Module, liger: bool = False) -> int:
    """Give HF's Llama-style RMSNorms fasttune's lean function (and with `liger`, tag Liger's RMSNorms), their outputs
    recomputed in backward instead of kept; returns how many norms are covered."""
    base = base_model(model)
    hidden = getattr(getattr(base, "config", None), "hidden_size", None)
    count = 0
    for module in model.modules():
        if llama_rmsnorm(module):
            module.forward = types.MethodType(_lean_forward, module)
        elif liger and liger_rmsnorm(module):
            module._fasttune_norm = vars(module)["forward"].__func__  # a function: pickles by its name
            module.forward = types.MethodType(_tagged_forward, module)
        else:
            continue
        # recompute the outputs of norms over the hidden size (what q/k/v and gate/up keep), not per-head q/k norms
        module._fasttune_tag = hidden is None or module.weight.numel() == hidden
        count += 1
    if count and not getattr(base, "_fasttune_norm_hooks", False):
        base.register_forward_pre_hook(_enter)
        base.register_forward_hook(_exit, always_call=True)
        base._fasttune_norm_hooks = True
    return count


def has_liger_norms(model: nn.Module) -> bool:
    """Liger's RMSNorms not yet tagged: `apply(model, liger=True)` would recompute their outputs."""
    return any(liger_rmsnorm(m) for m in base_model(model).modules())


def lean(model: nn.Module) -> bool:
    """Whether `apply` covered `model`'s norms: some are lean or tagged, and no Liger norm is left untagged."""
    covered = False
    for module in base_model(model).modules():
        forward = getattr(vars(module).get("forward"), "__func__", None)
        covered = covered or forward is _lean_forward or forward is _tagged_forward
    return covered and not has_liger_norms(model)
