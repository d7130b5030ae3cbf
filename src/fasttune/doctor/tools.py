"""Checks of build tools (nvcc, gcc, g++, ninja), the allocator setting, disk and RAM.

fasttune itself compiles nothing; the build tools only matter for building flash-attn 2/3 from source, and the C
compiler also for triton, which builds a small launcher in C the first time it runs a kernel. torch.compile on a CPU
(--training.compile, 8-bit AdamW's step) needs a C++ compiler.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from fasttune.compiler import CPU_COMPILE_USERS, INSTALL
from fasttune.doctor.machine import Machine, major_minor, run
from fasttune.doctor.report import FAIL, OK, SKIP, WARN, Row

NO_COMPILE = "fasttune needs no compiler; only building flash-attn 2/3 from source does"


def check_nvcc(m: Machine) -> list[Row]:
    """The classic mismatch: torch's cpp_extension refuses to build with an nvcc of another CUDA major version."""
    home, found = m.cuda_home, m.nvcc
    if found is None:
        where = f" (CUDA_HOME={home} has no bin/nvcc)" if m.env.get("CUDA_HOME") else ""
        status = WARN if where else SKIP
        fix = "unset CUDA_HOME, or point it at a CUDA toolkit" if where else ""
        return [Row("nvcc", "Build tools", "nvcc", status, f"no CUDA toolkit found{where}; {NO_COMPILE}", fix)]
    path, version = found
    if m.torch_cuda is None:
        return [Row("nvcc", "Build tools", "nvcc", SKIP, f"CUDA {version} at {path}; unused with a CPU-only torch")]
    mine, torchs = major_minor(version), major_minor(m.torch_cuda)
    if mine and torchs and mine[0] != torchs[0]:
        want = f"{torchs[0]}.{torchs[1]}"
        reason = (
            f"nvcc is CUDA {version} ({path}) but torch was built with CUDA {m.torch_cuda}: building flash-attn 2/3 "
            "or any CUDA extension fails (torch.utils.cpp_extension rejects a different major version)"
        )
        fix = (
            f"install the CUDA {want} toolkit, then export CUDA_HOME=/usr/local/cuda-{want} "
            f'PATH=/usr/local/cuda-{want}/bin:$PATH; or skip compiling (Hopper/Blackwell): pip install "fasttune[fa4]"'
        )
        return [Row("nvcc", "Build tools", "nvcc", WARN, reason, fix)]
    note = "matches" if mine == torchs else "same major version as (builds work, torch only warns)"
    return [Row("nvcc", "Build tools", "nvcc", OK, f"CUDA {version} at {path}; {note} torch's CUDA {m.torch_cuda}")]


def check_gcc(m: Machine) -> list[Row]:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        if m.gpus:
            reason = "none found: triton (compiled flex, Liger) fails at first use with 'Failed to find C compiler'"
            return [
                Row("gcc", "Build tools", "C compiler", WARN, reason, "apt-get install gcc  (or export CC=/path/to/cc)")
            ]
        return [Row("gcc", "Build tools", "C compiler", SKIP, f"no C compiler; {NO_COMPILE}")]
    res = run([cc, "--version"])
    version = res[1].splitlines()[0] if res and res[1] else "version unknown"
    return [Row("gcc", "Build tools", "C compiler", OK, f"{cc}: {version}")]


def check_cxx(m: Machine) -> list[Row]:
    """torch.compile on a CPU (--training.compile, adamw_8bit's step) builds C++ kernels: without a C++ compiler such
    a run stops before training (train.device.refuse_cpu_compile_without_compiler). On a GPU it writes Triton kernels,
    which need the C compiler of the row above instead."""
    label = "C++ compiler"
    if m.cxx is not None:
        path, version = m.cxx
        return [Row("cxx", "Build tools", label, OK, f"{path}: {version}; torch.compile on the CPU builds with it")]
    if "cxx" in m.failed:
        reason, fix = f"cannot look for one: {m.failed['cxx']}", "pip install --force-reinstall torch"
        return [Row("cxx", "Build tools", label, WARN, reason, fix)]
    looked = f"looked for {m.env.get('CXX') or 'g++'} on PATH"
    if m.gpus:
        reason = f"none found ({looked}); only torch.compile on a CPU needs one (on a GPU it writes Triton kernels)"
        return [Row("cxx", "Build tools", label, SKIP, reason)]
    reason = f"none found ({looked}): torch.compile on the CPU needs one, so {CPU_COMPILE_USERS} stop before training"
    return [Row("cxx", "Build tools", label, WARN, reason, INSTALL)]


