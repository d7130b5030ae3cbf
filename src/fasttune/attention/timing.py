"""Quick on-device fwd+bwd timing of one attention function, for `auto` with measure=True.

The timer is the benchmarks' one harness (fasttune.bench.harness.time_ms: do_bench / CUDA events, median), so auto's
measurement and `fasttune bench attention` time the same way.

Shape legend: B batch, H query heads, K kv heads, S sequence length, D head dim.
"""

from __future__ import annotations

import torch

from fasttune.bench.harness import time_ms


def time_backend(fn, device, dtype, head_dim: int, packed: bool, features: dict, tokens: int = 8192) -> float:
    """Median ms of one fwd+bwd of the registered attention function `fn` over `tokens` tokens, 16 query / 4 kv heads
    (GQA as in Llama-class models); packed: four documents of mixed length in one row; padded: 4 rows of tokens/4
    with 10% padding."""
    device = torch.device(device)
    rows = 1 if packed else 4
    seq = tokens // rows
    q_BHSD = torch.randn(rows, 16, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    k_BKLD = torch.randn(rows, 4, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    v_BKLD = torch.randn_like(k_BKLD, requires_grad=True)
    kwargs = dict(softcap=features.get("softcap"), sliding_window=features.get("sliding_window"))
    mask = None
    if packed:
        cu = torch.tensor([0, seq // 8, seq // 2, seq * 7 // 8, seq], dtype=torch.int32, device=device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=seq * 3 // 8, max_length_k=seq * 3 // 8)
    else:
        mask = torch.ones(rows, seq, dtype=torch.bool, device=device)
        mask[1:, -seq // 10 :] = False

    def step():
        out_BSHD, _ = fn(None, q_BHSD, k_BKLD, v_BKLD, mask, **kwargs)
        out_BSHD.sum().backward()

    return time_ms(step, device, grad_to_none=[q_BHSD, k_BKLD, v_BKLD])
