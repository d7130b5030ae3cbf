"""The chunked prompt pass (decoder.py `FusedDecoder.prefill`): prompts of 21-38 tokens run in chunks of 5 or 7 query
positions (the chunk size shrunk from its 2048), left-padded batches (a row whose whole first chunk is padding),
sliding windows shorter than the prompt, on every family the fused decoder runs. Greedy tokens and float32 scores at
every step as HF `generate`'s (within 1e-5 on the CPU: tests/test_generate_families.py's check) and as the single
pass's; no attention mask spans more than a chunk's queries, and the byte budget shrinks the chunks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, Qwen3Config

from fasttune.bench.generate_check import TOLERANCE
from fasttune.generate import decoder
from fasttune.generate.decoder import FusedDecoder
from fasttune.generate.fast import Generator
from tests.test_generate_families import (
    DEVICES,
    GEMMAS,
    LONGROPE,
    NEW,
    SHAPE,
    WINDOWED,
    build,
    check_matches_hf,
    prompts,
)
from tests.test_generate_moe import MOE, build_moe


def gemma(family: str, device: str):
    model = build(GEMMAS[family](), device)
    with torch.no_grad():  # random norm weights, as test_gemma_matches_hf
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


FAMILIES = {
    "llama": lambda device: build(LlamaConfig(**SHAPE), device),
    "qwen3": lambda device: build(Qwen3Config(**SHAPE), device),
    # Phi-4-mini's longrope: the real prompt + new tokens stay within its original 64 positions
    "phi3-longrope": lambda device: build(
        Phi3Config(**SHAPE, rope_parameters=dict(LONGROPE), original_max_position_embeddings=64), device
    ),
    **{f: lambda device, f=f: build(WINDOWED[f](), device) for f in WINDOWED},  # windows of 5: mistral, qwen2, phi3
    **{f: lambda device, f=f: gemma(f, device) for f in ("gemma2", "gemma3")},  # gemma2: soft-capped attention
    **{f: lambda device, f=f: build_moe(f, device) for f in MOE},  # prompt chunks through HF's experts module
}
CASES = [(1, 21, 5), (3, 38, 7)]  # (batch, prompt, chunk): chunks 5,5,5,5,1 without padding; 7x5,3 left-padded


def spy_masks(monkeypatch) -> list[tuple]:
    """(keys, mask shapes) of every forward: the mask it was given and each window's (None: causal, no mask)."""
    seen: list[tuple] = []
    biases = FusedDecoder._biases

    def spy(self, bias, slots_Q, cache, keys):
        out = biases(self, bias, slots_Q, cache, keys)
        seen.append((keys, [None if b is None else (tuple(b.shape), b.dtype) for b in [bias, *out.values()]]))
        return out

    monkeypatch.setattr(FusedDecoder, "_biases", spy)
    return seen


