"""One attention function per backend, registered into transformers' AttentionInterface/AttentionMaskInterface.

Shape legend: B batch, H query heads, K kv heads, S query length, L key length, D head dim, T flat tokens.

Every backend takes transformers' signature f(module, q_BHSD, k_BKLD, v_BKLD, attention_mask, scaling, dropout,
sliding_window, softcap, **kwargs) -> (out_BSHD, None) and handles three layouts itself:
  * packed: documents from cu_seq_lens_q/k kwargs, else from restarting position_ids (which transformers passes
    through **kwargs to the attention function) -> never attends across documents, whatever use_cache is;
  * padded: a 2D (B, L) padding mask, as transformers' flash mask function returns it (ours does the same);
  * a 4D mask a model or user built itself: honoured as given (eager or sdpa).
"""

from __future__ import annotations

import functools
import logging

import torch

from fasttune.attention import kernels
from fasttune.attention.layout import (
    Varlen,
    allow_mask,
    doc_ids,
    from_flat,
    memo,
    packed_from_kwargs,
    right_padded,
    to_flat,
    uniform,
    unpadded,
)

logger = logging.getLogger("fasttune")

# Names avoid the substrings "sdpa", "flash" and "flex_attention": transformers runs its own dispatch checks
# (and generation special cases) on any name containing them.
HF_NAMES = {
    "eager": "fasttune_eager",
    "sdpa": "fasttune_sdp",
    "flex_attention": "fasttune_flex",
    "varlen": "fasttune_varlen",
    "flash_attention_2": "fasttune_fa2",
    "flash_attention_3": "fasttune_fa3",
    "flash_attention_4": "fasttune_fa4",
    "auto": "fasttune_auto",  # routes each call by layout and row length (select.auto_plan)
}
NO_SOFTCAP = {"sdpa", "varlen"}  # kernels without a logit softcap: such calls go to eager, loudly
NO_DROPOUT = {"flex_attention", "varlen", "flash_attention_3", "flash_attention_4"}
MAX_HEAD_DIM = {"varlen": 256, "flash_attention_2": 256, "flash_attention_3": 256, "flash_attention_4": 256}


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _route(backend: str, q_BHSD: torch.Tensor, softcap: float | None, dropout: float) -> str:
    """The backend that can compute this call correctly; a change is logged once (never silent)."""
    why = None
    if softcap and backend in NO_SOFTCAP:
        why, backend = f"'{backend}' has no logit softcap", "eager"
    elif dropout and backend in NO_DROPOUT:
        why, backend = f"'{backend}' has no attention dropout", "sdpa"
    elif q_BHSD.shape[-1] > MAX_HEAD_DIM.get(backend, 1 << 30):
        why, backend = f"'{backend}' supports head dim <= {MAX_HEAD_DIM[backend]}, got {q_BHSD.shape[-1]}", "sdpa"
    elif q_BHSD.device.type != "cuda" and backend in MAX_HEAD_DIM:
        why, backend = f"'{backend}' needs CUDA, got {q_BHSD.device.type}", "sdpa"
    if why:
        _warn_once(f"fasttune attention: {why}; using '{backend}' for these calls")
    return backend


