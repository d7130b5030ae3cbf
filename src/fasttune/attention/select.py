"""Choosing a backend (policy): validation, the loud fallback, strict mode, `auto`, and the routes bound at
registration.

`auto` takes the first usable backend in the preference order of the records (backends.py, measured on H100),
optionally re-ranked by a quick on-device timing cached per GPU and torch version in
~/.cache/fasttune/attention_auto.json. Routes: sdpa sends documents and padded rows to torch's varlen kernel where it
runs; auto routes each call by layout and row length (Plan). Both are bound into the registered functions here, so
the mechanism below (dispatch, impls, kernels) never imports this module.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttune.attention import dispatch
from fasttune.attention.backends import AUTO_HF_NAME, BACKENDS, preference
from fasttune.attention.probe import probe, static_reason
from fasttune.attention.state import STATE
from fasttune.device import pick_device
from fasttune.errors import FasttuneError

logger = logging.getLogger("fasttune")


@dataclass(frozen=True)
class Resolved:
    """The backend to build the model with."""

    name: str  # fasttune backend name, one of BACKENDS (for `auto`: what it runs for this layout's usual calls), or
    # "transformers <impl>" for a model that cannot take a registered attention function
    hf_name: str  # pass as from_pretrained(..., attn_implementation=hf_name); `auto` routes per call
    reason: str  # why this one, for the log and the run summary


def describe(requested: str, name: str, reason: str) -> str:
    """One phrase for the run summary: 'sdpa (as requested)' (or where the name came from, when `reason` says:
    'sdpa (--attn-implementation)', 'sdpa (the sft preset's default)'), 'auto -> varlen (why)', 'sdpa (why not the
    request)'.
    auto's why is cut to its verdict: the preference order and why each faster backend is not usable stay in the
    log's line (on an H200 without flash-attn-4 they filled 14 lines of the summary's table)."""
    if requested == "auto":
        short = reason.split(" by measured preference")[0]
        if "; not usable:" in reason:
            short += "; faster ones not usable here: the log or `fasttune doctor` says why"
        return f"auto -> {name} ({short})"
    return f"{name} (as requested)" if name == requested and reason == "requested" else f"{name} ({reason})"


def native_attention(model_config) -> str | None:
    """None when the model class behind `model_config` takes registered attention functions (transformers'
    AttentionInterface), else the implementation transformers itself runs it with ('sdpa' or 'eager'). Models
    loaded with remote code are not known before loading: None."""
    if model_config is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:
        return None
    if getattr(cls, "_supports_attention_backend", False):  # what cls.is_backend_compatible() returns
        return None
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def _native(requested: str, native: str, model_config, strict: bool) -> Resolved:
    kind = getattr(model_config, "model_type", type(model_config).__name__)
    why = f"{kind} models compute attention in their own code, not through transformers' AttentionInterface"
    if strict:
        raise FasttuneError(
            f"attention backend '{requested}' cannot run this model: {why}; drop --strict-attention to train "
            f"with transformers' own '{native}' attention"
        )
    if requested == native:  # the name asked for, but transformers' call in the model's code, not fasttune's backend
        logger.warning(f"attention: {why}; '{native}' runs as transformers' own call in that code, not as fasttune's "
                       f"'{requested}' backend")  # fmt: skip
    else:
        logger.warning(f"attention: {why}; using transformers' own '{native}' implementation instead of '{requested}'")
    return Resolved(f"transformers {native}", native, f"{why}; transformers' own '{native}'")


def routes() -> dict[str, dispatch.Route]:
    """{backend name or 'auto': its route}, as registered into transformers."""
    return {**{name: dispatch.fixed(name) for name in BACKENDS}, "sdpa": _sdpa_route, "auto": auto_route}


def register() -> dict[str, str]:
    """Register every fasttune backend into transformers; fasttune name -> attn_implementation string."""
    return dispatch.register(routes())


def function(name: str):
    """The attention function registered for `name` (a backend or 'auto'): what a model calls, per layer."""
    return dispatch.attention_function(routes()[name])


def _sdpa_route(q_BHSD: torch.Tensor, layout: str, opts: dict) -> str:
    """sdpa on CUDA: documents and padded rows go to torch's varlen kernel when it runs here, instead of sdpa with
    a dense mask, which keeps cuDNN/FLASH off and measured 48-53% of the best kernel at 8k (docs/BENCHMARKS.md)."""
    if layout not in ("packed", "padded") or not q_BHSD.is_cuda or opts["dropout"]:
        return "sdpa"
    if layout == "padded" and opts["window"]:
        return "sdpa"
    return "varlen" if _varlen_runs(q_BHSD) else "sdpa"


def _varlen_runs(q_BHSD: torch.Tensor) -> bool:
    """Whether torch's varlen kernel runs for these queries; probed once per device/dtype/head dim."""
    return _varlen_runs_on(q_BHSD.device, q_BHSD.dtype, q_BHSD.shape[-1])


