"""Attention checks: which SDPA kernels run here, flex/varlen, flash-attn 2/3/4, and what `auto` picks.

`gather` probes once and stores the results on the Machine; every check below is a pure function of it. Backend
availability comes from fasttune.attention (available / import_status / resolve), the same probes training uses, so
doctor and `auto` never disagree. Only the per-kernel SDPA probe lives here: the attention package tries kernels in
order but has no call that lists every kernel that runs.
"""

from __future__ import annotations

import logging
import traceback
import warnings

import torch
import torch.nn.functional as F

from fasttune.attention import BACKENDS, available, import_status, kernel_report, resolve
from fasttune.doctor.machine import Machine, major_minor, wheel_tag
from fasttune.doctor.report import FAIL, OK, SKIP, WARN, Row
from fasttune.errors import one_line

HEAD_DIM = 128  # the head dim of the measured kernel tables in docs/BENCHMARKS.md and of Llama-3-8B-class models
SDPA_KERNELS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
PACKAGES = ("triton", "liger_kernel", "peft", "torchao")  # optional packages behind the fast paths (doctor.packages)


def gather(m: Machine, run: bool = True, debug: bool = False) -> Machine:
    """Add the probe results to `m` (run=False, --quick: the backends checked statically, not probed; the SDPA kernel
    rows and auto's choice still launch tiny calls). A probe that crashes leaves its fact empty and its error in
    m.failed; the checks that read it fail with it, in their rows."""
    modules = (*(b.module for b in BACKENDS.values() if b.module), *PACKAGES)
    facts = (
        ("imports", lambda: {mod: import_status(mod) for mod in modules}),
        ("backends", lambda: available(m.device, m.dtype, HEAD_DIM, run=run)),  # sdpa's probe records its kernel
        ("sdpa_ran", lambda: sorted({k for tag, k in kernel_report().items() if tag.startswith("sdpa")})),
        ("sdpa_kernels", lambda: sdpa_kernel_runs(m.device, m.dtype, HEAD_DIM)),
        ("sdpa_default", lambda: sdpa_default(m.device, m.dtype, HEAD_DIM)),
        ("auto", lambda: auto_choice(m)),
    )
    m.probed = run
    for name, compute in facts:
        try:
            setattr(m, name, compute())
        except Exception as exc:  # noqa: BLE001 - a crashing probe is a finding, reported by the rows that need it
            if debug:
                traceback.print_exc()
            m.failed[name] = one_line(exc, 300, typed=True)
    return m


def _fact(m: Machine, name: str):
    if name in m.failed:
        raise RuntimeError(f"probing {name} failed: {m.failed[name]}")
    return getattr(m, name)


def fa4_install(m: Machine) -> str:
    """flash-attn-4's README asks for its cu13 extra with CUDA 13 for best performance."""
    cu13 = (major_minor(m.torch_cuda) or (0, 0))[0] >= 13
    return 'pip install "fasttune[fa4]"' + (' "flash-attn-4[cu13]"' if cu13 else "")


def sdpa_kernel_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, str | None]:
    """{SDPA kernel: None if a tiny causal fwd+bwd runs with only that kernel enabled, else torch's reason}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q_BHSD = torch.randn(1, 4, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    result: dict[str, str | None] = {}
    for name in SDPA_KERNELS:
        # torch explains a rejected kernel in UserWarnings and then raises a generic "No viable backend".
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    F.scaled_dot_product_attention(q_BHSD, q_BHSD, q_BHSD, is_causal=True).float().sum().backward()
                result[name] = None
            except Exception as exc:  # noqa: BLE001 - a kernel that does not run is a finding
                said = [" ".join(str(w.message).split()) for w in caught if "not used because" in str(w.message)]
                said = said or [" ".join(str(w.message).split()) for w in caught]
                result[name] = "; ".join(said[:2])[:300] or one_line(exc, 300)
    return result


def sdpa_default(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel PyTorch's own priority picks for a causal call (torch._fused_sdp_choice), or 'unknown'."""
    from torch.nn.attention import SDPBackend

    q_BHSD = torch.randn(1, 4, 64, head_dim, device=device, dtype=dtype)
    try:
        return SDPBackend(torch._fused_sdp_choice(q_BHSD, q_BHSD, q_BHSD, is_causal=True)).name
    except Exception:  # noqa: BLE001 - private API: absent or changed in some torch versions
        return "unknown"


def _dtype_name(m: Machine) -> str:
    return str(m.dtype).removeprefix("torch.")


