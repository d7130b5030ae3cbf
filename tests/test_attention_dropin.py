"""Drop-in matrix: fasttune's registered attention functions against transformers' own eager attention, through
transformers' model code, on seven architectures (tiny random configs, CPU fp32; bf16 variants under the gpu marker).

The contract (docs/ATTENTION.md): outside a training forward every position equals eager's, pad positions included
(left and right padding with 2D masks, greedy generate); in a training forward (train mode, autograd on) real
positions, the loss and every gradient equal eager's, with labels ignored at pad positions; packed batches (by
position_ids or cu_seq_lens kwargs, default arguments) equal each document run alone.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_attention_models import packed_inputs
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from fasttune.attention import register

DIMS = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)
GQA = dict(DIMS, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0, pad_token_id=0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**GQA, head_dim=8),
    "qwen2": lambda: Qwen2Config(**GQA),
    "qwen3": lambda: Qwen3Config(**GQA, head_dim=8),
    "mistral": lambda: MistralConfig(**GQA, head_dim=8, sliding_window=4),  # windows cut inside every row
    "gemma2": lambda: Gemma2Config(**GQA, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0),
    "phi3": lambda: Phi3Config(**GQA, resid_pdrop=0.0, embd_pdrop=0.0),
    "gpt_neox": lambda: GPTNeoXConfig(**DIMS, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0),
}
BACKENDS = ("eager", "sdpa", "auto")  # usable for training on CPU; flex is forward-only there (checked below)
LENS = (9, 6, 4)  # rows of a padded batch; documents of a packed one
TOL = dict(atol=1e-4, rtol=1e-4)


@functools.cache
def _model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="eager").to(device, dtype)
    model.generation_config.update(pad_token_id=0, eos_token_id=None, do_sample=False)
    return model


REFERENCE = "hf eager"  # transformers' own eager attention; every other name is a fasttune backend


def model_for(arch: str, impl: str, mode: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The arch's one tiny model (same weights for every backend) with attention `impl`."""
    model = _model(arch, device, dtype)
    model.set_attn_implementation("eager" if impl == REFERENCE else register()[impl])
    return model.train(mode == "train")


def batch(padding: str, seed: int = 0):
    """input_ids (B, W), 2D attention mask (B, W) int64, labels: rows of LENS padded on one side. Labels are -100
    wherever a pad position's logits would carry loss: at pads, and (left padding: transformers shifts labels inside
    the row, so the last pad predicts the first real token) at each row's first real token."""
    gen = torch.Generator().manual_seed(seed)
    width = max(LENS)
    ids = torch.zeros(len(LENS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(LENS):
        at = slice(width - n, width) if padding == "left" else slice(0, n)
        ids[b, at], mask[b, at] = torch.randint(1, 64, (n,), generator=gen), 1
    labels = torch.where(mask.bool(), ids, -100)
    if padding == "left":
        labels[torch.arange(len(LENS)), width - torch.tensor(LENS)] = -100
    return ids, mask, labels


def _run(arch, impl, mode, ids, mask, labels, device="cpu", dtype=torch.float32):
    model = model_for(arch, impl, mode, device, dtype)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels if mode == "train" else None)
    grads = []
    if mode == "train":
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
    return out.logits.detach(), out.loss, grads


@functools.cache
def _reference(arch: str, mode: str, padding: str):
    """transformers' eager on the padded batch (logits, loss, gradients), computed once per arch, mode, padding."""
    with torch.set_grad_enabled(mode == "train"):
        return _run(arch, REFERENCE, mode, *batch(padding))


@functools.cache
def _reference_generate(arch: str, padding: str):
    ids, mask, _ = batch(padding, seed=1)
    with torch.no_grad():
        return model_for(arch, REFERENCE, "eval").generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, output_scores=True
        )


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padded_batches_equal_eager(arch, backend, mode):
    """Left and right padding, 2D masks: eval equals eager at every position, train at real positions, in the loss
    and in every gradient."""
    for padding in ("left", "right"):
        ids, mask, labels = batch(padding)
        want, want_loss, want_grads = _reference(arch, mode, padding)
        with torch.set_grad_enabled(mode == "train"):
            got, got_loss, got_grads = _run(arch, backend, mode, ids, mask, labels)
        where = mask.bool() if mode == "train" else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(got[where], want[where], **TOL, msg=lambda m, p=padding: f"{p} padding: {m}")
        if mode == "train":
            torch.testing.assert_close(got_loss, want_loss, **TOL)
            for g, w in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("backend", ["sdpa", "auto", "flex_attention"])  # eager's exact path is sdpa's, checked above
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_greedy_generate_equals_eager(arch, backend):
    """Greedy generate from left- and right-padded prompts: the same tokens and the same scores as eager (with
    right padding every row's first new token is read at a pad position)."""
    for padding in ("left", "right"):
        ids, mask, _ = batch(padding, seed=1)
        want = _reference_generate(arch, padding)
        model = model_for(arch, backend, "eval")
        with torch.no_grad():
            got = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, output_scores=True
            )
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), **TOL)
        assert torch.equal(got.sequences, want.sequences), f"{padding} padding"


