"""MoE experts under autocast (model/experts.py): bf16 matmuls over fp32 master weights, as nn.Linear's."""

from __future__ import annotations

import copy

import pytest
import torch

from fasttune.model import experts
from tests.test_memory import VOCAB
from tests.test_memory_layers import _moe


def _step(model, ids):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_experts_compute_in_bf16_under_autocast_with_fp32_gradients(kind):
    """An fp32 MoE model under bf16 autocast: with experts.apply its loss and gradients are those of the same model
    with bf16 expert weights (what autocast does for nn.Linear), where transformers alone runs the experts in fp32;
    the weights stay fp32 Parameters and get fp32 gradients; without autocast the forward is unchanged."""
    torch.manual_seed(0)
    ref = _moe(kind, 2).train()
    ids = torch.randint(2, VOCAB, (2, 32))
    plain = _step(copy.deepcopy(ref), ids)
    ours = copy.deepcopy(ref)
    assert experts.apply(ours) == 2
    cast = copy.deepcopy(ref)
    grouped = [n for n, p in cast.named_parameters() if p.dim() == 3]
    assert grouped
    for n in grouped:
        module, name = cast.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]
        setattr(module, name, torch.nn.Parameter(getattr(module, name).detach().to(torch.bfloat16)))
    want, got = _step(cast, ids), _step(ours, ids)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    for (n, p), q in zip(ours.named_parameters(), cast.parameters(), strict=True):
        assert p.dtype == torch.float32 and isinstance(p, torch.nn.Parameter), n
        assert torch.equal(p.grad, q.grad.float()), n
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in ref.named_parameters()}
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)  # no autocast: as transformers


def test_weights_are_restored_when_the_forward_raises():
    torch.manual_seed(0)
    model = _moe("mixtral", 1)
    experts.apply(model)
    module = next(m for m in model.modules() if vars(m).get("forward") is not None)
    before = dict(module._parameters)
    with torch.autocast("cpu", torch.bfloat16), pytest.raises((RuntimeError, IndexError)):
        module(torch.randn(4, 384), torch.zeros(4, 7, dtype=torch.long), torch.ones(4, 3))  # top-k shapes disagree
    assert module._parameters == before


def test_only_transformers_experts_modules_are_touched():
    """Experts modules (one weight slice per expert); not other modules with 3-D weights (RecurrentGemma's RG-LRU
    gates, convolutions), nor a module whose forward another patch already replaced."""
    from transformers import LlamaConfig, LlamaForCausalLM, RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_hidden_layers=1, vocab_size=VOCAB))  # fmt: skip
    assert experts.apply(llama) == 0
    assert experts.apply(torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3))) == 0
    gemma = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(hidden_size=64, intermediate_size=64, lru_width=64,
                                                           num_attention_heads=4, num_hidden_layers=2,
                                                           vocab_size=VOCAB))  # fmt: skip
    assert any(p.dim() == 3 for n, p in gemma.named_parameters() if "rg_lru" in n) and experts.apply(gemma) == 0
    moe = _moe("mixtral", 2)
    moe.model.layers[0].mlp.experts.forward = lambda *a: None  # someone else's patch
    assert experts.apply(moe) == 1


def test_gpt_oss_experts_under_ops_equal_no_plan():
    """gpt-oss's experts (biases, transformers' grouped matmul) under `ops`: transformers adds the bias in place onto
    the grouped matmul's output that `ops` keeps (torch refused it in backward); with the bias added out of place a
    full fine-tuning step has the loss and gradients of no plan."""
    from helpers import TINY_MODELS, TINY_SHAPE
    from transformers import AutoConfig, AutoModelForCausalLM

    from fasttune.train.recompute import apply_plan

    shape = {**TINY_SHAPE, **TINY_MODELS["gpt_oss"]}
    config = AutoConfig.for_model("gpt_oss", vocab_size=VOCAB, experts_implementation="grouped_mm", **shape)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).train()
    for module in ref.modules():  # biases nonzero: their gradients and placement count
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            if isinstance(getattr(module, name, None), torch.nn.Parameter):
                torch.nn.init.normal_(getattr(module, name), std=0.1)
    ids = torch.randint(2, VOCAB, (2, 32))
    ours = copy.deepcopy(ref)
    apply_plan(ours, "ops")
    assert sum(experts.runs_autocast(m) for m in ours.modules()) == config.num_hidden_layers
    losses = []
    for model in (ref, ours):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-6), n
