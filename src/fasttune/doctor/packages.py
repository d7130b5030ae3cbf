"""Checks of the optional packages behind fasttune's fast paths: triton, liger-kernel, peft, torchao.

Import state (Machine.imports) comes from fasttune.attention.import_status, so a package that is installed but broken
shows the real import error (and an ABI mismatch is named as one), exactly as the attention backends report it.
"""

from __future__ import annotations

import importlib.metadata

from packaging.requirements import InvalidRequirement, Requirement

from fasttune.doctor.machine import Machine
from fasttune.doctor.report import FAIL, OK, SKIP, WARN, Row


def _missing(why: str | None) -> bool:
    return bool(why) and why.startswith("package not installed")


def pinned_triton() -> str:
    """The triton version the installed torch wheel requires (CUDA wheels pin it exactly), as a pip spec."""
    try:
        reqs = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return "triton"
    for text in reqs:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.name == "triton" and "extra" not in str(req.marker or ""):
            return f"triton{req.specifier}"
    return "triton"


def _package_row(m: Machine, id_: str, label: str, module: str, missing: tuple[str, str, str] | None,
                 fix_missing: str, fix_broken: str) -> list[Row]:  # fmt: skip
    """ok when `module` imports; when it is missing, SKIP on a CPU-only machine with missing[0] as the reason, else
    `missing[1]` (a status) with missing[2]; FAIL with the real import error when it is installed but broken."""
    why = m.import_status(module)
    if why is None:
        return [Row(id_, "Packages", label, OK, f"{m.version(label) or '?'} imports")]
    if _missing(why):
        cpu_reason, status, reason = missing
        if not m.gpus and cpu_reason:
            return [Row(id_, "Packages", label, SKIP, cpu_reason)]
        return [Row(id_, "Packages", label, status, reason, fix_missing)]
    return [Row(id_, "Packages", label, FAIL, f"installed but broken: {why}", fix_broken)]


def check_triton(m: Machine) -> list[Row]:
    missing = ("not installed; GPU-only (compiled flex, Liger)", WARN,
               "not installed: compiled flex_attention, torch.compile and Liger kernels need it")  # fmt: skip
    return _package_row(m, "triton", "triton", "triton", missing, f'pip install "{pinned_triton()}"',
                        f'pip install --force-reinstall --no-deps "{pinned_triton()}"')  # fmt: skip


def check_liger(m: Machine) -> list[Row]:
    """Liger's fused linear-cross-entropy and friends: the `full` preset turns them on when installed."""
    reason = "not installed: fused linear-cross-entropy, RMSNorm, SwiGLU, RoPE (less memory, faster; preset full)"
    missing = ("not installed; its triton kernels need a GPU", WARN, reason)
    return _package_row(m, "liger", "liger-kernel", "liger_kernel", missing, 'pip install "fasttune[liger]"',
                        'pip install --force-reinstall --no-deps --no-cache-dir "liger-kernel>=0.6"')  # fmt: skip


def check_peft(m: Machine) -> list[Row]:
    missing = ("", SKIP, "not installed: needed only for LoRA (--experiment lora)")
    return _package_row(m, "peft", "peft", "peft", missing, 'pip install "fasttune[lora]"',
                        'pip install --force-reinstall --no-deps --no-cache-dir "peft>=0.17"')  # fmt: skip


def check_torchao(m: Machine) -> list[Row]:
    missing = ("", SKIP, "not installed: needed only for 8-bit AdamW (--training.optimizer adamw_8bit)")
    return _package_row(m, "torchao", "torchao", "torchao", missing, 'pip install "fasttune[adam8bit]"',
                        'pip install --force-reinstall --no-deps --no-cache-dir "torchao>=0.13"')  # fmt: skip
