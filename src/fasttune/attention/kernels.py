"""The attention kernels behind each backend, in two families with one signature each.

Shape legend: B batch, H query heads, K kv heads (H % K == 0, GQA), S query length, L key length, D head dim,
T flattened tokens. `scale` multiplies q.k; `window` is a sliding window w (key j visible from query i iff
0 <= i - j < w, transformers' convention); `softcap` is c in c * tanh(score / c).

  dense:  f(q_BHSD, k_BKLD, v_BKLD, mask, *, causal, scale, softcap, dropout) -> out_BHSD
  varlen: f(q_THD, k_TKD, v_TKD, cu_q, cu_k, max_q, max_k, *, scale, window, softcap, dropout) -> out_THD

Optional packages are imported inside the functions, never at module import.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch
import torch.nn.functional as F

from fasttune.attention import state
from fasttune.attention.state import STATE


def kernel_report() -> dict[str, str]:
    """{'<backend>/<path> <dtype> D<head dim>': kernel that ran}, e.g. {'sdpa/dense bf16 D128': 'CUDNN_ATTENTION'}."""
    return dict(STATE.kernels)


def clear_report() -> None:
    """Start the report afresh: a run clears what its probes and timings ran (a probe of sdpa runs its per-document
    path, which training on CUDA never takes), so its summary names the kernels of its own calls."""
    STATE.kernels.clear()


def _record(tag: str, q: torch.Tensor, kernel: str) -> None:
    key = f"{tag} {str(q.dtype).removeprefix('torch.')} D{q.shape[-1]}"
    if STATE.kernels.get(key) != kernel:
        STATE.kernels[key] = kernel


def repeat_kv(x_BKLD: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x_BKLD
    b, k, seq, d = x_BKLD.shape
    return x_BKLD[:, :, None].expand(b, k, n_rep, seq, d).reshape(b, k * n_rep, seq, d)


def eager(q_BHSD, k_BKLD, v_BKLD, mask, *, causal=False, scale, softcap=None, dropout=0.0) -> torch.Tensor:
    """The reference: plain matmul-softmax-matmul, softmax in fp32 like transformers' eager path."""
    n_rep = q_BHSD.shape[1] // k_BKLD.shape[1]
    k_BHLD, v_BHLD = repeat_kv(k_BKLD, n_rep), repeat_kv(v_BKLD, n_rep)
    s_BHSL = torch.matmul(q_BHSD, k_BHLD.transpose(-1, -2)) * scale
    if softcap:
        s_BHSL = torch.tanh(s_BHSL / softcap) * softcap
    if mask is None and causal:
        s_len, l_len = s_BHSL.shape[-2:]
        mask = torch.ones(s_len, l_len, dtype=torch.bool, device=s_BHSL.device).tril(l_len - s_len)
    if mask is not None and mask.dtype == torch.bool:
        s_BHSL = s_BHSL.masked_fill(~mask, torch.finfo(s_BHSL.dtype).min)
    elif mask is not None:
        s_BHSL = s_BHSL + mask[..., : s_BHSL.shape[-1]]
    p_BHSL = torch.softmax(s_BHSL, dim=-1, dtype=torch.float32).to(q_BHSD.dtype)
    if dropout:
        p_BHSL = F.dropout(p_BHSL, p=dropout, training=True)
    return torch.matmul(p_BHSL, v_BHLD)


# cuDNN attention is first on Hopper/Blackwell: 1.7-1.9x the FLASH kernel torch picks by default (docs/BENCHMARKS.md).
# Each entry: (backend name, expand kv heads to H first). cuDNN may reject GQA; expanding kv still beats FLASH.
_SDPA_LADDER = (
    ("CUDNN_ATTENTION", False),
    ("CUDNN_ATTENTION", True),
    ("FLASH_ATTENTION", False),
    ("EFFICIENT_ATTENTION", False),
    ("EFFICIENT_ATTENTION", True),
    ("MATH", False),
)


