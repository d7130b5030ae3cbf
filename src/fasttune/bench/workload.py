"""The training benchmark's workload: a realistic SFT length mix turned into synthetic token samples, handed to
the real training loop as a `DataBundle`, and the plain-HF baselines' collation of the same samples."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttune.data.pipeline import DataBundle, DataSummary


def sft_lengths(n: int, median: float, mean: float, lo: int, hi: int, seed: int = 0) -> list[int]:
    """n lognormal sample lengths with the given median and mean (before clipping to [lo, hi]).

    Lognormal: median = exp(mu), mean = exp(mu + sigma^2 / 2), so sigma^2 = 2 ln(mean / median)."""
    if not 0 < median <= mean:
        raise ValueError(f"need 0 < median <= mean, got median {median}, mean {mean}")
    mu, sigma = math.log(median), math.sqrt(2 * math.log(mean / median))
    rng = random.Random(seed)
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def dataset_workload(paths: tuple[str, ...], model_path: str | None, max_length: int,
                     n: int) -> tuple[list[int], list[list[bool]]]:  # fmt: skip
    """Token lengths of a real dataset, tokenized exactly as `fasttune train --data PATH...` would, and which tokens
    of each sample have a label (prompts and templates have none unless trained on)."""
    from fasttune.config import get_experiment
    from fasttune.data.packing import IGNORE
    from fasttune.data.pipeline import build_data

    cfg = get_experiment("sft")
    cfg.data.path, cfg.model.path, cfg.data.max_length = paths, model_path, max_length
    samples = build_data(cfg.validate()).train
    samples = samples[:n] if n else samples
    return [len(s) for s in samples], [(s.labels() != IGNORE).tolist() for s in samples]


class SyntheticTokenizer:
    """What the training loop needs of a tokenizer for synthetic tokens: a vocabulary size, a pad id, and the
    `init_kwargs` the loop records the prompt format in (generate/template.py)."""

    pad_token_id = 0
    eos_token_id = 1
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.init_kwargs: dict = {}

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, path: str | Path) -> tuple:
        return ()


def synthetic_bundle(lengths: list[int], vocab_size: int, seed: int = 0,
                     trained: list[list[bool]] | None = None) -> DataBundle:  # fmt: skip
    """Random token ids of the given lengths, no validation split. Labels = inputs where `trained` (a dataset's label
    masks, one list per sample) says so, else -100; without `trained` every token is trained."""
    from fasttune.data.sample import Sample, runs

    rng = random.Random(seed)
    train = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(2, vocab_size) for _ in range(n)]
        keep = trained[i] if trained is not None else [True] * n
        if len(keep) != n:
            raise ValueError(f"sample {i}: {n} tokens but {len(keep)} trained flags")
        train.append(Sample(ids, runs(np.array(keep, dtype=bool))))
    summary = DataSummary(
        source=f"synthetic ({len(lengths)} samples, lengths {min(lengths)}..{max(lengths)})", format="tokens"
    )
    summary.train_samples, summary.train_tokens, summary.longest = len(train), sum(lengths), max(lengths)
    return DataBundle(train, [], SyntheticTokenizer(vocab_size), summary)


@dataclass
class LengthStats:
    n: int
    median: float
    mean: float
    lo: int
    hi: int

    @classmethod
    def of(cls, lengths: list[int]) -> LengthStats:
        s = sorted(lengths)
        return cls(len(s), s[len(s) // 2], sum(s) / len(s), s[0], s[-1])

    def describe(self) -> str:
        return f"{self.n} samples, median {self.median:.0f}, mean {self.mean:.0f}, min {self.lo}, max {self.hi} tokens"
