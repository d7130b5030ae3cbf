"""`fasttune doctor` (also `python main.py --doctor`): its options. The checks (fasttune.doctor.checks, which import
torch) are imported when the command runs, so that `fasttune --help` answers without importing torch."""

from __future__ import annotations

import dataclasses

from fasttune.command import Command


@dataclasses.dataclass
class DoctorArgs(Command):
    """Check which fast paths work on this machine (torch, CUDA, attention backends, kernels, packages, memory,
    disk) and print the fix for each one that does not. Exit code 1 when a check fails."""

    json: bool = False
    """Print the report as JSON (every check: status, reason, fix)."""
    quick: bool = False
    """Check each attention backend statically (installed, supported GPU, dtype, head dim) instead of by a tiny
    forward+backward on the device; torch's SDPA kernels and the backend `auto` picks still run one tiny call."""

    def run(self) -> int:
        from fasttune.doctor.checks import main

        return main(self)
