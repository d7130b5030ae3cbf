"""Attention backends for Hugging Face causal LMs, registered into transformers by name.

Backends (one signature, transformers' attention-function signature): eager, sdpa, flex_attention, varlen
(torch.nn.attention.varlen.varlen_attn), flash_attention_2, flash_attention_3, flash_attention_4 (pip
flash-attn-4, module flash_attn.cute), plus "auto". Each is registered into `AttentionInterface` and
`AttentionMaskInterface` under its own attn_implementation string (e.g. "fasttune_varlen").

Public API:

    available(device=None, dtype=None, head_dim=128, run=False) -> dict[str, str | None]
        backend -> None (usable here) or the reason it is not.
    register() -> dict[str, str]
        registers every backend; fasttune name -> attn_implementation string.
    resolve(requested, *, device, dtype, head_dim, packed, strict=False, model_config=None, measure=False) -> Resolved
        Resolved(name, hf_name, reason). An unusable request logs one warning (logger "fasttune") naming the
        reason and the backend used instead; strict=True raises FasttuneError listing what is usable and why
        the rest is not. "auto" picks the fastest usable backend and logs why.
    probe(name, device, dtype, head_dim) -> str | None     (fasttune.attention.probe; used by `doctor`)
    import_status(module) -> str | None, explain_import_error(exc) -> str   (fasttune.attention.probe)
    kernel_report() -> dict[str, str]
        which kernel actually ran per call site, e.g. {"sdpa/dense bf16 D128": "CUDNN_ATTENTION"}.
    clear_report()   start that report afresh (a run does, after its probes and timings).
    function(name) -> the attention function registered for a backend or "auto" (what a model calls per layer).
    BACKENDS: dict[str, Backend]   the one table of backends (fasttune.attention.backends).
    NAMES: tuple[str, ...]   its keys in order, known without importing torch (the config's choices; tested equal).
    reset()   forget every cache, report, plan and probe result (fasttune.attention.state; tests' autouse fixture).

Layers, bottom up (each imports only those below it): state; kernels; layout; impls (one function per backend, every
layout); backends (the table); dispatch (the registered function, per-call fallbacks); probe; timing; select
(policy: resolve, auto's plan, the routes bound at registration).

Usage:

    r = resolve(cfg.attn_implementation, device=dev, dtype=torch.bfloat16, head_dim=128, packed=True,
                strict=cfg.strict_attention, model_config=config)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=r.hf_name)
    # packed batch, input_ids (1, T), documents end to end (DataCollatorWithFlattening(return_flash_attn_kwargs=True)):
    model(input_ids=ids, labels=labels, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
          max_length_q=m, max_length_k=m)
    # position_ids restarting at 0 per document alone also work; padded: model(input_ids, attention_mask, labels).

Packed batches never attend across documents, with default arguments, in train and eval mode: the registered
functions read document boundaries from the kwargs themselves (see docs/ATTENTION.md, "The trap").
Importing this package imports neither torch nor optional packages; the names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fasttune.attention.backends import BACKENDS, Backend
    from fasttune.attention.kernels import clear_report, kernel_report
    from fasttune.attention.probe import explain_import_error, import_status, probe
    from fasttune.attention.select import Resolved, available, describe, function, register, resolve
    from fasttune.attention.state import reset

NAMES = ("eager", "sdpa", "flex_attention", "varlen", "flash_attention_2", "flash_attention_3", "flash_attention_4")

__all__ = [
    "BACKENDS",
    "NAMES",
    "Backend",
    "Resolved",
    "available",
    "clear_report",
    "describe",
    "explain_import_error",
    "function",
    "import_status",
    "kernel_report",
    "probe",
    "register",
    "reset",
    "resolve",
]

_LAZY = {
    "BACKENDS": "backends",
    "Backend": "backends",
    "Resolved": "select",
    "available": "select",
    "describe": "select",
    "function": "select",
    "register": "select",
    "resolve": "select",
    "probe": "probe",
    "import_status": "probe",
    "explain_import_error": "probe",
    "kernel_report": "kernels",
    "clear_report": "kernels",
    "reset": "state",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fasttune.attention.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fasttune.attention' has no attribute '{name}'")
