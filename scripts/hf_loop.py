#!/usr/bin/env python3
"""The plain Hugging Face training step as a Trainer user with `bf16=True` gets it: fp32 weights under bf16
autocast, the model's default attention (sdpa where transformers supports it, else eager), right-padded batches of 8
alpaca records (prompt untrained), fused AdamW, gradient clipping. Prints real (non-pad) tokens/s over the last two
thirds of the steps and the peak memory, as one JSON line (docs/BENCHMARKS.md, "Architectures").

    python scripts/hf_loop.py MODEL_DIR ALPACA.json [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def batch(tok, records: list[dict]):
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, labels = [], []
    for r in records:
        prompt = tok(r["instruction"] + "\n", add_special_tokens=False)["input_ids"]
        answer = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id or 0]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    n = max(map(len, ids))
    x = torch.tensor([i + [pad] * (n - len(i)) for i in ids])
    y = torch.tensor([la + [-100] * (n - len(la)) for la in labels])
    mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])
    return x.cuda(), y.cuda(), mask.cuda()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    records = json.load(open(args.data))
    random.Random(0).shuffle(records)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    times, tokens = [], []
    for step in range(args.steps):
        x, y, mask = batch(tok, records[step * 8 : (step + 1) * 8])
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(int(mask.sum()))
    k = len(times) // 3
    print(json.dumps({"tok_s": sum(tokens[k:]) / sum(times[k:]), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "loss": loss.item()}))  # fmt: skip


if __name__ == "__main__":
    main()
