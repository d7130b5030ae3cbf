"""Quick on-device fwd+bwd timing of one backend, for `auto` with measure=True.

Shape legend: B batch, H query heads, K kv heads, S sequence length, D head dim.
"""

from __future__ import annotations

import torch

from fasttune.attention.dispatch import attention_forward
from fasttune.model.flops import attention_flops


def time_backend(name: str, device, dtype, head_dim: int, packed: bool, features: dict, tokens: int = 8192) -> float:
    """Median ms of one fwd+bwd over `tokens` tokens, 16 query / 4 kv heads (GQA as in Llama-class models);
    packed: four documents of mixed length in one row; padded: 4 rows of tokens/4 with 10% padding."""
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
        out_BSHD, _ = attention_forward(name, None, q_BHSD, k_BKLD, v_BKLD, mask, **kwargs)
        out_BSHD.sum().backward()

    for _ in range(3):  # warm-up: compile (flex), cuDNN plan build, kernel choice
        step()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _tflops(name, device, dtype, seq, tokens, packed, n_heads=16, head_dim=128) -> float:
    """fwd+bwd TFLOP/s of causal attention (model FLOPs, fasttune.model.flops)."""
    rows = 1 if packed else tokens // seq
    length = tokens if packed else seq
    q_BHSD = torch.randn(rows, n_heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
    k_BHSD, v_BHSD = (torch.randn_like(q_BHSD, requires_grad=True) for _ in range(2))
    kwargs = {}
    if packed:  # tokens // seq documents of length seq, laid end to end
        cu = torch.arange(0, tokens + 1, seq, dtype=torch.int32, device=device)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=seq, max_length_k=seq)

    def step():
        out_BSHD, _ = attention_forward(name, None, q_BHSD, k_BHSD, v_BHSD, None, **kwargs)
        out_BSHD.backward(torch.ones_like(out_BSHD))

    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        step()
    end.record()
    torch.cuda.synchronize(device)
    flops = attention_flops([seq] * (tokens // seq), n_heads, head_dim)
    return flops / (start.elapsed_time(end) / 10 * 1e-3) / 1e12


def main() -> None:
    """Print fwd+bwd TFLOP/s per usable backend, bf16, 16 heads, D128, 16k tokens per batch; then auto's pick."""
    from fasttune.attention import BACKENDS, kernel_report, resolve
    from fasttune.attention.probe import probe

    device, dtype = torch.device("cuda"), torch.bfloat16
    usable = [n for n in BACKENDS if n != "eager" and probe(n, device, dtype, 128) is None]
    print("usable:", usable, "| unusable:", {n: probe(n, device, dtype, 128) for n in BACKENDS if n not in usable})
    for packed in (False, True):
        print(f"{'packed' if packed else 'dense'} seq | " + " | ".join(usable))
        for seq in (1024, 4096, 16384):
            cells = [f"{_tflops(n, device, dtype, seq, 16384, packed):.0f}" for n in usable]
            print(f"{seq} | " + " | ".join(cells), flush=True)
        choice = resolve("auto", device=device, dtype=dtype, head_dim=128, packed=packed, measure=True)
        print("auto:", choice.name, "--", choice.reason)
    print("kernels that ran:", kernel_report())


if __name__ == "__main__":
    main()
