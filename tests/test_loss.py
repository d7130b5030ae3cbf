"""The chunked linear + cross-entropy against Hugging Face's own loss: values and gradients, padded and packed,
micro-batches normalised by the step's target count, fp32 and bf16, autocast, evaluation without gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from fasttune.data.packing import collate, count_targets
from fasttune.model.build import build_preset
from fasttune.model.liger import apply as apply_liger
from fasttune.model.loss import apply_chunked_loss, chunk_tokens, linear_cross_entropy
from fasttune.train.step import forward_backward

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


SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip


def _transformed_models():
    """Models whose forward changes the logits before the loss: Granite divides by logits_scaling, Cohere multiplies
    by logit_scale, Gemma 2 softcaps (a cap of 0.5 makes it visible at initialisation); and a MoE model without its
    router loss."""
    import transformers as tf

    yield tf.GraniteForCausalLM(tf.GraniteConfig(**SMALL, logits_scaling=8.0))
    yield tf.CohereForCausalLM(tf.CohereConfig(**SMALL, logit_scale=0.0625))
    yield tf.Gemma2ForCausalLM(tf.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=0.5))
    yield tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**SMALL))


@pytest.mark.parametrize("liger", [False, True])
@pytest.mark.parametrize("index", range(4))
def test_logit_scaling_and_softcapping_train_as_in_hf(index, liger, monkeypatch):
    """Before, Granite's logits_scaling was skipped: a different loss, silently (5.6805 against HF's 5.6995). Liger's
    kernel gets the softcap and the scaled rows (its contract faked on CPU)."""
    _fake_liger(monkeypatch)
    torch.manual_seed(0)
    ref = list(_transformed_models())[index].float().train()
    ours = copy.deepcopy(ref)
    assert apply_chunked_loss(ours, liger=liger), type(ref).__name__
    batches = [collate(_samples(6, seed=s), packing=False, pad_id=0) for s in (1, 2)]
    n = sum(count_targets(b) for b in batches)
    assert torch.allclose(forward_backward(ours, batches, n, None), forward_backward(ref, batches, n, None), rtol=1e-5)
    for k, g in _grads(ref).items():
        assert ((_grads(ours)[k] - g).abs().max() / g.abs().max().clamp_min(1e-12)) < 1e-4, k


def _patterns():
    """Forwards as transformers writes them (Llama's body), each with one change after the head."""
    import transformers as tf

    Base = tf.LlamaForCausalLM

    class Multiplied(Base):  # HyperCLOVAX: a multiplier where Granite divides
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits * self.config.logits_scaling
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            return tf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    class OnTheHead(Base):  # Falcon-H1: the multiplier on the head's line
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states) * self.model.multiplier
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            return tf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    class ScaledInput(Base):  # MiniCPM3: the head's input scaled
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids)
            hidden_states = outputs.last_hidden_state
            hidden_states = hidden_states / self.config.logits_scaling
            logits = self.lm_head(hidden_states)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            return tf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    class Sliced(Base):
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits[..., :100]  # a padded vocabulary cut back
            return logits

    class OwnLoss(Base):  # Bart's decoder: an unshifted CrossEntropyLoss
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            loss_fct = torch.nn.CrossEntropyLoss()
            loss = loss_fct(logits.view(-1, self.config.vocab_size), labels.view(-1))
            return loss

    class ZLoss(Base):  # Bamba: a z-loss added by assignment
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = loss + 0.1 * logits.logsumexp(-1).square().mean()
            return loss

    class LocalCap(Base):  # Gemma 3n / 4 multimodal: the softcap from a local variable
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            cap = self.config.get_text_config().final_logit_softcapping
            logits = logits / cap
            return logits

    class InsideTheCall(Base):  # a scale inside the head's call
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden_states * 2)
            return logits

    class Unpacked(Base):  # two values at once: neither is a known step
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden_states)
            loss, extra = self.loss_function(logits=logits, labels=labels), 0
            return loss + extra

    return Multiplied, OnTheHead, ScaledInput, Sliced, OwnLoss, ZLoss, LocalCap, InsideTheCall, Unpacked