def _varlen_runs_on(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    key = (device, dtype, head_dim)
    runs = STATE.routes.get(key)
    if runs is None:
        runs = STATE.routes[key] = probe("varlen", device, dtype, head_dim) is None
    return runs


def auto_route(q_BHSD: torch.Tensor, layout: str, opts: dict) -> str:
    """The backend `auto` runs for one call (the route registered as fasttune_auto)."""
    plan = auto_plan(q_BHSD.device, q_BHSD.dtype, q_BHSD.shape[-1])
    plain = not (opts["window"] or opts["softcap"] or opts["dropout"])
    name = plan.route(layout, q_BHSD.shape[2], plain=plain)
    if name == "sdpa" and layout == "right" and q_BHSD.is_cuda:
        # Right-padded rows change length with every batch, and cuDNN attention builds an execution plan per new
        # shape: in `fasttune bench train` (H200, no flash-attn-4) auto padded ran 20.1k tok/s on cuDNN rows where
        # the same kernel reached 24.9k in the next run, its plans cached, and varlen padded (no per-shape plans)
        # 33.8k vs 20.8k for sdpa on H100 (docs/BENCHMARKS.md). So such rows run torch's varlen kernel.
        return "varlen" if _varlen_runs(q_BHSD) else "sdpa"
    return _sdpa_route(q_BHSD, layout, opts) if name == "sdpa" else name


def available(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, head_dim: int = 128, run: bool = False
) -> dict[str, str | None]:
    """{backend: None if usable here, else the reason}. run=True adds the tiny forward+backward per backend."""
    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    check = probe if run else (lambda n, d, t, h: static_reason(n, d, t, h))
    return {name: check(name, device, dtype, head_dim) for name in BACKENDS}


def model_features(model_config) -> dict[str, object]:
    """Attention features a transformers config asks for: logit softcap and sliding window."""
    if model_config is None:
        return {}
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    features = {}
    if getattr(text_config, "attn_logit_softcapping", None):
        features["softcap"] = text_config.attn_logit_softcapping
    if getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True):
        features["sliding_window"] = text_config.sliding_window
    return features


def _feature_reason(name: str, features: dict) -> str | None:
    if features.get("softcap") and not BACKENDS[name].softcap:
        return f"no attention logit softcap (model uses {features['softcap']})"
    return None  # sliding windows: every backend is correct (sdpa/eager through an explicit mask)


def _why_not(name, device, dtype, head_dim, features) -> str | None:
    softcap = bool(features.get("softcap")) and BACKENDS[name].softcap  # probe the softcap path it will run
    return _feature_reason(name, features) or probe(name, device, dtype, head_dim, softcap)


