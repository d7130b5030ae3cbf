"""Availability probes: is a backend usable for this device, dtype and head dim, and if not, why.

Probes never raise: they return None (usable) or a one-line reason. `doctor` calls these same functions.
Static checks come first (package, import, torch version, GPU capability, dtype, head dim); then, before first
use, a tiny forward+backward through fasttune's own attention function on the real device and dtype, so a kernel
that imports but fails to run counts as unavailable, with its error.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from fasttune.attention import state
from fasttune.attention.backends import BACKENDS, Backend
from fasttune.attention.dispatch import attention_forward


def explain_import_error(exc: BaseException) -> str:
    """One line saying why an import failed, naming ABI mismatches as such."""
    text = " ".join(str(exc).split())
    if "undefined symbol" in text:
        return (
            f"ABI mismatch between torch {torch.__version__} and the compiled extension ({text}); "
            "reinstall a build made for this torch"
        )
    if isinstance(exc, ModuleNotFoundError):
        return f"package not installed (no module '{exc.name}')"
    return f"import failed: {type(exc).__name__}: {text}"


@state.cache
def import_status(module_name: str) -> str | None:
    """None if `module_name` imports cleanly, else the reason (missing package, ABI mismatch, import error)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:  # a dotted name whose parent is missing or broken
        return explain_import_error(exc)
    if spec is None:
        hint = next((b.pip for b in BACKENDS.values() if b.module == module_name and b.pip), None)
        return f"package not installed (no module '{module_name}')" + (f"; pip install {hint}" if hint else "")
    try:
        importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason, never a crash
        return explain_import_error(exc)
    return None


def static_reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Reason `name` cannot run here without running anything, or None."""
    needs = BACKENDS[name]
    if needs.cuda and device.type != "cuda":
        return f"needs a CUDA GPU (device is {device.type})"
    if needs.cuda and not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if needs.module and (why := import_status(needs.module)):
        if needs.module.startswith("torch."):
            return f"torch {torch.__version__} too old ({why})"
        return why
    if needs.cuda:
        cc = torch.cuda.get_device_capability(device)
        if not needs.min_cc <= cc <= needs.max_cc:
            return f"GPU compute capability {cc[0]}.{cc[1]} outside the supported {_cc_range(needs)}"
    if needs.dtypes is not None and dtype not in needs.dtypes:
        shown = " or ".join(str(t).removeprefix("torch.") for t in needs.dtypes)
        return f"dtype {str(dtype).removeprefix('torch.')} unsupported (needs {shown})"
    if needs.max_head_dim is not None and head_dim > needs.max_head_dim:
        return f"head dim {head_dim} unsupported (max {needs.max_head_dim})"
    return None


def _cc_range(needs: Backend) -> str:
    low = f"{needs.min_cc[0]}.{needs.min_cc[1]}"
    return f">= {low}" if needs.max_cc == (99, 99) else f"{low}..{needs.max_cc[0]}.x"


def probe(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if backend `name` runs forward+backward here (static checks, then a tiny real call), else why not."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    return _probe(name, str(device), dtype, head_dim)


@state.cache
def _probe(name: str, device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    reason = static_reason(name, torch.device(device), dtype, head_dim)
    if reason is None:
        reason = smoke_test(name, torch.device(device), dtype, head_dim)
    return reason


def smoke_test(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Forward+backward of a tiny packed GQA call through fasttune's attention function; None or the error.
    Grad mode is forced on: a probe can first run inside a forward under no_grad/inference_mode (auto's lazy plan),
    and the caller's grad mode must not make a backend look unusable (the result is cached)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _smoke_test(name, device, dtype, head_dim)


def _smoke_test(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q_BHSD = torch.randn(1, 4, 48, head_dim, generator=gen).to(device, dtype).requires_grad_()
    k_BKLD = torch.randn(1, 2, 48, head_dim, generator=gen).to(device, dtype).requires_grad_()
    v_BKLD = torch.randn(1, 2, 48, head_dim, generator=gen).to(device, dtype).requires_grad_()
    cu = torch.tensor([0, 17, 48], dtype=torch.int32, device=device)
    try:
        packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=31, max_length_k=31)
        out_BSHD, _ = attention_forward(name, None, q_BHSD, k_BKLD, v_BKLD, None, **packed)
        out_BSHD.float().square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a failing kernel is a reason, never a crash
        return (
            f"fails a tiny forward+backward on {device} {str(dtype).removeprefix('torch.')}: "
            + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        )
    grads = (q_BHSD.grad, k_BKLD.grad, v_BKLD.grad)
    if not torch.isfinite(out_BSHD).all() or any(g is None or not torch.isfinite(g).all() for g in grads):
        return f"gives non-finite output or gradients on {device} {dtype}"
    return None
