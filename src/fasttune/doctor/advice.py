"""Recommendations that fit this machine, from its GPU family and the rows doctor found.

Order of preference, everywhere: what already runs, then a pip wheel with no compiler, and only where nothing else
serves, a source build of flash-attn 2 (with the time to expect and the settings that keep it from running out of
memory).
"""

from __future__ import annotations

from fasttune.doctor.attn import fa4_install
from fasttune.doctor.machine import Machine, wheel_tag
from fasttune.doctor.report import FAIL, OK, Row
from fasttune.doctor.tools import meminfo


def advise(m: Machine, rows: list[Row]) -> list[str]:
    status = {r.id: r.status for r in rows}
    lines = [f"fix first: {r.name}: {r.fix}" for r in rows if r.status == FAIL and r.fix]
    by_family = {
        "cpu": _cpu,
        "pre-ampere": _pre_ampere,
        "ampere": _ampere,
        "blackwell-consumer": _ampere,
        "hopper": _hopper,
        "blackwell": _hopper,
    }
    return lines + by_family[m.family](m, status)


def _cpu(m: Machine, status: dict[str, str]) -> list[str]:
    lines = [
        "no CUDA GPU: fasttune trains on CPU with sdpa (`fasttune train --experiment quick`); the GPU-scale "
        "presets need --force here"
    ]
    if status.get("cuda") == FAIL:
        lines.append("a GPU is present but torch cannot use it: apply the fix in the 'torch CUDA build' row first")
    return lines


def _pre_ampere(m: Machine, status: dict[str, str]) -> list[str]:
    return [
        f"compute capability {m.cc[0]}.{m.cc[1]} predates Ampere: no flash kernels (they need sm_80+) and no native "
        "bf16; sdpa's memory-efficient kernel is the fused path, and --model.dtype fp32 avoids slow bf16 emulation",
    ]


def _hopper(m: Machine, status: dict[str, str]) -> list[str]:
    lines = []
    if status.get("flash_attention_4") != OK:
        lines.append(
            f"install flash-attn 4, a pure-Python wheel (no compiler, no nvcc): {fa4_install(m)}. Measured on H100 "
            "(torch 2.11.0+cu130): 499 TFLOP/s fwd+bwd on packed 4k documents vs 250 without it; `full` trains "
            "67k-74k tok/s with it and Liger vs 53k-57k without (docs/BENCHMARKS.md)"
        )
    else:
        lines.append("flash-attn 4 runs here: `auto` uses it for packed and padded batches")
    if status.get("liger") not in (OK, None):
        lines.append('add Liger kernels for the `full` preset: pip install "fasttune[liger]"')
    lines.append(
        "no need to build flash-attn 2/3 from source on this GPU: flash-attn 4 and sdpa-cuDNN need no compiler"
    )
    return lines


def _ampere(m: Machine, status: dict[str, str]) -> list[str]:
    lines = []
    fast = [n for n in ("varlen", "flex_attention") if status.get(n) == OK]
    if status.get("flash_attention_2") == OK:
        lines.append("flash-attn 2 runs here: `auto` uses it")
    elif fast or status.get("sdpa.FLASH_ATTENTION") == OK:
        lines.append(
            "fastest without compiling here: sdpa (torch's built-in FlashAttention-2 kernel) for padded batches, "
            + (f"{' / '.join(fast)} for packed batches" if fast else "sdpa for packed batches")
            + "; `auto` picks among them. No flash-attn build needed"
        )
    if not fast and status.get("flash_attention_2") != OK:
        lines += build_flash_attn2(m)
    if m.family == "blackwell-consumer":
        lines.append("flash-attn 4 does not support this GPU yet (sm_120); sdpa-cuDNN and flex are the fast paths")
    return lines


def build_flash_attn2(m: Machine) -> list[str]:
    """Only where no fused varlen kernel runs: a prebuilt wheel first, then a source build that will not OOM."""
    total, _ = meminfo()
    # flash-attn's README: below 96 GB of RAM, ninja's default parallelism can exhaust memory; it uses MAX_JOBS=4.
    ram = f"{total:.0f} GiB RAM here" if total else "RAM unknown"
    jobs_note = f"MAX_JOBS=4 keeps ninja within memory ({ram}; raise it only well above 96 GB)"
    archs = f"{m.cc[0]}0" if m.cc else "80"  # flash-attn 2.8 builds sm_80/90/100/120; 8.6/8.9 run the sm_80 code
    return [
        "no fused kernel for packed batches runs here, so flash-attn 2 is worth having. First look for a prebuilt "
        f"wheel matching this machine on https://github.com/Dao-AILab/flash-attention/releases: flash_attn-<version>"
        f"{wheel_tag(m)}.whl, then pip install <that file>",
        f"else build it: pip install ninja packaging && MAX_JOBS=4 FLASH_ATTN_CUDA_ARCHS={archs} pip install "
        "flash-attn --no-build-isolation --no-cache-dir. The arch setting compiles this GPU's kernels only, not all "
        f"four defaults; {jobs_note}. Needs nvcc of torch's CUDA major version and gcc (Build tools rows). "
        "flash-attn's README: 3-5 min on a 64-core machine with ninja, about 2 h without; longer with fewer jobs",
    ]
