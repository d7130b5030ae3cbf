"""LoRA on fused MoE experts computed on the activations (model/expert_lora_act.py): peft's factors mapped per expert,
the same loss and gradients as plain peft's ParamWrapper on every MoE family fasttune adapts, under every plan, in
double backward, under autocast and compiled; `ops` recomputing the rank-r matmuls' wide outputs; and what the
experts keep counted by the memory estimate."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from helpers import TINY_MODELS, TINY_SHAPE

from fasttune.config.base_config import LoraConfig
from fasttune.model import expert_lora, expert_lora_act, experts
from fasttune.model.lora import apply_lora, set_fast_forward
from fasttune.train.recompute import apply_plan, plans_for
from tests.test_memory import VOCAB

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft (<= 0.21) reads is_gradient_checkpointing
KINDS = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen2_moe")


def _model(kind: str, experts_n: int = 4, width: int | None = None, impl: str = "grouped_mm", layers: int = 2):
    """A tiny `kind` (TINY_MODELS) with eager attention (double backward; gpt-oss's sinks), `experts_n` experts of
    `width`, its experts run by transformers' `impl`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    count = "num_local_experts" if "num_local_experts" in TINY_MODELS[kind] else "num_experts"
    size = "moe_intermediate_size" if "moe_intermediate_size" in TINY_MODELS[kind] else "intermediate_size"
    extra = {count: experts_n, **({size: width} if width else {})}
    shape = {**TINY_SHAPE, **TINY_MODELS[kind], "num_hidden_layers": layers, **extra}
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, attn_implementation="eager", experts_implementation=impl,
                                  **shape)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def _lora(model, rank: int = 4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_lora(model, LoraConfig(enabled=True, rank=rank, alpha=2 * rank))
    torch.manual_seed(1)
    for p in model.parameters():  # B is zero at the start: every adapter nonzero, so the gradients of A count too
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _pair(kind: str, dtype=torch.float32, rank: int = 4, **kw):
    """(plain peft's model, a copy with fasttune's forwards)."""
    torch.manual_seed(0)
    ref = _lora(_model(kind, **kw).to(dtype), rank)
    ours = copy.deepcopy(ref)
    set_fast_forward(ref, enabled=False)
    assert set_fast_forward(ours) > 0
    return ref, ours


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _step(model, ids):
    """(loss, {adapter: gradient}) of one forward and backward."""
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, want, rtol=None, atol=None, msg=""):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, msg=msg)
    assert got[1].keys() == want[1].keys()
    for name, g in got[1].items():
        torch.testing.assert_close(g, want[1][name], rtol=rtol, atol=atol, msg=f"{msg} {name}")


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How many times each path ran: the activations' forward, and a recipe made (model/expert_lora.py)."""
    runs = {"act": 0, "recipes": 0}
    forward, init = expert_lora_act.forward, expert_lora._Recipe.__init__

    def act(*args):
        runs["act"] += 1
        return forward(*args)

    def recipe(self, *args):
        runs["recipes"] += 1
        init(self, *args)

    monkeypatch.setattr(expert_lora_act, "forward", act)
    monkeypatch.setattr(expert_lora._Recipe, "__init__", recipe)
    return runs


