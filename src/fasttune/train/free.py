"""What memory a run may still take: a GPU's (free_memory) and the host's (available_ram). train/memory.py plans
with them (per torchrun rank: rank_ram, host_free); bench/fit.py and train/footprint.py check with them."""

from __future__ import annotations

import os

import torch


def free_memory(device: torch.device) -> float | None:
    """Bytes this process can still use on `device`: the driver's free memory plus what torch already holds (the
    model's weights are counted by the estimate). None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device))


def available_ram() -> float | None:
    """Bytes of RAM the system can give without swapping (/proc/meminfo MemAvailable); None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rank_ram() -> float | None:
    """The host RAM one rank may take: MemAvailable over torchrun's ranks on this machine (None: unknown)."""
    ram = available_ram()
    return None if ram is None else ram / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def host_free(model: torch.nn.Module) -> float | None:
    """What a run on the CPU may still use: the RAM the system can give (shared by this machine's torchrun ranks)
    plus the weights this process already holds, which the estimate counts (as free_memory adds what torch holds on
    a GPU). None where the system does not say."""
    ram = rank_ram()
    if ram is None:
        return None
    held = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    return ram + held
