"""Packing: every token of every sample appears exactly once, no pack exceeds the budget, positions restart."""

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttune.data.packing import (
    IGNORE,
    best_fit_decreasing,
    collate_packed,
    collate_padded,
    count_targets,
    plan_micro_batches,
)


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=200), st.integers(64, 300))
def test_bins_cover_every_sample_once_within_budget(lengths, budget):
    bins = best_fit_decreasing(lengths, budget)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    # near-optimal: no two bins could be merged
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > budget


def test_plan_is_deterministic_per_seed_and_epoch():
    lengths = [random.Random(i).randint(1, 50) for i in range(100)]
    a = plan_micro_batches(lengths, packing=True, micro_batch_size=4, max_length=50, seed=1, epoch=0)
    b = plan_micro_batches(lengths, packing=True, micro_batch_size=4, max_length=50, seed=1, epoch=0)
    c = plan_micro_batches(lengths, packing=True, micro_batch_size=4, max_length=50, seed=1, epoch=1)
    assert a == b and a != c


def test_collate_packed_layout_and_targets_match_padded():
    samples = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))} for n in (5, 3, 7)]
    p = collate_packed(samples)
    assert p["input_ids"].shape == (1, 15)
    assert p["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert p["cu_seq_lens_q"].tolist() == [0, 5, 8, 15] and p["cu_seq_lens_q"].dtype == torch.int32
    assert p["max_length_q"] == 7
    # each sample's first token is never a target: it would be predicted from the previous sample
    assert [p["labels"][0, i].item() for i in (0, 5, 8)] == [IGNORE] * 3
    padded = collate_padded(samples, pad_id=0)
    assert count_targets(p) == count_targets(padded) == 4 + 2 + 6


def test_packs_of_split_documents_and_chat_cut_mid_response_train_as_each_sample_alone(tmp_path):
    """Real overlong data through the pipeline: a long text split into max_length pieces (neighbouring pieces of one
    document in one pack) and chat records cut inside their response. Each pack's loss and gradients (fasttune's
    model and attention) equal plain HF eager on each sample alone, so no piece sees another, and the cut response
    keeps exactly its trained tokens up to the cut."""
    import dataclasses
    import json

    from fixtures.tiny_tokenizer import CHATML
    from helpers import save_base_model
    from transformers import AutoModelForCausalLM

    from fasttune.config import get_experiment
    from fasttune.data.pipeline import build_data
    from fasttune.train.model_prep import prepare_model
    from fasttune.train.step import forward_backward

    model = save_base_model(tmp_path / "m", chat_template=CHATML, context=256, bos=None)
    words = "Natalia sold clips to her friends in April and half as many in May".split()
    rng = random.Random(0)
    text, chat = tmp_path / "book.jsonl", tmp_path / "chat.jsonl"
    text.write_text(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Count the clips."},
                    {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(60 + i))}]}) + "\n"
                    for i in range(6)))  # fmt: skip
    ref = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager").train()
    for data in (text, chat):
        cfg = get_experiment("sft")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(model)), data=dataclasses.replace(
            cfg.data, path=str(data), max_length=48, micro_batch_size=3, val_fraction=0.0))  # fmt: skip
        bundle = build_data(cfg)
        s = bundle.summary
        assert (s.split if data == text else s.truncated) > 0 and s.no_response == 0
        assert data == text or any(x.pairs()[-1][1] == len(x) == 48 for x in bundle.train)  # cut inside a response
        ours, _, _, batcher = prepare_model(cfg, bundle, torch.device("cpu"), torch.float32)
        plan = batcher.plan([len(x) for x in bundle.train], epoch=0)
        assert batcher.packing and max(map(len, plan)) > 1
        for idx in plan:
            samples = [bundle.train[i] for i in idx]
            ours.zero_grad(), ref.zero_grad()
            packed = batcher.collate(samples)
            alone = [collate_padded([x], 0) for x in samples]
            n = count_targets(packed)
            assert n == sum(map(count_targets, alone)) == sum(x.trained(1) for x in samples)
            got, want = forward_backward(ours, [packed], n, None), forward_backward(ref, alone, n, None)
            assert torch.allclose(got, want, rtol=1e-5), (data.name, idx)
            grads = dict(ours.named_parameters())
            for name, p in ref.named_parameters():
                assert torch.allclose(grads[name].grad, p.grad, rtol=1e-4, atol=1e-7), (data.name, name)
