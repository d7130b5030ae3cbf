"""The fused decode step of Gemma 2 and Gemma 3 text models (`gemma2`, `gemma3_text`): decoder.py's fused weights,
cache, masks (sliding windows included), RoPE and attention, with Gemma's layer around them:
- the embedding is scaled by sqrt(hidden) (HF's scaled embedding module, called as is);
- every RMSNorm multiplies by (1 + w) in float32 and rounds once (kernels.rms_norm with gemma=True: HF's bits);
- a layer is: norm, attention (Gemma 3: per-head q/k norms), o, post-attention norm, residual; pre-feed-forward
  norm, GELU-tanh gated MLP, post-feed-forward norm, residual;
- the attention scale is query_pre_attn_scalar ** -0.5 (HF's `scaling`);
- Gemma 3 gives sliding and full layers their own RoPE (local base, global base and scaling): one table per layer type;
- Gemma 2's soft-capping: of the final logits, tanh(logits / cap) * cap in the model dtype as HF; of the attention
  scores (attn_logit_softcapping, 50.0 in its checkpoints), which SDPA cannot apply, attention as HF's eager one:
  scores, cap, mask, float32 softmax, values (torch ops, graph-capturable; slower than SDPA at long contexts).
Refused (HF `generate` runs, with the reason): bidirectional attention, another activation, other layer types.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from fasttune.generate.decoder import (
    GEMMA_TYPES,
    LAYER_KINDS,
    STATIC_ROPE,
    FusedDecoder,
    _structure_reason,
    rope_reason,
)


def handles(model) -> bool:
    return getattr(model.config, "model_type", None) in GEMMA_TYPES


def unsupported_reason(model) -> str | None:
    """Why GemmaDecoder cannot run `model` (a Gemma 2/3 text model), or None when it can."""
    config = model.config
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention (use_bidirectional_attention) is not supported"
    if getattr(config, "hidden_activation", None) != "gelu_pytorch_tanh":
        return f"MLP activation {config.hidden_activation!r}: only gelu_pytorch_tanh is supported for Gemma"
    kinds = set(config.layer_types)
    if not kinds <= LAYER_KINDS:
        return f"layer types {sorted(kinds - LAYER_KINDS)}: only full and sliding-window attention are supported"
    return rope_reason(config, STATIC_ROPE) or _structure_reason(model)  # gemma3: one RoPE per layer type


class GemmaDecoder(FusedDecoder):
    """FusedDecoder with Gemma's layer (module docstring)."""

    gemma_norms = True

    def __init__(self, model):
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.attn_softcap = getattr(model.config, "attn_logit_softcapping", None)
        super().__init__(model)

    def _rope_table(self, length: int) -> None:
        """One table per layer type for Gemma 3 (its rotary module takes the type), one for all layers otherwise."""
        types = self.model.config.layer_types
        if self.model.config.model_type == "gemma3_text":
            tables = {t: self._table(length, t) for t in set(types)}
            self.layer_ropes = [tables[t] for t in types]
        else:
            self.layer_ropes = [self._table(length)] * len(types)
        self.rope = self.layer_ropes[0]

    def _needs_masks(self, padded: bool, length: int) -> bool:
        """The capped attention holds (B, Hq, C, K) scores whatever the mask: bounded as masks are."""
        return bool(self.attn_softcap) or super()._needs_masks(padded, length)

    def _score_bytes(self) -> int:
        """As FusedDecoder's, plus the soft-capped attention's scores per query head: capped, masked (model dtype)
        and their float32 softmax."""
        capped = self.heads * (3 * self.dtype.itemsize + 4) if self.attn_softcap else 0
        return super()._score_bytes() + capped

    def _attention(self, q_BQHD: torch.Tensor, kv_2BHTD: torch.Tensor, bias: torch.Tensor | None,
                   keys: int | None) -> torch.Tensor:  # fmt: skip
        """SDPA, or with soft-capped scores HF's eager attention: scale, tanh cap, mask, float32 softmax, values."""
        if not self.attn_softcap:
            return super()._attention(q_BQHD, kv_2BHTD, bias, keys)
        B, Q, Hq, D = q_BQHD.shape
        decode, G = keys is None, Hq // self.kv_heads
        keys = kv_2BHTD.shape[-2] if decode else keys
        k_BHKD, v_BHKD = (x[:, :, :keys].repeat_interleave(G, dim=1) for x in kv_2BHTD)
        s_BHQK = q_BQHD.transpose(1, 2) @ k_BHKD.transpose(-1, -2) * self.scale
        s_BHQK = torch.tanh(s_BHQK / self.attn_softcap) * self.attn_softcap
        if decode:  # (B, Hkv, G, T): query head h = kv head h // G, as in the grouped SDPA
            bias = bias.reshape(B, Hq, 1, keys)
        elif bias is None or isinstance(bias, CausalBias):  # a prompt (chunk) without padding: causal, lower right
            bias = self.causal_bias(Q, keys)
        p_BHQK = (s_BHQK + bias).softmax(-1, dtype=torch.float32).to(self.dtype)
        return (p_BHQK @ v_BHKD).transpose(1, 2).reshape(B * Q, Hq * D)

    def forward(self, ids_BQ: torch.Tensor, pos_BQ: torch.Tensor, slots_Q: torch.Tensor, cache: torch.Tensor,
                bias: torch.Tensor | None, keys: int | None = None) -> torch.Tensor:  # fmt: skip
        """As FusedDecoder.forward, with Gemma's layer."""
        model = self.model.model
        B, Q = ids_BQ.shape
        Hq, Hkv = self.heads, self.kv_heads
        if keys is None:
            bias = bias.expand(B, Hkv, Hq // Hkv, -1).contiguous()
        biases = self._biases(bias, slots_Q, cache, keys)
        h_NE = model.embed_tokens(ids_BQ).view(B * Q, -1)  # scaled by sqrt(hidden) in the model dtype, as HF
        for layer, fused, window, rope in zip(model.layers, self.layers, self.windows, self.layer_ropes, strict=True):
            a, m = layer.self_attn, layer.mlp
            qkv_BQF = F.linear(self._norm(h_NE, layer.input_layernorm.weight), fused["qkv"], fused["qkv_bias"])
            q_BQHD = self._queries(fused, qkv_BQF.view(B, Q, -1), pos_BQ, slots_Q, cache[a.layer_idx], rope)
            o_NF = self._attention(q_BQHD, cache[a.layer_idx], biases[window], keys)
            o_NE = F.linear(o_NF, a.o_proj.weight, a.o_proj.bias)
            h_NE = h_NE + self._norm(o_NE, layer.post_attention_layernorm.weight)
            gate_up_N2I = F.linear(self._norm(h_NE, layer.pre_feedforward_layernorm.weight), fused["gate_up"])
            gate_NI, up_NI = gate_up_N2I.chunk(2, dim=-1)
            down_NE = F.linear(F.gelu(gate_NI, approximate="tanh") * up_NI, m.down_proj.weight)
            h_NE = h_NE + self._norm(down_NE, layer.post_feedforward_layernorm.weight)
        logits_BV = self.model.lm_head(self._norm(h_NE.view(B, Q, -1)[:, -1], model.norm.weight))
        if self.softcap:
            logits_BV = torch.tanh(logits_BV / self.softcap) * self.softcap
        return logits_BV.float()
