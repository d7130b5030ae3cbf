"""What a decoder layer keeps for backward, per token: the byte counts behind the memory estimate (train/estimate.py).

Byte counts per token and decoder layer (bf16 compute, 2 bytes; h hidden, q = heads x head_dim, kv = kv heads x
head_dim, i intermediate), counted from what autograd saves in HF's Llama layer: each unfused RMSNorm keeps its fp32
upcast and its bf16 product input (6h), the q/k/v and gate/up projections their normed input (2h each), attention
q, k, v and its output (4q + 4kv), SwiGLU gate, silu(gate), up and the product (8i). Checked against the H100 runs
in docs/BENCHMARKS.md (1B shape, 16k tokens: 41.4 GiB measured without Liger, 41.1 predicted; see `Estimate.total`).
Gemma's layers differ in their norms only (`norm_bytes`; GeGLU keeps what SwiGLU keeps, the embedding scale nothing).
Other architectures' plain MLPs, activations, LayerNorms, parallel blocks and fused q/k/v projections are read from
the built layer (model/layout.py) and counted within 1% of tiny GPT-NeoX, StarCoder2, Falcon, Phi, GPT-J, GPT-2 and
GLM layers (tests/test_memory_archs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fasttune.model import layout
from fasttune.model.flops import kv_heads, moe_widths

NORMS = {"gemma": (2, 8, False), "gemma2": (4, 8, False), "gemma3_text": (4, 8, True), "qwen3": (2, 6, True),
         "qwen3_moe": (2, 6, True), "olmo2": (2, 8, True), "cohere": (1, 12, False),
         "cohere2": (1, 12, False), "gpt_neox": (2, 2, False), "gpt2": (2, 2, False), "gpt_bigcode": (2, 2, False),
         "starcoder2": (2, 2, False), "opt": (2, 2, False), "bloom": (2, 2, False), "phi": (1, 2, False),
         "gptj": (1, 2, False), "codegen": (1, 2, False), "falcon": (2, 2, False)}  # fmt: skip
"""model_type: (norms over the hidden size in a decoder layer, bytes they keep an element, q/k norms of that kind)
where not Llama's (2, 6, False), for a config alone (train/footprint.py); a built model's layer is read instead
(model/norm.py `norm_layout`, train/estimate.py). Left out, a Qwen3 layer's q/k norms (6(q + kv) bytes per token,
2(q + kv) with the lean RMSNorm) made the estimate 19% low at the test's shape, OLMo2's norms 35% (measured on
CPU). torch's LayerNorm keeps its input (2); Falcon's parallel_attn layers have one (`_norms`)."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    q: int
    kv: int
    intermediate: int
    """The MLP's width; an MoE layer's: one expert's."""
    vocab: int
    routed: int = 0
    """MoE: the experts each token is routed to (top-k); 0 for a dense MLP."""
    shared: int = 0
    """MoE: the shared experts' total width (Qwen-MoE's shared_expert_intermediate_size, DeepSeek's n_shared_experts x
    moe_intermediate_size)."""
    norms: int = 2
    """Norms over the hidden size in a decoder layer: 4 in Gemma 2/3 (one before and one after each block)."""
    norm_elem: int = 6
    """Bytes a norm keeps an element (norm_bytes): HF's Llama RMSNorm 6 (its fp32 upcast, its normalized input in
    bf16); 8 where the weight multiplies in fp32 (Gemma's 1 + weight, OLMo2's), keeping an fp32 normalized input; 12
    for Cohere's LayerNorm (its centred fp32 input twice, and the normalized one)."""
    qk_norms: bool = False
    """Per-head RMSNorms of q and k (Gemma 3, Qwen3), of the layer's norm kind."""
    softcap: bool = False
    """The logits are softcapped before the loss (Gemma 2's final_logit_softcapping; counted by train/estimate.py)."""
    fused_qkv: bool = False
    """One projection for q, k and v (Phi-3's qkv_proj, GPT-NeoX's and Falcon's query_key_value, GPT-2's c_attn):
    under autocast it keeps one bf16 copy of the norm's output, not three. (This and the fields below are read from
    the built layer by train/estimate.py, model/layout.py.)"""
    qkv_views: bool = False
    """v is a view of the fused output, which stays alive whole beside RoPE's rotated copies of q and k: 2(q + kv)
    more where attention is kept (Phi-3, GPT-NeoX, Falcon; not GPT-2's, without RoPE, nor CodeGen's)."""
    q_copy: bool = False
    """A partial rotary (Phi, GLM, GPT-NeoX, Phi-3) leaves q in (batch, heads, seq, dim) order and the attention's
    output is copied for the o-projection: 2q more where attention is kept."""
    mlp: str = "gated"
    """The dense MLP: "gated" (SwiGLU, GeGLU: gate, up, down), "gate_up" (gated, gate and up one projection: Phi-3,
    GLM; under autocast one reader of the norm's output), "plain" (fc1, activation, fc2: GPT-2, GPT-NeoX, Phi,
    Falcon, StarCoder2, OPT, ...: two matmuls, no gate or product kept)."""
    act_elem: int = 4
    """Bytes an element of the MLP width that its activation keeps, its output included (the next matmul keeps it):
    4 for torch's kernels, which keep their input (silu, gelu, gelu-tanh), 2 for relu (its output), 10 for GELU-tanh
    written in Python (NewGELUActivation: four intermediates). Measured by running it (model/layout.py)."""
    parallel: bool = False
    """Attention and MLP read the layer's input side by side (Phi, GPT-J, CodeGen, Falcon, Cohere; GPT-NeoX's
    use_parallel_residual): one norm's output read by both blocks, or two norms keeping one input."""

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        d = getattr(config, "head_dim", None) or config.hidden_size // heads
        k, width, shared = moe_widths(config)
        norms, elem, qk = _norms(config)
        softcap = bool(getattr(config, "final_logit_softcapping", None))
        return cls(config.hidden_size, config.num_hidden_layers, heads * d, kv_heads(config) * d, width,
                   config.vocab_size, k, shared, norms, elem, qk, softcap, parallel=layout.parallel(config, norms),
                   **layout.config_layout(config))  # fmt: skip