def attention_forward(backend, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature; `backend` is bound by functools.partial at registration."""
    q_BHSD, k_BKLD, v_BKLD = query, key, value
    batch, _, q_len, head_dim = q_BHSD.shape
    k_len = k_BKLD.shape[2]
    scale = head_dim**-0.5 if scaling is None else scaling
    window = kwargs.pop("sliding_window", None)
    window = window if window and k_len > window else None  # a window wider than the call changes nothing
    softcap = kwargs.pop("softcap", None) or None
    dropout = float(dropout or 0.0)
    opts = dict(scale=scale, window=window, softcap=softcap, dropout=dropout)
    causal = kwargs.pop("is_causal", None)
    if not (getattr(module, "is_causal", True) if causal is None else causal) and isinstance(
        attention_mask, torch.Tensor | None
    ):
        return _bidirectional(backend, q_BHSD, k_BKLD, v_BKLD, attention_mask, **opts), None
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
        backend = _auto_route(q_BHSD, "padded", opts) if backend == "auto" else backend
        backend = _route(backend, q_BHSD, softcap, dropout)
        return _given_mask(backend, q_BHSD, k_BKLD, v_BKLD, attention_mask, **opts), None
    padding_BL = attention_mask
    if padding_BL is not None and padding_BL.shape[1] != k_len:
        raise ValueError(f"2D attention mask covers {padding_BL.shape[1]} keys, the call has {k_len}")
    if padding_BL is not None and q_len == k_len and right_padded(padding_BL):
        # Under a causal mask no real query of a right-padded row can see a pad key, so the padding changes nothing
        # a real token computes: run the rows dense (cuDNN / dense flash / cached causal BlockMask) instead of
        # gathering real tokens into a varlen layout, which cost ~2x at 1k-token rows (docs/ATTENTION.md). Pad
        # positions get finite values that nothing real reads (labels ignore them; their gradient is zero).
        padding_BL = None
    # documents come from kwargs only when the caller gave no mask: with a padding mask, position_ids may be
    # scaled or offset for other reasons, and transformers does not infer packing either
    varlen = packed_from_kwargs(kwargs, batch, q_len, k_len) if attention_mask is None else None
    if backend == "auto":
        layout = "packed" if varlen is not None else "rows" if padding_BL is None else "padded"
        backend = _auto_route(q_BHSD, layout, opts)
    backend = _route(backend, q_BHSD, softcap, dropout)
    return _IMPLS[backend](q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, **opts), None


def _auto_route(q_BHSD: torch.Tensor, layout: str, opts: dict) -> str:
    from fasttune.attention.select import auto_plan

    plan = auto_plan(q_BHSD.device, q_BHSD.dtype, q_BHSD.shape[-1])
    plain = not (opts["window"] or opts["softcap"] or opts["dropout"])
    return plan.route(layout, q_BHSD.shape[2], plain=plain)


def _bidirectional(backend, q_BHSD, k_BKLD, v_BKLD, mask, *, scale, window, softcap, dropout) -> torch.Tensor:
    """A non-causal call (a bidirectional module, is_causal=False): sdpa (eager for softcap) with the padding mask;
    every other path here is causal."""
    if window is not None:
        raise ValueError("fasttune attention: bidirectional sliding-window attention is not supported; load the "
                         "model with attn_implementation='sdpa'")  # fmt: skip
    if backend not in ("sdpa", "eager"):
        _warn_once(f"fasttune attention: non-causal calls run on sdpa/eager, not '{backend}'")
    if mask is not None and mask.ndim == 2:
        mask = mask.bool()[:, None, None, :]  # keys only: no causal part
    return _given_mask(
        backend, q_BHSD, k_BKLD, v_BKLD, mask, scale=scale, window=None, softcap=softcap, dropout=dropout
    )


def _given_mask(backend, q_BHSD, k_BKLD, v_BKLD, mask, *, scale, window, softcap, dropout) -> torch.Tensor:
    """A 4D mask (or BlockMask) built outside fasttune already encodes causality, window and documents."""
    if not isinstance(mask, torch.Tensor):  # a flex BlockMask
        return kernels.flex(q_BHSD, k_BKLD, v_BKLD, mask, scale=scale, softcap=softcap).transpose(1, 2)
    kernel = kernels.eager if backend == "eager" or softcap else kernels.sdpa
    out_BHSD = kernel(q_BHSD, k_BKLD, v_BKLD, mask, scale=scale, softcap=softcap, dropout=dropout)
    return out_BHSD.transpose(1, 2)


def _dense_mask(q_BHSD, k_len, padding_BL, varlen, window) -> torch.Tensor | None:
    """The O(S*L) bool mask for eager/CPU sdpa, or None when plain causal (S == L) or a one-token decode step."""
    batch, _, q_len, _ = q_BHSD.shape
    doc_BS = doc_ids(varlen, batch * q_len).view(batch, q_len) if varlen is not None else None
    if padding_BL is None and doc_BS is None and window is None and (q_len == k_len or q_len == 1):
        return None
    return allow_mask(q_len, k_len, q_BHSD.device, window=window, padding_BL=padding_BL, doc_BS=doc_BS)


def _eager_impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
    mask = _dense_mask(q_BHSD, k_BKLD.shape[2], padding_BL, varlen, window)
    causal = mask is None and q_BHSD.shape[2] > 1
    out_BHSD = kernels.eager(q_BHSD, k_BKLD, v_BKLD, mask, causal=causal, scale=scale, softcap=softcap, dropout=dropout)
    return out_BHSD.transpose(1, 2)


def _sdpa_impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
    if padding_BL is not None and window is None and not dropout and _varlen_runs(q_BHSD):
        # Padded rows on CUDA: unpad into torch's varlen kernel instead of sdpa with a dense mask, which keeps
        # cuDNN/FLASH off and measured 48-53% of the best kernel at 8k (docs/BENCHMARKS.md).
        return _torch_varlen_impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, None, scale=scale, window=None,
                                  softcap=None, dropout=0.0)  # fmt: skip
    if varlen is not None:
        return _sdpa_packed(q_BHSD, k_BKLD, v_BKLD, varlen, scale=scale, window=window, dropout=dropout)
    mask = _dense_mask(q_BHSD, k_BKLD.shape[2], padding_BL, None, window)
    causal = mask is None and q_BHSD.shape[2] > 1
    out_BHSD = kernels.sdpa(q_BHSD, k_BKLD, v_BKLD, mask, causal=causal, scale=scale, dropout=dropout, tag="sdpa/dense")
    return out_BHSD.transpose(1, 2)


def _varlen_runs(q_BHSD: torch.Tensor) -> bool:
    """Whether torch's varlen kernel runs for these queries; decided once per device/dtype/head dim, not per call."""
    return q_BHSD.is_cuda and _varlen_runs_on(q_BHSD.device, q_BHSD.dtype, q_BHSD.shape[-1])


@functools.cache
def _varlen_runs_on(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    from fasttune.attention.probe import probe

    return probe("varlen", device, dtype, head_dim) is None


def _sdpa_packed(q_BHSD, k_BKLD, v_BKLD, varlen: Varlen, *, scale, window, dropout):
    """Packed sdpa without an O(T^2) mask: torch's varlen kernel (FLASH-class, one launch for all documents) when
    it runs here (CUDA), else one causal sdpa call per document (also on CPU, where a T x T mask over a long pack
    costs memory and sum(L_i^2) instead of T^2 attention work)."""
    if not dropout and _varlen_runs(q_BHSD):
        return _torch_varlen_impl(q_BHSD, k_BKLD, v_BKLD, None, varlen, scale=scale, window=window, softcap=None,
                                  dropout=0.0)  # fmt: skip
    batch, n_heads, q_len, head_dim = q_BHSD.shape
    lens = memo(varlen.cu_q, "lens", lambda: (varlen.cu_q[1:] - varlen.cu_q[:-1]).tolist())
    q_1HTD, k_1KTD, v_1KTD = (_one_row(x) for x in (q_BHSD, k_BKLD, v_BKLD))
    outs = []
    for q_d, k_d, v_d in zip(q_1HTD.split(lens, 2), k_1KTD.split(lens, 2), v_1KTD.split(lens, 2), strict=True):
        mask = None if window is None else allow_mask(q_d.shape[2], k_d.shape[2], q_d.device, window=window)
        outs.append(kernels.sdpa(q_d, k_d, v_d, mask, causal=True, scale=scale, dropout=dropout, tag="sdpa/per-doc"))
    return torch.cat(outs, dim=2).transpose(1, 2).reshape(batch, q_len, n_heads, head_dim)


def _one_row(x_BHSD: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (1, H, B*S, D): packed rows laid end to end (documents never span rows)."""
    b, h, s, d = x_BHSD.shape
    return x_BHSD.transpose(1, 2).reshape(1, b * s, h, d).transpose(1, 2)


def _varlen_family(kernel, dense_kernel=None):
    """Adapt a varlen kernel to every layout: padded rows are unpadded, plain rows go to the dense kernel when there
    is one (else become one document each)."""
    dense_failed: list[str] = []

    def impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
        batch, _, q_len, _ = q_BHSD.shape
        opts = dict(scale=scale, window=window, softcap=softcap, dropout=dropout)
        if varlen is None and padding_BL is None and dense_kernel is not None and not dense_failed:
            try:
                return dense_kernel(q_BHSD.transpose(1, 2), k_BKLD.transpose(1, 2), v_BKLD.transpose(1, 2), **opts)
            except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
                dense_failed.append(str(exc))  # e.g. an API change in a beta flash-attn: varlen still works
                _warn_once(f"fasttune attention: dense flash kernel failed ({exc}); using its varlen kernel")
        if varlen is None and padding_BL is not None:
            varlen = unpadded(padding_BL, q_len)
        elif varlen is None:
            varlen = uniform(batch, q_len, k_BKLD.shape[2], q_BHSD.device)
        q_THD, k_TKD, v_TKD = (
            to_flat(q_BHSD, varlen.idx_q),
            to_flat(k_BKLD, varlen.idx_k),
            to_flat(v_BKLD, varlen.idx_k),
        )
        out_THD = kernel(q_THD, k_TKD, v_TKD, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k, **opts)
        return from_flat(out_THD, varlen.idx_q, batch, q_len)

    return impl


_torch_varlen_impl = _varlen_family(kernels.torch_varlen)


def _flex_impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
    batch, n_heads, q_len, head_dim = q_BHSD.shape
    if varlen is None:
        block_mask = _flex_dense_mask(q_BHSD, k_BKLD.shape[2], padding_BL, window)
        return kernels.flex(q_BHSD, k_BKLD, v_BKLD, block_mask, scale=scale, softcap=softcap).transpose(1, 2)
    # Packed: one row of T tokens with a document mask, so no row is padded to the longest document.
    total = batch * q_len
    q_1HTD, k_1KTD, v_1KTD = (_one_row(x) for x in (q_BHSD, k_BKLD, v_BKLD))

    def build():
        return _block_mask(total, total, q_BHSD.device, window, doc_T=doc_ids(varlen, total))

    block_mask = memo(varlen.cu_q, f"flex{total}/{window}", build)
    out_1HTD = kernels.flex(q_1HTD, k_1KTD, v_1KTD, block_mask, scale=scale, softcap=softcap)
    return out_1HTD.transpose(1, 2).reshape(batch, q_len, n_heads, head_dim)


def _flex_dense_mask(q_BHSD, k_len, padding_BL, window):
    q_len, device = q_BHSD.shape[2], q_BHSD.device
    if padding_BL is None:
        return _causal_block_mask(q_len, k_len, str(device), window)
    return memo(padding_BL, f"flex{q_len}/{window}", lambda: _block_mask(q_len, k_len, device, window, padding_BL))


@functools.lru_cache(maxsize=16)
def _causal_block_mask(q_len: int, k_len: int, device: str, window: int | None):
    return _block_mask(q_len, k_len, torch.device(device), window)


def _block_mask(q_len, k_len, device, window, padding_BL=None, doc_T=None):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = k_len - q_len  # bottom-right causal, as in allow_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allow = kv_idx <= q_idx + offset
        if window is not None:
            allow = allow & (q_idx + offset - kv_idx < window)
        if doc_T is not None:
            allow = allow & (doc_T[q_idx] == doc_T[kv_idx])
        if padding_BL is not None:
            allow = (allow & padding_BL[b, kv_idx]) | (kv_idx == q_idx + offset)
        return allow

    rows = None if padding_BL is None else padding_BL.shape[0]
    return create_block_mask(mask_mod, rows, None, q_len, k_len, device=device)


_IMPLS = {
    "eager": _eager_impl,
    "sdpa": _sdpa_impl,
    "flex_attention": _flex_impl,
    "varlen": _torch_varlen_impl,
    **{name: _varlen_family(kernels.flash_varlen(name), kernels.flash_dense(name)) for name in kernels.FLASH_MODULES},
}


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, **kwargs):
    """Registered mask builder: the 2D padding mask or None (cheap; boundaries come from kwargs), like transformers'
    flash mask. Only when a model overlays its own mask pattern (use_vmap) or queries do not end at the last key (a
    static cache) is the full 4D bool mask built, because then bottom-right causality would be wrong."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    attention_mask = kwargs.pop("attention_mask", None)
    if kwargs.get("use_vmap") or not aligned:
        kwargs.update(allow_is_causal_skip=False)
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs)
    return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)


def register_all() -> dict[str, str]:
    """Register every backend into transformers (idempotent); fasttune name -> attn_implementation string."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, hf_name in HF_NAMES.items():
        AttentionInterface.register(hf_name, functools.partial(attention_forward, name))
        AttentionMaskInterface.register(hf_name, mask_function)
    return dict(HF_NAMES)
