"""The decode step of a Llama-family model over a static KV cache, with fused projections: what fast generation
captures in one CUDA graph per (batch, cache capacity).

HF's Llama decode step is ~780 small kernels per token (RMSNorm alone is 8 per norm, RoPE 10 per layer): ~2.8 ms
per token in a graph on an H100, 20% of the weights' bandwidth bound (docs/BENCHMARKS.md, "Generation"). This module
runs the same model from the same weights in ~15 kernels per layer:
- q/k/v and gate/up projections are one matrix each (copies of HF's weights, refreshed when those change);
- the residual add is fused into the o/down projections (`addmm`, one rounding instead of two);
- RoPE is one complex multiply: q/k weight rows are permuted per head so that HF's rotate-half pairs (i, i + D/2)
  sit side by side. Attention scores are dot products over the head dim, so the permutation leaves them unchanged;
- attention reads the whole preallocated cache through one SDPA call with an additive mask (-inf on padding and on
  slots not written yet), so shapes never depend on the step: one graph serves every step, prompt length and call.
  Grouped-query attention is SDPA over (B, Hkv, G*Q, D) queries: no repeat of the keys. A sliding-window layer's
  mask also has -inf on the slots its window leaves behind (made once per step per window size);
- the prompt runs in query chunks (`prefill`: as many positions as keep a chunk's activations and masks within
  PREFILL_BYTES), each over the cache slots written so far, causal within itself: its masks are (B, 1, C, K), never
  (P, P), and its MLPs see B * C tokens;
- Phi-3's fused qkv_proj / gate_up_proj are split into the same fused copies; its partial rotary leaves the last
  head dims unrotated (cos 1, sin 0 in the same complex multiply);
- an MoE layer's feed-forward is moe.py's (router, experts on HF's fused expert weights, Qwen2-MoE's shared expert);
  OLMoE's q/k norms span all heads (their weights permuted per head as the rows) and clip_qkv clamps q, k, v.
Rounding therefore differs from HF's (fp32: ~1e-6 relative in the logits; bf16: a few hundredths): greedy tokens
equal HF's up to its first near-tie (docs/BENCHMARKS.md, tests/test_generate_fast.py).

Legend: B batch, Q query positions of a forward (a prompt chunk's C, 1 at decode), P prompt length, K keys a prompt
chunk reads (the slots written so far, its own included), T cache capacity, L layers,
Hq/Hkv query/key-value heads, G = Hq/Hkv, D head dim, E hidden size, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from fasttune.generate import kernels, moe
from fasttune.model.context import context_length

# architectures whose decoder layer is exactly: RMSNorm, q/k/v (optional bias, optional per-head q/k RMSNorm, OLMoE's
# over all heads and its clip_qkv; phi3: one fused qkv_proj), RoPE (phi3: on a leading part of the head dim), full or
# sliding-window attention, o, RMSNorm, SwiGLU gate/up/down (phi3: one fused gate_up_proj; MoE: moe.py's sparse block)
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", *moe.MOE_TYPES)  # MoE: moe.py's feed-forward
GEMMA_TYPES = ("gemma2", "gemma3_text")  # their layer is gemma.py's, on this decoder's weights, cache and masks
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq does not depend on the sequence length
# longrope (Phi-3/Phi-4) uses its short factors while every position is below original_max_position_embeddings and
# switches every position to its long factors beyond: static within that length, so calls longer fall back (per call)
BOUNDED_ROPE = ("longrope",)
LAYER_KINDS = {"full_attention", "sliding_attention"}
PREFILL_CHUNK = 1 << 16  # most prompt positions per row one forward of the prompt pass runs (`FusedDecoder.prefill`)
PREFILL_BYTES = 1 << 31  # a prompt chunk's activations and (B, C, K) masks (Gemma 2: capped scores) stay within this


def unsupported_reason(model) -> str | None:
    """Why the fused decoder cannot run `model`, or None when it can."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r}: the fused decoder supports {', '.join(SUPPORTED_TYPES + GEMMA_TYPES)}"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= LAYER_KINDS:
        return f"layer types {sorted(kinds - LAYER_KINDS)}: only full and sliding-window attention are supported"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        return f"MLP activation {config.hidden_act!r} / MLP bias: only SwiGLU without bias is supported"
    return rope_reason(config, STATIC_ROPE + BOUNDED_ROPE) or _structure_reason(model)


