"""Training FLOPs, one convention for MFU, the training benchmark and the attention kernel timings.

Model FLOPs: the arithmetic the step's math needs, whatever a kernel or an activation plan recomputes. A matmul
costs 2 FLOPs per multiply-add; backward is twice forward (the input gradient and the weight gradient each cost a
forward), so forward + backward = FWD_BWD = 3x forward, for the dense layers and for attention alike. With LoRA the
frozen weights need no weight gradient: 2x forward for the dense layers. Causal attention does half of its S x S
scores. (FlashAttention's papers count 3.5x for attention, because their backward recomputes the scores: hardware
FLOPs. Attention TFLOP/s in docs/BENCHMARKS.md measured before 2026-11-28 used that count: multiply them by 6/7.)
"""

from __future__ import annotations

from collections.abc import Sequence

FWD_BWD = 3.0
"""Forward + backward FLOPs as a multiple of forward FLOPs."""


def head_dim(config) -> int:
    """Per-head width: the config's `head_dim` when it sets one (Gemma, Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    """Key/value heads: `num_key_value_heads`; Falcon's `num_kv_heads` with its new decoder or without multi_query,
    else one (Falcon-7B's multi-query attention: counted as 71 heads before); else the query heads."""
    if n := getattr(config, "num_key_value_heads", None):
        return int(n)
    if getattr(config, "model_type", None) == "falcon":
        if getattr(config, "new_decoder_architecture", False) or not getattr(config, "multi_query", True):
            return int(getattr(config, "num_kv_heads", None) or config.num_attention_heads)
        return 1
    return config.num_attention_heads


PLAIN_MLP = frozenset({"gpt2", "gpt_neo", "gptj", "gpt_neox", "gpt_neox_japanese", "gpt_bigcode", "opt", "falcon",
                       "phi", "bloom", "starcoder2", "codegen", "mpt", "biogpt", "xglm", "nemotron",
                       "persimmon"})  # fmt: skip
"""Model types whose MLP is two matmuls (up, activation, down); the others gate it (SwiGLU/GeGLU: three)."""


def mlp_width(config) -> int:
    """The MLP's inner width: `intermediate_size` (Llama and most), GPT-2's `n_inner`, OPT's `ffn_dim`, else the
    4 x hidden that GPT-2 and Falcon default to."""
    for name in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        if width := getattr(config, name, None):
            return int(width)
    return 4 * config.hidden_size


def experts(config) -> int:
    """Routed experts of an MoE config (Mixtral's num_local_experts, Qwen-MoE's num_experts, DeepSeek's
    n_routed_experts); 0 for a dense model."""
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if n := getattr(config, name, None):
            return int(n)
    return 0


def moe_widths(config) -> tuple[int, int, int]:
    """(top-k, one expert's width, the shared experts' total width) of an MoE config: `moe_intermediate_size` per
    expert, or `intermediate_size` as in Mixtral; (0, mlp_width, 0) for a dense model."""
    k = getattr(config, "num_experts_per_tok", None)
    if not (k and experts(config)):
        return 0, mlp_width(config), 0
    expert = getattr(config, "moe_intermediate_size", None) or mlp_width(config)
    shared = getattr(config, "shared_expert_intermediate_size", None) or expert * (
        getattr(config, "n_shared_experts", None) or 0)  # fmt: skip
    return int(k), int(expert), int(shared)


def active_mlp_width(config) -> int:
    """The MLP width a token runs through: an MoE layer's top-k experts plus its shared experts; a dense model's
    `mlp_width`. Layers an MoE config keeps dense (DeepSeek's first_k_dense_replace, Qwen-MoE's mlp_only_layers) are
    counted as MoE ones."""
    k, expert, shared = moe_widths(config)
    return k * expert + shared if k else expert


def mlp_matrices(config) -> int:
    return 2 if getattr(config, "model_type", "") in PLAIN_MLP else 3


def attention_flops(doc_lens: Sequence[int], n_heads: int, head_dim: int, *, backward: bool = True,
                    layers: int = 1) -> float:  # fmt: skip
    """Causal attention of documents of these lengths: 2 matmuls (QK^T, PV) x 2 FLOPs x n^2/2 causal pairs x D
    per head and document (documents never attend to each other), x FWD_BWD with backward."""
    fwd = 2 * 2 * head_dim * n_heads * layers * sum(n * n / 2 for n in doc_lens)
    return fwd * (FWD_BWD if backward else 1.0)


def dense_flops_per_token(config, lora: bool = False) -> float:
    """Training FLOPs per token of every matmul with weights (projections, MLP or the experts a token is routed to and
    the router, lm head): 2 x weights forward, x FWD_BWD (x 2 with LoRA: no weight gradients; the adapters are
    negligible)."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, kv_heads(config)
    attn = h * head_dim(config) * (2 * heads + 2 * kv)
    mlp = mlp_matrices(config) * h * active_mlp_width(config) + h * experts(config)  # + the router
    return 2 * (2.0 if lora else FWD_BWD) * (n_layers * (attn + mlp) + h * config.vocab_size)


def step_flops(config, doc_lens: Sequence[int], lora: bool = False) -> float:
    """Model FLOPs of one training step over documents of these lengths (dense layers + causal attention)."""
    dense = dense_flops_per_token(config, lora) * sum(doc_lens)
    return dense + attention_flops(doc_lens, config.num_attention_heads, head_dim(config),
                                   layers=config.num_hidden_layers)  # fmt: skip