def one_pass_scores(model, batch: int, length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The fused decoder's tokens and scores with the whole prompt in one forward (chunk size above its length)."""
    ids_BP, mask_BP = prompts(batch, next(model.parameters()).device.type, length)
    gen = Generator(model, use_graphs=False)
    seen: list[torch.Tensor] = []
    select = gen._select
    gen._select = lambda logits_BV, *key: (seen.append(logits_BV.clone()), select(logits_BV, *key))[1]
    return gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch,length,chunk", CASES)
def test_chunked_prompt_matches_hf_and_the_single_pass(family, batch, length, chunk, device, monkeypatch):
    model = FAMILIES[family](device)
    _, one_pass = one_pass_scores(model, batch, length)
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", chunk)
    masks = spy_masks(monkeypatch)
    _, chunked = check_matches_hf(model, batch, length=length)  # HF's tokens, its scores at every step
    ends = [*range(chunk, length, chunk), length]  # the keys each chunk reads: the slots written up to its end
    assert [keys for keys, _ in masks if keys is not None][: len(ends)] == ends
    limit = 1e-5 if device == "cpu" else TOLERANCE[torch.float32]
    assert max(float((a - b).abs().max()) for a, b in zip(one_pass, chunked, strict=True)) < limit


def test_no_prompt_mask_spans_more_than_a_chunk(monkeypatch):
    """A padded batch with sliding windows (Qwen2: one full, one sliding layer): every prompt forward's masks are
    (B, 1, <= chunk, keys written), the windowed one included; the lm head sees only the last position."""
    model = FAMILIES["qwen2"]("cpu")
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 5)
    masks = spy_masks(monkeypatch)
    check_matches_hf(model, 3, length=38)
    prompt = [(keys, shapes) for keys, shapes in masks if keys is not None]
    assert len(prompt) == 8  # 38 positions in chunks of 5
    for keys, shapes in prompt:
        for shape, _ in shapes:
            assert shape[0] == 3 and shape[1] == 1 and shape[2] <= 5 and shape[3] == keys
    heads: list[tuple] = []
    model.lm_head.register_forward_hook(lambda module, args, out: heads.append(tuple(args[0].shape)))
    Generator(model, use_graphs=False).generate(*prompts(3, "cpu", 38), max_new_tokens=4)
    assert heads == [(3, SHAPE["hidden_size"])] * (8 + 3)  # each forward's last position only: 8 chunks, 3 steps


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_the_byte_budget_shrinks_the_chunks(family, monkeypatch):
    """With PREFILL_BYTES just above a few queries' masks (Gemma 2: and soft-capped scores per head), the chunks
    shrink to fit and the tokens and scores stay HF's."""
    model = FAMILIES[family]("cpu")
    gen = Generator(model, use_graphs=False)
    per_query = 3 * (gen.decoder._token_bytes() + 38 * gen.decoder._score_bytes())
    monkeypatch.setattr(decoder, "PREFILL_BYTES", 3 * per_query + 1)
    assert gen.decoder.prefill_chunk(3, 38) == 3
    masks = spy_masks(monkeypatch)
    check_matches_hf(model, 3, length=38)
    prompt = [shapes for keys, shapes in masks if keys is not None]
    assert len(prompt) == math.ceil(38 / 3)
    assert all(shape[2] <= 3 for shapes in prompt for shape, _ in shapes)
    if family == "gemma2":  # its eager soft-capped attention holds scores per head: they count
        assert gen.decoder._score_bytes() > FusedDecoder._score_bytes(gen.decoder) + 4 * SHAPE["num_attention_heads"]


def test_unpadded_chunks_run_without_a_materialized_mask(monkeypatch):
    """Without padding or windows the first chunk is causal (no mask) and each later one gets torch's lower-right
    causal bias, which SDPA runs on its flash kernel on a GPU (a dense (1, 1, C, K) mask would send it to the
    memory-efficient one); the answers are HF's either way (the parametrized test above)."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    model = FAMILIES["llama"]("cpu")
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 5)
    given: list = []
    biases = FusedDecoder._biases
    monkeypatch.setattr(FusedDecoder, "_biases", lambda self, bias, *a: given.append(bias) or biases(self, bias, *a))
    check_matches_hf(model, 1, length=21)
    prompt = given[:5]  # 21 positions in chunks of 5,5,5,5,1
    assert prompt[0] is None
    for bias, (queries, keys) in zip(prompt[1:], [(5, 10), (5, 15), (5, 20), (1, 21)], strict=True):
        assert isinstance(bias, CausalBias) and bias.variant == CausalVariant.LOWER_RIGHT
        assert (bias.seq_len_q, bias.seq_len_kv) == (queries, keys)


def test_a_prompt_without_masks_is_chunked_by_its_activations_alone(monkeypatch):
    """No padding and no window shorter than the prompt: nothing grows with the keys, so the chunk is what keeps its
    activations within PREFILL_BYTES, at any length (and a whole prompt where they fit); masked chunks count their
    (B, C, K) masks too. The chunks still give HF's tokens and scores."""
    model = FAMILIES["llama"]("cpu")
    d = Generator(model, use_graphs=False).decoder
    monkeypatch.setattr(decoder, "PREFILL_BYTES", 4 * d._token_bytes() + 1)
    assert d.prefill_chunk(1, 21, masked=False) == d.prefill_chunk(1, 10**6, masked=False) == 4
    assert d.prefill_chunk(1, 21, masked=True) < 4
    assert not d._needs_masks(False, 21) and d._needs_masks(True, 21)
    assert FAMILIES["mistral"]("cpu").config.sliding_window < 21  # a window that hides keys needs masks
    assert Generator(FAMILIES["mistral"]("cpu"), use_graphs=False).decoder._needs_masks(False, 21)
    seen: list = []
    biases = FusedDecoder._biases
    monkeypatch.setattr(FusedDecoder, "_biases", lambda self, bias, s, c, keys: seen.append(keys) or
                        biases(self, bias, s, c, keys))  # fmt: skip
    check_matches_hf(model, 1, length=21)
    assert seen[:6] == [4, 8, 12, 16, 20, 21]
