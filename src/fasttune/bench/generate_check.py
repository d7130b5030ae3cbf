"""Greedy agreement with HF `generate` that means something: on a briefly trained model, not random weights.

On random weights the top logits nearly tie at almost every step, so any change of rounding flips a token within
a few steps and "identical to HF" is luck. Here a model first learns a small synthetic language (a noisy Markov
chain: each context has one likely successor and a few rare ones), so its greedy choices have real margins. The
check then says: our greedy tokens equal HF's up to the first step where HF's own top-2 logit margin is below a
stated tolerance (there, rounding may legitimately pick the other token). A wrong RoPE, mask or cache index flips
a token where the margin is large and fails it. Used by `fasttune bench generate` and tests/test_generate_fast.py.

Legend: B batch, S sequence length, N new tokens, V vocab.
"""

from __future__ import annotations

import contextlib

import torch

# Logit tolerances for "near tie": above the largest |fasttune - HF| logit difference seen on the matched prefix
# (fp32: ~2e-5 on CPU; bf16: see docs/BENCHMARKS.md, "Generation"), so a flip below it is rounding, above it a bug.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}
FIRST_TOKEN = 3  # ids below are left for pad/bos/eos


def synthetic_tokens(batch: int, length: int, *, symbols: int = 64, order: int = 1, noise: float = 0.2,
                     seed: int = 0, language_seed: int = 1234) -> torch.Tensor:  # fmt: skip
    """(batch, length) token ids of a noisy order-`order` Markov chain over `symbols` ids from FIRST_TOKEN: each
    context has one successor taken with probability 1 - noise, otherwise one of 3 rare ones. `language_seed` fixes
    the chain (train and test draw from the same language), `seed` the samples."""
    lang = torch.Generator().manual_seed(language_seed)
    contexts = symbols**order
    likely_C = torch.randint(symbols, (contexts,), generator=lang)
    rare_C3 = torch.randint(symbols, (contexts, 3), generator=lang)
    gen = torch.Generator().manual_seed(seed)
    out_BS = torch.randint(symbols, (batch, length), generator=gen)
    noisy_BS = torch.rand(batch, length, generator=gen) < noise
    pick_BS = torch.randint(3, (batch, length), generator=gen)
    for s in range(order, length):
        ctx_B = torch.zeros(batch, dtype=torch.long)
        for j in range(order):
            ctx_B = ctx_B * symbols + out_BS[:, s - order + j]
        out_BS[:, s] = torch.where(noisy_BS[:, s], rare_C3[ctx_B, pick_BS[:, s]], likely_C[ctx_B])
    return out_BS + FIRST_TOKEN


def train_briefly(model, steps: int, *, batch: int = 16, seq_len: int = 64, lr: float = 3e-3, order: int = 1,
                  symbols: int = 64, log_every: int = 0) -> list[float]:  # fmt: skip
    """AdamW on the synthetic language, in place, model in train mode for the duration; bf16 autocast on CUDA.
    Returns the losses (the first and last say whether it learned)."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    losses = []
    model.train()
    for step in range(steps):
        ids_BS = synthetic_tokens(batch, seq_len, symbols=symbols, order=order, seed=step).to(device)
        with autocast:
            loss = model(input_ids=ids_BS, labels=ids_BS, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (log_every and step % log_every == 0) or step in (0, steps - 1):
            losses.append(loss.item())  # a host sync: only where logged
    model.eval()
    return losses


def hf_greedy(model, ids_BP: torch.Tensor, mask_BP: torch.Tensor, new_tokens: int):
    """HF `generate`, greedy, no EOS: (sequences (B, P + N), float32 scores per step, N x (B, V))."""
    model.generation_config.eos_token_id = None
    out = model.generate(
        ids_BP,
        attention_mask=mask_BP,
        max_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, [s.float() for s in out.logits]


def greedy_agreement(hf_scores: list[torch.Tensor], hf_new_BN: torch.Tensor, new_BN: torch.Tensor,
                     tolerance: float) -> dict:  # fmt: skip
    """Per row: the first step where our token differs from HF's, and the first where HF's own top-2 margin is
    below `tolerance`. `agree` holds when no row differs before its first near-tie. Steps count from 0."""
    scores_NBV = torch.stack([s.cpu() for s in hf_scores])
    top2_NB2 = scores_NBV.topk(2, dim=-1).values
    near_tie_NB = (top2_NB2[..., 0] - top2_NB2[..., 1]) < tolerance
    hf_new_BN, new_BN = hf_new_BN.cpu(), new_BN.cpu()
    steps = min(hf_new_BN.shape[1], new_BN.shape[1], scores_NBV.shape[0])
    differ_BN = hf_new_BN[:, :steps] != new_BN[:, :steps]

    def first(flags_BN: torch.Tensor) -> list[int | None]:
        return [int(row.nonzero()[0]) if bool(row.any()) else None for row in flags_BN]

    mismatch, near_tie = first(differ_BN), first(near_tie_NB[:steps].t())
    never = steps + 1  # "no mismatch" / "no near-tie" compare as after the last step
    pairs = [(never if m is None else m, never if t is None else t) for m, t in zip(mismatch, near_tie, strict=True)]
    ok = [m >= t for m, t in pairs]
    known = [m for m in mismatch if m is not None]
    ties = [t for t in near_tie if t is not None]
    return {
        "agree": all(ok),
        "rows_agree": f"{sum(ok)}/{len(ok)}",
        "first_mismatch_step": min(known) if known else None,
        "first_near_tie_step": min(ties) if ties else None,
        "tolerance": tolerance,
        "steps": steps,
        "per_row": list(zip(mismatch, near_tie, strict=True)),
    }
