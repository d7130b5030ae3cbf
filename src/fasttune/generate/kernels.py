"""Triton kernels of the decode step, each replacing several small torch kernels (launch-bound at batch 1).

Measured on an H200 (docs/BENCHMARKS.md, "Generation"): a batch-1 decode step of the 1b shape spent ~1.2 ms in 304
kernels, of which the weights' matrix products were ~0.72 ms; RoPE + cache writes were ~7 kernels a layer, RMSNorm
3.7 us per call. These kernels fold them: `rope_cache_write` (RoPE of queries and keys, keys and values into the
cache: 1 kernel a layer instead of 7), `rms_norm` and `silu_mul` (1 instead of 2). Each computes in float32 and rounds
where HF's modules round. RMSNorm has both of HF's roundings: Llama's (normalize in float32, round, multiply by the
weight in the model dtype) and, with `gemma=True`, Gemma's (x * rsqrt(mean(x^2) + eps) times (1 + w), all in float32
as HF's ops: the mean as CUDA's, the sum times 1/n; no fused multiply-adds; one rounding at the end). Its bits are
HF's module's wherever the sum of squares is (the sum runs in another order: elsewhere 1 ulp now and then).
`rms_norm_reference` is the same norm in torch ops (the CPU path; HF's own ops for Gemma).

Without Triton (CPU, or Triton missing) `available()` is False and fasttune/generate/decoder.py runs torch ops. Tests
run these kernels on the CPU under Triton's interpreter (TRITON_INTERPRET=1) against the torch path.

Legend: N rows (tokens), E hidden size, I MLP width, Hq/Hkv heads, D head dim, T cache capacity.
"""

from __future__ import annotations

import os
import struct

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the decoder uses torch ops
    triton = None


def available(device: torch.device) -> bool:
    """Triton kernels for tensors on `device` (the CPU only under Triton's interpreter, for tests)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, mean_factor, BLOCK: tl.constexpr,
                         GEMMA: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        live = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        if GEMMA:  # HF's Gemma ops: x * rsqrt(sum(x^2) * (1/n) + eps), times (1 + w), all float32, one rounding
            y = x * tl.rsqrt(tl.sum(x * x, axis=0) * mean_factor + eps)
            out = y * (1.0 + w)
        else:
            y = x / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # HF rounds to the input dtype before the weight
            out = y * w
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < n_cols
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=live, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=live, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # torch rounds silu's output
        tl.store(out_ptr + row * stride_out + cols, (s * u).to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit(do_not_specialize=["n_query"])  # 1 at decode, P at prefill: one compile serves both
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, cache_ptr, n_query, stride_qkv,
                           stride_ckv, stride_cb, stride_ch, stride_ct, HQ: tl.constexpr, HKV: tl.constexpr,
                           HALF: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        token = tl.program_id(0)  # b * n_query + q
        head = tl.program_id(1)  # queries, then keys, then values
        b = token // n_query
        slot = tl.load(slot_ptr + token % n_query)
        pair = tl.arange(0, BLOCK)  # BLOCK: HALF rounded up to a power of 2 (Phi-3-mini's head dim 96: 48 pairs)
        live = pair < HALF
        src = qkv_ptr + token * stride_qkv + head * 2 * HALF
        if head < HQ + HKV:  # rotate the pairs (2i, 2i + 1): the weights' rows are in that order (decoder.py)
            pos = tl.load(pos_ptr + token)
            c = tl.load(cos_ptr + pos * HALF + pair, mask=live, other=0.0)
            s = tl.load(sin_ptr + pos * HALF + pair, mask=live, other=0.0)
            x0 = tl.load(src + 2 * pair, mask=live, other=0.0).to(tl.float32)
            x1 = tl.load(src + 2 * pair + 1, mask=live, other=0.0).to(tl.float32)
            if head < HQ:
                dst = q_ptr + token * HQ * 2 * HALF + head * 2 * HALF
            else:
                dst = cache_ptr + b * stride_cb + (head - HQ) * stride_ch + slot * stride_ct
            tl.store(dst + 2 * pair, (x0 * c - x1 * s).to(q_ptr.dtype.element_ty), mask=live)
            tl.store(dst + 2 * pair + 1, (x1 * c + x0 * s).to(q_ptr.dtype.element_ty), mask=live)
        else:
            dims = tl.arange(0, 2 * BLOCK)
            dst = cache_ptr + stride_ckv + b * stride_cb + (head - HQ - HKV) * stride_ch + slot * stride_ct
            tl.store(dst + dims, tl.load(src + dims, mask=dims < 2 * HALF), mask=dims < 2 * HALF)


def rms_norm(x_NE: torch.Tensor, weight_E: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim with Llama's rounding, or with `gemma` Gemma's (module docstring): `weight_E` is the
    module's own weight (the kernel adds the 1)."""
    x2 = x_NE.reshape(-1, x_NE.shape[-1])  # a copy where the rows are not evenly strided (q/k heads of a qkv row)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x_NE.dtype, device=x_NE.device)
    block = triton.next_power_of_2(x2.shape[-1])
    _rms_norm_kernel[(x2.shape[0],)](x2, weight_E, out, x2.stride(0), out.stride(0), x2.shape[-1], eps,
                                     mean_factor(x_NE), BLOCK=block, GEMMA=gemma,
                                     num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False)  # fmt: skip
    return out.view(x_NE.shape)


def mean_factor(x: torch.Tensor) -> float:
    """What CUDA's `mean` over the last dim multiplies the sum by: float32(rows) / float32(numel), rounded to float32
    (ATen's MeanOps factor; 1/n unless numel is past 2^24)."""
    rows, numel = _f32(x.numel() // x.shape[-1]), _f32(x.numel())
    return _f32(rows / numel)  # a float32 quotient through a double one: rounded twice, still the float32 quotient


def _f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """`rms_norm` in torch ops: Llama's rounding as torch's rms_norm, Gemma's as HF's Gemma RMSNorm, op for op."""
    if not gemma:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


def silu_mul(gate_up_N2I: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a (N, 2I) gate|up product."""
    rows, width = gate_up_N2I.shape[0], gate_up_N2I.shape[1] // 2
    out = torch.empty((rows, width), dtype=gate_up_N2I.dtype, device=gate_up_N2I.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate_up_N2I, out, gate_up_N2I.stride(0), out.stride(0), width,
                                                        BLOCK=block, num_warps=4)  # fmt: skip
    return out


def rope_cache_write(qkv_NF: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor, pos_N: torch.Tensor,
                     slots_Q: torch.Tensor, cache_2BHTD: torch.Tensor, heads: int, kv_heads: int):  # fmt: skip
    """Rotated queries (N, Hq, D); rotated keys and the values go to the cache at `slots_Q` (token n = b * Q + q)."""
    tokens, half = qkv_NF.shape[0], cos_TD2.shape[-1]
    q_NHD = torch.empty((tokens, heads, 2 * half), dtype=qkv_NF.dtype, device=qkv_NF.device)
    c = cache_2BHTD
    _rope_cache_kernel[(tokens, heads + 2 * kv_heads)](
        qkv_NF, cos_TD2, sin_TD2, pos_N, slots_Q, q_NHD, c, slots_Q.shape[0], qkv_NF.stride(0),
        c.stride(0), c.stride(1), c.stride(2), c.stride(3), HQ=heads, HKV=kv_heads, HALF=half,
        BLOCK=triton.next_power_of_2(half), num_warps=1,
    )  # fmt: skip
    return q_NHD
