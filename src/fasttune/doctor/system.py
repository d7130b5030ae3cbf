"""Checks of the Python environment, torch build, GPU and driver.

Each `check_*` takes the `Machine` and returns rows; it may raise, `report.run_check` turns that into a fail row.
"""

from __future__ import annotations

import os
import sys

from fasttune.doctor.machine import Machine, major_minor, run
from fasttune.doctor.report import FAIL, OK, SKIP, WARN, Row

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 11)
MIN_TRANSFORMERS = (5, 17)


def torch_index(m: Machine) -> str:
    """The PyTorch wheel index whose CUDA the driver runs: newest the driver supports (nvidia-smi), else cu130."""
    driver = major_minor(m.smi.get("cuda"))
    for tag, need in (("cu130", (13, 0)), ("cu128", (12, 8)), ("cu126", (12, 6))):
        if driver is None or driver >= need:
            return f"https://download.pytorch.org/whl/{tag}"
    return "https://download.pytorch.org/whl/cu126"


def torch_install(m: Machine) -> str:
    return f'pip install -U "torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}" --index-url {torch_index(m)}'


def check_python(m: Machine) -> list[Row]:
    version = ".".join(map(str, m.python))
    in_env = sys.prefix != sys.base_prefix or bool(os.environ.get("CONDA_PREFIX"))
    where = f"{sys.executable}" + ("" if in_env else " (system Python, not a virtual environment)")
    if m.python[:2] < MIN_PYTHON:
        fix = "python3.12 -m venv .venv && . .venv/bin/activate && pip install -e ."
        return [Row("python", "Python", "Python", FAIL, f"{version} at {where}; fasttune needs >= 3.11", fix)]
    if not in_env:
        fix = "python3 -m venv .venv && . .venv/bin/activate && pip install -e .  (keeps system packages intact)"
        return [Row("python", "Python", "Python", WARN, f"{version} at {where}", fix)]
    return [Row("python", "Python", "Python", OK, f"{version} at {where}")]


def check_pip(m: Machine) -> list[Row]:
    """`pip check`: a half-upgraded environment (the usual broken venv) shows as unmet requirements here."""
    res = run([sys.executable, "-m", "pip", "check"], timeout=60)
    if res is None or "No module named pip" in res[1]:
        return [Row("pip_check", "Python", "pip check", SKIP, "pip is not installed in this environment (uv venv?)")]
    code, text = res
    if code == 0:
        return [Row("pip_check", "Python", "pip check", OK, "no broken requirements")]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    reason = f"{len(lines)} broken requirement(s): " + "; ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")
    fix = (
        "pip install the packages named above at the required versions, or recreate the venv (docs/TROUBLESHOOTING.md)"
    )
    return [Row("pip_check", "Python", "pip check", WARN, reason, fix)]


def check_torch(m: Machine) -> list[Row]:
    build = f"CUDA {m.torch_cuda} build" if m.torch_cuda else "CPU-only build"
    reason = f"{m.torch_version}, {build}, C++11 ABI {m.cxx11_abi}"
    if (major_minor(m.torch_version) or (0, 0)) < MIN_TORCH:
        return [Row("torch", "Python", "torch", FAIL, f"{reason}; fasttune needs >= 2.11", torch_install(m))]
    return [Row("torch", "Python", "torch", OK, reason)]


def check_transformers(m: Machine) -> list[Row]:
    version = m.version("transformers")
    if version is None:
        return [
            Row("transformers", "Python", "transformers", FAIL, "not installed", 'pip install "transformers>=5.17"')
        ]
    if (major_minor(version) or (0, 0)) < MIN_TRANSFORMERS:
        reason = f"{version}; fasttune needs >= 5.17 (attention registry and packed-batch kwargs)"
        return [Row("transformers", "Python", "transformers", FAIL, reason, 'pip install -U "transformers>=5.17"')]
    return [Row("transformers", "Python", "transformers", OK, version)]