def sdpa(q_BHSD, k_BKLD, v_BKLD, mask, *, causal=False, scale, softcap=None, dropout=0.0, tag="sdpa",
         fill_empty=True) -> torch.Tensor:  # fmt: skip
    """torch SDPA. On CUDA it tries kernels fastest-first, once per signature, and keeps the first that runs, so
    the report names the kernel that really ran rather than what a priority list hoped for. `fill_empty=False`:
    the caller knows every query sees a key (causal rows without padding), so the empty-row fix-up is skipped."""
    assert not softcap, "sdpa has no softcap; the dispatcher routes softcap to eager"
    if mask is None or mask.dtype != torch.bool:
        return _sdpa(q_BHSD, k_BKLD, v_BKLD, mask, causal, scale, dropout, tag)
    # Additive, as eager's mask. A query with no visible key (left padding) gets eager's uniform weights over all
    # keys, i.e. the mean value, set explicitly: kernels that scale scores by log2(e) overflow finfo.min to -inf and
    # return zeros for such rows (cuDNN on an H200, torch 2.11: pad rows off by 0.55 relative to eager).
    zero = torch.zeros((), dtype=q_BHSD.dtype, device=mask.device)
    out_BHSD = _sdpa(q_BHSD, k_BKLD, v_BKLD, torch.where(mask, zero, torch.finfo(q_BHSD.dtype).min), causal, scale,
                     dropout, tag)  # fmt: skip
    if not fill_empty:
        return out_BHSD
    empty_B1S1 = ~mask.any(-1, keepdim=True)
    mean_BH1D = repeat_kv(v_BKLD.mean(2, keepdim=True, dtype=torch.float32), q_BHSD.shape[1] // k_BKLD.shape[1])
    return torch.where(empty_B1S1, mean_BH1D.to(out_BHSD.dtype), out_BHSD)


def _sdpa(q_BHSD, k_BKLD, v_BKLD, mask, causal, scale, dropout, tag) -> torch.Tensor:
    gqa = q_BHSD.shape[1] != k_BKLD.shape[1]
    if q_BHSD.device.type != "cuda":
        _record(tag, q_BHSD, f"{q_BHSD.device.type} sdpa")
        return _sdpa_call(q_BHSD, k_BKLD, v_BKLD, mask, causal, scale, dropout, None, False)
    sig = (tag, q_BHSD.dtype, q_BHSD.shape[-1], mask is not None and mask.dtype, causal, gqa, dropout > 0)
    chosen = STATE.sdpa_choice.get(sig)
    ladder = ((chosen,) if chosen else ()) + _SDPA_LADDER
    for backend, expand in ladder:
        if expand and not gqa:
            continue  # expanding kv heads changes nothing without GQA
        try:
            out = _sdpa_call(q_BHSD, k_BKLD, v_BKLD, mask, causal, scale, dropout, backend, expand)
        except RuntimeError:
            continue
        if chosen != (backend, expand):
            STATE.sdpa_choice[sig] = (backend, expand)
        _record(tag, q_BHSD, backend + (" (kv heads expanded)" if expand and gqa else ""))  # after a report reset too
        return out
    raise RuntimeError("no SDPA kernel accepted these inputs")


def _sdpa_call(q, k, v, mask, causal, scale, dropout, backend: str | None, expand: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    if expand and gqa:
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1])
        gqa = False
    kwargs = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None, scale=scale, enable_gqa=gqa)
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


FLEX_RECOMPILE_LIMIT = 64


@state.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # flex is only fast compiled (docs/BENCHMARKS.md: 381 vs ~23 TFLOP/s unfused); dynamic shapes because packed batches
    # change length every step and a static compile per length would recompile endlessly. Each mask kind (causal,
    # padding, documents, window), head dim and GQA setting is still its own graph: past dynamo's default limit of
    # 8 per function, torch silently runs flex unfused, which materialises the whole score matrix (a 16 GiB
    # allocation in the attention bench). So the process-wide limit is raised, never lowered, and the old value kept
    # for state.reset(). (A config patch around each call would also work, but breaks a user's torch.compile of the
    # whole model: dynamo cannot trace it.)
    dynamo = torch._dynamo.config
    if STATE.recompile_limit is None:
        STATE.recompile_limit = dynamo.recompile_limit
    dynamo.recompile_limit = max(dynamo.recompile_limit, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=True)


@state.cache
def _softcap_mod(softcap: float, device: torch.device):
    """score_mod c * tanh(score / c), one function object per value (a new closure per call would recompile), the
    cap a captured tensor rather than a Python float, which dynamic=True turns into a symbolic float: Gemma 2's
    softcap failed compiled flex with an AssertionError about FakeTensor (H200, torch 2.11)."""
    cap = torch.tensor(float(softcap), device=device, dtype=torch.float32)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