def _family(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return "hopper" if torch.cuda.get_device_capability(device)[0] >= 9 else "ampere"


def resolve(
    requested: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    packed: bool,
    strict: bool = False,
    model_config=None,
    measure: bool = False,
) -> Resolved:
    """Resolve a requested backend (or "auto") to a usable one and register it into transformers.

    An unusable request logs one warning naming the reason and the backend used instead; strict=True raises
    FasttuneError instead. measure=True lets `auto` time its top candidates on this device (cached)."""
    device = torch.device(device)
    if requested not in (*BACKENDS, "auto"):
        raise FasttuneError(f"unknown attention backend '{requested}'; valid: {', '.join(('auto', *BACKENDS))}")
    register()
    native = native_attention(model_config)
    if native is not None:
        return _native(requested, native, model_config, strict)
    features = model_features(model_config)
    if requested != "auto":
        why = _why_not(requested, device, dtype, head_dim, features)
        if why is None:
            return Resolved(requested, BACKENDS[requested].hf_name, "requested")
        if strict:
            raise FasttuneError(_strict_message(requested, why, device, dtype, head_dim, features))
    choice = _auto(device, dtype, head_dim, packed, features, measure)
    if requested != "auto":
        logger.warning(f"attention backend '{requested}' unavailable: {why}; using '{choice.name}' instead")
        # the named fallback itself, not auto's per-call routing, so that the warning says what runs
        return Resolved(
            choice.name, BACKENDS[choice.name].hf_name, f"'{requested}' unavailable ({why}); using {choice.name}"
        )
    logger.info(f"attention auto -> '{choice.name}': {choice.reason}")
    return choice


def _strict_message(requested, why, device, dtype, head_dim, features) -> str:
    usable, unusable = [], []
    for name in BACKENDS:
        reason = _why_not(name, device, dtype, head_dim, features)
        (usable if reason is None else unusable).append(name if reason is None else f"{name} ({reason})")
    return (
        f"attention backend '{requested}' is unavailable: {why}. Available here: {', '.join(usable)}. "
        f"Unavailable: {'; '.join(unusable)}. Pass --attn-implementation with an available one, or drop "
        "--strict-attention."
    )


def _first_usable(device, dtype, head_dim, packed, features, n=1) -> tuple[list[str], tuple[str, ...]]:
    """The first n usable backends in auto's preference order (probing lazily: no probe past the n-th usable one,
    so a first choice that runs spares the compile of flex's probe), or ['eager']; and the order."""
    order = preference(_family(device), "packed" if packed else "rows")
    usable = []
    for name in order:
        if len(usable) == n:
            break
        if _why_not(name, device, dtype, head_dim, features) is None:
            usable.append(name)
    return usable or ["eager"], order


def _auto(device, dtype, head_dim, packed, features, measure) -> Resolved:
    usable, order = _first_usable(device, dtype, head_dim, packed, features, n=3 if measure else 1)
    layout = "packed" if packed else "padded"
    reason = f"fastest usable for {device.type} {layout} D{head_dim} by measured preference {'>'.join(order)}"
    ahead = order[: order.index(usable[0])] if usable[0] in order else []  # preferred, but not usable here: why
    if skipped := [f"{n} ({w})" for n in ahead if (w := _why_not(n, device, dtype, head_dim, features))]:
        reason += f"; not usable: {'; '.join(skipped)}"
    if measure and device.type == "cuda" and len(usable) > 1:
        name, reason = _timed_choice(usable[:3], device, dtype, head_dim, packed, features)
        return Resolved(name, BACKENDS[name].hf_name, reason)
    if features:  # softcap / sliding window: one backend that computes them natively for every call
        return Resolved(usable[0], BACKENDS[usable[0]].hf_name, reason)
    plan = auto_plan(device, dtype, head_dim)
    return Resolved(plan.packed if packed else plan.rows, AUTO_HF_NAME, f"{reason}; per call: {plan.describe()}")


# Unpadded (or right-padded) rows shorter than this many tokens run faster on cuDNN (through sdpa) than on
# flash-attn-4's dense kernel on H100, bf16 fwd+bwd (docs/BENCHMARKS.md, two runs): D64 512/1k rows 136/202 vs
# 114/156 TFLOP/s, 2k 264 vs 317; D128 512 rows 163 vs 165 and 126 vs 99, 1k 260 vs 279.
SHORT_ROWS = {64: 2048, 128: 1024}
SHORT_ROWS_DEFAULT = 1024


@dataclass(frozen=True)
class Plan:
    """What the registered `auto` attention function runs, per call: documents (packed), rows (dense or padded), and
    optionally another backend for unpadded rows shorter than `short_below` tokens."""

    packed: str
    rows: str
    short_rows: str | None = None
    short_below: int = SHORT_ROWS_DEFAULT  # row length (tokens) under which short_rows runs

    def route(self, layout: str, row_len: int, *, plain: bool = True) -> str:
        """layout: 'packed', 'rows' (unpadded), 'right' (right-padded rows run dense), 'padded' or 'given' (a 4D
        mask); plain: no window/softcap/dropout."""
        if layout == "packed":
            return self.packed
        if layout == "rows" and plain and self.short_rows and row_len < self.short_below:
            return self.short_rows
        return self.rows

    def describe(self) -> str:
        short = f" (< {self.short_below} tokens: {self.short_rows})" if self.short_rows else ""
        return f"documents -> {self.packed}, rows -> {self.rows}{short}"


def auto_plan(device: torch.device, dtype: torch.dtype, head_dim: int) -> Plan:
    """The per-call routing of `auto` on this device, dtype and head dim (probes once, then cached). Called for every
    attention call of an `auto` model: the device as given is looked up first, before any normalisation."""
    plan = STATE.plans.get((device, dtype, head_dim))
    return plan if plan is not None else _new_auto_plan(device, dtype, head_dim)


@torch._disable_dynamo  # a compiled layer's first call probes: eagerly (dynamo met the probes' lru_caches, .item())
def _new_auto_plan(device: torch.device, dtype: torch.dtype, head_dim: int) -> Plan:
    raw = (device, dtype, head_dim)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" share one plan
    key = (str(device), dtype, head_dim)
    if key not in STATE.plans:
        usable = functools.cache(lambda name: _why_not(name, device, dtype, head_dim, {}) is None)
        STATE.plans[key] = make_plan(_family(device), usable, head_dim)
    STATE.plans[raw] = STATE.plans[key]
    return STATE.plans[key]


def make_plan(family: str, usable: Callable[[str], bool], head_dim: int) -> Plan:
    """auto's routing on a GPU family ('hopper', 'ampere', 'cpu') given which backends are usable there (asked
    lazily, in preference order). Pure: tests hand it simulated machines."""

    def first(layout: str) -> str:
        return next((name for name in preference(family, layout) if usable(name)), "eager")

    rows = first("rows")
    # cuDNN through sdpa's ladder for short rows (kernel_report names the kernel that ran)
    short = "sdpa" if family == "hopper" and rows.startswith("flash") and usable("sdpa") else None
    return Plan(first("packed"), rows, short, SHORT_ROWS.get(head_dim, SHORT_ROWS_DEFAULT))


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fasttune" / "attention_auto.json"


def _timed_choice(candidates, device, dtype, head_dim, packed, features) -> tuple[str, str]:
    key = "|".join((torch.cuda.get_device_name(device), torch.__version__, str(dtype), f"D{head_dim}", str(packed)))
    key += "|" + "/".join(candidates) + ("|softcap" if features.get("softcap") else "")
    path = _cache_path()
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key not in cache:
        from fasttune.attention.timing import time_backend  # measure=True only (it brings the bench harness)

        times = {n: time_backend(function(n), device, dtype, head_dim, packed, features) for n in candidates}
        cache[key] = times
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    times = cache[key]
    best = min(times, key=times.get)
    shown = ", ".join(f"{n} {ms:.2f} ms" for n, ms in times.items())
    return best, f"fastest fwd+bwd measured on this GPU ({shown}; cache {path})"