def rope_parameters(config) -> list[dict]:
    """Every RoPE parameter set the model's layers use (transformers 5's rope_parameters, or rope_scaling): one, or
    one per layer type (Gemma 3: full and sliding attention), each with its `rope_type` ("default" when unnamed) and,
    where the config has one, `original_max_position_embeddings`."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    types = set(getattr(config, "layer_types", None) or ())
    per_type = bool(rope) and all(isinstance(v, dict) for v in rope.values())
    sets = [rope[t] for t in sorted(types & set(rope)) or sorted(rope)] if per_type else [rope]
    out = []
    for params in sets:
        params = dict(params)
        params.setdefault("rope_type", params.get("type", "default"))
        original = getattr(config, "original_max_position_embeddings", None)
        if original is not None:
            params.setdefault("original_max_position_embeddings", original)
        out.append(params)
    return out


def rope_reason(config, supported: tuple[str, ...]) -> str | None:
    """Why the model's RoPE is not one of the `supported` types, or None."""
    for params in rope_parameters(config):
        if params["rope_type"] not in supported:
            return f"rope type {params['rope_type']!r}: only {', '.join(supported)} are supported"
    return None


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as HF's modules choose their masks: Mistral and Phi-3 apply
    `sliding_window` to every layer when it is set, the others (Qwen2/Qwen3, Gemma) to the layers `layer_types` marks
    sliding (Qwen2/Qwen3's config drops the window unless `use_sliding_window`)."""
    window = getattr(config, "sliding_window", None) or None
    kind, layers = config.model_type, config.num_hidden_layers
    if kind in ("mistral", "phi3", "mixtral", "qwen3_moe"):  # qwen3_moe: its config drops the window unless used
        return [window] * layers
    if kind == "olmoe":  # its mask is causal only (the window it passes reaches flash attention alone)
        return [None] * layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers  # qwen2(_moe), qwen3, gemma2, gemma3
    return [window if t == "sliding_attention" else None for t in types]


def _swiglu(layer) -> torch.nn.Module | None:
    """The layer's dense SwiGLU module: its MLP, or a sparse MoE block's shared expert (Qwen2-MoE; None without)."""
    return getattr(layer.mlp, "shared_expert", None) if moe.is_sparse(layer.mlp) else layer.mlp


def _projections(layer) -> list[tuple[str, torch.nn.Module]]:
    """The linear modules of a decoder layer the fused copies are made from, by name."""
    a, m = layer.self_attn, _swiglu(layer)
    attn = ["qkv_proj"] if hasattr(a, "qkv_proj") else ["q_proj", "k_proj", "v_proj"]
    out = [(n, getattr(a, n)) for n in [*attn, "o_proj"]]
    if m is not None:
        mlp = ["gate_up_proj"] if hasattr(m, "gate_up_proj") else ["gate_proj", "up_proj"]
        out += [(n, getattr(m, n)) for n in [*mlp, "down_proj"]]
    if getattr(layer.mlp, "shared_expert_gate", None) is not None:
        out.append(("shared_expert_gate", layer.mlp.shared_expert_gate))
    return out


def _structure_reason(model) -> str | None:
    """The module layout the fused copies are made from: plain dense weights on one device."""
    if hasattr(model, "merge_and_unload"):  # a peft model: its adapters live outside the base weights
        return "LoRA adapters are not merged into the weights: merge them (merge_and_unload) for the fast path"
    inner = getattr(model, "model", None)
    if getattr(inner, "rotary_emb", None) is None or getattr(inner, "layers", None) is None:
        return f"{type(model).__name__} is not a plain HF causal LM (model.model.layers and .rotary_emb)"
    for layer in inner.layers:
        reason = moe.structure_reason(layer.mlp) if moe.is_sparse(layer.mlp) else None
        if reason:
            return reason
        for name, proj in _projections(layer):
            if type(proj) is not torch.nn.Linear:  # LoRA layers, quantized linears: the copies would drop them
                return f"{name} is a {type(proj).__name__}, not a plain Linear (merge adapters: merge_and_unload)"
    params = list(model.parameters())
    if any(type(p.data) is not torch.Tensor for p in params):
        return "sharded or wrapped parameters (e.g. FSDP's DTensor): gather the model first"
    if len({p.device for p in params}) > 1:
        return "the weights are on several devices"
    return None


def _rope_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Head-dim order that puts HF's rotate-half pairs (i, i + R/2) of the first R = `rotary_dim` dims side by side:
    [0, R/2, 1, R/2 + 1, ..., R, R + 1, ...]; the dims past R (phi3's partial rotary) keep their place and are
    "rotated" by cos 1, sin 0 (exact), so every head dim goes through the same complex multiply."""
    half = rotary_dim // 2
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)
    return torch.cat([pairs, torch.arange(rotary_dim, head_dim)])


def _split_weights(layer, heads: int, kv_heads: int, head_dim: int, part: str) -> list[torch.Tensor | None]:
    """q, k, v weights (`part` "weight") or biases ("bias", None where absent) of a layer, and gate, up weights (None
    in an MoE layer without a shared expert): views of phi3's fused qkv_proj / gate_up_proj (q, k, v and gate, up in
    that order), else the separate ones."""
    a, m = layer.self_attn, _swiglu(layer)
    if hasattr(a, "qkv_proj"):
        fused = getattr(a.qkv_proj, part)
        qkv = [None] * 3 if fused is None else list(fused.split([heads * head_dim, *[kv_heads * head_dim] * 2]))
    else:
        qkv = [getattr(p, part) for p in (a.q_proj, a.k_proj, a.v_proj)]
    if part == "bias":
        return qkv
    if m is None:
        return [*qkv, None, None]
    gate_up = m.gate_up_proj.weight.chunk(2) if hasattr(m, "gate_up_proj") else (m.gate_proj.weight, m.up_proj.weight)
    return qkv + list(gate_up)


class FusedDecoder:
    """Fused copies of a model's weights, a static KV cache per batch size, and the forward over them."""

    gemma_norms = False  # RMSNorm rounding: Llama's (round, then times w); Gemma's (times 1 + w in float32, round)

    def __init__(self, model):
        self.model = model
        config = model.config
        attn0 = model.model.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn0.head_dim
        self.scale = float(attn0.scaling)
        norm = model.model.norm
        self.eps = float(norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps)
        self.clip_qkv = getattr(config, "clip_qkv", None)  # OLMoE: q, k, v clamped to +-clip_qkv after the norms
        # the positions Generator._check lets a call reach: YaRN's factor x original beyond max_position_embeddings
        self.max_positions = int(context_length(config) or 1 << 20)
        self.rope_limit = None  # positions the rope table holds, where the rope depends on the length (longrope)
        bounded = [r for r in rope_parameters(config) if r["rope_type"] in BOUNDED_ROPE]
        if bounded:
            original = min(int(r["original_max_position_embeddings"]) for r in bounded)
            self.rope_limit = self.max_positions = min(self.max_positions, original)
        self.windows = layer_windows(config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_kernels = kernels.available(self.device)  # Triton kernels on CUDA (kernels.py), else torch ops
        self._version = None
        self.layers: list[dict[str, torch.Tensor | None]] = []
        self._rope_table(self.max_positions)  # sets rotary_dim, which the weights' row order depends on
        self.refresh()

    def call_reason(self, positions: int) -> str | None:
        """Why a call whose forwards see `positions` positions cannot run here, or None when it can: the longest real
        prompt (left padding takes none) plus the new tokens fed back, all but the last; as many as HF's longrope
        measures (the largest position id + 1) to choose its factors."""
        if self.rope_limit is not None and positions > self.rope_limit:
            # the same words at every length: the generator logs each reason once
            return (f"prompt + max_new_tokens past original_max_position_embeddings={self.rope_limit}, beyond which "
                    "longrope switches to its long factors")  # fmt: skip
        return None

    def _sources(self) -> list[torch.Tensor]:
        out = []  # the parameters themselves: a view's id would change at every call
        for layer in self.model.model.layers:
            a = layer.self_attn
            out += [t for _, p in _projections(layer) for t in (p.weight, p.bias) if t is not None]
            out += [n.weight for n in (getattr(a, "q_norm", None), getattr(a, "k_norm", None)) if n is not None]
            out += [layer.mlp.gate.weight] if moe.is_sparse(layer.mlp) else []
        return out

    @torch.no_grad()
    def refresh(self) -> bool:
        """Re-fuse the weights if the model's changed since the last call (training between generations): in-place
        updates bump each tensor's version counter, a host-side read. Copies into the same buffers, so captured
        graphs stay valid. True when it copied."""
        version = tuple((id(t), t._version) for t in self._sources())
        if version == self._version:
            return False
        order = _rope_order(self.head_dim, self.rotary_dim).to(self.device)
        fresh = not self.layers

        def permuted(w: torch.Tensor, heads: int) -> torch.Tensor:  # (heads*D, ...) rows in rope order per head
            return w.reshape(heads, self.head_dim, *w.shape[1:])[:, order].reshape(w.shape)

        def qk_norm(norm) -> torch.Tensor | None:  # per head (D,) or, OLMoE's, over all heads (heads*D,)
            return None if norm is None else permuted(norm.weight, norm.weight.numel() // self.head_dim)

        shape = (self.heads, self.kv_heads, self.head_dim)
        for i, layer in enumerate(self.model.model.layers):
            a = layer.self_attn
            q, k, v, gate, up = _split_weights(layer, *shape, "weight")
            qkv = [permuted(q, self.heads), permuted(k, self.kv_heads), v]
            q_b, k_b, v_b = _split_weights(layer, *shape, "bias")
            bias = None if q_b is None else torch.cat([permuted(q_b, self.heads), permuted(k_b, self.kv_heads), v_b])
            qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
            new = {
                "qkv": torch.cat(qkv),  # (Hq*D + 2*Hkv*D, E)
                "qkv_bias": bias,
                "gate_up": None if gate is None else torch.cat([gate, up]),  # (2I, E); MoE: the shared expert's
                "q_norm": qk_norm(qn),
                "k_norm": qk_norm(kn),
                "router": moe.fused_router(layer.mlp) if moe.is_sparse(layer.mlp) else None,  # (E [+ 1], E)
            }
            if fresh:
                self.layers.append(new)
            else:
                for key, value in new.items():  # MoE's router without a shared gate is the parameter itself:
                    if value is not None and value is not self.layers[i][key]:  # a copy onto it would bump its version
                        self.layers[i][key].copy_(value)
        self._version = version
        return True

    @torch.no_grad()
    def _rope_table(self, length: int) -> None:
        """cos + i sin per (position, pair), float32, from HF's own rotary module (its scaling rules included); pairs
        past the rotary dims (partial rotary) get cos 1, sin 0."""
        self.rope = self._table(length)

    def _table(self, length: int, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, cos + i sin) per (position, pair) of HF's rotary module called with `args` after the
        positions (Gemma 3: the layer type)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = self.model.model.rotary_emb(probe, positions, *args)  # (1, T, R), halves equal; R = D unless partial
        self.rotary_dim = cos.shape[-1]
        rest = (self.head_dim - self.rotary_dim) // 2
        half = self.rotary_dim // 2
        cos_TD2 = F.pad(cos[0, :, :half].float(), (0, rest), value=1.0).contiguous()
        sin_TD2 = F.pad(sin[0, :, :half].float(), (0, rest), value=0.0).contiguous()
        return cos_TD2, sin_TD2, torch.complex(cos_TD2, sin_TD2)

    def new_cache(self, batch: int, capacity: int) -> torch.Tensor:
        """(L, 2, B, Hkv, T, D) keys and values. Zeros: slots never written are masked, and 0 * finite stays 0."""
        shape = (len(self.layers), 2, batch, self.kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _rope(self, x_BQHD: torch.Tensor, rope_BQ1D2: torch.Tensor) -> torch.Tensor:
        shape = x_BQHD.shape
        pairs = torch.view_as_complex(x_BQHD.float().reshape(*shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * rope_BQ1D2).reshape(shape).to(self.dtype)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim with the module's own `weight`, rounded as the model's norms round."""
        if self.use_kernels:
            return kernels.rms_norm(x, weight, self.eps, gemma=self.gemma_norms)
        return kernels.rms_norm_reference(x, weight, self.eps, gemma=self.gemma_norms)

    def _queries(self, fused: dict, qkv_BQF: torch.Tensor, pos_BQ: torch.Tensor, slots_Q: torch.Tensor,
                 kv_cache: torch.Tensor, rope: tuple | None = None) -> torch.Tensor:  # fmt: skip
        """Rotated queries (B, Q, Hq, D); rotated keys and the values written to `kv_cache` (2, B, Hkv, T, D).
        `rope`: the layer's (cos, sin, cos + i sin) tables, the model's by default."""
        B, Q, _ = qkv_BQF.shape
        Hq, Hkv, D = self.heads, self.kv_heads, self.head_dim
        cos_TD2, sin_TD2, rope_TD2 = rope or self.rope
        if fused["q_norm"] is not None:  # qwen3, gemma3: per-head RMSNorm before RoPE, back in the qkv row layout
            qkv_BQF = self._qk_norms(fused, qkv_BQF)
        if self.clip_qkv is not None:
            qkv_BQF = qkv_BQF.clamp(-self.clip_qkv, self.clip_qkv)
        if self.use_kernels:
            qkv_NF = qkv_BQF.view(B * Q, -1)
            q_NHD = kernels.rope_cache_write(qkv_NF, cos_TD2, sin_TD2, pos_BQ.reshape(-1), slots_Q, kv_cache, Hq, Hkv)
            return q_NHD.view(B, Q, Hq, D)
        qk_BQHD = qkv_BQF[..., : (Hq + Hkv) * D].view(B, Q, Hq + Hkv, D)
        v_BQHD = qkv_BQF[..., (Hq + Hkv) * D :].view(B, Q, Hkv, D)
        qk_BQHD = self._rope(qk_BQHD, rope_TD2[pos_BQ][:, :, None])  # queries and keys in one multiply
        kv_cache.index_copy_(3, slots_Q, torch.stack([qk_BQHD[:, :, Hq:], v_BQHD]).transpose(2, 3))
        return qk_BQHD[:, :, :Hq]

    def _qk_norms(self, fused: dict, qkv_BQF: torch.Tensor) -> torch.Tensor:
        """q and k RMS-normed with the layer's q/k norms: per head (Qwen3, Gemma 3: weight (D,)) or over all heads
        (OLMoE: weight (Hq*D,) / (Hkv*D,), its rows in the same rope order as the projection's)."""
        B, Q, _ = qkv_BQF.shape
        Hq, Hkv, D = self.heads, self.kv_heads, self.head_dim
        q_BQF, k_BQF, v_BQF = qkv_BQF.split([Hq * D, Hkv * D, Hkv * D], -1)
        if fused["q_norm"].numel() == D:
            q_BQF = self._norm(q_BQF.view(B, Q, Hq, D), fused["q_norm"]).reshape(B, Q, -1)
            k_BQF = self._norm(k_BQF.view(B, Q, Hkv, D), fused["k_norm"]).reshape(B, Q, -1)
        else:
            q_BQF, k_BQF = self._norm(q_BQF, fused["q_norm"]), self._norm(k_BQF, fused["k_norm"])
        return torch.cat([q_BQF, k_BQF, v_BQF], -1)

    def _attention(self, q_BQHD: torch.Tensor, kv_2BHTD: torch.Tensor, bias: torch.Tensor | None,
                   keys: int | None) -> torch.Tensor:  # fmt: skip
        """Attention output (B * Q, Hq * D). Decode (`keys` None, Q = 1): over all T cache slots under `bias`
        (B, Hkv, G, T). A prompt chunk (its Q queries written to slots keys-Q..keys-1): over slots 0..keys-1 under
        `bias` (B, 1, Q, keys) with padding, else None for a whole prompt (causal) or a lower-right CausalBias."""
        B, Q, Hq, D = q_BQHD.shape
        G = Hq // self.kv_heads
        if keys is None:  # GQA as more queries per key head: query head h reads key head h // G, as HF's repeat_kv
            q_BKGD = q_BQHD.view(B, self.kv_heads, G, D)
            o_BKGD = F.scaled_dot_product_attention(q_BKGD, kv_2BHTD[0], kv_2BHTD[1], bias, scale=self.scale)
            return o_BKGD.reshape(B, Hq * D)
        # prefill: keys repeated per query head (B * Hq * K * D, the size of the keys) so the mask broadcasts over
        # heads without a copy; the grouped layout above would need the (B, Hkv, G*Q, K) mask materialized
        k_BHKD, v_BHKD = (x[:, :, :keys].repeat_interleave(G, dim=1) for x in kv_2BHTD)
        o_BHQD = F.scaled_dot_product_attention(q_BQHD.transpose(1, 2), k_BHKD, v_BHKD, bias, is_causal=bias is None,
                                                scale=self.scale)  # fmt: skip
        return o_BHQD.transpose(1, 2).reshape(B * Q, Hq * D)

    def _window_bias(self, bias: torch.Tensor | None, slots_Q: torch.Tensor, keys: int,
                     window: int | None) -> torch.Tensor | None:  # fmt: skip
        """`bias` with -inf on the keys a sliding window of `window` hides from each query, as HF's mask: key slot k
        is visible from query slot q when k > q - window (slots count left padding, as HF's cache positions do).
        Unchanged when the keys all fit in the window (then it hides nothing, at any step)."""
        if window is None or keys <= window:
            return bias
        key_slots_K = torch.arange(keys, device=self.device)
        far_QK = key_slots_K <= slots_Q[:, None] - window
        if bias is None or isinstance(bias, CausalBias):  # a prompt (chunk) without padding: the causal mask, explicit
            bias = self.causal_bias(slots_Q.shape[0], keys)
        return bias.masked_fill(far_QK, float("-inf"))

    def causal_bias(self, queries: int, keys: int) -> torch.Tensor:
        """The additive (queries, keys) mask of a prompt chunk without padding, its queries the last `queries` of
        slots 0..keys-1: lower-right causal (what None or torch's CausalBias stand for, made explicit)."""
        bias = torch.zeros((queries, keys), dtype=self.dtype, device=self.device)
        return bias.masked_fill(torch.ones_like(bias, dtype=torch.bool).triu(keys - queries + 1), float("-inf"))

    def _biases(self, bias: torch.Tensor | None, slots_Q: torch.Tensor, cache: torch.Tensor,
                keys: int | None) -> dict[int | None, torch.Tensor | None]:  # fmt: skip
        """The mask of each window size, made once per step."""
        keys = cache.shape[-2] if keys is None else keys  # decode reads every cache slot, a prompt chunk those written
        return {w: self._window_bias(bias, slots_Q, keys, w) for w in set(self.windows)}

    def _silu_mul(self, gate_up_N2I: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a (N, 2I) gate|up product."""
        if self.use_kernels:
            return kernels.silu_mul(gate_up_N2I)
        gate_NI, up_NI = gate_up_N2I.chunk(2, dim=-1)
        return F.silu(gate_NI) * up_NI

    def prefill_chunk(self, batch: int, keys: int, masked: bool = True) -> int:
        """Query positions per row of one prompt chunk over at most `keys` slots: as many as keep its activations,
        and with `masked` its (B, C, keys) masks, within PREFILL_BYTES. A prompt without masks (no padding, no
        window that hides a key) runs whole up to that: a later chunk's lower-right causal attention runs on SDPA's
        flash kernel, 0.65x the speed of the cuDNN kernel a whole causal prompt gets on an H200."""
        per_query = self._token_bytes() + (keys * self._score_bytes() if masked else 0)
        return max(1, min(PREFILL_CHUNK, PREFILL_BYTES // (batch * per_query)))

    def _token_bytes(self) -> int:
        """About the bytes one prompt position holds inside a layer: the MLP's gate|up and activation, the attention's
        q/k/v and output and the residual stream (model dtype)."""
        config = self.model.config
        hidden = config.hidden_size
        width = getattr(config, "intermediate_size", None) or 4 * hidden
        return self.dtype.itemsize * (3 * width + 2 * (self.heads + self.kv_heads) * self.head_dim + 2 * hidden)

    def _needs_masks(self, padded: bool, length: int) -> bool:
        """Whether a prompt's chunks attend under (B, 1, C, K) masks: padding, or a window shorter than it."""
        return padded or any(w is not None and w < length for w in self.windows)

    def _score_bytes(self) -> int:
        """Bytes a prompt chunk holds per (row, query, key): its visibility mask and temporaries (bool), the additive
        mask and a copy per sliding window size (model dtype)."""
        return 3 + self.dtype.itemsize * (1 + len({w for w in self.windows if w is not None}))

    @torch.no_grad()
    def prefill(self, ids_BP: torch.Tensor, pos_BP: torch.Tensor, real_BP: torch.Tensor,
                cache: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Logits (B, V) in float32 of the prompt's last position. The prompt (`real_BP` False on left padding) is
        written to cache slots 0..P-1 in chunks of `prefill_chunk` positions, each attending to the slots written
        before it and causally within itself: the same attention as one pass, with (B, 1, C, K) masks, never (P, P),
        and C tokens per row through the MLPs at a time."""
        B, P = ids_BP.shape
        real_BP = None if bool(real_BP.all()) else real_BP
        chunk = self.prefill_chunk(B, P, self._needs_masks(real_BP is not None, P))
        slots_P = torch.arange(P, device=self.device)
        for start in range(0, P, chunk):
            end = min(start + chunk, P)
            bias = self._chunk_bias(real_BP, slots_P[start:end], end)
            logits_BV = self.forward(ids_BP[:, start:end], pos_BP[:, start:end], slots_P[start:end], cache, bias, end)
        return logits_BV

    def _chunk_bias(self, real_BP: torch.Tensor | None, slots_Q: torch.Tensor,
                    keys: int) -> torch.Tensor | CausalBias | None:  # fmt: skip
        """The additive mask (B, 1, Q, keys) of a prompt chunk at `slots_Q` over slots 0..keys-1: a query sees the
        real keys up to its own slot, and always itself (a padding query with no key at all would give NaN). Without
        padding (`real_BP` None): None for a whole prompt (causal, as HF drops an all-ones mask), and torch's
        lower-right causal bias for a later chunk, which SDPA runs on its flash kernel with no mask tensor (an H200
        ran it at 301 TFLOP/s, a dense (1, 1, Q, keys) mask at 262 on cuDNN: docs/BENCHMARKS.md "Long prompts")."""
        if real_BP is None:
            Q = slots_Q.shape[0]
            return None if keys == Q else causal_lower_right(Q, keys)
        slots_K = torch.arange(keys, device=self.device)
        visible_BQK = (slots_K <= slots_Q[:, None])[None] & real_BP[:, None, :keys] | (slots_K == slots_Q[:, None])
        bias_BQK = torch.zeros(visible_BQK.shape, dtype=self.dtype, device=self.device)
        return bias_BQK.masked_fill_(~visible_BQK, float("-inf"))[:, None]

    def forward(self, ids_BQ: torch.Tensor, pos_BQ: torch.Tensor, slots_Q: torch.Tensor, cache: torch.Tensor,
                bias: torch.Tensor | None, keys: int | None = None) -> torch.Tensor:  # fmt: skip
        """Logits (B, V) in float32 of the last query position. Writes keys/values of the Q inputs at cache slots
        `slots_Q`, then attends with the additive mask (0 or -inf) `bias`: at decode (`keys` None, Q = 1)
        (B, 1, 1, T) over all cache slots; a prompt chunk (`prefill`: slots keys-Q..keys-1) over slots 0..keys-1,
        (B, 1, Q, keys) with padding, else None for a whole prompt (causal) or a lower-right CausalBias."""
        model = self.model.model
        B, Q = ids_BQ.shape
        Hq, Hkv = self.heads, self.kv_heads
        if keys is None:  # the mask as SDPA sees it, materialized once per step rather than expanded by every layer
            bias = bias.expand(B, Hkv, Hq // Hkv, -1).contiguous()
        biases = self._biases(bias, slots_Q, cache, keys)
        h_NE = model.embed_tokens(ids_BQ).view(B * Q, -1)
        for layer, fused, window in zip(model.layers, self.layers, self.windows, strict=True):
            a = layer.self_attn
            qkv_BQF = F.linear(self._norm(h_NE, layer.input_layernorm.weight), fused["qkv"], fused["qkv_bias"])
            q_BQHD = self._queries(fused, qkv_BQF.view(B, Q, -1), pos_BQ, slots_Q, cache[a.layer_idx])
            o_NF = self._attention(q_BQHD, cache[a.layer_idx], biases[window], keys)
            h_NE.addmm_(o_NF, a.o_proj.weight.t())  # residual fused, in place: addmm would first copy h
            if a.o_proj.bias is not None:
                h_NE.add_(a.o_proj.bias)
            x_NE = self._norm(h_NE, layer.post_attention_layernorm.weight)
            if fused["router"] is not None:
                h_NE.add_(moe.forward(self.model.config, layer.mlp, fused, x_NE, keys is not None, self._silu_mul))
            else:
                h_NE.addmm_(self._silu_mul(F.linear(x_NE, fused["gate_up"])), layer.mlp.down_proj.weight.t())
        x_BE = self._norm(h_NE.view(B, Q, -1)[:, -1], model.norm.weight)
        return self.model.lm_head(x_BE).float()  # HF generate scores in float32 too