def _norms(config) -> tuple[int, int, bool]:
    """NORMS of the config's model type; Falcon's parallel_attn layers have one LayerNorm (its new decoder two, or
    num_ln_in_parallel_attn)."""
    norms, elem, qk = NORMS.get(getattr(config, "model_type", None), (2, 6, False))
    if getattr(config, "model_type", None) == "falcon":
        new = bool(getattr(config, "new_decoder_architecture", False))
        one_or_two = getattr(config, "num_ln_in_parallel_attn", None) or (2 if new else 1)
        norms = one_or_two if new or getattr(config, "parallel_attn", False) else 2
    return norms, elem, qk


def layer_bytes(s: Shape, plan: str, liger: bool = False, fp32_stream: bool = False, lora_rank: int = 0,
                lora_upcast: bool = False, fused_mlp: bool = False, lean_norm: bool = False) -> float:  # fmt: skip
    """Activation bytes per token one decoder layer keeps for backward under `plan` (not every:K: see below);
    `lora_rank`, `lora_upcast`: peft LoRA adapters (see lora_bytes); `fused_mlp`: fasttune's SwiGLU function
    (model/mlp.py) keeps gate and up only; `lean_norm`: fasttune's RMSNorm keeps its input only, and the norm outputs
    the next matmuls keep (q/k/v's and gate/up's input, 2h each) are recomputed (model/norm.py)."""
    h, q, kv = s.hidden, s.q, s.kv
    norms, in_attn = norm_bytes(s, liger or lean_norm)  # in_attn: kept only where the attention block is
    outs = norm_outputs(s)  # what the blocks' matmuls (or a checkpoint of one) keep of the norms' outputs
    mlp, mlp_ops = mlp_bytes(s, liger, fused_mlp)
    stream = stream_bytes(s, plan, fused_mlp, lean_norm, liger) if fp32_stream else 0
    # a fused q/k/v output stays alive through v, a view of it, beside RoPE's copies of q and k (2q + 2kv); a partial
    # rotary's q makes the attention's output a copy for the o-projection (2q): measured on CPU (Phi-3, 4 head
    # layouts; GPT-NeoX, Falcon, Phi, GLM)
    in_attn += (2 * q + 2 * kv) * s.qkv_views + 2 * q * s.q_copy
    keep = {
        "none": norms + outs + 4 * q + 4 * kv + in_attn + mlp + stream,
        "ops": 2 * h + (2 * q + 4 * kv) + 2 * q + 2 * h + mlp_ops + stream,  # input, qkv, attn, o, MLP matmuls
        "attention": norms + outs + mlp + stream,  # the recomputed block's input, the other's matmul input
        "mlp": norms + outs + 4 * q + 4 * kv + in_attn + stream,
        "full": 2 * h + stream,
    }
    recomputed = LEAN_RECOMPUTED.get(plan, 0) * h if lean_norm else 0
    lora = lora_bytes(s, plan, lora_rank, liger, lora_upcast, lean_norm) if lora_rank else 0.0
    return float(keep[plan] - recomputed) + lora


