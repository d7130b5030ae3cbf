"""Batch layouts the registered attention functions see, and the document boundaries behind them.

Shape legend: B batch, H query heads, K kv heads, S query length, L key length, D head dim,
T tokens of a flattened (packed or unpadded) batch, N documents.

A call is either
  * packed: documents laid end to end, boundaries from `cu_seq_lens_q/k` kwargs (DataCollatorWithFlattening)
    or from `position_ids` that restart at 0 -> `Varlen` (cu_seqlens over the flattened B*S tokens);
  * dense: one sequence per row, optional 2D padding mask (B, L) as transformers' flash mask returns it.
Boundaries are derived here, from kwargs, and not from the mask transformers builds: with transformers
5.17-5.24 a train-mode forward with default `use_cache=True` creates a cache and skips its packed-sequence
detection, so the mask it builds lets documents attend to each other (docs/ATTENTION.md, "The trap").
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from dataclasses import dataclass

import torch

from fasttune.attention.state import STATE


@dataclass(frozen=True)
class Varlen:
    """Flattened documents: tokens cu[i]:cu[i+1] of the flat layout form document i."""

    cu_q: torch.Tensor  # int32 (N+1,)
    cu_k: torch.Tensor  # int32 (N+1,)
    max_q: int
    max_k: int
    idx_q: torch.Tensor | None = None  # flat positions in B*S of the kept query tokens; None: all kept
    idx_k: torch.Tensor | None = None  # same for keys in B*L


@torch._disable_dynamo  # under torch.compile: one graph break, not a recompile per forward (a new id(t))
def memo(t: torch.Tensor, tag: str, build):
    """build(), computed once per (tensor object, version, tag): every decoder layer of one forward gets the same
    position_ids / mask object, so the host syncs behind max lengths happen once per forward, not once per layer.
    Inference tensors have no version counter: they are not cached."""
    if t.is_inference():
        return build()
    key = (id(t), tag)
    hit = STATE.memo.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = build()
    if len(STATE.memo) > 32:  # a forward touches one or two tensors; old entries are dead
        STATE.memo.clear()
    STATE.memo[key] = (weakref.ref(t), t._version, value)
    return value


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


def _cu_from_starts(start_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    starts = start_T.nonzero().flatten()
    end = torch.tensor([start_T.numel()], device=start_T.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    return cu, _as_int((cu[1:] - cu[:-1]).max())


def packed_from_kwargs(kwargs: dict, batch: int, q_len: int, k_len: int) -> Varlen | None:
    """The packed layout of this call, or None when each row holds one sequence."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None:
            max_q = memo(cu_q, "max", lambda: _as_int((cu_q[1:] - cu_q[:-1]).max()))
        if max_k is None:
            max_k = max_q if cu_k is cu_q else memo(cu_k, "max", lambda: _as_int((cu_k[1:] - cu_k[:-1]).max()))
        # max lengths given as tensors (0-d or (1,)) are read once per forward, not once per layer
        max_q, max_k = (memo(m, "int", lambda m=m: _as_int(m)) if isinstance(m, torch.Tensor) else int(m)
                        for m in (max_q, max_k))  # fmt: skip
        return Varlen(cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k)
    position_ids = kwargs.get("position_ids")
    # With a cache offset (decoding) position_ids continue a sequence: packing only exists in full-length calls.
    if position_ids is None or q_len != k_len or position_ids.shape[-1] != q_len:
        return None
    return memo(position_ids, f"docs{batch}", lambda: _docs_from_positions(position_ids.expand(batch, -1)))


