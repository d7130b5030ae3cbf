"""One tokenized sample, held compactly: its token ids as an int32 array and its trained tokens as spans.

A sample's labels (HF convention: aligned with input_ids, unshifted, -100 where no loss) are always its own token
where trained and -100 elsewhere, so they are not stored: `spans` holds the [start, end) runs of trained tokens (a
multi-turn chat sample has one per trained turn) and `labels()` rebuilds them when a micro-batch is made. A data set
(`Samples`) keeps every sample's ids in one array and its spans in another, with offsets: ~4 bytes per token and ~24
per sample (two offsets, one span), where a dict of two Python lists took ~40 per token (two 8-byte pointers and a
boxed int), once per rank: 100M tokens of SFT data hold ~0.4 instead of ~4 GB of host memory. (A list of `Sample`s
adds ~300 bytes a sample: the object and its two arrays' headers, 0.3 GB per million samples and rank.) A data set with
a sample cut to data.max_length adds a byte per sample: which ones are whole.

`sample["input_ids"]` and `sample["labels"]` give them as lists, as a tokenizer returns them (tests, one-off reads);
code that reads every sample uses `ids`, `spans`, `labels()`, `len()` and `trained()`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

IGNORE = -100
"""Label of a token that contributes no loss (PyTorch's cross-entropy `ignore_index`); the one constant."""

_NO_SPANS = np.zeros(0, dtype=np.int32)


class Sample:
    """Token ids (`ids`, int32) and the trained runs (`spans`, int32 [start0, end0, start1, end1, ...], sorted,
    disjoint, none empty, none adjacent); `record` and `last_turn`: eval's numbering (eval/run.py); `whole`: False for
    a piece `cut` from a longer sample (data.overlong truncate or split), whose answer may be cut: what --generate
    leaves out (its length does not say: a sample may be exactly max_length tokens long, a split's last piece
    shorter)."""

    __slots__ = ("ids", "spans", "record", "last_turn", "whole")

    def __init__(self, ids: Sequence[int] | np.ndarray, spans: Iterable[tuple[int, int]] = (),
                 record: int | None = None, last_turn: bool = True, whole: bool = True):  # fmt: skip
        self.ids = _int32(ids)
        if self.ids.ndim != 1:
            raise ValueError(f"a sample's ids are one sequence, got an array of shape {self.ids.shape}")
        self.spans = _merged(spans, len(self.ids))
        self.record, self.last_turn, self.whole = record, last_turn, whole

    @classmethod
    def from_labels(cls, ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> Sample:
        """The sample of `ids` and their `labels` (-100, or the token itself where trained)."""
        ids_a, labels_a = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        if ids_a.shape != labels_a.shape:
            raise ValueError(f"{len(ids_a)} ids but {len(labels_a)} labels")
        mask = labels_a != IGNORE
        if not np.array_equal(labels_a[mask], ids_a[mask]):
            raise ValueError("a label is neither -100 nor its own token; a sample trains each token on itself")
        return cls(ids_a, runs(mask))

    @classmethod
    def _view(cls, ids: np.ndarray, spans: np.ndarray, record: int | None, last_turn: bool, whole: bool) -> Sample:
        """A sample of arrays already checked (int32 ids, merged spans), kept as they are: views into `Samples`."""
        out = cls.__new__(cls)
        out.ids, out.spans, out.record, out.last_turn, out.whole = ids, spans, record, last_turn, whole
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def pairs(self) -> list[tuple[int, int]]:
        """The trained runs as (start, end) pairs."""
        bounds = self.spans.tolist()
        return list(zip(bounds[::2], bounds[1::2], strict=True))

    def labels(self) -> np.ndarray:
        """The labels, int64: the token where trained, else -100."""
        out = np.full(len(self.ids), IGNORE, dtype=np.int64)
        for lo, hi in self.pairs():
            out[lo:hi] = self.ids[lo:hi]
        return out

    def trained(self, lo: int = 0, hi: int | None = None) -> int:
        """How many tokens in [lo, hi) are trained; trained(1): the loss's targets (after the causal shift)."""
        hi = len(self.ids) if hi is None else hi
        return sum(max(0, min(e, hi) - max(s, lo)) for s, e in self.pairs())

    def cut(self, lo: int, hi: int) -> Sample:
        """Tokens [lo, hi) as a sample of their own (a copy: a truncated sample does not keep the rest alive); not
        `whole` unless they are all of it."""
        lo, hi = max(0, lo), min(len(self.ids), hi)
        whole = self.whole and (lo, hi) == (0, len(self.ids))
        return Sample(self.ids[lo:hi].copy(), ((s - lo, e - lo) for s, e in self.pairs()), self.record,
                      self.last_turn, whole)  # fmt: skip

    def __getitem__(self, key: str) -> list[int]:
        if key == "input_ids":
            return self.ids.tolist()
        if key == "labels":
            return self.labels().tolist()
        raise KeyError(key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (np.array_equal(self.ids, other.ids) and np.array_equal(self.spans, other.spans)
                and (self.record, self.last_turn, self.whole) == (other.record, other.last_turn,
                                                                  other.whole))  # fmt: skip

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"Sample({len(self.ids)} tokens, trained {self.pairs()})"


class Samples(Sequence[Sample]):
    """A data set's samples in two flat int32 arrays (every sample's ids, then every sample's spans) and their int64
    offsets; `samples[i]` is a `Sample` whose arrays are read-only views into them, made on access."""

    def __init__(self, samples: Iterable[Sample]):
        samples = list(samples)
        self._ids, self._starts = _flat([s.ids for s in samples])
        self._spans, self._span_starts = _flat([s.spans for s in samples])
        default = all(s.record is None and s.last_turn for s in samples)
        self._origins = None if default else [(s.record, s.last_turn) for s in samples]
        """Eval's numbering of each sample (record, last_turn); None: every sample's is the default (training)."""
        whole = np.fromiter((s.whole for s in samples), dtype=bool, count=len(samples))
        self._whole = None if whole.all() else whole
        """Each sample's `whole`, a byte each; None: every sample is whole."""

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i):  # -> Sample, or a list of them for a slice
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        record, last_turn = self._origins[i] if self._origins is not None else (None, True)
        whole = bool(self._whole[i]) if self._whole is not None else True
        ids = self._ids[self._starts[i] : self._starts[i + 1]]
        spans = self._spans[self._span_starts[i] : self._span_starts[i + 1]]
        return Sample._view(ids, spans, record, last_turn, whole)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __add__(self, other: Sequence[Sample]) -> list[Sample]:
        return [*self, *other]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Samples({len(self)} samples, {len(self._ids)} tokens)"


def _flat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The int32 arrays joined into one (read-only: samples are views of it) and their int64 start offsets + end."""
    starts = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays)), out=starts[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    flat.flags.writeable = False
    return flat, starts


def _int32(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """`ids` as int32 (a list is copied, an int32 array kept as it is); an id out of its range raises, not wraps."""
    if isinstance(ids, np.ndarray) and ids.dtype != np.int32 and ids.size:
        if ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max:
            raise ValueError(f"token id {ids.max()} does not fit in int32")
    return np.asarray(ids, dtype=np.int32)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) runs of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _merged(spans: Iterable[tuple[int, int]], n: int) -> np.ndarray:
    """Spans clipped to [0, n), empty ones dropped, overlapping or touching ones joined, as a flat int32 array."""
    out: list[int] = []
    for lo, hi in sorted((max(0, int(s)), min(n, int(e))) for s, e in spans):
        if lo >= hi:
            continue
        if out and lo <= out[-1]:
            out[-1] = max(out[-1], hi)
        else:
            out += [lo, hi]
    return np.array(out, dtype=np.int32) if out else _NO_SPANS


def columns(sample: Sample | dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of a sample as new int64 arrays (the caller may write into them): a Sample's, or a dict's
    "input_ids" and "labels" (HF style, as tests and scripts write them)."""
    if isinstance(sample, Sample):
        return sample.ids.astype(np.int64), sample.labels()
    return np.array(sample["input_ids"], dtype=np.int64), np.array(sample["labels"], dtype=np.int64)
