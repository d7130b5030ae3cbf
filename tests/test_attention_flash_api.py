"""The flash-attn 2 and 3 adapters against each package's public signature, on CPU.

Neither package installs on the lent GPU (no prebuilt wheel for torch 2.11 + CUDA 13, no network), so the kernels are
untested there; what can be tested is fasttune's side: argument names and conventions (window_size=(left, right)
with -1 = unlimited, bottom-right causal, softcap, int max lengths, tuple returns), layouts and GQA. The stand-ins
below have the packages' exact signatures (flash_attn 2.6+ `flash_attn/flash_attn_interface.py`, FA3
`hopper/flash_attn_interface.py`) and compute FlashAttention's documented semantics with plain torch ops; the result
must equal the per-document reference of test_attention.py, which uses transformers' window convention.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from test_attention import TOL, make_qkv, packed_call, padded_call, reference

from fasttune.attention import BACKENDS, dispatch

LENS = (5, 11, 1, 8)


def _flash_semantics(q_THD, k_TKD, v_TKD, cu_q, cu_k, scale, causal, window_size, softcap):
    """FlashAttention's documented math: causal aligned bottom-right; key j visible from query i (both relative to
    the document end) iff i - left <= j <= i + right, -1 meaning unlimited."""
    left, right = window_size
    n_rep = q_THD.shape[1] // k_TKD.shape[1]
    outs = []
    for d in range(len(cu_q) - 1):
        q = q_THD[cu_q[d] : cu_q[d + 1]].transpose(0, 1)
        k = k_TKD[cu_k[d] : cu_k[d + 1]].repeat_interleave(n_rep, 1).transpose(0, 1)
        v = v_TKD[cu_k[d] : cu_k[d + 1]].repeat_interleave(n_rep, 1).transpose(0, 1)
        s = q @ k.transpose(-1, -2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(q.shape[1])[:, None] + (k.shape[1] - q.shape[1])
        j = torch.arange(k.shape[1])[None, :]
        allow = torch.ones_like(s[0], dtype=torch.bool)
        if causal:
            allow &= j <= i
        if left >= 0:
            allow &= j >= i - left
        if right >= 0:
            allow &= j <= i + right
        outs.append((torch.softmax(s.masked_fill(~allow, float("-inf")), -1) @ v).transpose(0, 1))
    return torch.cat(outs)


def _dense(q_BSHD, k_BSKD, v_BSKD, scale, causal, window_size, softcap):
    b, s, _, _ = q_BSHD.shape
    cu_q = [i * s for i in range(b + 1)]
    cu_k = [i * k_BSKD.shape[1] for i in range(b + 1)]
    flat = (x.reshape(-1, *x.shape[2:]) for x in (q_BSHD, k_BSKD, v_BSKD))
    out = _flash_semantics(*flat, cu_q, cu_k, scale, causal, window_size, softcap)
    return out.reshape(q_BSHD.shape)


def fa2_module() -> types.ModuleType:
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int) and dropout_p == 0.0
        scale = softmax_scale or q.shape[-1] ** -0.5
        return _flash_semantics(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), scale, causal, window_size,
                                softcap)  # fmt: skip

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
        return _dense(q, k, v, softmax_scale or q.shape[-1] ** -0.5, causal, window_size, softcap)

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func, flash_attn_func=flash_attn_func)


def fa3_module() -> types.ModuleType:
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                               num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):  # fmt: skip
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        scale = softmax_scale or q.shape[-1] ** -0.5
        out = _flash_semantics(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), scale, causal, window_size,
                               softcap)  # fmt: skip
        return out, None  # some FA3 builds return (out, softmax_lse) whatever return_attn_probs says

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):  # fmt: skip
        return _dense(q, k, v, softmax_scale or q.shape[-1] ** -0.5, causal, window_size, softcap), None

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func, flash_attn_func=flash_attn_func)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fa2_module())
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3_module())
    for name in ("flash_attention_2", "flash_attention_3"):  # records that run on CPU, else calls go to sdpa
        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], cuda=False))


@pytest.mark.parametrize("backend", ["flash_attention_2", "flash_attention_3"])
@pytest.mark.parametrize("layout", ["cu", "position_ids", "padded-right", "padded-left", "dense"])
@pytest.mark.parametrize("feature", ["plain", "window", "softcap"])
def test_flash_adapters_match_reference(stand_ins, backend, layout, feature):
    q, k, v = (x.requires_grad_() for x in make_qkv(torch.float32))
    kw = dict(scaling=0.3)
    kw |= dict(sliding_window=3) if feature == "window" else {}
    kw |= dict(softcap=2.0) if feature == "softcap" else {}
    lens = (sum(LENS),) if layout == "dense" else LENS
    if layout.startswith("padded"):
        out = padded_call(backend, q, k, v, LENS, left=layout.endswith("left"), **kw)
    elif layout == "dense":
        out = dispatch.attention_forward(backend, None, q[None], k[None], v[None], None, **kw)[0][0]
    else:
        out = packed_call(backend, q, k, v, LENS, layout, **kw)
    ref = reference(q, k, v, lens, scale=0.3, window=kw.get("sliding_window"), softcap=kw.get("softcap"))
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    grad_out = torch.randn_like(ref)
    for got, want in zip(
        torch.autograd.grad(out.double(), (q, k, v), grad_out),
        torch.autograd.grad(ref, (q, k, v), grad_out),
        strict=True,
    ):
        torch.testing.assert_close(got.double(), want.double(), **TOL[torch.float32])