def test_the_forwards_logit_steps_are_read_from_its_source_with_the_instances_values():
    """A multiplier (HyperCLOVAX) multiplies, one on the head's own line (Falcon-H1) counts, and values come from the
    instance (self.model.multiplier); transformers' classes too (Granite divides, Gemma 2 softcaps, Llama: nothing)."""
    import transformers as tf

    from fasttune.model.head import LogitTransform, logit_transform

    multiplied, on_the_head, scaled_input, *_ = _patterns()
    assert logit_transform(scaled_input(tf.LlamaConfig(**SMALL, logits_scaling=4.0))) == LogitTransform(0.25, None)
    model = multiplied(tf.LlamaConfig(**SMALL, logits_scaling=4.0))
    assert logit_transform(model) == LogitTransform(4.0, None)
    model = on_the_head(tf.LlamaConfig(**SMALL))
    model.model.multiplier = 0.25
    assert logit_transform(model) == LogitTransform(0.25, None)
    granite, cohere, gemma2, moe = _transformed_models()
    assert logit_transform(granite) == LogitTransform(1 / 8, None)
    assert logit_transform(cohere) == LogitTransform(0.0625, None)
    assert logit_transform(gemma2) == LogitTransform(1.0, 0.5)
    assert logit_transform(tf.Gemma2ForCausalLM(tf.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=None)))\
        == LogitTransform(1.0, None)  # fmt: skip
    assert logit_transform(build_preset("micro", VOCAB, "eager", torch.float32)) == LogitTransform()


@pytest.mark.parametrize("index", range(3))
def test_read_transforms_train_as_the_forward_does(index):
    import transformers as tf

    torch.manual_seed(0)
    ref = _patterns()[index](tf.LlamaConfig(**SMALL, logits_scaling=4.0)).float().train()
    ref.model.multiplier = 0.25
    ours = copy.deepcopy(ref)
    assert apply_chunked_loss(ours)
    batch = collate(_samples(6, seed=3), packing=False, pad_id=0)
    n = count_targets(batch)
    assert torch.allclose(forward_backward(ours, [batch], n, None), forward_backward(ref, [batch], n, None), rtol=1e-5)
    for k, g in _grads(ref).items():
        assert ((_grads(ours)[k] - g).abs().max() / g.abs().max().clamp_min(1e-12)) < 1e-4, k


def test_not_applied_where_the_loss_would_differ():
    """A router's auxiliary loss (output_router_logits), or a forward that changes the logits in a way fasttune's loss
    does not know (read from its source): the model's own loss runs, with the reason."""
    import transformers as tf

    from fasttune.model.loss import supports_chunked_loss

    moe = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**SMALL, output_router_logits=True))
    assert not apply_chunked_loss(moe) and "output_router_logits" in supports_chunked_loss(moe)

    expected = {
        "Sliced": "logits = logits[..., :100]",
        "OwnLoss": "loss = loss_fct(logits.view(-1, self.config.vocab_size), labels.view(-1))",
        "ZLoss": "loss = loss + 0.1 * logits.logsumexp(-1).square().mean()",
        "LocalCap": "logits = logits / cap",
        "InsideTheCall": "the head is not called on the hidden states as they are",
        "Unpacked": "loss, extra = self.loss_function(logits=logits, labels=labels), 0",
    }
    for cls in _patterns()[3:]:
        model = cls(tf.LlamaConfig(**SMALL))
        assert not apply_chunked_loss(model)
        why = supports_chunked_loss(model)
        assert why == f"{cls.__name__}.forward does what fasttune's loss does not: {expected[cls.__name__]}"


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