def check_sdpa_kernels(m: Machine) -> list[Row]:
    where = f"{m.device.type} {_dtype_name(m)} D{HEAD_DIM}"
    rows = []
    for name, why in _fact(m, "sdpa_kernels").items():
        label = f"sdpa {name.removesuffix('_ATTENTION').lower()}"
        if why is None:
            rows.append(Row(f"sdpa.{name}", "Attention", label, OK, f"tiny causal fwd+bwd runs ({where})"))
        elif name == "MATH":
            rows.append(Row(f"sdpa.{name}", "Attention", label, FAIL, why, "reinstall torch: " + _torch_hint(m)))
        elif not m.gpus and name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            rows.append(Row(f"sdpa.{name}", "Attention", label, SKIP, "CUDA-only kernel; no GPU here"))
        elif not m.gpus or m.cc < (8, 0):
            rows.append(Row(f"sdpa.{name}", "Attention", label, SKIP, f"does not run here ({where}): {why}"))
        else:
            fix = f"none needed: fasttune's sdpa falls back to the next kernel; to regain this one: {_torch_hint(m)}"
            rows.append(Row(f"sdpa.{name}", "Attention", label, WARN, f"fails on this GPU ({where}): {why}", fix))
    return rows


def _torch_hint(m: Machine) -> str:
    from fasttune.doctor.system import torch_install

    return torch_install(m)


def check_sdpa_default(m: Machine) -> list[Row]:
    """What torch picks by itself versus what fasttune's sdpa backend ran in its probe (it tries cuDNN first)."""
    picked = m.sdpa_default
    reason = f"PyTorch's own priority picks {picked} for a causal {_dtype_name(m)} D{HEAD_DIM} call"
    if m.sdpa_ran:
        reason += f"; fasttune's sdpa backend ran {', '.join(m.sdpa_ran)}"
    if m.family in ("hopper", "blackwell") and picked != "CUDNN_ATTENTION":
        reason += " (fasttune tries cuDNN first: 1.7x FLASH fwd+bwd at 4k on H100, docs/BENCHMARKS.md)"
    return [Row("sdpa.default", "Attention", "sdpa default", OK, reason)]


def check_flex_varlen(m: Machine) -> list[Row]:
    reasons = _backends(m)
    rows = []
    for name, label in ((b.name, b.label) for b in BACKENDS.values() if (b.module or "").startswith("torch.")):
        why = reasons[name]
        if why is None:
            how = "runs a tiny packed fwd+bwd" if m.probed else "available (static check, --quick)"
            status = OK if m.gpus or name != "flex_attention" else SKIP
            extra = "" if m.gpus else "; unfused on CPU, so fasttune uses it on CUDA only"
            rows.append(Row(name, "Attention", label, status, how + extra))
        elif not m.gpus or "compute capability" in why:
            rows.append(Row(name, "Attention", label, SKIP, why))
        else:
            rows.append(Row(name, "Attention", label, WARN, why, _flex_varlen_fix(m, why)))
    return rows


def _flex_varlen_fix(m: Machine, why: str) -> str:
    if "too old" in why:
        return _torch_hint(m)
    if "triton" in why.lower():
        from fasttune.doctor.packages import pinned_triton

        return f'pip install "{pinned_triton()}"'
    if "C compiler" in why:
        return "apt-get install gcc  (triton builds a C launcher at first use)"
    return "run `fasttune doctor --debug`; the error above comes from a tiny fwd+bwd on this GPU"


def _backends(m: Machine) -> dict[str, str | None]:
    return _fact(m, "backends")


def check_backends(m: Machine) -> list[Row]:
    reasons = _backends(m)
    usable = [n for n, why in reasons.items() if why is None]
    reason = f"usable here ({m.device.type}, {_dtype_name(m)}, D{HEAD_DIM}): {', '.join(usable)}"
    return [Row("backends", "Attention", "attention backends", OK, reason)]


def auto_choice(m: Machine) -> dict[str, str]:
    """What `attn_implementation="auto"` resolves to here, packed (fasttune's default) and padded."""
    quiet = logging.getLogger("fasttune")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # resolve() logs its choice; doctor prints it in the closing line instead
    try:
        packed = resolve("auto", device=m.device, dtype=m.dtype, head_dim=HEAD_DIM, packed=True)
        padded = resolve("auto", device=m.device, dtype=m.dtype, head_dim=HEAD_DIM, packed=False)
    finally:
        quiet.setLevel(level)
    return {"packed": packed.name, "padded": padded.name, "reason": packed.reason}


def closing_line(m: Machine) -> str:
    """The closing line of the report: what `auto` picks here and why."""
    _fact(m, "auto")
    where = f"{m.gpus[0].name if m.gpus else 'CPU'}, {_dtype_name(m)}, head dim {HEAD_DIM}"
    line = f"attn_implementation='auto' picks '{m.auto['packed']}' here for packed batches"
    line += "" if m.auto["padded"] == m.auto["packed"] else f" ('{m.auto['padded']}' when padded)"
    return f"{line} ({where}): {m.auto['reason']}."


