#!/usr/bin/env python3
"""Which SDPA kernel a prompt chunk's attention gets (docs/BENCHMARKS.md "Long prompts"): 2k queries over 32k keys
under torch's lower-right causal bias, under a dense additive mask (default, cuDNN, memory-efficient), and a whole
32k causal prompt (default, flash, cuDNN); TFLOP/s of the causal work (triton's do_bench, bf16, 32 heads, head dim
64). Needs a CUDA GPU.

    PYTHONPATH=src python scripts/sdpa_chunk_kernels.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

HEADS, DIM, QUERIES, KEYS = 32, 64, 2048, 32768


def rate(fn, work: float, backend: SDPBackend | None = None) -> str:
    """Milliseconds and TFLOP/s of `fn` (`work`: query-key pairs computed), under `backend` when given."""
    try:
        if backend is None:
            ms = do_bench(fn)
        else:
            with sdpa_kernel(backend):
                ms = do_bench(fn)
    except RuntimeError as e:
        return f"refused ({str(e)[:80]})"
    return f"{ms:.3f} ms, {4 * work * HEADS * DIM / ms / 1e9:.0f} TFLOP/s"


def main() -> None:
    def rand(length: int) -> torch.Tensor:
        return torch.randn(1, HEADS, length, DIM, device="cuda", dtype=torch.bfloat16)

    q, k, v, whole = rand(QUERIES), rand(KEYS), rand(KEYS), rand(KEYS)
    hidden = torch.ones(QUERIES, KEYS, device="cuda", dtype=torch.bool).triu(KEYS - QUERIES + 1)
    dense = torch.zeros(QUERIES, KEYS, device="cuda", dtype=torch.bfloat16).masked_fill(hidden, float("-inf"))
    chunk = QUERIES * KEYS - QUERIES * QUERIES / 2
    lower_right = causal_lower_right(QUERIES, KEYS)
    print("chunk, lower-right causal bias:", rate(lambda: F.scaled_dot_product_attention(q, k, v, lower_right), chunk))
    masked = lambda: F.scaled_dot_product_attention(q, k, v, dense[None, None])  # noqa: E731
    causal = lambda: F.scaled_dot_product_attention(whole, k, v, is_causal=True)  # noqa: E731
    for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        print(f"chunk, dense mask, {backend or 'default'}:", rate(masked, chunk, backend))
    for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        print(f"whole prompt, causal, {backend or 'default'}:", rate(causal, KEYS * KEYS / 2, backend))


if __name__ == "__main__":
    main()