def flex(q_BHSD, k_BKLD, v_BKLD, block_mask, *, scale, softcap=None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = _softcap_mod(softcap, q_BHSD.device) if softcap else None
    _record("flex", q_BHSD, "flex compiled" if q_BHSD.device.type == "cuda" else "flex unfused (cpu)")
    gqa = q_BHSD.shape[1] != k_BKLD.shape[1]
    if gqa and STATE.flex_expand_kv:  # the probe found compiled GQA flex failing here; MHA on expanded kv runs
        n_rep = q_BHSD.shape[1] // k_BKLD.shape[1]
        k_BKLD, v_BKLD, gqa = repeat_kv(k_BKLD, n_rep), repeat_kv(v_BKLD, n_rep), False
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if q_BHSD.device.type != "cuda":
        return flex_attention(q_BHSD, k_BKLD, v_BKLD, **kwargs)
    return _compiled_flex()(q_BHSD, k_BKLD, v_BKLD, **kwargs)


class _TorchVarlen(torch.autograd.Function):
    """torch's flash-attention varlen kernel (aten._flash_attention_forward / _backward), called directly as
    torch.nn.attention.varlen calls it, without dropout. Two differences, both measured on an H200 (docs/BENCHMARKS.md,
    "torch's varlen kernel, called directly"): grouped kv heads go in as they are, where torch 2.11's varlen_attn has
    no enable_gqa and they had to be expanded (and kept for backward: 3 x hidden bytes per token and layer), and one
    autograd function replaces the custom-op layers around the two ops (less Python per call)."""

    @staticmethod
    def forward(ctx, q_THD, k_TKD, v_TKD, cu_q, cu_k, max_q: int, max_k: int, scale: float, left: int):
        causal = left == -1  # torch's varlen_attn: is_causal for window (-1, 0), else a causal sliding window
        out_THD, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q_THD, k_TKD, v_TKD, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
            scale=scale, window_size_left=left, window_size_right=0,
        )  # fmt: skip
        ctx.save_for_backward(q_THD, k_TKD, v_TKD, cu_q, cu_k, out_THD, lse, seed, offset)
        ctx.args = (max_q, max_k, causal, scale, left)
        return out_THD

    @staticmethod
    def backward(ctx, grad_THD):
        q_THD, k_TKD, v_TKD, cu_q, cu_k, out_THD, lse, seed, offset = ctx.saved_tensors
        max_q, max_k, causal, scale, left = ctx.args
        grad_THD = grad_THD if grad_THD.stride(-1) == 1 else grad_THD.contiguous()
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_THD, q_THD, k_TKD, v_TKD, out_THD, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, seed, offset,
            scale=scale, window_size_left=left, window_size_right=0,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def torch_varlen(q_THD, k_TKD, v_TKD, cu_q, cu_k, max_q, max_k, *, scale, window=None, softcap=None, dropout=0.0):
    """torch's flash-attention varlen kernel (CUDA, fp16/bf16), causal; grouped kv heads as they are."""
    assert not softcap, "torch's varlen kernel has no softcap; the dispatcher routes softcap to eager"
    _record("varlen", q_THD, "torch varlen (flash)")
    left = window - 1 if window else -1
    return _TorchVarlen.apply(q_THD, k_TKD, v_TKD, cu_q, cu_k, int(max_q), int(max_k), float(scale), left)


@functools.cache
def _params(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _flash_kwargs(fn, scale, window, softcap, dropout) -> dict:
    params = _params(fn)
    kwargs = dict(softmax_scale=scale, causal=True)
    if window and "window_size" in params:
        kwargs["window_size"] = (window - 1, 0)
    elif window:
        kwargs.update(window_size_left=window - 1, window_size_right=0)
    if softcap:
        kwargs["softcap"] = softcap
    if dropout and "dropout_p" in params:
        kwargs["dropout_p"] = dropout
    return kwargs


def flash_varlen(name: str, module: str):
    """varlen kernel of the flash-attn package `module` (backend `name`); kwargs follow each version's signature."""

    def run(q_THD, k_TKD, v_TKD, cu_q, cu_k, max_q, max_k, *, scale, window=None, softcap=None, dropout=0.0):
        fn = importlib.import_module(module).flash_attn_varlen_func
        kwargs = _flash_kwargs(fn, scale, window, softcap, dropout)
        for key, value in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
            if key in _params(fn):
                kwargs[key] = int(value)  # FA4 4.0.0b36 crashes on a tensor max length
        _record(name, q_THD, name + " varlen")
        out = fn(q_THD, k_TKD, v_TKD, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run


def flash_dense(name: str, module: str):
    """Dense (B, S, H, D) kernel of the same package for unpadded rows: FA4 through varlen measured 168 TFLOP/s at
    1k tokens per row on H100 against 262 for its dense kernel (docs/BENCHMARKS.md)."""

    def run(q_BSHD, k_BLKD, v_BLKD, *, scale, window=None, softcap=None, dropout=0.0):
        fn = importlib.import_module(module).flash_attn_func
        _record(name, q_BSHD, name + " dense")
        out = fn(q_BSHD, k_BLKD, v_BLKD, **_flash_kwargs(fn, scale, window, softcap, dropout))
        return out[0] if isinstance(out, tuple) else out

    return run
