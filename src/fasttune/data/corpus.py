"""The embedded default corpus: the Python standard library source of the running interpreter.

One document per .py file; site-packages and test suites are skipped. Nothing is downloaded and nothing is
shipped in the repo. The train/validation split is a function of each file's relative path, so it is the
same on every run and does not move when files are added.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from fasttune.data.sample import Sample
from fasttune.errors import DataError

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "test_tools"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stable_fraction(name: str) -> float:
    """A stable pseudo-random number in [0, 1) per document name."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


def holdout(items: list, keys: list[str], val_fraction: float) -> tuple[list, list]:
    """(train, validation): item i is held out when the hash of keys[i] falls below val_fraction, so the same items
    are held out on every run; at least one is held out when val_fraction > 0 and there are two or more."""
    train, val = [], []
    for item, key in zip(items, keys, strict=True):
        (val if stable_fraction("split:" + key) < val_fraction else train).append(item)
    if val_fraction > 0 and not val and len(train) > 1:
        val.append(train.pop())
    return train, val


def too_few_to_hold_out(documents: int, val_fraction: float) -> bool:
    """Whether `documents` are too few for whole ones to make val_fraction of them (one of 20 at 0.05)."""
    return val_fraction > 0 and documents * val_fraction < 1


def holdout_tail(samples: list[Sample], val_fraction: float, piece: int) -> tuple[list[Sample], list[Sample], int, int]:
    """(train, validation, pieces held out, pieces) for text too few documents long to hold whole ones out: the
    samples (documents, in order) cut into `piece`-token pieces as training splits them, and the last
    round(val_fraction x pieces) of those (at least one, one train piece always left) held out, contiguous. A document
    is cut at a piece boundary, so its train part splits into the pieces it would have anyway: none is both trained
    and validated."""
    counts = [-(-len(s) // piece) for s in samples]
    total = sum(counts)
    held = min(max(1, round(val_fraction * total)), total - 1) if val_fraction > 0 else 0
    train, val, left = list(samples), [], held
    while left > 0:
        sample, n = train.pop(), counts.pop()
        if n > left:
            cut = (n - left) * piece
            train.append(sample.cut(0, cut))
            sample = sample.cut(cut, len(sample))
        val.insert(0, sample)
        left -= n
    return train, val, max(held, 0), total


def list_stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the stdlib .py files, in a stable pseudo-random order (so a prefix is a fair sample)."""
    return list(_stdlib_files(root or stdlib_root()))


@functools.cache  # a walk of the whole stdlib (~0.5 s), once per process: build_data's input digest lists it too
def _stdlib_files(root: Path) -> tuple[str, ...]:
    names = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("test_") for part in rel.parts):
            continue
        names.append(rel.as_posix())
    if not names:
        raise DataError(f"no Python source found under {root}; pass --data PATH to train on your own files")
    return tuple(sorted(names, key=lambda n: (stable_fraction("order:" + n), n)))


def load_stdlib_corpus(max_documents: int | None, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents of the embedded corpus."""
    root = stdlib_root()
    names = list_stdlib_files(root)[:max_documents]
    docs = [Document(name, (root / name).read_text(encoding="utf-8", errors="replace")) for name in names]
    docs = [d for d in docs if d.text.strip()]
    return holdout(docs, [d.name for d in docs], val_fraction)


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha1()
    for d in docs:
        h.update(d.name.encode())
        h.update(hashlib.sha1(d.text.encode()).digest())
    return h.hexdigest()[:16]
