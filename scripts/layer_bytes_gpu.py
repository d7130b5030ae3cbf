#!/usr/bin/env python3
"""What one decoder layer keeps for backward on a GPU, per token, against the estimate (train/activations.py
layer_bytes + model/layout.py kept_scores), for the architectures of scripts/arch_models.py at their sweep shape:
two layers minus one, CUDA memory allocated after a forward under bf16 autocast minus before, over a row of
--tokens tokens packed from 256-token samples (padded rows of them for a model with its own attention), with fp32
weights (full fine-tuning: the bf16 weight copies autocast keeps for backward are taken out) and with LoRA (rank 16,
fasttune's forward) on a bf16 base. One JSON line per architecture and mode (docs/BENCHMARKS.md, "Architectures,
second sweep").

    python scripts/layer_bytes_gpu.py phi,gpt2,llama [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arch_models  # noqa: E402

from fasttune.attention.select import native_attention, register  # noqa: E402
from fasttune.config import LoraConfig  # noqa: E402
from fasttune.data.packing import collate_packed  # noqa: E402
from fasttune.model.layout import kept_scores  # noqa: E402
from fasttune.train.activations import layer_bytes  # noqa: E402
from fasttune.train.estimate import model_shape  # noqa: E402
from fasttune.train.recompute import decoder_layers  # noqa: E402

SAMPLE = 256


def build(name: str, layers: int, lora: bool):
    config = arch_models.config(name)
    for field in ("num_hidden_layers", "n_layer"):
        if field in config.to_dict():
            setattr(config, field, layers)
    native = native_attention(config)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation=native or register()["sdpa"])
    if lora:
        from fasttune.model.lora import apply_lora, set_fast_forward

        model = apply_lora(model.to(torch.bfloat16), LoraConfig(enabled=True, rank=16, alpha=32, dropout=0.0))
        set_fast_forward(model, True)
    return model.cuda().train(), f"transformers {native}" if native else "sdpa"


def kept(name: str, layers: int, lora: bool, tokens: int):
    model, attention = build(name, layers, lora)
    rows = [{"input_ids": list(range(3, 3 + SAMPLE)), "labels": list(range(3, 3 + SAMPLE))}] * (tokens // SAMPLE)
    if attention == "sdpa":
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packed(rows).items() if k != "labels"}
    else:
        batch = {"input_ids": torch.tensor([r["input_ids"] for r in rows]).cuda()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", torch.bfloat16):
        out = model(**batch, use_cache=False)
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before
    layer = decoder_layers(model)[0]
    copies = 0 if lora else 2 * layers * sum(p.numel() for p in layer.parameters() if p.dim() >= 2)  # autocast's bf16
    # copies of the layers' weights, which their matmuls keep for backward
    predicted = layer_bytes(model_shape(model, autocast=True), "none", fp32_stream=not lora,
                            lora_rank=16 if lora else 0)  # fmt: skip
    predicted += kept_scores(model, attention, SAMPLE if attention != "sdpa" else tokens, autocast=True)[0]
    del out, model
    torch.cuda.empty_cache()
    return used - copies, predicted, attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", help="comma-separated architectures of scripts/arch_models.py")
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    for name in args.names.split(","):
        for lora in (False, True):
            one, predicted, attention = kept(name, 1, lora, args.tokens)
            two = kept(name, 2, lora, args.tokens)[0]
            got = (two - one) / args.tokens
            row = {
                "arch": name,
                "lora": lora,
                "attention": attention,
                "kept": round(got),
                "predicted": round(predicted),
            }
            print(json.dumps({**row, "predicted / kept": round(predicted / got, 3)}))


if __name__ == "__main__":
    main()
