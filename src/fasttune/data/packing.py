"""Micro-batch planning and collation: padding-free packing (default), classic padded batches, or padded batches of
samples of similar length within the packing budget (for models whose attention cannot keep packed samples apart).

Packed micro-batch: one row `input_ids_1T` holding several samples back to back, `position_ids_1T` restarting
at 0 for each sample, and `cu_seq_lens_q/k` (int32, cumulative lengths) + `max_length_q/k`, the convention of
transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`. The first label of each sample is
-100 so no sample learns to predict its first token from the previous sample's last one.
Padded micro-batch: `input_ids_BS`, `attention_mask_BS`, `labels_BS` padded to the longest sample.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fasttune.data.sample import IGNORE, Sample, columns


def best_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bin-pack sample indices into bins of at most `budget` tokens (best-fit decreasing, O(n log n)).

    Best fit is at least as tight as first fit decreasing (both within 11/9 OPT + 1 bins)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing budget {budget}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            room, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (budget - n, len(bins) - 1))
    return bins


def by_length(lengths: Sequence[int], budget: int, rng: random.Random) -> list[list[int]]:
    """Padded micro-batches of samples of similar length, each at most `budget` tokens with its padding (rows x its
    longest sample): the samples longest first (equal lengths in random order), cut where the next would overflow."""
    if lengths and max(lengths) > budget:
        i = max(range(len(lengths)), key=lambda i: lengths[i])
        raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the micro-batch budget {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], rng.random()))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_micro_batches(
    lengths: Sequence[int], *, packing: bool, micro_batch_size: int, max_length: int, seed: int, epoch: int,
    grouped: bool = False,
) -> list[list[int]]:  # fmt: skip
    """The micro-batches (lists of sample indices) of one epoch. Deterministic in (seed, epoch), so a resumed
    run sees exactly the data order of an uninterrupted one. `grouped` (packing off): padded batches by_length
    within the packing budget instead of micro_batch_size samples in random order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    if grouped and not packing:
        batches = by_length(lengths, micro_batch_size * max_length, rng)
        rng.shuffle(batches)
        return batches
    if packing:
        bins = best_fit_decreasing(lengths, micro_batch_size * max_length)
        for b in bins:
            rng.shuffle(b)
        rng.shuffle(bins)
        return bins
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def collate_packed(samples: Sequence[Sample | dict]) -> dict[str, torch.Tensor | int]:
    """One row of the samples back to back; each sample's first label -100 (see the module's docstring)."""
    ids, labels = zip(*map(columns, samples), strict=True)
    for lab in labels:
        lab[0] = IGNORE  # columns gives fresh label arrays
    lengths = [len(x) for x in ids]
    cu = np.cumsum([0, *lengths])
    cu_t = torch.tensor(cu, dtype=torch.int32)
    longest = int((cu_t[1:] - cu_t[:-1]).max())
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids))[None],
        "labels": torch.from_numpy(np.concatenate(labels))[None],
        "position_ids": torch.from_numpy(np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]))[None],
        "cu_seq_lens_q": cu_t,
        "cu_seq_lens_k": cu_t,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def collate_padded(samples: Sequence[Sample | dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (padding side does not change the loss; right padding keeps positions 0..n-1)."""
    rows = [columns(s) for s in samples]
    width = max(len(x) for x, _ in rows)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, (x, lab) in enumerate(rows):
        n = len(x)
        ids[r, :n] = torch.from_numpy(x)
        labels[r, :n] = torch.from_numpy(lab)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(samples: Sequence[Sample | dict], *, packing: bool, pad_id: int) -> dict:
    return collate_packed(samples) if packing else collate_padded(samples, pad_id)


def count_targets(batch: dict) -> int:
    """Tokens that contribute to the loss (after the causal shift)."""
    return int((batch["labels"][..., 1:] != IGNORE).sum())


def real_tokens(batch: dict) -> int:
    """Non-padding tokens in a micro-batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


@dataclass(frozen=True)
class Batcher:
    """How samples become micro-batches, built once from the data config: `plan` an epoch (lists of sample
    indices, deterministic in (seed, epoch)), `collate` one micro-batch. Used by the training loop, the validation
    pass, the data summary and the benchmarks, so they all batch the same way."""

    packing: bool
    micro_batch_size: int
    max_length: int
    seed: int = 0
    pad_id: int = 0
    grouped: bool = False
    """Packing off: padded batches of similar lengths within micro_batch_size x max_length tokens (by_length)."""

    @classmethod
    def from_config(cls, data_cfg, seed: int, pad_id: int | None = 0, **changes) -> Batcher:
        """`data_cfg`: a DataConfig (packing, micro_batch_size, max_length); `changes` override its fields."""
        fields = dict(packing=data_cfg.packing, micro_batch_size=data_cfg.micro_batch_size,
                      max_length=data_cfg.max_length)  # fmt: skip
        return cls(**{**fields, **changes}, seed=seed, pad_id=pad_id or 0)

    def plan(self, lengths: Sequence[int], epoch: int) -> list[list[int]]:
        return plan_micro_batches(lengths, packing=self.packing, micro_batch_size=self.micro_batch_size,
                                  max_length=self.max_length, seed=self.seed, epoch=epoch,
                                  grouped=self.grouped)  # fmt: skip

    @property
    def layout(self) -> str:
        """How micro-batches are made: "packed", "grouped" (padded, by length) or "padded"; kept in checkpoints."""
        return "packed" if self.packing else "grouped" if self.grouped else "padded"

    def bounds(self, longest: int) -> tuple[int, int]:
        """(the most tokens a micro-batch holds, its padding included; its widest row) when no sample is longer than
        `longest`: what the memory estimate plans for."""
        budget = self.micro_batch_size * self.max_length
        if self.packing:
            return budget, budget
        row = min(self.max_length, longest)
        return (budget if self.grouped else self.micro_batch_size * row), row

    def collate(self, samples: Sequence[Sample | dict]) -> dict:
        return collate(samples, packing=self.packing, pad_id=self.pad_id)
