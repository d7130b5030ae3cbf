#!/usr/bin/env python3
"""Random-init bf16 model folders of several architectures at one shape, for the architecture sweep
(docs/BENCHMARKS.md, "Architectures"): hidden 1024, 12 layers, 16 query / 4 kv heads, MLP 4096, vocabulary 32,000
(~0.25B parameters; Qwen3-MoE: 8 layers, top-4 of 32 experts of width 512), each with the tests' byte-level
tokenizer (tests/fixtures/tiny_tokenizer.py). Nothing is downloaded.

    python scripts/arch_models.py llama,qwen2,gemma3 [--out /tmp]     # -> /tmp/a-llama, /tmp/a-qwen2, ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, intermediate_size=4096,
             max_position_embeddings=4096, num_hidden_layers=12, tie_word_embeddings=False)  # fmt: skip


def config(name: str):
    c = dict(SHAPE)
    if name in ("neox", "falcon", "falcon-mq", "phi", "gpt2", "gptj"):
        c.pop("num_key_value_heads")
    if name in ("gpt2", "gptj"):  # GPT-2's and GPT-J's own config names
        c = dict(vocab_size=32000, n_embd=1024, n_head=16, n_inner=4096, n_positions=4096, n_layer=12,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if name == "gpt2":
        c.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if name == "qwen3moe":
        c.update(moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4, num_hidden_layers=8)
    made = {
        "llama": lambda: T.LlamaConfig(**c),
        "qwen2": lambda: T.Qwen2Config(**c),
        "qwen3": lambda: T.Qwen3Config(head_dim=64, **c),
        "mistral": lambda: T.MistralConfig(sliding_window=4096, **c),
        "gemma2": lambda: T.Gemma2Config(head_dim=64, **c),
        "gemma3": lambda: T.Gemma3TextConfig(head_dim=64, sliding_window=512, **c),
        "phi3": lambda: T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **c),
        "olmo2": lambda: T.Olmo2Config(**c),
        "neox": lambda: T.GPTNeoXConfig(**c),
        "falcon": lambda: T.FalconConfig(multi_query=False, new_decoder_architecture=False, ffn_hidden_size=4096, **c),
        "falcon-mq": lambda: T.FalconConfig(multi_query=True, ffn_hidden_size=4096, **c),
        "starcoder2": lambda: T.Starcoder2Config(**c),
        "phi": lambda: T.PhiConfig(bos_token_id=1, eos_token_id=2, **c),
        "gpt2": lambda: T.GPT2Config(**c),
        "gptj": lambda: T.GPTJConfig(rotary_dim=32, **c),
        "glm": lambda: T.GlmConfig(head_dim=64, pad_token_id=0, **c),
        "qwen3moe": lambda: T.Qwen3MoeConfig(head_dim=64, **c),
    }
    if name not in made:
        raise SystemExit(f"unknown architecture {name!r}; one of {', '.join(made)}")
    return made[name]()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", help="comma-separated architectures")
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    args = p.parse_args()
    tok = build_tiny_tokenizer()
    for name in args.names.split(","):
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config(name)).to(torch.bfloat16)
        folder = args.out / f"a-{name}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters")


if __name__ == "__main__":
    main()
