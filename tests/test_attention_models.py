"""Through transformers' own model code: packed == padded == each document alone, and no cross-document leak with
default arguments (use_cache left at its default) in train and eval mode. Tiny configs, no downloads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

from fasttune.attention import register

LENS = (7, 3, 9)  # windows of 4 cut inside the documents
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    attention_dropout=0.0,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=4),
    "gemma2": lambda: Gemma2Config(**SMALL, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=None),
    "gemma3": lambda: Gemma3TextConfig(**SMALL, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
}
BACKENDS = ("eager", "sdpa")  # CPU backends with backward; flex is forward-checked below


def build(arch: str, backend: str):
    torch.manual_seed(0)
    hf_name = register()[backend]
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=hf_name)
    return model.float()


def documents(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=gen) for n in LENS]


def packed_inputs(docs, with_cu: bool):
    ids = torch.cat(docs)[None]
    kwargs = dict(position_ids=torch.cat([torch.arange(len(d)) for d in docs])[None])
    if with_cu:
        cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
        longest = max(len(d) for d in docs)
        kwargs |= dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return ids, kwargs


def alone_logits(model, docs):
    """Ground truth from transformers' own eager attention: each document in its own forward."""
    ours = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
    model.set_attn_implementation(ours)
    return out


@pytest.mark.parametrize("arch", ["gemma3"])  # the other architectures: tests/test_attention_dropin.py
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_default_args_equals_each_document_alone(arch, backend, mode):
    model = build(arch, backend)
    model.train(mode == "train")
    docs = documents()
    want = alone_logits(model, docs)
    for with_cu in (True, False):
        ids, kwargs = packed_inputs(docs, with_cu)
        with torch.no_grad():
            logits = model(input_ids=ids, **kwargs).logits[0]  # default use_cache: the trap
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3"])  # the other architectures: tests/test_attention_dropin.py
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_and_padded_give_same_loss_and_grads(arch, backend):
    docs = documents()
    model = build(arch, backend)
    ids, kwargs = packed_inputs(docs, with_cu=True)
    labels = torch.cat([torch.cat([torch.full((1,), -100), d[1:]]) for d in docs])[None]
    model(input_ids=ids, labels=labels, **kwargs).loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    width = max(LENS)
    pad_ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    pad_labels = torch.full((len(docs), width), -100)
    for b, d in enumerate(docs):
        pad_ids[b, : len(d)], mask[b, : len(d)], pad_labels[b, 1 : len(d)] = d, 1, d[1:]
    loss = model(input_ids=pad_ids, attention_mask=mask, labels=pad_labels).loss
    loss.backward()
    for p, g in zip(model.parameters(), packed_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_changing_one_document_does_not_change_the_others(backend, mode):
    model = build("llama", backend)
    model.train(mode == "train")
    docs = documents()
    changed = [documents(seed=1)[0], *docs[1:]]
    with torch.no_grad():
        a = model(input_ids=packed_inputs(docs, False)[0], **packed_inputs(docs, False)[1]).logits[0]
        b = model(input_ids=packed_inputs(changed, False)[0], **packed_inputs(changed, False)[1]).logits[0]
    torch.testing.assert_close(a[LENS[0] :], b[LENS[0] :], atol=0, rtol=0)
    assert not torch.allclose(a[: LENS[0]], b[: LENS[0]])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_flex_forward_packed(arch):
    model = build(arch, "flex_attention").eval()
    docs = documents()
    ids, kwargs = packed_inputs(docs, with_cu=False)
    want = alone_logits(model, docs)
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits[0]
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_generation_with_cache_matches_full_forward():
    """Decode steps (cache, q_len 1) and a padded batch go through the same registered functions."""
    model = build("llama", "sdpa").eval()
    ids = documents()[0][None]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        full = model(input_ids=out[:, :-1], use_cache=False).logits
    assert torch.equal(full[0, ids.shape[1] - 1 :].argmax(-1), out[0, ids.shape[1] :])