def norm_outputs(s: Shape) -> int:
    """The norms' outputs the matmuls after them keep (q/k/v's and the MLP's input, 2h each): one in a parallel
    layer of one norm (Phi, GPT-J, Falcon, Cohere), which both blocks read."""
    return 2 * s.hidden * (1 if s.parallel and s.norms == 1 else 2)


def mlp_bytes(s: Shape, liger: bool = False, fused_mlp: bool = False) -> tuple[int, int]:
    """What the MLP keeps per token: (without recomputation, under `ops`). A gated one its gate and up outputs, the
    activation's keep (silu: its input, the gate, and its output) and their product, down's input: 8i with HF's
    modules, 6i with Liger's SwiGLU (it recomputes silu(gate)), 4i with fasttune's (model/mlp.py); a plain one its
    activation's keep alone (4i with torch's gelu: fc1's output and fc2's input; 10i with GELU-tanh written in
    Python). `ops` keeps the matmul outputs (gate and up or fc1, and down)."""
    h, i = s.hidden, s.intermediate
    if s.routed:  # MoE (HF's experts, unfused): each routed copy of a token keeps its expert's SwiGLU and ~4h more
        # (the token's copy, the weighted output); a shared expert (Qwen-MoE) keeps its SwiGLU and its gated output
        return (s.routed * (8 * i + 4 * h) + (8 * s.shared + 2 * h if s.shared else 0),
                s.routed * (4 * i + 2 * h) + (4 * s.shared + 2 * h if s.shared else 0))  # fmt: skip
    if s.mlp == "plain":
        return s.act_elem * i, 2 * i + 2 * h
    return (4 * i if fused_mlp else 6 * i if liger else (s.act_elem + 4) * i), 4 * i + 2 * h


def norm_bytes(s: Shape, keep_input: bool = False) -> tuple[int, int]:
    """What a layer's norms keep per token: (those over the hidden size, the per-head q/k norms, kept where the
    attention block is). HF's Llama RMSNorm keeps its fp32 upcast and its normalized input rounded to bf16 (6 bytes
    an element); Gemma's its fp32 upcast and its fp32 normalized input, as it multiplies by (1 + weight) in fp32 (8);
    `keep_input`: Liger's and the lean RMSNorm keep their bf16 input (2; unmeasured on Gemma), as torch's LayerNorm
    does (norm_elem 2), and two such norms of a parallel layer (GPT-NeoX) keep the same input. Measured exactly on
    CPU (tests/test_memory_layers.py): in bf16 a Gemma 2 layer keeps 20h more than a Llama layer (four norms of 8h,
    not two of 6h), Gemma 3 8(q + kv) more again; counted as Llama's, the 12-layer Gemma 2/3 runs on an H200 were
    predicted 7% and 10% below their peaks."""
    per = 2 if keep_input else s.norm_elem
    return per * _norm_inputs(s, per) * s.hidden, (per * (s.q + s.kv) if s.qk_norms else 0)


def _norm_inputs(s: Shape, per: int) -> int:
    """Norms over the hidden size counted apart: those that keep only their input (2 bytes an element) keep one in
    a parallel layer."""
    return 1 if s.parallel and per == 2 else s.norms


