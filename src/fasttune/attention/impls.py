"""Each backend's attention function for every batch layout: the `impl` of its record in backends.py.

Shape legend: B batch, H query heads, K kv heads, S query length, L key length, D head dim, T flat tokens.

One signature: impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout) -> out_BSHD, where
  * varlen (layout.Varlen) is set for packed calls: documents laid end to end, never attending across;
  * padding_BL is a 2D (B, L) bool mask of real keys for padded rows (None: every key is real);
  * both None: plain causal rows (bottom-right aligned when S < L, as in a decode step).
Which impl runs for a call, and the fallbacks for features an impl lacks, are decided in dispatch.py.
"""

from __future__ import annotations

import logging

import torch

from fasttune.attention import kernels, state
from fasttune.attention.layout import Varlen, allow_mask, doc_ids, from_flat, memo, to_flat, uniform, unpadded
from fasttune.attention.state import STATE

logger = logging.getLogger("fasttune")


def dense_mask(q_BHSD, k_len, padding_BL, varlen, window) -> torch.Tensor | None:
    """The O(S*L) bool mask for eager/CPU sdpa, or None when plain causal (S == L) or a one-token decode step."""
    batch, _, q_len, _ = q_BHSD.shape
    doc_BS = doc_ids(varlen, batch * q_len).view(batch, q_len) if varlen is not None else None
    if padding_BL is None and doc_BS is None and window is None and (q_len == k_len or q_len == 1):
        return None
    return allow_mask(q_len, k_len, q_BHSD.device, window=window, padding_BL=padding_BL, doc_BS=doc_BS)


