"""The registered attention function: reads the layout of a call, asks its route which backend runs it, and applies
the feature fallbacks of backends.py. Registered into transformers' AttentionInterface/AttentionMaskInterface.

Shape legend: B batch, H query heads, K kv heads, S query length, L key length, D head dim, T flat tokens.

Every registered function has transformers' signature f(module, q_BHSD, k_BKLD, v_BKLD, attention_mask, scaling,
dropout, sliding_window, softcap, **kwargs) -> (out_BSHD, None) and handles three layouts itself:
  * packed: documents from cu_seq_lens_q/k kwargs, else from restarting position_ids (which transformers passes
    through **kwargs to the attention function) -> never attends across documents, whatever use_cache is;
  * padded: a 2D (B, L) padding mask, as transformers' flash mask function returns it (ours does the same);
  * a 4D mask a model or user built itself: honoured as given (eager or sdpa).
Which backend runs a call is its route's answer: a fixed name, or a policy bound at registration (select.py: sdpa's
varlen path on CUDA, auto's plan), so this module never imports the policy above it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fasttune.attention import kernels
from fasttune.attention.backends import AUTO_HF_NAME, BACKENDS
from fasttune.attention.impls import warn_once
from fasttune.attention.layout import allow_mask, memo, packed_from_kwargs, padding_of

# route(q_BHSD, layout, opts) -> backend name. layout: 'packed' (documents), 'rows' (unpadded rows), 'right'
# (right-padded rows of a training forward, run dense), 'padded' (rows with other padding), 'given' (a dense mask:
# 4D, non-causal, or eager's exact semantics outside training); opts: scale, window, softcap, dropout of the call.
Route = Callable[[torch.Tensor, str, dict], str]


def fixed(name: str) -> Route:
    """The route of a backend that runs every call itself."""
    return lambda q_BHSD, layout, opts: name


def _route(backend: str, q_BHSD: torch.Tensor, softcap: float | None, dropout: float) -> str:
    """The backend that can compute this call correctly; a change is logged once (never silent)."""
    record, why = BACKENDS[backend], None
    if softcap and not record.softcap:
        why, backend = f"'{backend}' has no logit softcap", "eager"
    elif dropout and not record.dropout:
        why, backend = f"'{backend}' has no attention dropout", "sdpa"
    elif record.max_head_dim is not None and q_BHSD.shape[-1] > record.max_head_dim:
        why, backend = f"'{backend}' supports head dim <= {record.max_head_dim}, got {q_BHSD.shape[-1]}", "sdpa"
    elif record.cuda and q_BHSD.device.type != "cuda":
        why, backend = f"'{backend}' needs CUDA, got {q_BHSD.device.type}", "sdpa"
    if why:
        warn_once(f"fasttune attention: {why}; using '{backend}' for these calls")
    return backend


def _training(module) -> bool:
    """A training forward (the model in train mode, autograd on): the only calls where pad positions may differ
    from eager. Direct calls without a module (kernel benchmarks) count as training."""
    return module is None or (module.training and torch.is_grad_enabled())


def _autocast(*qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, fp32 q, k, v in the autocast dtype, as autocast casts sdpa's inputs. With fp32 weights the
    projections come out in bf16 but RoPE's fp32 cos/sin make q and k fp32 again: the route must see the dtype the
    kernels run in, or it finds torch's varlen kernel (and flash-attn) unable to run fp32 and sends packed documents
    to one sdpa call each (H200, sft of a 0.2B Llama with fp32 master weights: the GPU busy 4% of the step)."""
    device = qkv[0].device.type
    if not torch.is_autocast_enabled(device):
        return qkv
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in qkv)