def stream_bytes(s: Shape, plan: str, fused_mlp: bool = False, lean_norm: bool = False, liger: bool = False) -> float:
    """What fp32 weights under bf16 autocast add per token and layer to what the bf16 layer keeps (measured exactly
    on CPU, tests/test_memory_layers.py): the residual stream and the norms' products are fp32 (+2h for each norm,
    +2h for a checkpoint's input), and each nn.Linear that reads a norm's output keeps its own bf16 copy of it, where
    bf16 ones share the output (+2h for each reader after the first: k and v; up, unless the fused MLP reads gate and
    up from one copy; an MoE layer's shared expert gate, up and gate projection beside the router). Where the matmuls
    keep those copies (none, attention) the lean RMSNorm has no output to recompute. Norms of fp32 products (Gemma's,
    norm_elem above 6) keep them in bf16 already, and the two that read the stream keep it as their fp32 upcast:
    nothing more; but Liger's norms keep their input in its own dtype, the fp32 stream (liger_kernel 0.8.5,
    ops/rms_norm.py). torch's LayerNorm keeps its input, the fp32 stream (+2h; once for the two norms of a parallel
    layer, which read one input). A plain MLP's fc1 or a gate_up_proj is its MLP's one reader; the one norm output of
    a parallel layer is read by both blocks, each keeping its own copy (+2h; bf16 layers keep one, norm_outputs)."""
    h = s.hidden
    attn = 0 if s.fused_qkv else 4 * h
    mlp = (6 * h if s.shared else 0) if s.routed else (0 if fused_mlp or s.mlp != "gated" else 2 * h)
    one = s.parallel and (s.norms == 1 or s.norm_elem == 2 or liger)  # one norm input: the stream
    norms = 0 if s.norm_elem > 6 and not liger else 2 * h * (1 if one else 2)  # the norms that read the stream
    shared = 2 * h if s.parallel and s.norms == 1 else 0
    lean = LEAN_RECOMPUTED[plan] * h if lean_norm and plan in ("none", "attention") else 0
    extra = {"none": norms + attn + mlp + shared, "ops": 2 * h, "attention": norms + 2 * h + mlp + shared,
             "mlp": norms + 2 * h + attn + shared, "full": 2 * h}  # fmt: skip
    return extra[plan] + lean


LEAN_RECOMPUTED = {"none": 4, "attention": 2, "mlp": 4}
"""Norm outputs (x hidden bytes per token and layer) the lean RMSNorm recomputes instead of the matmuls keeping them;
under `attention` the checkpoint keeps the attention block's input itself (measured: tests/test_memory_layers.py)."""


