"""Counts in words for messages: "1 step", "2 steps", "0.5 epochs"."""

from __future__ import annotations


def count(n: float, word: str, many: str | None = None, shown: str | None = None) -> str:
    """`n` and `word`, singular for exactly one and plural otherwise (`many`, else word + "s"); `shown`: how `n` is
    written (default str(n): "1" for 1 and 1.0 alike is the caller's choice)."""
    return f"{n if shown is None else shown} {word if n == 1 else many or word + 's'}"
