"""What a decoder layer's MLP and attention are made of, as the memory estimate counts them (train/activations.py
`Shape`): read from the built layer (train/estimate.py), or for a config alone from its model type.

- The MLP: gated (SwiGLU/GeGLU: gate and up projections, or one fused gate_up_proj) or plain (fc1, activation, fc2:
  GPT-2, GPT-NeoX, Phi, Falcon, StarCoder2, ...), and what its activation keeps an element, measured by running it
  (`activation_keeps`): torch's kernels keep their input (gelu, gelu-tanh, silu: 2 bytes in bf16, 4 with the output
  the next matmul keeps), relu its output (2), GELU-tanh written in Python (NewGELUActivation, GPT-2's, Phi's, GPT-J's)
  four bf16 intermediates besides (10).
- The attention: one projection for q, k and v (one reader of the norm's output under autocast), whether its output
  stays alive whole beside RoPE's copies of q and k, and whether RoPE leaves q in (batch, heads, seq, dim) order.
- Parallel layers (attention and MLP both read the layer's input).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fasttune.model.flops import PLAIN_MLP

PLAIN = ("fc1", "c_fc", "dense_h_to_4h", "fc_in", "up_proj")
"""Names of a plain MLP's first projection (OPT, Phi; GPT-2, StarCoder2; GPT-NeoX, Falcon; GPT-J, CodeGen; MPT,
Nemotron), without a gate beside it."""
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv")
"""Names of one projection computing q, k and v (Phi-3, CodeGen; GPT-NeoX, Falcon, Bloom; GPT-2, GPT-BigCode; MPT)."""
ATTENTIONS = ("self_attn", "attention", "self_attention", "attn")
ACT_NAMES = ("hidden_act", "activation_function", "activation", "hidden_activation")
"""Config fields naming the MLP's activation (a key of transformers' ACT2FN)."""


def activation_keeps(act, device: torch.device | str = "cpu", autocast: bool = False) -> int | None:
    """Bytes an element of the MLP width that `act` keeps for backward in bf16, its output included (the next matmul
    keeps it as its input): what autograd saves, distinct storages, measured on a small tensor on `device`, under
    bf16 autocast where the run has it: CUDA's autocast runs some ops in fp32 (pow: GPT-2's Python GELU-tanh keeps
    18 bytes an element there, 10 without, H200; docs/BENCHMARKS.md "Architectures"). None when it does not run
    there."""
    device = torch.device(device)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=autocast)
    with torch.inference_mode(False), torch.enable_grad(), amp:
        # its own generator: a measurement made before the model is built must not change the model's init
        x = torch.randn(64, 256, generator=torch.Generator(device).manual_seed(0), device=device).to(torch.bfloat16)
        x.requires_grad_(True)
        try:
            with hooks:
                y = act(x)
        except (RuntimeError, TypeError, ValueError):
            return None
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*saved, y)}
    return round(sum(storages.values()) / x.numel())


def config_activation_keeps(config) -> int:
    """activation_keeps of the activation the config names (4, torch's gelu's, where it names none it knows)."""
    from transformers.activations import ACT2FN

    name = next((n for f in ACT_NAMES if isinstance(n := getattr(config, f, None), str)), None)
    kept = activation_keeps(ACT2FN[name]) if name in ACT2FN else None
    return 4 if kept is None else kept


def _activation(block: nn.Module) -> nn.Module | None:
    """The MLP's activation module: a child without children named for it (act, act_fn, activation_fn, gelu_impl)."""
    for name, module in block.named_children():
        skip = isinstance(module, nn.Linear | nn.Dropout) or any(module.children())
        if ("act" in name or "gelu" in name) and not skip:
            return module
    return None


def mlp_layout(layer: nn.Module, autocast: bool = False, device: torch.device | None = None) -> dict:
    """{"mlp": "gated", "gate_up" or "plain", "act_elem": ...} of one built decoder layer, as far as its modules tell
    (an MoE layer's experts are counted by train/activations.py itself; OPT's fc1 and fc2 sit in the layer), its
    activation measured on `device` (default: the layer's, or the CPU)."""
    block = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None) or layer
    names = {name.rsplit(".", 1)[-1] for name, _ in block.named_modules()}
    found: dict = {}
    if "gate_up_proj" in names:
        found["mlp"] = "gate_up"
    elif "gate_proj" in names:
        found["mlp"] = "gated"
    elif names & set(PLAIN):
        found["mlp"] = "plain"
    act = _activation(block)
    weight = next(layer.parameters(), None)
    if device is None:
        device = weight.device if weight is not None and weight.device.type != "meta" else torch.device("cpu")
    if act is not None and any(p.device != device for p in act.parameters()):  # XIELU's: the layer is on the CPU
        try:  # or meta (FSDP2), the run on `device`: a copy there keeps the same bytes
            act = copy.deepcopy(act).to_empty(device=device)
        except (RuntimeError, TypeError):  # an object that does not copy (a compiled extension's): unmeasured
            act = None
    if act is not None and (kept := activation_keeps(act, device, autocast)) is not None:
        found["act_elem"] = kept
    return found