def lora_bytes(s: Shape, plan: str, rank: int, liger: bool = False, upcast: bool = False,
               lean_norm: bool = False) -> float:  # fmt: skip
    """What LoRA adapters on a frozen base change per token and decoder layer against the trainable layer.
    fasttune's forward (model/lora.py, `upcast` False): each lora_A keeps its bf16 input (which the trainable base
    matmul kept anyway) and its rank-r output; HF's RMSNorm no longer keeps its normalized input for the frozen norm
    weight's gradient (-2h each; Liger's keeps its input either way); `ops` keeps each adapted output beside the base
    matmul's (the addmm that adds the adapter is a matmul). Exact: tests/test_memory_layers.py measures it on CPU.
    `upcast`: peft's own forward (lora.dropout > 0) with fp32 adapters on a bf16 base: each adapted linear upcasts
    its input to fp32 for lora_A, kept for lora_A's weight gradient, and `ops` keeps the fp32 lora_B outputs; `ops`
    exact, the others fitted (q = h, kv = h / 2) to what HF's Llama layer under peft 0.21 keeps alive. Llama-3.1-8B,
    r 16, Liger: none keeps +0.2 KB over its 139 KB with fasttune's forward, +95 KB with peft's upcasts.
    `lean_norm`: the frozen lean RMSNorm keeps its input like Liger's; peft's upcasts keep an fp32 copy of the norm
    output, not the output, so nothing is recomputed for them. Every linear layer adapted (`all-linear`, or Llama's
    names): a fused q/k/v projection is one, a plain MLP (fc1, fc2) two with one i-wide output; torch's frozen
    LayerNorm keeps its input as before (measured: GPT-NeoX, StarCoder2, tests/test_memory_archs.py)."""
    h, q, kv, i = s.hidden, s.q, s.kv, s.intermediate
    n_attn = 2 if s.fused_qkv else 4  # the attention's adapted linears
    n_mlp, wide = {"plain": (2, 1), "gate_up": (2, 2)}.get(s.mlp, (3, 2))  # the MLP's linears, i-wide outputs
    if upcast:
        lean = 0.0  # where norms are kept: the lean one keeps its input (HF's frozen one does not), and what
        if lean_norm and plan in LEAN_RECOMPUTED:  # layer_bytes counts as recomputed stays: peft's upcasts keep fp32
            lean = ((0 if liger else 4) + {"none": 4, "attention": 2, "mlp": 2}[plan]) * h  # copies (the `mlp`
            # checkpoint's input is still recomputed)
        a = 4.0 * rank  # one fp32 lora_A output
        extra = {
            "none": 14 * h + 2 * q + 2 * i + (n_attn + n_mlp) * a,
            "ops": 8 * h + 4 * q + 8 * kv + 4 * wide * i + (n_attn + n_mlp) * a,  # lora_B outputs of q, k, v, o, MLP's
            "attention": 2 * h + 2 * i + n_mlp * a,  # the MLP's part of none (the attention block is recomputed)
            "mlp": 8 * h + 2 * q + n_attn * a,  # the attention block's part
            "full": 0.0,
        }
        return extra[plan] + lean
    a = 2.0 * rank  # one bf16 lora_A output
    # a frozen norm keeps no normalized input for its weight's gradient: 2 bytes an element of Llama's kind (6), the
    # fp32 4 of the others (8, 12); in fp32 without autocast (estimate.fp32_layers' norm_elem 4 and 6, bytes the
    # estimate doubles) 2, its fp32 4 (counted 0 at norm_elem 4, a Llama layer was 8h high, Gemma 2's 16h: measured
    # on CPU). torch's LayerNorm (2), Liger's and the lean norm keep their input either way
    per = 0 if liger or lean_norm or s.norm_elem <= 2 else 2 if s.norm_elem <= 6 else 4
    norms, qk = -per * s.norms * h, -per * (q + kv) * s.qk_norms
    extra = {
        "none": norms + qk + (n_attn + n_mlp) * a,
        "ops": 4 * h + 2 * q + 4 * kv + 2 * wide * i + (n_attn + n_mlp) * a,  # adapted outputs of q, k, v, o, MLP's
        "attention": norms + n_mlp * a,  # the layer's norms sit outside the recomputed attention block, q/k's inside
        "mlp": norms + qk + n_attn * a,
        "full": 0.0,
    }
    return extra[plan]


def activation_bytes(s: Shape, plan: str, tokens: int, liger: bool = False, fp32_stream: bool = False,
                     lora_rank: int = 0, lora_upcast: bool = False, fused_mlp: bool = False,
                     lean_norm: bool = False, scores: tuple[float, float] = (0.0, 0.0)) -> float:  # fmt: skip
    """Activations kept over all layers, plus the one layer being recomputed in backward when the plan recomputes;
    under `offload` the kept layer inputs are on the host (offloaded_bytes), not counted here.
    `scores`: bytes per token and layer that attention in a model's own code keeps (model/layout.py kept_scores),
    where the attention is kept whole (`none`, `mlp`) and under `ops`; `attention` and `full` recompute it."""

    per = _per_layer(s, liger, fp32_stream, lora_rank, lora_upcast, fused_mlp, lean_norm, scores)
    if plan == "offload":  # the layer being recomputed, its input and the one copied back ahead (train/offload.py)
        return tokens * (per("none") + 2 * per("full"))
    if plan.startswith("every:"):
        k = int(plan.split(":")[1])
        n_full = s.layers // k
        kept = n_full * per("full") + (s.layers - n_full) * per("ops")
    else:
        kept = s.layers * per(plan)
    recompute = 0.0 if plan == "none" else per("none")
    return tokens * (kept + recompute)


def _per_layer(s: Shape, liger: bool, fp32_stream: bool, lora_rank: int, lora_upcast: bool, fused_mlp: bool,
               lean_norm: bool, scores: tuple[float, float]):  # fmt: skip
    """Bytes per token one layer keeps under a plan, attention scores a model's own code keeps included."""

    def per(plan: str) -> float:
        kept = layer_bytes(s, plan, liger=liger, fp32_stream=fp32_stream, lora_rank=lora_rank, lora_upcast=lora_upcast,
                           fused_mlp=fused_mlp, lean_norm=lean_norm)  # fmt: skip
        return kept + {"none": scores[0], "mlp": scores[0], "ops": scores[1]}.get(plan, 0.0)

    return per