def check_flash_attn(m: Machine) -> list[Row]:
    """One row per backend that comes from a pip package (the flash-attn family)."""
    return [_flash_row(m, b.name, b.label, b.module, b.dists) for b in BACKENDS.values() if b.dists]


def _flash_row(m: Machine, backend: str, label: str, module: str, dists: tuple[str, ...]) -> Row:
    version = m.version(*dists)
    why = m.import_status(module)
    if why and why.startswith("package not installed"):
        return _missing_row(m, backend, label)
    if why:
        reason, fix = _import_failure(m, backend, module, why)
        return Row(backend, "Attention", label, FAIL, reason, fix)
    shown = f"{version or 'unknown version'} imports ({module})"
    if not m.gpus:
        return Row(backend, "Attention", label, SKIP, f"{shown}; runs only on a CUDA GPU")
    runs = _backends(m)[backend]
    if runs is None:
        return Row(backend, "Attention", label, OK, shown + ("; runs a tiny packed fwd+bwd" if m.probed else ""))
    if "compute capability" in runs or "head dim" in runs or "dtype" in runs:
        return Row(backend, "Attention", label, SKIP, f"{shown}; {runs}")
    return Row(backend, "Attention", label, FAIL, f"{shown} but {runs}", _reinstall(m, backend))


def _missing_row(m: Machine, backend: str, label: str) -> Row:
    fam = m.family
    if backend == "flash_attention_4":
        if fam in ("hopper", "blackwell"):
            why = "not installed: the fastest attention on this GPU, a pip wheel with no compiler (docs/BENCHMARKS.md)"
            return Row(backend, "Attention", label, WARN, why, fa4_install(m))
        return Row(backend, "Attention", label, SKIP, "not installed; flash-attn 4 supports Hopper/Blackwell only")
    if backend == "flash_attention_3":
        why = "not installed; built from source (flash-attention/hopper) for Hopper only"
        if fam in ("hopper", "blackwell"):
            why += "; flash-attn 4 covers this GPU with a pip wheel instead"
        return Row(backend, "Attention", label, SKIP, why)
    why = "not installed; sdpa runs the same FlashAttention-2 algorithm inside torch, no build needed"
    return Row(backend, "Attention", label, SKIP, why)


def _import_failure(m: Machine, backend: str, module: str, why: str) -> tuple[str, str]:
    """Reason and fix for a package that is installed but does not import; 'undefined symbol' is an ABI mismatch."""
    if "undefined symbol" not in why:
        return f"installed but `import {module}` fails: {why}", _reinstall(m, backend)
    py = f"{m.python[0]}.{m.python[1]}"
    why = why.removesuffix("; reinstall a build made for this torch")  # the fix column says how
    need = (
        f"{why}. The compiled extension was built for another torch/CUDA/Python/C++ ABI; one that loads here must "
        f"match torch {m.torch_version.split('+')[0]}, CUDA {m.torch_cuda}, Python {py} and "
        f"torch._C._GLIBCXX_USE_CXX11_ABI={m.cxx11_abi}"
    )
    if backend == "flash_attention_2":
        need += f" (a prebuilt wheel named flash_attn-<version>{wheel_tag(m)}.whl)"
    if backend == "flash_attention_4":
        need += "; flash-attn-4 itself is pure Python, so the symbol is missing in a compiled package it imports"
    return need, _reinstall(m, backend)


def _reinstall(m: Machine, backend: str) -> str:
    """Rebuild against this torch; --no-cache-dir because pip would reuse the wheel it built for the old torch."""
    fa4 = m.family in ("hopper", "blackwell")
    if backend == "flash_attention_2":
        rebuild = "pip uninstall -y flash-attn && MAX_JOBS=4 pip install flash-attn --no-build-isolation --no-cache-dir"
        return rebuild + (
            f"; or, no compiler needed on this GPU: pip uninstall -y flash-attn && {fa4_install(m)}" if fa4 else ""
        )
    if backend == "flash_attention_3":
        rebuild = "cd flash-attention/hopper && MAX_JOBS=4 pip install . --no-build-isolation --no-cache-dir"
        return rebuild + (f"; or use flash-attn 4: {fa4_install(m)}" if fa4 else "")
    # Reinstalling through the extra lets pip resolve the versions of the CuTe DSL packages flash-attn-4 pins.
    fix = f"pip uninstall -y flash-attn-4 && {fa4_install(m).replace('pip install', 'pip install --no-cache-dir')}"
    return fix + "; if a broken flash-attn 2 shares the flash_attn package: pip uninstall -y flash-attn"
