"""Every activation plan trains exactly like no plan: the same loss and gradients on Llama's layers, on GPT-2's and
OPT's (whose layers and blocks sit elsewhere), under LoRA, and with Liger's RoPE, which a selective plan must not see.
What each plan costs and which one the planner picks: tests/test_memory.py."""

from __future__ import annotations

import copy
import importlib.machinery

import pytest
import torch

from fasttune.errors import FasttuneError
from fasttune.model.build import build_preset
from fasttune.train.estimate import Setup
from fasttune.train.memory import auto_order, choose_plan
from fasttune.train.recompute import apply_plan
from tests.helpers import assert_same_step
from tests.test_memory import VOCAB, _batch, _setup


@pytest.mark.parametrize("plan", ["ops", "attention", "mlp", "every:2", "full"])
def test_every_plan_gives_the_gradients_of_no_plan(plan):
    ref = build_preset("micro", VOCAB, "sdpa", torch.float32).train()
    ours = copy.deepcopy(ref)
    apply_plan(ours, plan)
    assert any("forward" in vars(m) for m in ours.modules())  # the plan is installed
    assert_same_step(ref, ours, _batch())


def _other_layout(kind: str):
    """GPT-2 (layers at transformer.h, attention `attn`) and OPT (model.decoder.layers, no MLP block)."""
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)  # fmt: skip
    else:
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                           word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_plans_find_the_layers_of_other_layouts_and_keep_their_gradients(kind):
    from fasttune.train.recompute import plans_for

    ref = _other_layout(kind).train()
    plans = plans_for(ref)
    assert plans == ({"none", "ops", "every:K", "full", "attention", "mlp"} if kind == "gpt2"
                     else {"none", "ops", "every:K", "full", "attention"})  # fmt: skip
    batch = _batch()
    batch.pop("cu_seq_lens_q", None), batch.pop("cu_seq_lens_k", None), batch.pop("max_length_q", None)
    batch.pop("max_length_k", None)
    for plan in ("ops", "attention", "every:2", "full") + (("mlp",) if kind == "gpt2" else ()):
        ref.zero_grad()
        ours = copy.deepcopy(ref)
        apply_plan(ours, plan)
        assert any("forward" in vars(m) for m in ours.modules()), plan  # installed on the layers found
        assert_same_step(ref, ours, batch, atol=1e-6, what=plan)
    st = Setup(**{**_setup(8192).__dict__, "plans": plans})
    assert all(e.plan != "mlp" for e in auto_order(st)) == (kind == "opt")
    if kind == "opt":
        with pytest.raises(FasttuneError, match="model.memory=mlp: this model's decoder layers cannot take it"):
            choose_plan("mlp", st, None)


def test_plans_under_lora_give_the_gradients_of_no_plan():
    from fasttune.config import LoraConfig
    from fasttune.model.lora import apply_lora

    base = build_preset("micro", VOCAB, "sdpa", torch.float32)
    ref = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, rank=4, alpha=8)).train()
    ours = copy.deepcopy(ref)
    apply_plan(ours, "every:2")
    assert_same_step(ref, ours, _batch(), loss_rtol=1e-5)


def test_liger_rope_is_left_out_of_selective_plans_and_never_rotates_saved_outputs(monkeypatch, caplog):
    """Liger's RoPE rotates q/k in the storage of the projections' outputs, which a selective plan saves and hands
    back to the recomputed forward (rotated twice: wrong gradients, measured on an H200). An explicit selective plan
    applies Liger without RoPE, and a Liger RoPE an earlier model left in the module rotates copies."""
    import sys
    import types

    from fasttune.train import model_prep

    calls = []
    liger = types.ModuleType("liger_kernel")
    liger.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    liger.transformers = types.SimpleNamespace(_apply_liger_kernel_to_instance=lambda **kw: calls.append(kw))
    patches = types.SimpleNamespace(MODEL_TYPE_TO_APPLY_LIGER_FN={"llama": None})
    monkeypatch.setitem(sys.modules, "liger_kernel", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger.transformers)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patches)

    def liger_rope(q, k, cos, sin):  # Liger's contract: rotates in place, returns its inputs
        q.mul_(-1), k.mul_(-1)
        return q, k

    liger_rope.__module__ = "liger_kernel.transformers.rope"
    fake = types.ModuleType("fake_modeling")
    fake.apply_rotary_pos_emb = liger_rope
    monkeypatch.setitem(sys.modules, "fake_modeling", fake)
    model = type("FakeForCausalLM", (torch.nn.Module,), {"__module__": "fake_modeling"})()
    model.config = types.SimpleNamespace(model_type="llama")

    cuda = torch.device("cuda")  # only its type is read
    for plan, rope in (("none", True), ("full", True), ("auto", True), ("ops", False), ("every:2", False)):
        model_prep._apply_liger(model, cuda, plan)
        assert calls.pop()["rope"] is rope, plan
    q, k = torch.ones(2), torch.ones(3)
    q2, k2 = fake.apply_rotary_pos_emb(q, k, None, None)
    assert q.eq(1).all() and k.eq(1).all() and q2.eq(-1).all() and k2.eq(-1).all()  # copies rotated, inputs kept
    wrapped = fake.apply_rotary_pos_emb
    model_prep._apply_liger(model, cuda, "ops")
    assert fake.apply_rotary_pos_emb is wrapped  # wrapped once

    # a model type Liger has no kernels for: said, and nothing applied (the log said "Liger kernels applied" for
    # GPT-NeoX, Falcon, Phi, GPT-2, ..., on an H200 with liger-kernel 0.8.5)
    model.config.model_type = "gpt_neox"
    calls.clear()
    with caplog.at_level("WARNING", logger="fasttune"):
        model_prep._apply_liger(model, cuda, "none")
    assert not calls and "Liger has no kernels for model type 'gpt_neox'; running without them" in caplog.text