def rope_layout(config, fused: bool) -> dict:
    """{"qkv_views", "q_copy"} of a config whose layers have (`fused`) one q/k/v projection or not (see
    train/activations.py `Shape`). A fused output stays alive whole where RoPE rotates copies of q and k and v is a
    view of it (Phi-3, GPT-NeoX, Falcon; GPT-2's q, k and v are all views the kernel keeps, as separate projections'
    outputs would be; CodeGen's RoPE, set by rotary_dim, copies v out). A partial rotary (rope_parameters'
    partial_rotary_factor: Phi, GLM, GPT-NeoX, StableLM; Phi-3 cuts its whole head dim so) rotates and concatenates
    q in (batch, heads, seq, dim) order, and its attention's output is then copied for the o-projection."""
    rope = getattr(config, "rope_parameters", None)
    rope = rope if isinstance(rope, dict) and not getattr(config, "alibi", False) else None
    split = getattr(config, "model_type", None) in PARTIAL_ROTARY  # transformers 5 puts the factor (1.0 too) in every
    # config's rope_parameters when its config.json names it; Llama's RoPE ignores it and copies nothing
    return {
        "qkv_views": fused and rope is not None,
        "q_copy": split and rope is not None and "partial_rotary_factor" in rope,
    }


PARTIAL_ROTARY = frozenset({"phi", "phi3", "glm", "glm4", "gpt_neox", "stablelm", "persimmon"})
"""Model types whose RoPE rotates part of the head dim (partial_rotary_factor; Phi-3 the whole of it the same way)
and concatenates q back: its attention output is then copied for the o-projection."""


def attention_layout(layer: nn.Module, config) -> dict:
    """{"fused_qkv", "qkv_views", "q_copy"} of one built decoder layer."""
    attention = next((a for n in ATTENTIONS if isinstance(a := getattr(layer, n, None), nn.Module)), None)
    if attention is None:
        return {}
    fused = any(isinstance(getattr(attention, n, None), nn.Module) for n in FUSED_QKV)
    return {"fused_qkv": fused, **rope_layout(config, fused)}


def parallel(config, norms: int) -> bool:
    """Attention and MLP read the layer's input side by side: one norm's output (Phi, GPT-J, CodeGen, Falcon's
    parallel_attn, Cohere), or two norms of the one input (GPT-NeoX's use_parallel_residual, Falcon's new decoder)."""
    flags = ("use_parallel_residual", "parallel_attn", "new_decoder_architecture")
    return norms == 1 or any(getattr(config, f, False) is True for f in flags)


GATE_UP_TYPES = frozenset({"phi3", "glm", "glm4"})
"""Model types whose gated MLP computes gate and up in one gate_up_proj, for a config alone."""
FUSED_TYPES = frozenset({"phi3", "gpt_neox", "falcon", "gpt2", "gpt_bigcode", "codegen", "bloom"})
"""Model types whose attention has one q/k/v projection, for a config alone (attention_layout reads built layers;
tests/test_memory_archs.py checks that they agree)."""


def config_layout(config) -> dict:
    """The Shape fields above for a config alone (train/footprint.py; a built model's layer is read instead)."""
    model_type = getattr(config, "model_type", None)
    fused = model_type in FUSED_TYPES
    mlp = "plain" if model_type in PLAIN_MLP else "gate_up" if model_type in GATE_UP_TYPES else "gated"
    return {"mlp": mlp, "act_elem": config_activation_keeps(config), "fused_qkv": fused, **rope_layout(config, fused)}