def attention_forward(route, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature; `route` (a Route, or a backend name) is bound at registration."""
    route = fixed(route) if isinstance(route, str) else route
    q_BHSD, k_BKLD, v_BKLD = _autocast(query, key, value)
    batch, _, q_len, head_dim = q_BHSD.shape
    k_len = k_BKLD.shape[2]
    scale = head_dim**-0.5 if scaling is None else scaling
    window = kwargs.pop("sliding_window", None)
    window = window if window and k_len > window else None  # a window wider than the call changes nothing
    softcap = kwargs.pop("softcap", None) or None
    dropout = float(dropout or 0.0)
    opts = dict(scale=scale, window=window, softcap=softcap, dropout=dropout)
    causal = kwargs.pop("is_causal", None)
    if not (getattr(module, "is_causal", True) if causal is None else causal) and isinstance(
        attention_mask, torch.Tensor | None
    ):
        return _bidirectional(route(q_BHSD, "given", opts), q_BHSD, k_BKLD, v_BKLD, attention_mask, **opts), None
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
        backend = _route(route(q_BHSD, "given", opts), q_BHSD, softcap, dropout)
        return _given_mask(backend, q_BHSD, k_BKLD, v_BKLD, attention_mask, **opts), None
    padding_BL, layout = attention_mask, None
    if padding_BL is not None:
        if padding_BL.shape[1] != k_len:
            raise ValueError(f"2D attention mask covers {padding_BL.shape[1]} keys, the call has {k_len}")
        padding = padding_of(padding_BL)  # one sync per forward (memoized on the mask object)
        if padding.full:
            padding_BL = None
        elif not _training(module):
            # Outside training every position must equal eager's, pad queries included (generate reads the last
            # position of right-padded prompts): one dense mask, eager's semantics (docs/ATTENTION.md, contract).
            backend = _route(route(q_BHSD, "given", opts), q_BHSD, softcap, dropout)
            mask = memo(
                padding_BL,
                f"allow/{q_len}/{window}",  # built once per forward, not once per layer
                lambda: allow_mask(q_len, k_len, q_BHSD.device, window=window, padding_BL=padding_BL),
            )
            return _given_mask(backend, q_BHSD, k_BKLD, v_BKLD, mask, **opts), None
        elif q_len == k_len and padding.right:
            # Training: under a causal mask no real query of a right-padded row can see a pad key, so the padding
            # changes nothing a real token computes: run the rows dense (cuDNN / dense flash / cached causal
            # BlockMask) instead of gathering real tokens into a varlen layout, which cost ~2x at 1k-token rows
            # (docs/ATTENTION.md). Pad queries then differ from eager; their labels are ignored, so they carry no
            # loss and their gradient is zero.
            padding_BL, layout = None, "right"
    # documents come from kwargs only when the caller gave no mask: with a padding mask, position_ids may be
    # scaled or offset for other reasons, and transformers does not infer packing either
    varlen = packed_from_kwargs(kwargs, batch, q_len, k_len) if attention_mask is None else None
    if layout is None:
        layout = "packed" if varlen is not None else "rows" if padding_BL is None else "padded"
    backend = _route(route(q_BHSD, layout, opts), q_BHSD, softcap, dropout)
    return BACKENDS[backend].impl(q_BHSD, k_BKLD, v_BKLD, padding_BL, varlen, **opts), None


def _bidirectional(backend, q_BHSD, k_BKLD, v_BKLD, mask, *, scale, window, softcap, dropout) -> torch.Tensor:
    """A non-causal call (a bidirectional module, is_causal=False): sdpa (eager for softcap) with the padding mask;
    every other path here is causal."""
    if window is not None:
        raise ValueError("fasttune attention: bidirectional sliding-window attention is not supported; load the "
                         "model with attn_implementation='sdpa'")  # fmt: skip
    if backend not in ("sdpa", "eager"):
        warn_once(f"fasttune attention: non-causal calls run on sdpa/eager, not '{backend}'")
    if mask is not None and mask.ndim == 2:
        mask = mask.bool()[:, None, None, :]  # keys only: no causal part
    return _given_mask(
        backend, q_BHSD, k_BKLD, v_BKLD, mask, scale=scale, window=None, softcap=softcap, dropout=dropout
    )


def _given_mask(backend, q_BHSD, k_BKLD, v_BKLD, mask, *, scale, window, softcap, dropout) -> torch.Tensor:
    """A 4D mask (or BlockMask) built outside fasttune already encodes causality, window and documents."""
    if not isinstance(mask, torch.Tensor):  # a flex BlockMask
        return kernels.flex(q_BHSD, k_BKLD, v_BKLD, mask, scale=scale, softcap=softcap).transpose(1, 2)
    kernel = kernels.eager if backend == "eager" or softcap else kernels.sdpa
    out_BHSD = kernel(q_BHSD, k_BKLD, v_BKLD, mask, scale=scale, softcap=softcap, dropout=dropout)
    return out_BHSD.transpose(1, 2)


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, **kwargs):
    """Registered mask builder: the 2D padding mask or None (cheap; boundaries come from kwargs), like transformers'
    flash mask. Only when a model overlays its own mask pattern (use_vmap) or queries do not end at the last key (a
    static cache) is the full 4D bool mask built, because then bottom-right causality would be wrong."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    attention_mask = kwargs.pop("attention_mask", None)
    if kwargs.get("use_vmap") or not aligned:
        kwargs.update(allow_is_causal_skip=False)
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs)
    return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)


def attention_function(route: Route | str) -> Callable:
    """The function registered into transformers for this route (a backend name: that backend for every call)."""
    return functools.partial(attention_forward, route)


def register(routes: dict[str, Route]) -> dict[str, str]:
    """Register one attention function per route ({fasttune name or 'auto': route}) with fasttune's mask function
    (idempotent); fasttune name -> attn_implementation string."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    hf_names = {name: AUTO_HF_NAME if name == "auto" else BACKENDS[name].hf_name for name in routes}
    for name, route in routes.items():
        AttentionInterface.register(hf_names[name], attention_function(route))
        AttentionMaskInterface.register(hf_names[name], mask_function)
    return hf_names
