"""Checks of the optional packages behind fasttune's fast paths: triton, liger-kernel, peft.

Import state comes from fasttune.attention.import_status, so a package that is installed but broken shows the
real import error (and an ABI mismatch is named as one), exactly as the attention backends report it.
"""

from __future__ import annotations

import importlib.metadata
import re

from fasttune.attention import import_status
from fasttune.doctor.machine import Machine, dist_version
from fasttune.doctor.report import FAIL, OK, SKIP, WARN, Row


def _missing(why: str | None) -> bool:
    return bool(why) and why.startswith("package not installed")


def pinned_triton() -> str:
    """The triton version the installed torch wheel requires (CUDA wheels pin it exactly), as a pip spec."""
    try:
        for req in importlib.metadata.requires("torch") or []:
            if re.match(r"triton\b", req) and "extra" not in req:
                return req.split(";")[0].replace(" ", "")
    except importlib.metadata.PackageNotFoundError:
        pass
    return "triton"


def check_triton(m: Machine) -> list[Row]:
    why = import_status("triton")
    if why is None:
        return [Row("triton", "Packages", "triton", OK, f"{dist_version('triton') or '?'} imports")]
    if _missing(why):
        if not m.gpus:
            return [Row("triton", "Packages", "triton", SKIP, "not installed; GPU-only (compiled flex, Liger)")]
        reason = "not installed: compiled flex_attention, torch.compile and Liger kernels need it"
        return [Row("triton", "Packages", "triton", WARN, reason, f'pip install "{pinned_triton()}"')]
    fix = f'pip install --force-reinstall --no-deps "{pinned_triton()}"'
    return [Row("triton", "Packages", "triton", FAIL, f"installed but broken: {why}", fix)]


def check_liger(m: Machine) -> list[Row]:
    """Liger's fused linear-cross-entropy and friends: the `full` preset turns them on when installed."""
    why = import_status("liger_kernel")
    if why is None:
        return [Row("liger", "Packages", "liger-kernel", OK, f"{dist_version('liger-kernel') or '?'} imports")]
    if _missing(why):
        if not m.gpus:
            return [Row("liger", "Packages", "liger-kernel", SKIP, "not installed; its triton kernels need a GPU")]
        reason = "not installed: fused linear-cross-entropy, RMSNorm, SwiGLU, RoPE (less memory, faster; preset full)"
        return [Row("liger", "Packages", "liger-kernel", WARN, reason, 'pip install "fasttune[liger]"')]
    fix = 'pip install --force-reinstall --no-deps --no-cache-dir "liger-kernel>=0.6"'
    return [Row("liger", "Packages", "liger-kernel", FAIL, f"installed but broken: {why}", fix)]


def check_peft(m: Machine) -> list[Row]:
    why = import_status("peft")
    if why is None:
        return [Row("peft", "Packages", "peft", OK, f"{dist_version('peft') or '?'} imports")]
    if _missing(why):
        reason = "not installed: needed only for LoRA (--experiment lora)"
        return [Row("peft", "Packages", "peft", SKIP, reason, 'pip install "fasttune[lora]"')]
    fix = 'pip install --force-reinstall --no-deps --no-cache-dir "peft>=0.17"'
    return [Row("peft", "Packages", "peft", FAIL, f"installed but broken: {why}", fix)]