def check_ninja(m: Machine) -> list[Row]:
    """flash-attn builds in parallel only through ninja; a ninja whose --version fails is as bad as none."""
    path = shutil.which("ninja")
    slow = "flash-attn's README: without ninja the build uses one core and takes about 2 h"
    if path is None:
        return [
            Row("ninja", "Build tools", "ninja", SKIP, f"not installed; {NO_COMPILE} ({slow})", "pip install ninja")
        ]
    res = run([path, "--version"])
    if res is None or res[0] != 0:
        code = "hangs" if res is None else f"exits with {res[0]}"
        reason = f"{path}: `ninja --version` {code}; {slow}"
        return [Row("ninja", "Build tools", "ninja", WARN, reason, "pip uninstall -y ninja && pip install ninja")]
    return [Row("ninja", "Build tools", "ninja", OK, f"{res[1]} at {path}")]


def check_alloc_conf(m: Machine) -> list[Row]:
    env = m.env
    user = {k: env[k] for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF") if k in env}
    name = "PYTORCH_ALLOC_CONF"
    if not user:
        value = os.environ.get(name, "")
        reason = f"not set by you; every fasttune command sets {name}={value} (cuts fragmentation from packed batches)"
        return [
            Row("alloc_conf", "Resources", name, OK if m.gpus else SKIP, reason + ("" if m.gpus else "; CUDA only"))
        ]
    shown = ", ".join(f"{k}={v}" for k, v in user.items())
    if any(re.search(r"expandable_segments\s*:\s*true", v, re.I) for v in user.values()):
        return [Row("alloc_conf", "Resources", name, OK, f"{shown} (your setting, kept)")]
    reason = f"{shown}: your setting is kept, without expandable segments (more fragmentation, earlier OOM)"
    other = ",".join(v for v in user.values() if v)
    fix = f'export {name}="expandable_segments:True{"," + other if other else ""}"'
    return [Row("alloc_conf", "Resources", name, WARN if m.gpus else SKIP, reason, fix)]


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(m: Machine) -> list[Row]:
    """Runs write checkpoints (a 1.1B model is 2.2 GB per save in bf16) and models land in the HF cache."""
    hf = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    rows = []
    for key, label, path in (("disk", "disk (run dir)", Path.cwd()), ("disk_hf", "disk (HF cache)", hf)):
        where = _existing(path)
        free = shutil.disk_usage(where).free / 2**30
        reason = f"{free:.1f} GiB free at {where}"
        if free < 2:
            rows.append(
                Row(key, "Resources", label, FAIL, reason + ": a run's checkpoints will not fit", _disk_fix(key))
            )
        elif free < 20:
            rows.append(Row(key, "Resources", label, WARN, reason + ": room for few 1B checkpoints", _disk_fix(key)))
        else:
            rows.append(Row(key, "Resources", label, OK, reason))
    return rows


def _disk_fix(key: str) -> str:
    if key == "disk_hf":
        return "export HF_HOME=/path/on/a/bigger/disk  (or: hf cache delete)"
    return "free space, or pass --output-dir on a bigger disk and --training.keep-last 1"


def check_ram(m: Machine) -> list[Row]:
    total, avail = meminfo()
    cpus = os.cpu_count() or 1
    if avail is None:
        return [Row("ram", "Resources", "RAM", WARN, f"cannot read memory size; {cpus} CPUs")]
    reason = f"{avail:.1f} GiB available of {total:.1f} GiB, {cpus} CPUs"
    if avail < 4:
        fix = "close other programs; use a smaller --model.preset or --data.micro-batch-size"
        return [Row("ram", "Resources", "RAM", WARN, reason + ": loading a 1B model in fp32 takes 4.4 GB", fix)]
    return [Row("ram", "Resources", "RAM", OK, reason)]


def meminfo() -> tuple[float | None, float | None]:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {k: int(v.split()[0]) for k, v in info.items() if k in ("MemTotal", "MemAvailable")}
        return kib["MemTotal"] / 2**20, kib["MemAvailable"] / 2**20
    except (OSError, KeyError, ValueError):
        try:
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            return pages * size / 2**30, None
        except (ValueError, OSError, AttributeError):
            return None, None
