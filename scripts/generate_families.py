"""fasttune's Generator against HF generate (greedy, bf16, batch 1 and 8, 64-token prompts, 256 new tokens) on ~0.25B
random models of the families the fused decoder runs beyond Llama: Gemma 3 text, Gemma 2, Phi-3, Mistral with a
sliding window shorter than the call; the published Gemma 3 1B and Phi-3-mini shapes (`bench generate --shape`); and
mixture-of-experts models of the same attention (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; 0.4-0.7B in all, 0.17B
active), also at batch 32, with both decode paths of generate/moe.py timed apart (`gathered_tok_s`, `dense_tok_s`;
`path`: the one it picks at that batch) to check its choice. `torch_ops_tok_s`: the same graphs without the Triton
kernels (what they buy). Usage (a CUDA GPU): python scripts/generate_families.py OUT.json [NAME ...] (default: every
model below; `moe` for the MoE ones only).
Random weights have near-ties from the first steps, so the token agreement printed here is no correctness check:
tests/test_generate_families.py is (fp32, scores within tolerance of HF at every step)."""

import json
import sys
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Phi3Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from fasttune.generate import moe
from fasttune.generate.fast import Generator
from fasttune.model.build import preset_config

PROMPT, NEW = 64, 256
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0, eos_token_id=None)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "gemma3_text": lambda: Gemma3TextConfig(**SHAPE, head_dim=64, sliding_window=128),
    "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=64, sliding_window=128),
    "phi3": lambda: Phi3Config(**SHAPE),
    "mistral_w128": lambda: MistralConfig(**SHAPE, sliding_window=128),
    "gemma-3-1b": lambda: preset_config("gemma-3-1b", 32000),
    "phi-3-mini": lambda: preset_config("phi-3-mini", 32000),
}
# MoE: the attention above; experts narrow and many as the published ones (Qwen3-30B-A3B: top-8 of 128 of width 768 at
# hidden 2048; OLMoE-1B-7B: top-8 of 64 of 1024; Qwen1.5-MoE-A2.7B: top-4 of 60 of 1408 + a shared 5632; Mixtral: top-2
# of 8 of 14336 at 4096), shrunk with the hidden size
MOE = dict(SHAPE, intermediate_size=1024)
MOE_CONFIGS = {
    "mixtral": lambda: MixtralConfig(**MOE, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**MOE, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=256,
                                        shared_expert_intermediate_size=1024),
    "qwen3_moe": lambda: Qwen3MoeConfig(**MOE, head_dim=64, num_experts=64, num_experts_per_tok=8,
                                        moe_intermediate_size=256, norm_topk_prob=True),
    "olmoe": lambda: OlmoeConfig(**dict(MOE, intermediate_size=256), num_experts=64, num_experts_per_tok=8),
}  # fmt: skip
CONFIGS.update(MOE_CONFIGS)


def timed(fn) -> tuple[torch.Tensor, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def forced(model, ids, mask, gathered: bool) -> float:
    """tok/s of the fast path with every MoE layer on one decode path (generate/moe.py), whatever the batch."""
    choose, moe.gathers = moe.gathers, lambda *args: gathered
    try:
        gen = Generator(model)
        gen.generate(ids, mask, max_new_tokens=NEW)
        _, seconds = timed(lambda: gen.generate(ids, mask, max_new_tokens=NEW))
    finally:
        moe.gathers = choose
    return round(len(ids) * NEW / seconds)


def row(name: str, model, batch: int) -> dict:
    ids = torch.randint(5, 30000, (batch, PROMPT), device="cuda")
    mask = torch.ones_like(ids)
    gen = Generator(model)
    gen.generate(ids, mask, max_new_tokens=NEW)  # first call: graph capture, Triton compiles
    ours, ours_s = timed(lambda: gen.generate(ids, mask, max_new_tokens=NEW))
    plain = Generator(model)
    if plain.decoder is not None:
        plain.decoder.use_kernels = False
    plain.generate(ids, mask, max_new_tokens=NEW)
    _, plain_s = timed(lambda: plain.generate(ids, mask, max_new_tokens=NEW))
    hf = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **hf)  # warm-up
    theirs, theirs_s = timed(lambda: model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **hf))
    a, b = ours[:, PROMPT:], theirs[:, PROMPT:]
    first_diff = [int((x != y).nonzero()[0]) if (x != y).any() else NEW for x, y in zip(a, b, strict=True)]
    out = dict(model=name, batch=batch, reason=gen.reason, fast_tok_s=round(batch * NEW / ours_s),
               torch_ops_tok_s=round(batch * NEW / plain_s), hf_tok_s=round(batch * NEW / theirs_s),
               speedup=round(theirs_s / ours_s, 1),
               same_frac=round(float((a == b).float().mean()), 3), first_diff=first_diff)  # fmt: skip
    if name in MOE_CONFIGS and gen.reason is None:
        config = model.config
        experts, top_k = getattr(config, "num_local_experts", None) or config.num_experts, config.num_experts_per_tok
        out["path"] = "gathered" if moe.gathers(batch, top_k, experts) else "dense"
        out["gathered_tok_s"], out["dense_tok_s"] = forced(model, ids, mask, True), forced(model, ids, mask, False)
    return out


def main(out_path: str, names: list[str]) -> None:
    rows = []
    names = [n for n in names if n != "moe"] + (list(MOE_CONFIGS) if "moe" in names else [])
    for name in names or CONFIGS:
        config = CONFIGS[name]
        torch.manual_seed(0)
        attn = "eager" if name == "gemma2" else "sdpa"  # Gemma 2's default: its soft-capping needs eager
        with torch.device("cuda"):  # initialised on the GPU: Phi-3-mini's 3.8B on the CPU take minutes
            model = AutoModelForCausalLM.from_config(config(), attn_implementation=attn, dtype=torch.bfloat16).eval()
        model.generation_config.do_sample = False
        for batch in (1, 8, 32) if name in MOE_CONFIGS else (1, 8):
            rows.append(row(name, model, batch))
            print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
