"""Device names as the user writes them ("auto", "cpu", "cuda", "cuda:N") -> torch.device: the one resolution of
"auto" used by training, generation, the benchmarks and attention."""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (or None): the current CUDA GPU when torch sees one, else the CPU; anything else as given."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
