"""Everything the attention package remembers between calls, with one owner and one reset.

What is kept, and why: the kernel report (which kernel really ran, for the run summary), the SDPA kernel each call
signature settled on (the ladder is tried once, not per call), the per-forward memo (host syncs once per forward, not
once per layer), `auto`'s per-device plans, the SDPA->varlen routing decision per device, cached probe and import
results, and dynamo's recompile limit (raised for compiled flex, restored by `reset`). Tests reset all of it through
an autouse fixture (tests/conftest.py); a long-lived process that changes GPUs or installs a package can too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class State:
    kernels: dict[str, str] = field(default_factory=dict)  # kernel report: call site -> kernel that ran
    sdpa_choice: dict[tuple, tuple[str, bool]] = field(default_factory=dict)  # call signature -> (SDPBackend, expand)
    memo: dict[tuple[int, str], tuple] = field(default_factory=dict)  # (tensor id, tag) -> (weakref, version, value)
    plans: dict[tuple, object] = field(default_factory=dict)  # (device, dtype, head dim) -> auto's Plan
    routes: dict[tuple, bool] = field(default_factory=dict)  # (device, dtype, head dim) -> sdpa runs varlen here
    warned: set[str] = field(default_factory=set)  # warnings already logged once
    broken: set = field(default_factory=set)  # dense flash kernels that raised once (their varlen kernel runs)
    flex_expand_kv: bool = False  # compiled flex runs GQA on expanded kv heads (its GQA kernel failed the probe)
    recompile_limit: int | None = None  # dynamo's limit before compiled flex raised it; None: untouched


STATE = State()
_CACHES: list[Callable] = []


def cache(fn: Callable | None = None, *, maxsize: int | None = None):
    """functools.lru_cache (unbounded by default) whose entries `reset()` clears; @cache or @cache(maxsize=16)."""

    def wrap(f: Callable):
        cached = functools.lru_cache(maxsize=maxsize)(f)
        _CACHES.append(cached)
        return cached

    return wrap(fn) if fn is not None else wrap


def reset() -> None:
    """Forget everything: reports, choices, plans, probes, memo; restore dynamo's recompile limit."""
    if STATE.recompile_limit is not None:
        import torch

        torch._dynamo.config.recompile_limit = STATE.recompile_limit
    for name, value in vars(State()).items():
        setattr(STATE, name, value)
    for cached in _CACHES:
        cached.cache_clear()