def end_of_backward_bytes(s: Shape, plan: str, tokens: int, liger: bool = False, fp32_stream: bool = False,
                          lora_rank: int = 0, lora_upcast: bool = False, fused_mlp: bool = False,
                          lean_norm: bool = False, scores: tuple[float, float] = (0.0, 0.0)) -> float:  # fmt: skip
    """Activations still live when backward reaches the first layers, beside (nearly) every gradient: under a plan
    that recomputes whole layers, the first recomputed layer's activations and the inputs kept below it; under
    `offload` its own two inputs too (all of activation_bytes). Plans that keep activations free them as gradients
    arrive: 0 (the estimate's max(grads, activations) holds). Measured on an H200 at the Llama-3.1-8B shape and 64k
    tokens (docs/BENCHMARKS.md "Offloading the layers' inputs"): `offload`'s peak is there, ~11 GiB above
    max(grads, activations)."""
    args = (liger, fp32_stream, lora_rank, lora_upcast, fused_mlp, lean_norm, scores)
    if plan == "offload":
        return activation_bytes(s, plan, tokens, *args)
    per = _per_layer(s, *args)
    if plan == "full":
        return tokens * (per("none") + per("full"))
    if plan.startswith("every:"):  # layers 0..k-2 keep their matmuls (ops), layer k-1 is recomputed
        k = int(plan.split(":")[1])
        return tokens * ((k - 1) * per("ops") + per("none") + per("full"))
    return 0.0


def attention_workspace_bytes(s: Shape, tokens: int) -> float:
    """What a flash attention backward allocates beside its inputs and outputs for one layer: an fp32 accumulator of
    dq ([tokens, q]) and, with grouped kv heads, dk and dv expanded to the query heads in bf16 (torch's varlen kernel,
    FlashAttention 2's mha_varlen_bwd). 2 GiB at the Llama-3.1-8B shape and 64k tokens.

    Counted the same in fp32 without autocast (--model.dtype fp32 on a GPU; a CPU run counts no workspace), where no
    flash kernel runs (half precision only: attention/backends.py FLASH; torch's varlen probe fails too), and sdpa
    runs the documents on its memory-efficient kernel (kernels._SDPA_LADDER: cuDNN and flash take no fp32): its
    backward writes dq straight into its fp32 output (no accumulator), and with grouped kv heads dk and dv expanded
    in fp32, 8q bytes a token: what is counted here with grouped heads, 4q above it without. Reasoned from the
    kernels, not measured: the CPU has none of these workspaces, and the kernels are CUDA's."""
    return tokens * s.q * (4.0 + (4.0 if s.kv < s.q else 0.0))


def offloaded_bytes(s: Shape, tokens: int, fp32_stream: bool = False) -> float:
    """Host bytes the `offload` plan pins: each decoder layer's input ([tokens, hidden], fp32 under autocast), each
    in a block of the next power of two (torch's caching host allocator rounds pinned allocations up to one)."""
    one = tokens * layer_bytes(s, "full", fp32_stream=fp32_stream)
    return float(s.layers * (1 << math.ceil(math.log2(one)))) if one > 0 else 0.0


def recompute_flops(s: Shape, plan: str) -> float:
    """Matmul FLOPs per token recomputed in backward (elementwise recompute counts as 0)."""
    attn = 2 * s.hidden * (2 * s.q + 2 * s.kv)
    matmuls = 2 if s.mlp == "plain" and not s.routed else 3  # a plain MLP: fc1 and fc2
    mlp = 2 * matmuls * s.hidden * (s.routed * s.intermediate + s.shared if s.routed else s.intermediate)
    per_layer = {"none": 0, "ops": 0, "attention": attn, "mlp": mlp, "full": attn + mlp, "offload": attn + mlp}
    if plan.startswith("every:"):
        return (s.layers // int(plan.split(":")[1])) * (attn + mlp)
    return s.layers * per_layer[plan]
