"""What memory a run may still take: a GPU's (free_memory) and the host's (available_ram). train/memory.py plans
with them; bench/fit.py and train/footprint.py check with them."""

from __future__ import annotations

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
