"""The chunked linear + cross-entropy against Hugging Face's own loss: values and gradients, padded and packed,
micro-batches normalised by the step's target count, fp32 and bf16, autocast, evaluation without gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from fasttune.data.packing import collate, count_targets
from fasttune.model.build import build_preset
from fasttune.model.loss import apply_chunked_loss, chunk_tokens, linear_cross_entropy
from fasttune.train.run import forward_backward

VOCAB = 300


def _samples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, VOCAB, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
        labels = [-100] * (i % 4) + ids[i % 4 :]  # a prompt that is not trained on
        out.append({"input_ids": ids, "labels": labels})
    return out


def _pair(dtype=torch.float32):
    ref = build_preset("micro", VOCAB, "eager", dtype).train()
    ours = copy.deepcopy(ref)
    assert apply_chunked_loss(ours)
    return ref, ours


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_hf_loss_and_grads_with_accumulation(packing, dtype, tol):
    ref, ours = _pair(dtype)
    samples = _samples(10)
    batches = [collate(samples[i::3], packing=packing, pad_id=0) for i in range(3)]  # three micro-batches
    n = sum(count_targets(b) for b in batches)
    loss_ref = forward_backward(ref, batches, n, None)
    loss_ours = forward_backward(ours, batches, n, None)
    assert torch.allclose(loss_ours, loss_ref, rtol=tol, atol=tol), (loss_ours, loss_ref)
    g_ref, g_ours = _grads(ref), _grads(ours)
    assert g_ref.keys() == g_ours.keys() and "model.embed_tokens.weight" in g_ours  # tied head: grads reach it
    for k in g_ref:
        err = (g_ours[k] - g_ref[k]).abs().max() / g_ref[k].abs().max().clamp_min(1e-12)
        assert err < tol, (k, float(err))


def test_small_chunks_and_mean_reduction_and_autocast():
    """Many chunks (7 tokens each), HF's mean when no num_items_in_batch is given, fp32 weights under bf16 autocast
    (the `auto` dtype on CUDA: the head runs in bf16, gradients come back in fp32)."""
    head = torch.nn.Linear(16, VOCAB, bias=True)
    hidden = torch.randn(2, 23, 16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 23))
    labels[0, :5] = -100
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref_head = copy.deepcopy(head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, head, labels, chunk=7)
        logits = ref_head(ref_hidden).float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    (loss * 3).backward()
    (ref * 3).backward()
    assert torch.allclose(loss, ref, rtol=1e-3)
    assert head.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    for a, b in ((hidden.grad, ref_hidden.grad), (head.weight.grad, ref_head.weight.grad),
                 (head.bias.grad, ref_head.bias.grad)):  # fmt: skip
        assert (a - b).abs().max() / b.abs().max() < 2e-2


def test_evaluation_and_generation_paths():
    ref, ours = _pair()
    ours.eval(), ref.eval()
    batch = collate(_samples(4), packing=True, pad_id=0)
    with torch.no_grad():
        a = ours(**batch, use_cache=False, num_items_in_batch=1)
        b = ref(**batch, use_cache=False, num_items_in_batch=1)
        assert a.logits is None and torch.allclose(a.loss, b.loss, rtol=1e-5)  # sum over targets, no logits held
        plain = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(ours(**plain).logits, ref(**plain).logits)  # without labels: the model's own forward


def test_chunk_size_follows_vocabulary():
    assert chunk_tokens(32000) == 2048 and chunk_tokens(128256) == 512 and chunk_tokens(10**9) == 64


def test_not_applied_to_softcapped_logits():
    model = build_preset("micro", VOCAB, "eager", torch.float32)
    model.config.final_logit_softcapping = 30.0
    assert not apply_chunked_loss(model)


def test_the_chunked_forward_uses_the_current_cache_field_name(monkeypatch):
    """transformers >= 5.2x renamed `past_key_values` to `cache`; passing or reading the old name warned on every
    training run ("`past_key_values`/`cache_params` are deprecated")."""
    from transformers.utils import generic

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a: warned.append(msg))  # once-per-process cache
    _, ours = _pair()
    batch = collate(_samples(4), packing=True, pad_id=0)
    out = ours(**batch, use_cache=False, num_items_in_batch=1)
    assert out.loss is not None and not [m for m in warned if "deprecated" in m], warned
