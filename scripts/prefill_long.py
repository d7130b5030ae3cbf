#!/usr/bin/env python3
"""The fast generation path's prompt pass on long prompts (docs/BENCHMARKS.md "Long prompts"): fasttune's chunked
pass (generate/decoder.py `prefill`, as it ships), the same with the first chunking's settings (2048 positions, 512
MiB), the whole prompt in one forward (the pass before chunking), and HF `generate`; the time to two new tokens and
the peak memory above the model and cache, at the 1B shape (random init, bf16) on a CUDA GPU.

    PYTHONPATH=src python scripts/prefill_long.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from fasttune.generate import decoder
from fasttune.generate.fast import Generator
from fasttune.model.build import preset_config

CASES = [(1, 8192, False), (1, 32768, False), (1, 65536, False), (4, 16384, False), (8, 16384, True), (32, 2048, True)]
SETTINGS = {"chunked": None, "c2048_512m": (2048, 1 << 29), "one_pass": (1 << 30, 1 << 62)}  # (PREFILL_CHUNK, _BYTES)


def timed(fn) -> tuple[torch.Tensor, float, float]:
    """fn's output, seconds and peak GiB above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**30


def batch_of(batch: int, length: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts; padded: row i left-padded by i/(2 x batch) of the length."""
    ids = torch.randint(5, 30000, (batch, length), device="cuda")
    mask = torch.ones_like(ids)
    for i in range(batch if padded else 0):
        mask[i, : (i * length) // (2 * batch)] = 0
    return ids.masked_fill(mask == 0, 0), mask


def fast(model, ids, mask, setting) -> tuple[list, float, float]:
    saved = decoder.PREFILL_CHUNK, decoder.PREFILL_BYTES
    if setting is not None:
        decoder.PREFILL_CHUNK, decoder.PREFILL_BYTES = setting
    try:
        gen = Generator(model)
        gen.generate(ids, mask, max_new_tokens=2)  # warm: graph capture, Triton compiles
        out, seconds, gib = timed(lambda: gen.generate(ids, mask, max_new_tokens=2))
    finally:
        decoder.PREFILL_CHUNK, decoder.PREFILL_BYTES = saved
    return out[:, ids.shape[1] :].tolist(), seconds, gib


def main(out_path: str) -> None:
    config = preset_config("1b", 32000)
    config.max_position_embeddings, config.pad_token_id, config.eos_token_id = 131072, 0, None
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    rows = []
    for batch, length, padded in CASES:
        ids, mask = batch_of(batch, length, padded)
        row, first = dict(batch=batch, prompt=length, padded=padded), {}
        for name, setting in SETTINGS.items():
            first[name], row[f"{name}_s"], row[f"{name}_gib"] = fast(model, ids, mask, setting)
            torch.cuda.empty_cache()
        hf = dict(attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=2, min_new_tokens=2)
        model.generate(ids, **hf)
        out, row["hf_s"], row["hf_gib"] = timed(lambda ids=ids, hf=hf: model.generate(ids, **hf))
        torch.cuda.empty_cache()
        row["same_as_one_pass"] = first["chunked"] == first["one_pass"]
        row["same_as_hf"] = first["chunked"] == out[:, length:].tolist()  # random weights: near-ties may differ
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