def eager(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
    mask = dense_mask(q_BHSD, k_BKLD.shape[2], padding_BL, varlen, window)
    causal = mask is None and q_BHSD.shape[2] > 1
    out_BHSD = kernels.eager(q_BHSD, k_BKLD, v_BKLD, mask, causal=causal, scale=scale, softcap=softcap, dropout=dropout)
    return out_BHSD.transpose(1, 2)


def sdpa(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
    """Rows: one sdpa call (dense mask when padded or windowed); documents: one causal call per document. On CUDA,
    documents and padded rows go to torch's varlen kernel instead (the route bound at registration, select.py)."""
    if varlen is not None:
        return _sdpa_per_document(q_BHSD, k_BKLD, v_BKLD, varlen, scale=scale, window=window, dropout=dropout)
    mask = dense_mask(q_BHSD, k_BKLD.shape[2], padding_BL, None, window)
    causal = mask is None and q_BHSD.shape[2] > 1
    out_BHSD = kernels.sdpa(
        q_BHSD,
        k_BKLD,
        v_BKLD,
        mask,
        causal=causal,
        scale=scale,
        dropout=dropout,
        tag="sdpa/dense",
        fill_empty=padding_BL is not None,
    )  # unpadded causal rows: every query sees itself
    return out_BHSD.transpose(1, 2)


def _sdpa_per_document(q_BHSD, k_BKLD, v_BKLD, varlen: Varlen, *, scale, window, dropout):
    """Packed sdpa without an O(T^2) mask: one causal sdpa call per document (a T x T mask over a long pack costs
    memory and sum(L_i^2) instead of T^2 attention work)."""
    batch, n_heads, q_len, head_dim = q_BHSD.shape
    lens = memo(varlen.cu_q, "lens", lambda: (varlen.cu_q[1:] - varlen.cu_q[:-1]).tolist())
    q_1HTD, k_1KTD, v_1KTD = (_one_row(x) for x in (q_BHSD, k_BKLD, v_BKLD))
    outs = []
    for q_d, k_d, v_d in zip(q_1HTD.split(lens, 2), k_1KTD.split(lens, 2), v_1KTD.split(lens, 2), strict=True):
        mask = None if window is None else allow_mask(q_d.shape[2], k_d.shape[2], q_d.device, window=window)
        outs.append(kernels.sdpa(q_d, k_d, v_d, mask, causal=True, scale=scale, dropout=dropout, tag="sdpa/per-doc",
                                 fill_empty=False))  # fmt: skip
    return torch.cat(outs, dim=2).transpose(1, 2).reshape(batch, q_len, n_heads, head_dim)


def _one_row(x_BHSD: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (1, H, B*S, D): packed rows laid end to end (documents never span rows)."""
    b, h, s, d = x_BHSD.shape
    return x_BHSD.transpose(1, 2).reshape(1, b * s, h, d).transpose(1, 2)


def varlen_family(kernel, dense_kernel=None):
    """Adapt a varlen kernel to every layout: padded rows are unpadded, plain rows go to the dense kernel when there
    is one (else become one document each)."""

    def impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
        batch, _, q_len, _ = q_BHSD.shape
        opts = dict(scale=scale, window=window, softcap=softcap, dropout=dropout)
        if varlen is None and padding_BL is None and dense_kernel is not None and dense_kernel not in STATE.broken:
            try:
                return dense_kernel(q_BHSD.transpose(1, 2), k_BKLD.transpose(1, 2), v_BKLD.transpose(1, 2), **opts)
            except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
                STATE.broken.add(dense_kernel)  # e.g. an API change in a beta flash-attn: varlen still works
                warn_once(f"fasttune attention: dense flash kernel failed ({exc}); using its varlen kernel")
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


def warn_once(message: str) -> None:
    if message not in STATE.warned:
        STATE.warned.add(message)
        logger.warning(message)


torch_varlen = varlen_family(kernels.torch_varlen)


def flex(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, *, scale, window, softcap, dropout):
    batch, n_heads, q_len, head_dim = q_BHSD.shape
    if varlen is None:
        block_mask = _flex_dense_mask(q_BHSD, k_BKLD.shape[2], padding_BL, window)
        return kernels.flex(q_BHSD, k_BKLD, v_BKLD, block_mask, scale=scale, softcap=softcap).transpose(1, 2)
    # Packed: one row of T tokens with a document mask, so no row is padded to the longest document.
    total = batch * q_len
    q_1HTD, k_1KTD, v_1KTD = (_one_row(x) for x in (q_BHSD, k_BKLD, v_BKLD))

    def build():
        return block_mask_for(total, total, q_BHSD.device, window, doc_T=doc_ids(varlen, total))

    block_mask = memo(varlen.cu_q, f"flex{total}/{window}", build)
    out_1HTD = kernels.flex(q_1HTD, k_1KTD, v_1KTD, block_mask, scale=scale, softcap=softcap)
    return out_1HTD.transpose(1, 2).reshape(batch, q_len, n_heads, head_dim)


def _flex_dense_mask(q_BHSD, k_len, padding_BL, window):
    q_len, device = q_BHSD.shape[2], q_BHSD.device
    if padding_BL is None:
        return _causal_block_mask(q_len, k_len, str(device), window)
    return memo(padding_BL, f"flex{q_len}/{window}", lambda: block_mask_for(q_len, k_len, device, window, padding_BL))


@state.cache(maxsize=16)
def _causal_block_mask(q_len: int, k_len: int, device: str, window: int | None):
    return block_mask_for(q_len, k_len, torch.device(device), window)


def block_mask_for(q_len, k_len, device, window, padding_BL=None, doc_T=None):
    """flex BlockMask with the same semantics as layout.allow_mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = k_len - q_len  # bottom-right causal, as in allow_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allow = kv_idx <= q_idx + offset
        if window is not None:
            allow = allow & (q_idx + offset - kv_idx < window)
        if doc_T is not None:
            allow = allow & (doc_T[q_idx] == doc_T[kv_idx])
        if padding_BL is not None:
            allow = allow & padding_BL[b, kv_idx]  # a query with no visible key gets zeros (flex), finite
        return allow

    rows = None if padding_BL is None else padding_BL.shape[0]
    return create_block_mask(mask_mod, rows, None, q_len, k_len, device=device)