def _head_flops(labels: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    head = torch.nn.Linear(16, VOCAB, bias=False)
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(hidden, head, labels, num_items_in_batch=100, chunk=16).backward()
    return counter.get_total_flops()


def test_the_head_runs_on_the_trained_tokens_only():
    """A prompt (no target) costs no head matmul: half the targets, half the head's FLOPs, forward and backward; a
    batch where every token has a target costs what it did."""
    labels = torch.randint(0, VOCAB, (2, 64))
    full = _head_flops(labels)
    labels[:, :32] = -100  # prompts: with the shift, 31 of each row's 63 targets are gone (plus the last token)
    half = _head_flops(labels)
    assert full == 3 * 2 * (2 * 63) * 16 * VOCAB  # 126 targets: logits, d hidden, d weight
    assert half == 3 * 2 * (2 * 32) * 16 * VOCAB
    labels[:] = -100  # a micro-batch of prompts only
    assert _head_flops(labels) == 0


def _fake_liger(monkeypatch) -> None:
    """liger_fused_linear_cross_entropy's contract in plain torch (softcap as Liger applies it)."""
    import sys
    import types

    def fake_kernel(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean", softcap=None):
        assert (target != ignore_index).all()  # only trained rows reach it
        logits = hidden @ weight.T
        logits = softcap * torch.tanh(logits / softcap) if softcap else logits
        out = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
        return out if reduction == "sum" else out / len(target)

    liger = types.ModuleType("liger_kernel.transformers.functional")
    liger.liger_fused_linear_cross_entropy = fake_kernel
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", liger)


def test_the_loss_replaces_a_patched_forward_and_falls_back_to_it(monkeypatch):
    """Over a forward an earlier patch bound to the instance (Liger's), without labels that forward runs; a deep copy
    falls back on its own weights; with `liger`, the kernel gets the trained rows only and the result is HF's loss."""
    import sys
    import types

    ref, ours = _pair()
    seen = []

    def patched(self, *args, **kwargs):
        seen.append(self)
        return type(self).forward(self, *args, **kwargs)

    _fake_liger(monkeypatch)
    ours = copy.deepcopy(ref)
    ours.forward = types.MethodType(patched, ours)
    assert apply_chunked_loss(ours, liger=True)
    batch = collate(_samples(6), packing=True, pad_id=0)
    n = count_targets(batch)
    assert torch.allclose(forward_backward(ours, [batch], n, None), forward_backward(ref, [batch], n, None))
    for k, g in _grads(ref).items():
        assert torch.allclose(_grads(ours)[k], g, atol=1e-6), k
    with torch.no_grad():  # evaluation: fasttune's chunked loss, whatever Liger's version does under no_grad
        monkeypatch.setattr(sys.modules["liger_kernel.transformers.functional"], "liger_fused_linear_cross_entropy",
                            lambda *a, **k: pytest.fail("Liger's kernel ran in evaluation"))  # fmt: skip
        assert torch.allclose(ours(**batch, num_items_in_batch=n).loss, ref(**batch, num_items_in_batch=n).loss)
    plain = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(ours(**plain).logits, ref(**plain).logits) and seen == [ours]
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert not torch.equal(twin(**plain).logits, ours(**plain).logits)
    assert seen[-2] is twin and seen[-1] is ours


@pytest.mark.gpu
def test_liger_on_the_trained_rows_equals_liger_on_every_row():
    """Liger's fused kernel behind fasttune's row selection against Liger's own model forward (every row), bf16
    autocast over fp32 weights on CUDA, with prompts masked and the step's target count as divisor."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
    ref = build_preset("micro", VOCAB, "sdpa", torch.float32).cuda().train()
    apply_liger(ref)  # on this model only (Liger's own call also patches every later model of the architecture)
    ours = copy.deepcopy(ref)
    assert apply_chunked_loss(ours, liger=True)
    batches = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in collate(_samples(8, seed=s), packing=True,
                pad_id=0).items()} for s in (1, 2)]  # fmt: skip
    n = sum(count_targets(b) for b in batches)
    loss_ref = forward_backward(ref, batches, n, torch.bfloat16)
    loss_ours = forward_backward(ours, batches, n, torch.bfloat16)
    assert torch.allclose(loss_ours, loss_ref, rtol=1e-3), (loss_ours, loss_ref)
    for k, g in _grads(ref).items():
        assert ((_grads(ours)[k] - g).abs().max() / g.abs().max()) < 2e-2, k


CASES = [(8192, 3800, 128256), (8192, 8190, 128256), (8192, 3800, 32000), (16384, 100, 32000), (8192, 1, 128256)]


@pytest.mark.parametrize("rows,kept,vocab", [*CASES, (4096, 4096, 151936)])
def test_liger_keeps_the_whole_batchs_chunk_size_for_the_trained_rows(rows, kept, vocab):
    """Liger sizes chunks in proportion to its rows; the budget given for the trained rows restores the whole batch's
    chunk (skinnier chunks re-read the head weight: 5% slower at 128k, measured), and is the smallest that does."""
    from fasttune.model.loss import _liger_chunk, liger_chunk_budget

    budget = liger_chunk_budget(rows, kept, vocab, 2048)
    want = min(kept, _liger_chunk(rows, vocab, 2048, 1))
    assert _liger_chunk(kept, vocab, 2048, budget) >= want
    assert budget == 1 or _liger_chunk(kept, vocab, 2048, budget // 2) < want
    assert _liger_chunk(8192, 128256, 2048, 1) == 256 and _liger_chunk(3800, 128256, 2048, 1) == 64  # Liger's sizes


def test_an_moe_router_loss_counts_once_per_step_whatever_the_micro_batches():
    """With output_router_logits HF adds coef x aux_loss to every forward's loss; summed over micro-batches it grew
    with --training.grad-accum (a Qwen3-MoE run: 7.26 at 1, 8.26 at 2, 10.26 at 4). fasttune averages it: the step's
    loss is the cross-entropy plus the micro-batches' mean router loss, and validation reads the cross-entropy."""
    import transformers as tf

    from fasttune.train.step import router_loss

    torch.manual_seed(0)
    model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**SMALL, output_router_logits=True, router_aux_loss_coef=0.5))
    samples = _samples(8)
    n = count_targets(collate(samples, packing=True, pad_id=0))
    parts = [[collate(samples[i::k], packing=True, pad_id=0) for i in range(k)] for k in (1, 2, 4)]
    with torch.no_grad():  # by hand: each micro-batch's cross-entropy (sum / n) and router loss, from HF's forward
        outs = [[model(**b, use_cache=False, num_items_in_batch=n) for b in batches] for batches in parts]
        routers = [[router_loss(model, o) for o in os_] for os_ in outs]
        expected = [sum(o.loss - r for o, r in zip(os_, rs, strict=True)) + sum(rs) / len(rs)
                    for os_, rs in zip(outs, routers, strict=True)]  # fmt: skip
    for batches, want in zip(parts, expected, strict=True):
        got = forward_backward(model, batches, n, None)
        assert torch.allclose(got, want, rtol=1e-5), (len(batches), float(got), float(want))
    assert all(float(r) > 0.1 for rs in routers for r in rs)  # the router term is there to be counted


def test_the_training_loops_labels_carry_their_count_so_the_head_selects_rows_without_asking_the_device(monkeypatch):
    """step.to_device counts the targets on the host; with that count the row selection reads no device value (on a
    GPU, a host sync per micro-batch), and gives the rows the counted path gives."""
    from fasttune.model.loss import trained_rows
    from fasttune.train.step import to_device

    batch = to_device(collate(_samples(6), packing=True, pad_id=0), torch.device("cpu"))
    assert batch["labels"].fasttune_targets == count_targets(batch)
    hidden = torch.randn(*batch["labels"].shape, 8)
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:].reshape(-1)
    want_h, want_t = hidden.reshape(-1, 8)[shifted != -100], shifted[shifted != -100]
    assert all(map(torch.equal, trained_rows(hidden, batch["labels"].clone(), None), (want_h, want_t)))  # counted
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("read a device value"))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("read a device value"))
    got_h, got_t = trained_rows(hidden, batch["labels"], None)
    monkeypatch.undo()
    assert torch.equal(got_h, want_h) and torch.equal(got_t, want_t) and len(got_t) == count_targets(batch)