OWN_ATTENTION_BYTES = {"eager": (6.0, 2.0), "gpt_neo": (6.0, 4.0), "falcon multi-query": (4.0, 4.0)}
"""Bytes a score (per head, query and key) that attention computed in a model's own code keeps for backward, where
the attention is kept whole and under `ops` (which keeps the score matmul's output and recomputes the softmax):
transformers' eager attention keeps its fp32 softmax output and that output's copy in the compute dtype (6), and
the bf16 scores under `ops` (2); GPT-Neo computes the scores from fp32 copies of q and k (4 under `ops`, but 2 under
autocast, which casts them back); Falcon's multi-query sdpa call runs torch's math kernel, which keeps its
probabilities (4). Measured on CPU in bf16 and under autocast (tests/test_memory_archs.py) and on an H200 over
4096-token rows (docs/BENCHMARKS.md, "Architectures, second sweep": GPT-J's eager attention in transformers 5.17
kept 6.4 bytes a score, Falcon's multi-query 4.2)."""


def kept_scores(model: nn.Module, attention: str | None, row: int, autocast: bool = False,
                device: torch.device | None = None) -> tuple[float, float]:  # fmt: skip
    """Bytes per token and layer that attention a model computes in its own code (attention.select.native_attention;
    fasttune's own backends keep none of it) keeps for backward over rows of `row` tokens, where the attention is
    kept whole and under `ops` (OWN_ATTENTION_BYTES), with what it keeps per token beside the layer's usual: GPT-Neo
    in bf16 its fp32 q and k (2(q + kv) more), Falcon's math kernel under `ops` its output (2q, a matmul's). `device`:
    where it trains (default: where its weights are), for the kernel torch picks for Falcon's call. In the bytes of
    the run's compute dtype: fp32 weights without `autocast` keep FP32_SCORE_BYTES a score."""
    from fasttune.model.build import base_model  # transformers, imported when a model exists

    if not attention or not attention.startswith("transformers "):
        return 0.0, 0.0
    config = base_model(model).config
    kind = config.model_type if config.model_type == "gpt_neo" else "eager"
    fp32 = not autocast and next(model.parameters()).dtype == torch.float32
    if attention != "transformers eager":
        if config.model_type != "falcon" or not config.multi_query or config.new_decoder_architecture:
            return 0.0, 0.0
        if not _math_sdpa(model, config, autocast, device):
            return (4.0 if fp32 else 2.0) * row, 0.0  # a fused kernel: its copy of the mask (tokens x tokens), not ops
        kind = "falcon multi-query"
    if fp32:
        return _fp32_scores(config, kind, row)
    whole, ops = OWN_ATTENTION_BYTES[kind]
    if kind == "gpt_neo" and autocast:
        ops = 2.0
    heads, h = config.num_attention_heads, config.hidden_size
    whole, ops = row * heads * whole, row * heads * ops
    if kind == "gpt_neo" and not autocast:
        whole += 4 * h  # fp32 q and k where bf16 ones would be (no grouped kv heads)
    if kind == "falcon multi-query":
        ops += 2 * h
    return whole, ops


FP32_SCORE_BYTES = 4.0
"""Bytes a score keeps in fp32 without autocast, whole and under `ops`: its fp32 softmax output (no copy in another
dtype) or the score matmul's output; measured on CPU for Bloom, MPT, GPT-Neo and Falcon's multi-query math kernel
(tests/test_memory_archs.py)."""


def _fp32_scores(config, kind: str, row: int) -> tuple[float, float]:
    """kept_scores in fp32: FP32_SCORE_BYTES a score, and Falcon's math kernel output under `ops` (a matmul's, 4q)."""
    heads, h = config.num_attention_heads, config.hidden_size
    score = row * heads * FP32_SCORE_BYTES
    return score, score + (4 * h if kind == "falcon multi-query" else 0)


def _math_sdpa(model: nn.Module, config, autocast: bool, device: torch.device | None) -> bool:
    """Whether torch's SDPA runs its math kernel (which keeps the probabilities) for Falcon's multi-query call: q with
    every head, k and v with one, a float mask. torch <= 2.13 does on every device; 2.14's CPU flash kernel takes the
    broadcast heads (then 2 bytes a query-key pair are kept, not 4 a score: tests/test_memory_archs.py). Asked of
    torch's own dispatcher with tensors of the call's layout; a model on the meta device counts as math (the most)."""
    param = next(model.parameters())
    device = device or param.device
    if device.type == "meta":
        return True
    dtype = torch.bfloat16 if autocast else param.dtype
    q = torch.zeros(1, 2, 4, config.hidden_size // config.num_attention_heads, device=device, dtype=dtype)
    kv, mask = q[:, :1], torch.zeros(1, 1, 4, 4, device=device, dtype=dtype)
    return int(torch._fused_sdp_choice(q, kv, kv, mask, 0.0, False)) == 0  # SDPBackend.MATH