def _wrappers(model):
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in model.modules() if type(m) is ParamWrapper and expert_lora._of_experts(m)]


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])  # experts stored [E, out, in]; gpt-oss's [E, in, out]
def test_factors_per_expert_are_pefts_rows_and_columns_and_its_delta(kind):
    """A_e is rows e*r .. e*r+r-1 of lora_A.weight, B_e columns j*E+e of lora_B.weight, padded with zeros to 16 bytes
    (rank 4 in bf16: 8), and scaling * A_e^T B_e^T is peft's delta of expert e (get_delta_weight, get_delta_factors)
    in the orientation x is multiplied by."""
    model = _lora(_model(kind))
    wrappers = _wrappers(model)
    assert {w.parameter_name for w in wrappers} == {"gate_up_proj", "down_proj"}
    for wrapper in wrappers:
        a, b = wrapper.lora_A["default"].weight.detach(), wrapper.lora_B["default"].weight.detach()
        n, r = wrapper.num_experts, a.shape[0] // wrapper.num_experts
        transposed = wrapper.get_base_layer().is_transposed
        with torch.no_grad():
            a_EIR, b_ERO, scaling = expert_lora_act.factors(wrapper, "default", torch.bfloat16)
            delta = wrapper.get_delta_weight("default")
            lhs, rhs, _ = wrapper.get_delta_factors("default")
        torch.testing.assert_close(scaling * lhs @ rhs, delta)
        assert a_EIR.shape[-1] == b_ERO.shape[1] == 8 and not a_EIR[..., r:].any() and not b_ERO[:, r:].any()
        for e in range(n):
            torch.testing.assert_close(a_EIR[e, :, :r], a[e * r : (e + 1) * r].T.bfloat16(), rtol=0, atol=0)
            torch.testing.assert_close(b_ERO[e, :r], b[:, [j * n + e for j in range(r)]].T.bfloat16(), rtol=0, atol=0)
            a_e, b_e = a[e * r : (e + 1) * r], b[:, [j * n + e for j in range(r)]]
            torch.testing.assert_close(scaling * a_e.T @ b_e.T, delta[e] if transposed else delta[e].T)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_adapter_gradients_equal_plain_peft_under_every_plan(kind, counted, monkeypatch):
    """fp32: the loss and every adapter's gradient equal plain peft's (no plan) under every plan the model takes and
    offload, with the experts on the activations each time (no recipe made); the loss too under torch.inference_mode
    in eval mode."""
    from fasttune.train import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    ref, ours = _pair(kind)
    with torch.inference_mode():
        got, want = (m.eval()(input_ids=_ids(), labels=_ids(), use_cache=False).loss for m in (ours, ref))
    torch.testing.assert_close(got, want)
    want = _step(ref, _ids())
    assert any(g.abs().max() > 0 for n, g in want[1].items() if ".experts." in n)
    plans = sorted({"every:2" if p == "every:K" else p for p in plans_for(ours)} | {"offload"})
    assert {"none", "ops", "full", "mlp"} <= set(plans)
    for plan in plans:
        model = copy.deepcopy(ours)
        apply_plan(model, plan)
        counted["act"] = 0
        _assert_same(_step(model, _ids()), want, msg=plan)
        assert counted["act"] >= 2 and not counted["recipes"], (plan, counted)