def documents() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(1, 64, (n,), generator=gen) for n in LENS]


@functools.cache
def _referencepacked_inputs(arch: str, mode: str):
    """eval: eager logits of each document alone; train: eager loss and gradients of the documents as a padded
    batch (computed once per arch and mode)."""
    docs = documents()
    if mode == "eval":
        with torch.no_grad():
            eager = model_for(arch, REFERENCE, "eval")
            return torch.cat([eager(input_ids=d[None]).logits[0] for d in docs]), None, None
    ids, mask, _ = batch("right")
    for b, d in enumerate(docs):
        ids[b, : len(d)] = d
    return _run(arch, REFERENCE, "train", ids, mask, torch.where(mask.bool(), ids, -100))


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_equals_each_document_alone(arch, backend, mode):
    """Packed by position_ids alone and with cu_seq_lens kwargs, default arguments (use_cache not set): logits equal
    eager on each document alone; in train mode so do the loss's gradients (the padded batch of the same
    documents through eager is the reference: cross-document gradients are exactly zero)."""
    docs = documents()
    want, want_loss, want_grads = _referencepacked_inputs(arch, mode)
    for with_cu in (False, True) if mode == "eval" else (True,):
        model = model_for(arch, backend, mode)
        packed_ids, kwargs = packed_inputs(docs, with_cu)
        if mode == "eval":
            with torch.no_grad():
                got = model(input_ids=packed_ids, **kwargs).logits[0]
            torch.testing.assert_close(got, want, **TOL)
            continue
        model.zero_grad()
        packed_labels = torch.cat([torch.cat([torch.full((1,), -100), d[1:]]) for d in docs])[None]
        loss = model(input_ids=packed_ids, labels=packed_labels, **kwargs).loss
        loss.backward()
        # HF shifts labels inside each padded row; packed labels are pre-shifted per document: same targets
        torch.testing.assert_close(loss, want_loss, **TOL)
        for p, w in zip(model.parameters(), want_grads, strict=True):
            torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-4)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("backend", ["sdpa", "varlen", "auto", "flash_attention_4"])
