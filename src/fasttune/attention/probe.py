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
from fasttune.attention.state import STATE
from fasttune.errors import one_line


def explain_import_error(exc: BaseException) -> str:
    """One line saying why an import failed, naming ABI mismatches as such."""
    text = one_line(exc)
    if "undefined symbol" in text:
        return (
            f"ABI mismatch between torch {torch.__version__} and the compiled extension ({text}); "
            "reinstall a build made for this torch"
        )
    if isinstance(exc, ModuleNotFoundError):
        return f"package not installed (no module '{exc.name}')"
    return f"import failed: {one_line(exc, typed=True)}"


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
    if device.type == "cpu" and not needs.cpu_backward:
        return f"no backward on CPU in torch {torch.__version__} (forward only there; it trains on a CUDA GPU)"
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


# Under torch.compile a probe first runs inside a compiled layer (auto's lazy plan, sdpa's varlen route on CUDA): it
# runs eagerly there (dynamo met its .item() and lru_cache); _disable_dynamo imports dynamo on the first call only
@torch._disable_dynamo
def probe(
    name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int, softcap: bool = False
) -> str | None:
    """None if backend `name` runs forward+backward here (static checks, then a real call at a training shape;
    softcap=True: with a logit softcap, as Gemma 2 uses), else why not. Cached per arguments."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    return _probe(name, str(device), dtype, head_dim, softcap)


@state.cache
def _probe(name: str, device: str, dtype: torch.dtype, head_dim: int, softcap: bool) -> str | None:
    reason = static_reason(name, torch.device(device), dtype, head_dim)
    if reason is None:
        reason = smoke_test(name, torch.device(device), dtype, head_dim, softcap)
    if reason and name == "flex_attention" and "cuda" in device and not STATE.flex_expand_kv:
        # compiled GQA flex may find no kernel config at a training shape (NoValidChoicesError, H200, torch 2.11):
        # retry with kv heads expanded (plain MHA kernels), and keep that mode when it runs
        STATE.flex_expand_kv = True
        retry = smoke_test(name, torch.device(device), dtype, head_dim, softcap)
        if retry is None:
            return None
        STATE.flex_expand_kv = False
        reason += f"; with kv heads expanded: {retry.split(': ', 1)[-1]}"
    return reason


def smoke_test(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, softcap: bool = False) -> str | None:
    """Forward+backward through fasttune's attention function; None or the error. Grad mode is forced on: a probe
    can first run inside a forward under no_grad/inference_mode (auto's lazy plan), and the caller's grad mode must
    not make a backend look unusable (the result is cached)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _smoke_test(name, device, dtype, head_dim, softcap)


# On CUDA the probe runs at a training shape, GQA 8 query / 2 kv heads and 2k tokens, packed and as dense rows:
# compiled flex passed a 48-token probe and then failed at 8/2 heads, D64 (InductorError NoValidChoicesError, H200,
# torch 2.11); on CPU a tiny shape keeps the probe cheap (eager materialises the scores).
SHAPES = {"cuda": (8, 2, (0, 700, 1500, 2048)), "cpu": (4, 2, (0, 17, 48))}


def _smoke_test(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, softcap: bool) -> str | None:
    heads, kv_heads, cu_list = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    total = cu_list[-1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q_BHSD = torch.randn(1, heads, total, head_dim, generator=gen).to(device, dtype).requires_grad_()
    k_BKLD = torch.randn(1, kv_heads, total, head_dim, generator=gen).to(device, dtype).requires_grad_()
    v_BKLD = torch.randn(1, kv_heads, total, head_dim, generator=gen).to(device, dtype).requires_grad_()
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(cu_list, cu_list[1:], strict=False))
    extra = dict(softcap=30.0) if softcap else {}
    calls = [(None, dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest))]
    if device.type == "cuda":
        calls.append((2, {}))  # dense rows: the causal BlockMask / dense kernel path
    outs = []
    shape = f"{heads} query / {kv_heads} kv heads, {total} tokens, D{head_dim}" + (", softcap" if softcap else "")
    try:
        for rows, kwargs in calls:
            qkv = (q_BHSD, k_BKLD, v_BKLD) if rows is None else (_rows(x, rows) for x in (q_BHSD, k_BKLD, v_BKLD))
            out_BSHD, _ = attention_forward(name, None, *qkv, None, scaling=head_dim**-0.5, **kwargs, **extra)
            out_BSHD.float().square().sum().backward()
            outs.append(out_BSHD.detach().reshape(total, heads, head_dim))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a failing kernel is a reason, never a crash
        where = f"{device} {str(dtype).removeprefix('torch.')}"
        return f"fails a forward+backward ({shape}) on {where}: {one_line(exc, 300, typed=True)}"
    grads = (q_BHSD.grad, k_BKLD.grad, v_BKLD.grad)
    if any(not torch.isfinite(o).all() for o in outs) or any(g is None or not torch.isfinite(g).all() for g in grads):
        return f"gives non-finite output or gradients on {device} {dtype}"
    documents = [cu_list, [0, total // 2, total]][: len(calls)]  # dense rows are documents of half the tokens each
    err = _error_against_reference(q_BHSD, k_BKLD, v_BKLD, documents, outs, 30.0 if softcap else None)
    if err > WRONG:
        # a kernel can run and be wrong (flash-attn-4 4.0.0b36 at D8 with GQA, H200: gradients off by ~100%); a
        # backend that trains another model than eager's is unusable, never a silent choice
        return f"gives wrong results ({shape}): relative error {err:.2g} against a float32 reference (limit {WRONG})"
    return None


WRONG = 0.05  # relative error of output or gradients that counts as wrong; bf16 kernels measure <= 1e-2 here


def _error_against_reference(q_BHSD, k_BKLD, v_BKLD, documents, outs, softcap) -> float:
    """Largest relative error (norm) of the calls' outputs and the accumulated q/k/v gradients against a float32
    causal attention of each document alone, given the same loss (sum of squared outputs, every call)."""
    q, k, v = (x.detach().float()[0].requires_grad_() for x in (q_BHSD, k_BKLD, v_BKLD))
    rep = q.shape[0] // k.shape[0]
    refs = []
    for cu in documents:
        parts = []
        for a, b in zip(cu, cu[1:], strict=False):
            s = q[:, a:b] @ k[:, a:b].repeat_interleave(rep, 0).transpose(-1, -2) * q.shape[-1] ** -0.5
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            causal = torch.ones(b - a, b - a, dtype=torch.bool, device=s.device).tril()
            parts.append(torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[:, a:b].repeat_interleave(rep, 0))
        refs.append(torch.cat(parts, 1).transpose(0, 1))  # (T, H, D)
    sum(r.square().sum() for r in refs).backward()

    def rel(got, want):
        return float((got.float() - want).norm() / want.norm().clamp_min(1e-12))

    errs = [rel(o, r.detach()) for o, r in zip(outs, refs, strict=True)]
    errs += [rel(g[0], w.grad) for g, w in zip((q_BHSD.grad, k_BKLD.grad, v_BKLD.grad), (q, k, v), strict=True)]
    return max(errs)


def _rows(x_1HTD: torch.Tensor, rows: int) -> torch.Tensor:
    """(1, H, T, D) -> (rows, H, T/rows, D)."""
    _, h, t, d = x_1HTD.shape
    return x_1HTD.view(h, rows, t // rows, d).transpose(0, 1)