def test_bf16_and_autocast_are_within_their_tolerance_of_peft(counted):
    """A bf16 base (fp32 adapters, as on a GPU), and fp32 weights under bf16 autocast with model/experts.py: within
    bf16's tolerance of peft (which folds the delta into the bf16 weight, rounding it; here it is added to the
    output)."""
    ref, ours = _pair("qwen3_moe", torch.bfloat16)
    for p in ours.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ref32 = _pair("qwen3_moe")[0]
    _assert_same(_step(ours, _ids()), _step(ref32, _ids()), rtol=5e-2, atol=5e-3, msg="bf16")
    ref, ours = _pair("qwen3_moe")
    assert experts.apply(ours) == 2
    with torch.autocast("cpu", torch.bfloat16):
        got = _step(ours, _ids())
    _assert_same(got, _step(ref, _ids()), rtol=5e-2, atol=5e-3, msg="autocast")
    assert counted["act"] and not counted["recipes"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize(("kind", "rank"), [("qwen3_moe", 4), ("qwen3_moe", 16), ("gpt_oss", 8)])
def test_on_a_gpu_within_bf16_tolerance_of_fp32_peft(kind, rank, counted):
    """CUDA's grouped matmul (not the CPU's fallback), the rank padded to 16 bytes (4 -> 8 in bf16): one adapted
    experts module with a bf16 base and fp32 adapters under bf16 autocast, as fasttune trains on a GPU, against plain
    peft's in fp32 on the same GPU, for the same routing (a whole tiny model's routing flips between bf16 and fp32)."""
    ref, ours = _pair(kind, rank=rank)
    ref, ours = _experts(ref).cuda(), _experts(ours).cuda()
    tokens, k = 64, 2
    for p in ours.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    assert experts.apply(ours) == 1
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, TINY_SHAPE["hidden_size"], device="cuda", generator=g)
    index = torch.rand(tokens, ours.num_experts, device="cuda", generator=g).topk(k).indices
    weights = torch.rand(tokens, k, device="cuda", generator=g).softmax(-1)
    outs = []
    for module, dtype in ((ours, torch.bfloat16), (ref, torch.float32)):
        with torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
            out = module(x, index, weights)
        out.float().square().sum().backward()
        outs.append((out.float(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    for got, want in zip((outs[0][0], *outs[0][1].values()), (outs[1][0], *outs[1][1].values()), strict=True):
        assert float((got - want).norm() / want.norm()) < 2e-2
    assert counted["act"] == 1 and not counted["recipes"]


def _experts(model):
    """The outermost adapted experts module of `model`'s first layer."""
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.experts"))


@pytest.mark.parametrize("plan", ["none", "full"])
def test_double_backward_equals_plain_peft(plan):
    """A gradient penalty (torch.autograd.grad with create_graph=True, then backward through those gradients): every
    adapter's gradient equals plain peft's; the thin grouped matmuls are differentiable twice as its fold is."""
    ref, ours = _pair("qwen3_moe")
    apply_plan(ours, plan)

    def penalty(model):
        model.train()
        model.zero_grad()
        adapters = [p for p in model.parameters() if p.requires_grad]
        loss = model(input_ids=_ids(), labels=_ids(), use_cache=False).loss
        grads = torch.autograd.grad(loss, adapters, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _assert_same(penalty(ours), penalty(ref), msg=plan)


def test_other_experts_implementations_and_adapters_off_fall_back(counted):
    """The recipes where transformers runs another experts implementation (eager, batched_mm), or the switch is
    off; peft's own forward with the adapters disabled: each the same loss as plain peft."""
    for impl in ("eager", "batched_mm"):
        ref, ours = _pair("mixtral", impl=impl)
        _assert_same(_step(ours, _ids()), _step(ref, _ids()), msg=impl)
        assert not counted["act"] and counted["recipes"], impl
    ref, ours = _pair("mixtral")
    counted["recipes"] = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(expert_lora_act, "enabled", False)
        _assert_same(_step(ours, _ids()), _step(ref, _ids()), msg="switched off")
    assert not counted["act"] and counted["recipes"]
    with ours.disable_adapter(), ref.disable_adapter(), torch.no_grad():
        got, want = (m(input_ids=_ids(), labels=_ids(), use_cache=False).loss for m in (ours, ref))
    torch.testing.assert_close(got, want)
    assert not counted["act"]


def _per_layer(n: int, plan: str, lora: str, fp32: bool = False) -> int:
    """Bytes a bf16 (`fp32`: fp32, no autocast) qwen3_moe decoder layer (`n` experts of width 256, LoRA rank 16)
    keeps for backward: two layers minus one, 64 tokens; the weights not counted."""
    from tests.test_memory_layers import _kept_bytes

    def make(layers):
        return _model("qwen3_moe", experts_n=n, width=256, layers=layers)

    kept = functools.partial(_kept_bytes, tokens=64, plan=plan, lora=lora, make=make, fp32=fp32)
    return kept(2) - kept(1)


@pytest.mark.usefixtures("frozen_gc")
def test_ops_recomputes_the_rank_r_matmuls_wide_outputs(monkeypatch):
    """`ops` keeps the [tokens x top-k, r] intermediates and recomputes the grouped matmuls from rank r back to the
    experts' width: kept, they were exactly those outputs more (gate_up's 2 x 256 and down's 64 wide, bf16)."""
    from fasttune.train import recompute

    monkeypatch.setattr(expert_lora_act, "RANKS", set())  # filled as the forward is installed (compile reads it)
    recomputed = _per_layer(4, "ops", "fast")
    assert expert_lora_act.RANKS == {16, 32}  # gate_up at twice the rank (model/lora.py)
    monkeypatch.setattr(recompute, "_widens_rank", lambda args: False)
    assert _per_layer(4, "ops", "fast") - recomputed == 64 * 2 * (2 * 256 + TINY_SHAPE["hidden_size"]) * 2


def _copies(n: int, fp32: bool = False) -> tuple[torch.nn.Module, float]:
    """(a bf16 (`fp32`: fp32) qwen3_moe of `n` experts of width 256 under LoRA rank 16, its adapters' stacked copies
    per layer)."""
    model = _lora(_model("qwen3_moe", experts_n=n, width=256).to(torch.float32 if fp32 else torch.bfloat16), rank=16)
    set_fast_forward(model)
    return model, expert_lora.act_bytes(model) / 2


@pytest.mark.slow  # 32 models built and run: 13 s
@pytest.mark.usefixtures("frozen_gc")
def test_what_a_layer_keeps_grows_by_the_adapter_copies_the_estimate_counts():
    """Four times the experts: a layer keeps no adapted weight, only the adapters' stacked bf16 copies more (and the
    router's probabilities, as without LoRA) where the experts' activations are kept (`none`), and nothing of them
    where they are recomputed (`ops`): expert_lora.act_bytes, what Setup.experts_lora holds. In fp32 without
    autocast (--model.dtype fp32, the CPU) the copies are fp32, twice bf16's (rank padded to 4, not 8): act_bytes
    reads the weights' dtype (1130496 bytes kept, 1130496 counted; 565248 each in bf16)."""
    from fasttune.train.estimate import KEEPS_EXPERTS

    for fp32 in (False, True):
        grown = _copies(16, fp32)[1] - _copies(4, fp32)[1]
        for plan in ("none", "ops"):
            routing = _per_layer(16, plan, "", fp32) - _per_layer(4, plan, "", fp32)
            kept = _per_layer(16, plan, "fast", fp32) - _per_layer(4, plan, "fast", fp32) - routing
            assert kept == (grown if plan in KEEPS_EXPERTS else 0), (plan, fp32)


def test_the_estimate_counts_the_adapter_copies_under_the_plans_that_keep_them():
    """Setup.experts_lora is the adapters' stacked copies of every layer (expert_lora.act_bytes), added under plans
    none and attention only; no weight is remade (experts_fold 0)."""
    from fasttune.config import get_experiment
    from fasttune.train.estimate import Setup, estimate, setup_of

    model, per_layer = _copies(16)
    st = setup_of(get_experiment("lora"), model, liger=False, chunked=True)
    assert st.experts_fold == 0 and st.experts_lora == 2 * per_layer > 0
    without = Setup(**{**st.__dict__, "experts_lora": 0.0})
    for plan in ("none", "attention", "ops", "mlp", "full", "every:2"):
        added = estimate(st, plan).total - estimate(without, plan).total
        assert added == (st.experts_lora if plan in ("none", "attention") else 0), plan


def test_adapter_copies_at_the_qwen3_30b_a3b_shape():
    """The docstrings' figure: 41 MB a layer of bf16 copies at rank 16 (128 experts, hidden 2048, width 768; gate_up
    holds gate and up, rank 32: model/lora.py), the meta device holding the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                  num_experts_per_tok=8, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)  # fmt: skip
    with torch.device("meta"):
        model = _lora(AutoModelForCausalLM.from_config(config).to(torch.bfloat16), rank=16)
    assert expert_lora.act_bytes(model) == 128 * (32 * (2048 + 2 * 768) + 16 * (768 + 2048)) * 2  # 40.9 MB


@pytest.fixture
def fresh_dynamo():
    """dynamo reset, and its counters (graph breaks, graphs) cleared: earlier tests' stay in them."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("backend", "dtype", "plan"), [
    ("aot_eager", torch.float32, "none"), ("aot_eager", torch.float32, "ops"),
    pytest.param("inductor", torch.bfloat16, "ops", marks=pytest.mark.slow)])  # fmt: skip
def test_compiled_layers_equal_eager_ones_without_a_graph_break(backend, dtype, plan):
    """Each decoder layer compiled: the same loss and adapter gradients as the eager forward, step after step, with
    no graph break and nothing compiled again after the first step. bf16 under inductor: transformers runs torch's
    grouped matmul under compile in bf16 only (its own fallback op otherwise), and inductor laid the factors' stacks
    out as permuted views, which the grouped matmul refuses, before they were an op of their own."""
    from torch._dynamo.utils import counters

    from fasttune.train.recompute import decoder_layers

    ours = _pair("qwen3_moe", dtype)[1]
    eager = copy.deepcopy(ours)
    apply_plan(ours, plan)
    for layer in decoder_layers(ours):
        layer.compile(backend=backend)
    compiled = None
    tolerance = {} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-3}
    for step in range(3):
        _assert_same(_step(ours, _ids(step)), _step(eager, _ids(step)), **tolerance, msg=str(step))
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert compiled is None or counters["stats"]["unique_graphs"] == compiled
        compiled = counters["stats"]["unique_graphs"]