def test_padded_and_packed_equal_eager_on_gpu_bf16(arch, backend):
    """The padded rows of the CPU matrix (eval: every position; train: real positions, loss, gradients) and packed
    documents (eval) in bf16 on CUDA, against transformers' eager in bf16, by relative error."""
    from fasttune.attention.probe import probe

    if backend != "auto" and (why := probe(backend, "cuda", torch.bfloat16, 8)):
        pytest.skip(f"{backend} unavailable here: {why}")
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    for padding in ("left", "right"):
        ids, mask, labels = batch(padding)
        for mode in ("eval", "train"):
            with torch.set_grad_enabled(mode == "train"):
                want, want_loss, want_grads = _run(arch, REFERENCE, mode, ids, mask, labels, **cuda)
                got, got_loss, got_grads = _run(arch, backend, mode, ids, mask, labels, **cuda)
            where = mask.bool().cuda() if mode == "train" else torch.ones_like(mask, dtype=torch.bool).cuda()
            assert _rel(got[where], want[where]) < 2e-2, f"{padding} {mode} logits"
            if mode == "train":
                assert abs(float(got_loss - want_loss)) < 2e-2 * float(want_loss)
                assert max(_rel(g, w) for g, w in zip(got_grads, want_grads, strict=True)) < 5e-2
    docs = [d.cuda() for d in documents()]
    with torch.no_grad():
        want = torch.cat([model_for(arch, REFERENCE, "eval", **cuda)(input_ids=d[None]).logits[0] for d in docs])
        ids, kwargs = packed_inputs([d.cpu() for d in docs], with_cu=True)
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        got = model_for(arch, backend, "eval", **cuda)(input_ids=ids.cuda(), **kwargs).logits[0]
    assert _rel(got, want) < 2e-2, "packed"


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("backend", [REFERENCE, "sdpa", "auto"])
def test_packed_forward_without_transformers_host_sync_is_unchanged(arch, backend):
    """The training loop's packed forward runs transformers' mask preparation with packing known up front
    (layout.packed_without_sync: no `.all()` read back from the device): logits and gradients equal the forward
    without it, with transformers' own eager attention too (which builds its mask from those document ids), and
    transformers still asks through the module function the context answers for."""
    import transformers.masking_utils as masking

    from fasttune.attention.layout import packed_without_sync

    model = model_for(arch, backend, "train")
    docs = documents()
    ids, kwargs = packed_inputs(docs, with_cu=True)
    labels = torch.cat([torch.cat([torch.full((1,), -100), d[1:]]) for d in docs])[None]
    results, calls = [], []
    for context in (lambda: torch.enable_grad(), lambda: packed_without_sync(kwargs)):
        model.zero_grad()
        with context():
            current = masking.find_packed_sequence_indices
            masking.find_packed_sequence_indices = lambda position_ids, f=current: calls.append(1) or f(position_ids)
            try:  # the training loop's call: use_cache=False (a cache would skip packing detection)
                out = model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
            finally:
                masking.find_packed_sequence_indices = current
        out.loss.backward()
        results.append((out.logits, [p.grad.clone() for p in model.parameters()]))
    assert calls, "transformers detects packing through this module function"
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_packed_check_answers_only_inside_the_context_and_its_thread():
    """Inside packed_without_sync transformers' packing check answers with document ids without asking the device
    (also for one document per row, where transformers says None); outside it, after an error inside it, in another
    thread meanwhile, and for a batch that is not packed, it is transformers' own."""
    import threading

    import transformers.masking_utils as masking

    from fasttune.attention.layout import packed_without_sync

    packed = {"cu_seq_lens_q": torch.tensor([0, 6], dtype=torch.int32)}
    one = torch.arange(6)[None]

    def check():
        return masking.find_packed_sequence_indices(one)

    assert check() is None
    other = []
    with packed_without_sync(packed):
        assert torch.equal(check(), torch.zeros_like(one))
        thread = threading.Thread(target=lambda: other.append(check()))
        thread.start()
        thread.join()
    assert other == [None] and check() is None
    with pytest.raises(RuntimeError), packed_without_sync(packed):
        raise RuntimeError("boom")
    assert check() is None
    with packed_without_sync({"input_ids": one}):  # not a packed batch: left alone
        assert check() is None


def test_document_ids_are_transformers_packed_sequence_indices():
    import transformers.masking_utils as masking

    from fasttune.attention.layout import _document_ids

    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 0, 1]])
    torch.testing.assert_close(_document_ids(packed), masking.find_packed_sequence_indices(packed))
    one = torch.arange(6)[None].expand(2, -1)  # one document per row: transformers says None (no packing)
    assert masking.find_packed_sequence_indices(one) is None
    assert not _document_ids(one).any()
