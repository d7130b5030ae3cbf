"""Liger's kernels on one model, not on the process.

Liger (liger_kernel.transformers.monkey_patch, 0.8.5) patches the model instance it is given, and also globals that
every later model reads: the RMSNorm and MLP classes of the architecture's transformers module (every model of that
architecture built afterwards in the process gets Liger's kernels), the CausalLM class's forward where it patches no
instance, and, for some architectures, torch.nn.functional.cross_entropy and torch.nn.LayerNorm. Found on an H200: a
model built after a Liger run in the same process (a test's HF reference, a user's own model in a notebook) silently
carried Liger's norms and MLP, and a CPU model ran into Liger's RoPE kernel (a Triton error). `apply` keeps the patches
to the model: what Liger changed is put back, except the RoPE functions, which the model's attention looks up in its
module at every call: they stay patched module-wide, as Liger leaves them, but run Liger's kernel on CUDA tensors only
and the function they replaced on others. `globals_restored` puts those back too, for a benchmark's plain-HF rows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
from types import MethodType

import torch

_TORCH_GLOBALS = ((torch.nn.functional, "cross_entropy"), (torch.nn, "LayerNorm"))


def _modeling_modules() -> list:
    return [m for name, m in list(sys.modules.items()) if m is not None and name.startswith("transformers.models.")
            and ".modeling_" in name]  # fmt: skip


def _snapshot() -> tuple[dict, dict, dict]:
    modules = {m: dict(vars(m)) for m in _modeling_modules()}
    forwards = {v: v.__dict__["forward"] for d in modules.values() for v in d.values()
                if isinstance(v, type) and "forward" in v.__dict__}  # fmt: skip
    torch_globals = {(owner, name): getattr(owner, name) for owner, name in _TORCH_GLOBALS}
    return modules, forwards, torch_globals


def _called_at_run_time(name: str) -> bool:
    """Module functions the model's own code looks up at each call (`apply_rotary_pos_emb`, the multimodal ones)."""
    return "rotary" in name or "rope" in name


def _on_cuda_only(patched, plain):
    """Liger's RoPE for CUDA tensors, the function it replaced for the others (a CPU model later in the process)."""
    plain = getattr(plain, "plain", plain)

    @functools.wraps(patched)
    def rope(q, *args, **kwargs):
        return (patched if q.is_cuda else plain)(q, *args, **kwargs)

    rope.plain = plain
    return rope


def _restore(snapshot: tuple[dict, dict, dict], model=None) -> None:
    modules, forwards, torch_globals = snapshot
    for module, before in modules.items():
        for name, value in before.items():
            now = vars(module).get(name)
            if now is value:
                continue
            kept = model is not None and _called_at_run_time(name) and callable(now)
            setattr(module, name, _on_cuda_only(now, value) if kept else value)
    for cls, forward in forwards.items():
        patched = cls.__dict__.get("forward")
        if patched is forward:
            continue
        for sub in model.modules() if model is not None else ():
            if isinstance(sub, cls) and "forward" not in vars(sub):
                sub.forward = MethodType(patched, sub)  # the class-wide patch, kept to this model
        cls.forward = forward
    for (owner, name), value in torch_globals.items():
        setattr(owner, name, value)


class _OtherBackends(logging.Filter):
    """Liger 0.8.5 imports its kernels' backends for every kind of device on a kernel's first use and warns for each
    that fails. On an H200 with triton 3.6 every run with Liger printed two such lines: its Huawei Ascend backend
    ("cannot import name 'tanh'"; fasttune never runs Liger on an NPU) and its optional CuTe DSL backend, when
    nvidia-cutlass-dsl is not installed (the Triton kernels run). Those records are dropped; any other backend's
    failure (Triton's) still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = args[0] if args and isinstance(args[0], str) else ""
        not_installed = len(args) > 2 and args[2] in ("ImportError", "ModuleNotFoundError")
        return not ("._ascend." in path or ("._cutedsl." in path and not_installed))


_QUIET = _OtherBackends()


def quiet_other_backends() -> None:
    logging.getLogger("liger_kernel.backends.registry").addFilter(_QUIET)  # the same filter once, however often


def apply(model, **kwargs) -> None:
    """Liger's kernels for `model` (liger_kernel's `_apply_liger_kernel_to_instance`, `kwargs` passed on), the rest of
    the process left as it was but for the RoPE functions."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    quiet_other_backends()
    snapshot = _snapshot()
    try:
        _apply_liger_kernel_to_instance(model=model, **kwargs)
    finally:
        _restore(snapshot, model)


@contextlib.contextmanager
def globals_restored(*modules: str):
    """Every global Liger may patch (RoPE functions included) as it was before the block: a benchmark's plain-HF
    configurations after one with Liger. `modules`: modeling modules to import first (one imported inside the block
    is not restored)."""
    for name in modules:
        importlib.import_module(name)
    snapshot = _snapshot()
    try:
        yield
    finally:
        _restore(snapshot)
