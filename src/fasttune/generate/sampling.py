"""Sampling whose randomness belongs to each sample, not to the batch it happens to be in.

Every sample gets a 32-bit key from (seed, its index in the input) (`sample_key`); its token at new-token step n is
one inverse-CDF draw from the (temperature, top-k, top-p) distribution with the uniform number u(key, n)
(`row_uniform`, a counter-based hash: no generator state, the same on the CPU and on CUDA, graph-safe). So a sample's
answer depends on the seed, its index and its own logits only: --batch-size 1 and 32 give the same sampled answers,
and the fast path and HF `generate` (through `hf_sampling`, a logits processor that makes the same draw after HF's own
warpers) draw alike from alike logits.

Legend: B batch, V vocab.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """x * c mod 2^32 for 0 <= x < 2^32 in int64 without overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A bijective 32-bit integer hash with low bias (Wellons' lowbias32), on ints or int64 tensors in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_key(seed: int, index: int) -> int:
    """The key of the sample at `index` (its position in the input) under `seed` (any int, negative included)."""
    key = _mix32((seed & _M32) ^ 0x9E3779B9)
    key = _mix32(key ^ ((seed >> 32) & _M32))
    return _mix32(key ^ (index & _M32))


def row_uniform(keys_B: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """A uniform number in (0, 1) per row (float32, 24 bits): a function of the row's key and the step only."""
    h = _mix32(keys_B ^ _mix32((step + 0x632BE5AB) & _M32))
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def draw(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """One token per row from `probs_BV` (zeros allowed) by inverse CDF at `u_B`; never a token of probability 0.
    No host sync: graph-safe."""
    cdf_BV = probs_BV.float().cumsum(-1)
    target_B1 = (u_B * cdf_BV[:, -1])[:, None]
    picked_B = (cdf_BV <= target_B1).sum(-1)
    # rounding can put the target at the total: the last token with probability > 0, not a zero after it
    vocab_V = torch.arange(probs_BV.shape[-1], device=probs_BV.device)
    last_B = torch.where(probs_BV > 0, vocab_V, 0).amax(-1)
    return torch.minimum(picked_B, last_B)


class SeededDraw(LogitsProcessor):
    """The last logits processor of HF `generate` (run greedy): draws each row's token as `draw` does and leaves only
    it, so argmax picks it. `keys_B`: the rows' sample keys; `prompt_len`: the padded prompt length (step 0 after)."""

    def __init__(self, keys_B: torch.Tensor, prompt_len: int):
        self.keys_B, self.prompt_len = keys_B, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        u_B = row_uniform(self.keys_B.to(scores.device), input_ids.shape[1] - self.prompt_len)
        picked_B = draw(scores.float().softmax(-1), u_B)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, picked_B[:, None], 0.0)


HF_TOP_K = 50
"""What HF `generate` samples with when the model's generation config sets no top_k (transformers 5 leaves it None
in the config and fills in 50 when generating)."""


def sampling_top_k(model) -> int:
    """The top-k HF `generate(do_sample=True)` uses for `model`: its generation config's top_k, HF's 50 when it sets
    none; 0 (off) when it sets 0."""
    top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
    return HF_TOP_K if top_k is None else int(top_k)


def hf_sampling(temperature: float, top_p: float, top_k: int, keys: list[int], prompt_len: int) -> list:
    """HF `generate` logits processors (run it with do_sample=False) that sample as the fast path does: HF's own
    temperature, top-k and top-p warpers in HF's order, then `SeededDraw`. Empty for greedy (temperature 0)."""
    if temperature <= 0:
        return []
    processors = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return [*processors, SeededDraw(torch.tensor(keys, dtype=torch.long), prompt_len)]