def _document_ids(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """transformers' `find_packed_sequence_indices` without its host sync: the document index of every token (a new
    document wherever the position does not continue by +1), also when the rows hold one document each."""
    first_B1 = position_ids_BS[:, :1] - 1
    return (torch.diff(position_ids_BS, prepend=first_B1, dim=-1) != 1).cumsum(-1)


_KNOWN_PACKED = contextvars.ContextVar("fasttune_known_packed", default=False)
"""Set inside packed_without_sync, per thread and task: other threads' forwards keep transformers' own check."""


def _packed_check(found):
    """transformers' function, answering from _document_ids inside packed_without_sync (identical elsewhere)."""

    @functools.wraps(found)
    def check(position_ids):
        return _document_ids(position_ids) if _KNOWN_PACKED.get() else found(position_ids)

    check.fasttune_wraps = found
    return check


@contextlib.contextmanager
def packed_without_sync(batch: dict):
    """Around a forward of a packed batch (`cu_seq_lens_q` given): transformers' mask preparation detects packing
    from position_ids and asks the host whether it found any (`.all()` on a device tensor), which waits for
    everything queued, the previous step's update included. The batch is known to be packed, so the answer is
    given without asking: the same document ids (masks built from them are unchanged; fasttune's attention reads
    the boundaries from the kwargs). transformers' function is wrapped once per process and behaves as its own
    outside this context (and in other threads); other batches, and transformers versions without that function,
    are left as they are."""
    import transformers.masking_utils as masking

    found = getattr(masking, "find_packed_sequence_indices", None)
    if found is None or batch.get("cu_seq_lens_q") is None:
        yield
        return
    if not hasattr(found, "fasttune_wraps"):
        masking.find_packed_sequence_indices = _packed_check(found)
    token = _KNOWN_PACKED.set(True)
    try:
        yield
    finally:
        _KNOWN_PACKED.reset(token)


def _docs_from_positions(pos_BS: torch.Tensor) -> Varlen | None:
    # A document starts at each row start and wherever the position does not continue by +1 (HF's convention).
    start_BS = torch.ones_like(pos_BS, dtype=torch.bool)
    start_BS[:, 1:] = pos_BS[:, 1:] != pos_BS[:, :-1] + 1
    if _as_int(start_BS.sum()) == pos_BS.shape[0]:
        return None
    cu, max_len = _cu_from_starts(start_BS.flatten())
    return Varlen(cu, cu, max_len, max_len)


@dataclass(frozen=True)
class Padding:
    """Host-side facts of a 2D padding mask, read with one sync per forward (memoized on the mask object)."""

    lens: tuple[int, ...]  # real tokens per row
    right: bool  # every row is real tokens followed only by padding (no False before a True)
    width: int  # keys per row

    @property
    def full(self) -> bool:
        """No padding at all: the mask changes nothing."""
        return all(n == self.width for n in self.lens)


def padding_of(padding_BL: torch.Tensor) -> Padding:
    def read() -> Padding:
        m_BL = padding_BL.bool()
        right_B = ~(m_BL[:, 1:] & ~m_BL[:, :-1]).any(-1)
        lens, right = torch.stack([m_BL.sum(-1), right_B.long()]).tolist()  # the one sync
        return Padding(tuple(lens), all(right), m_BL.shape[1])

    return memo(padding_BL, "padding", read)


def unpadded(padding_BL: torch.Tensor, q_len: int) -> Varlen:
    """Varlen layout of a padded batch: keep the True tokens of each row; queries are the last q_len keys."""
    return memo(padding_BL, f"unpad{q_len}", lambda: _unpad(padding_BL.bool(), q_len))


def _unpad(padding_BL: torch.Tensor, q_len: int) -> Varlen:
    def side(m_BX):
        lens_B = m_BX.sum(-1, dtype=torch.int32)
        cu = torch.nn.functional.pad(lens_B.cumsum(0, dtype=torch.int32), (1, 0))
        return m_BX.flatten().nonzero().flatten(), cu, _as_int(lens_B.max())

    idx_k, cu_k, max_k = side(padding_BL)
    if q_len == padding_BL.shape[1]:
        return Varlen(cu_k, cu_k, max_k, max_k, idx_k, idx_k)
    idx_q, cu_q, max_q = side(padding_BL[:, -q_len:])
    return Varlen(cu_q, cu_k, max_q, max_k, idx_q, idx_k)


def uniform(batch: int, q_len: int, k_len: int, device: torch.device) -> Varlen:
    """Varlen view of an unpadded batch: row b is one sequence (no copy, no sync)."""
    ar = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return Varlen(ar * q_len, ar * k_len, q_len, k_len)


def doc_ids(varlen: Varlen, total: int) -> torch.Tensor:
    """Document index of each of the `total` flat query tokens, (T,)."""
    marks_T = torch.zeros(total, dtype=torch.int32, device=varlen.cu_q.device)
    marks_T[varlen.cu_q[1:-1].long()] = 1
    return marks_T.cumsum(0)


def allow_mask(
    q_len: int,
    k_len: int,
    device: torch.device,
    *,
    window: int | None = None,
    padding_BL: torch.Tensor | None = None,
    doc_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool mask (B|1, 1, S, L), True = may attend. Queries sit at the last S key positions (bottom-right causal,
    like flash attention and transformers with a cache). O(S*L): only for eager, CPU sdpa and fallbacks."""
    i_S1 = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j_1L = torch.arange(k_len, device=device)[None, :]
    allow = (j_1L <= i_S1)[None]
    if window is not None:
        allow = allow & ((i_S1 - j_1L) < window)[None]
    if doc_BS is not None:
        allow = allow & (doc_BS[:, :, None] == doc_BS[:, None, :])
    if padding_BL is not None:
        # As transformers' eager mask: a pad query sees the real keys its causal row allows, never itself; a
        # query with no visible key (left padding) has an all-False row, which kernels.eager/sdpa turn into
        # uniform weights over all keys, as eager's additive finfo.min mask does (finite: no NaN).
        allow = allow & padding_BL.bool()[:, None, :]
    return allow[:, None]


def to_flat(x_BHSD: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(B, H, S, D) -> (T, H, D), keeping only the tokens in idx when given."""
    x_TH_D = x_BHSD.transpose(1, 2).reshape(-1, x_BHSD.shape[1], x_BHSD.shape[3])
    return x_TH_D if idx is None else x_TH_D.index_select(0, idx)


def from_flat(out_THD: torch.Tensor, idx: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor:
    """(T, H, D) -> (B, S, H, D); dropped (pad) tokens get zeros."""
    if idx is not None:
        full = out_THD.new_zeros(batch * q_len, *out_THD.shape[1:])
        out_THD = full.index_copy(0, idx, out_THD)
    return out_THD.reshape(batch, q_len, *out_THD.shape[1:])