def check_cuda(m: Machine) -> list[Row]:
    """torch's CUDA build and cuDNN against what the machine has: the CPU-wheel-on-a-GPU-box trap comes first."""
    gpu_here = m.smi.get("name")
    if m.torch_cuda is None:
        if gpu_here:
            reason = f"torch {m.torch_version} is a CPU-only build but this machine has a {gpu_here}"
            return [Row("cuda", "CUDA", "torch CUDA build", FAIL, reason, torch_install(m))]
        return [Row("cuda", "CUDA", "torch CUDA build", SKIP, "CPU-only torch and no NVIDIA GPU: training runs on CPU")]
    found = f"torch built with CUDA {m.torch_cuda}, cuDNN {_cudnn(m.cudnn)}"
    if m.cuda_available:
        return [Row("cuda", "CUDA", "torch CUDA build", OK, f"{found}; {len(m.gpus)} GPU(s) visible")]
    if not gpu_here:
        return [Row("cuda", "CUDA", "torch CUDA build", SKIP, f"{found}; no NVIDIA GPU or driver here (nvidia-smi)")]
    driver = major_minor(m.smi.get("cuda"))
    if driver and driver < (major_minor(m.torch_cuda) or (0, 0)):
        reason = f"{found}, but the driver {m.smi.get('driver')} supports only CUDA {m.smi['cuda']}: torch sees no GPU"
        fix = f"upgrade the NVIDIA driver, or install a torch for CUDA {m.smi['cuda']}: {torch_install(m)}"
        return [Row("cuda", "CUDA", "torch CUDA build", FAIL, reason, fix)]
    why = m.cuda_error or "torch.cuda.is_available() is False"
    fix = "check CUDA_VISIBLE_DEVICES and that nvidia-smi works in this shell/container (--gpus all)"
    return [Row("cuda", "CUDA", "torch CUDA build", FAIL, f"{found}; GPU {gpu_here} present but {why}", fix)]


def _cudnn(v: int | None) -> str:
    """cuDNN 9 reports 91900 for 9.19.0."""
    if not v:
        return "not available"
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 90000 else str(v)


def check_gpu(m: Machine) -> list[Row]:
    if not m.gpus:
        return [Row("gpu", "CUDA", "GPU", SKIP, "no CUDA GPU visible to torch: fasttune runs on CPU (quick preset)")]
    g = m.gpus[0]
    more = f" (+{len(m.gpus) - 1} more)" if len(m.gpus) > 1 else ""
    reason = f"{g.name}{more}, compute capability {g.cc[0]}.{g.cc[1]} ({m.family}), {g.total_gib:.1f} GiB"
    arches = m.arch_list
    sm = g.cc[0] * 10 + g.cc[1]
    ptx = [int(a.split("_")[1].rstrip("af")) for a in arches if a.startswith("compute_")]
    if arches and f"sm_{sm}" not in arches and not any(p <= sm for p in ptx):
        why = f"{reason}; torch {m.torch_version} ships no kernels for sm_{sm} (built for {' '.join(arches)})"
        return [Row("gpu", "CUDA", "GPU", FAIL, why, torch_install(m))]
    return [Row("gpu", "CUDA", "GPU", OK, reason)]


def check_distributed(m: Machine) -> list[Row]:
    """Several GPUs: what `torchrun` (DDP / --training.fsdp) would use here."""
    name = "multi-GPU (torchrun)"
    if not m.distributed:
        why = f"torch {m.torch_version} was built without torch.distributed: one process only"
        return [Row("distributed", "CUDA", name, WARN if len(m.gpus) > 1 else SKIP, why, torch_install(m))]
    if len(m.gpus) < 2:
        why = f"{len(m.gpus)} GPU visible: one process (CPU ranks with gloo work for tests)"
        return [Row("distributed", "CUDA", name, SKIP, why)]
    version = m.nccl
    if not version:
        why = f"{len(m.gpus)} GPUs but torch has no NCCL: multi-GPU training would fall back to slow gloo"
        return [Row("distributed", "CUDA", name, WARN, why, torch_install(m))]
    why = f"{len(m.gpus)} GPUs, NCCL {version}: torchrun --nproc_per_node {len(m.gpus)} main.py --experiment full"
    return [Row("distributed", "CUDA", name, OK, why)]


def check_driver(m: Machine) -> list[Row]:
    if not m.smi:
        if not m.gpus:
            return [Row("driver", "CUDA", "NVIDIA driver", SKIP, "no NVIDIA driver (nvidia-smi not found)")]
        reason = "nvidia-smi not found, so the driver's CUDA version cannot be compared with torch's"
        fix = "put nvidia-smi on PATH (it ships with the driver; in containers use the NVIDIA Container Toolkit)"
        return [Row("driver", "CUDA", "NVIDIA driver", WARN, reason, fix)]
    reason = f"driver {m.smi.get('driver', '?')}, supports CUDA <= {m.smi.get('cuda', '?')}"
    driver, built = major_minor(m.smi.get("cuda")), major_minor(m.torch_cuda)
    if driver and built and driver < built and m.cuda_available:
        # Minor-version compatibility lets torch run, but kernels compiled at run time for the newer CUDA do not.
        why = f"{reason}, older than torch's CUDA {m.torch_cuda}: JIT-compiled kernels (triton, flash-attn-4) may fail"
        fix = f"upgrade the NVIDIA driver to one for CUDA {m.torch_cuda}, or {torch_install(m)}"
        return [Row("driver", "CUDA", "NVIDIA driver", WARN, why, fix)]
    return [Row("driver", "CUDA", "NVIDIA driver", OK, reason)]
