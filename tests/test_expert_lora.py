"""LoRA on fused MoE experts without a weight-sized tensor kept per layer (model/expert_lora.py): the same loss and
gradients as plain peft's ParamWrapper under the activation plans, what a layer keeps no longer growing with the
experts' weights, and what backward remakes counted by the memory estimate."""

from __future__ import annotations

import copy
import functools
import gc
import warnings
import weakref

import pytest
import torch
from helpers import TINY_MODELS, TINY_SHAPE
from torch.utils._python_dispatch import TorchDispatchMode

from fasttune.config.base_config import LoraConfig
from fasttune.model import expert_lora, expert_lora_act, experts
from fasttune.model.expert_lora import fold_bytes
from fasttune.model.lora import apply_lora, set_fast_forward
from fasttune.train.recompute import apply_plan
from tests.test_memory import VOCAB
from tests.test_memory_layers import _kept_bytes

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft (<= 0.21) reads is_gradient_checkpointing
KINDS = ("qwen3_moe", "mixtral")


@pytest.fixture(autouse=True)
def recipes(monkeypatch):
    """The recipes path for every test here: the experts' grouped matmul would otherwise run the adapters on the
    activations (model/expert_lora_act.py: tests/test_expert_lora_act.py)."""
    monkeypatch.setattr(expert_lora_act, "enabled", False)


def _model(kind: str, layers: int = 2, experts_n: int = 4, width: int | None = None, attn: str = "sdpa"):
    """A tiny model of TINY_MODELS' shape (`experts_n` experts of `width`), on fasttune's `attn` backend."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fasttune.attention.select import register

    count = "num_experts" if kind == "qwen3_moe" else "num_local_experts"
    size = {"moe_intermediate_size" if kind == "qwen3_moe" else "intermediate_size": width} if width else {}
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, attn_implementation=register()[attn], **{
        **TINY_SHAPE, **TINY_MODELS[kind], "num_hidden_layers": layers, count: experts_n, **size})  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def _lora(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8))
    torch.manual_seed(1)
    for p in model.parameters():  # B is zero at the start: every adapter nonzero, so the gradients of A count too
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _step(model, ids):
    """(loss, the input embeddings' gradient, {adapter: gradient}) of one forward and backward."""
    model.train()
    model.zero_grad()
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=x, labels=ids, use_cache=False).loss
    loss.backward()
    return loss, x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapted_experts_train_as_plain_peft_under_every_plan(kind, dtype, monkeypatch):
    """Loss, the input's gradient and every adapter's gradient equal those of plain peft's experts (its
    ParamWrapper forward, no plan) under every plan (every:2: one layer under ops, the other whole; attention: the
    experts outside the checkpoint; offload: the layers' inputs in host memory, all of them here), with an fp32 base
    and with a bf16 one under fp32 adapters (fasttune's LoRA on a GPU), within torch's fp32 tolerance: the same fold
    of the adapters into the weights, remade in backward from the same inputs."""
    from fasttune.train import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny layers' inputs are offloaded too
    offload.stats.reset()
    torch.manual_seed(0)
    ref = _lora(_model(kind).to(dtype))
    ours = copy.deepcopy(ref)
    assert expert_lora.set_forward(ref, enabled=False) == 0  # peft's ParamWrapper (tests/test_lora.py: the rest)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    want = _step(ref, ids)
    assert any(g.abs().max() > 0 for n, g in want[2].items() if ".experts." in n)
    for plan in ("none", "ops", "every:2", "full", "attention", "mlp", "offload"):
        model = copy.deepcopy(ours)
        assert set_fast_forward(model) == 2 * 4 + 2  # q, k, v, o of each layer; its experts
        apply_plan(model, plan)
        loss, grad, grads = _step(model, ids)
        close = torch.testing.assert_close
        close(loss, want[0], msg=plan)
        close(grad, want[1], msg=plan)
        assert grads.keys() == want[2].keys()
        for name, g in grads.items():
            close(g, want[2][name], msg=f"{plan} {name}")
    assert offload.stats.tensors  # offload ran (last)


@pytest.mark.usefixtures("frozen_gc")
def test_adapted_experts_without_grad_accumulating_twice_through_a_graph_and_with_a_graph_dropped(monkeypatch):
    """As plain peft's experts: the loss under torch.no_grad, torch.inference_mode and in eval mode, and the
    gradients of two micro-batches accumulated, each backward run twice through its graph (retain_graph: the weights
    remade once, read again). A forward whose graph is dropped without a backward leaves no recipe (and no weight it
    remade) alive, nor does a backward."""
    torch.manual_seed(0)
    ref = _lora(_model("qwen3_moe"))
    ours = copy.deepcopy(ref)
    set_fast_forward(ref, enabled=False)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        losses = []
        for model in (ref, ours):
            model.eval()
            with mode():
                losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss)
        torch.testing.assert_close(losses[1], losses[0], msg=str(mode))
    grads = []
    for model in (ref, ours):
        model.train()
        model.zero_grad()
        for half in (ids[:1], ids[1:]):
            loss = model(input_ids=half, labels=half, use_cache=False).loss
            loss.backward(retain_graph=True)
            loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)

    made, init = [], expert_lora._Recipe.__init__
    monkeypatch.setattr(expert_lora._Recipe, "__init__", lambda self, *a: init(self, *a) or made.append(weakref.ref(
        self)))  # fmt: skip
    for backward in (False, True):
        loss = ours(input_ids=ids, labels=ids, use_cache=False).loss
        if backward:
            loss.backward()
        del loss
        gc.collect()
        assert len(made) == 4 * (1 + backward) and not [r for r in made if r() is not None], backward


def _tracked(monkeypatch) -> tuple[list[weakref.ref], list[weakref.ref]]:
    """Weak references to every recipe made from now on, and to every weight a recipe remakes in backward."""
    recipes, remade = [], []
    init, remake = expert_lora._Recipe.__init__, expert_lora._Recipe.remake

    def tracked_init(self, *args):
        init(self, *args)
        recipes.append(weakref.ref(self))

    def tracked_remake(self):
        fresh = self.out is None
        out = remake(self)
        if fresh:
            remade.append(weakref.ref(out))
        return out

    monkeypatch.setattr(expert_lora._Recipe, "__init__", tracked_init)
    monkeypatch.setattr(expert_lora._Recipe, "remake", tracked_remake)
    return recipes, remade


@pytest.fixture
def no_cyclic_gc():
    """The cyclic garbage collector off: what a test frees, reference counting alone frees."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("no_cyclic_gc", "fresh_dynamo")
@pytest.mark.parametrize("plan", ["none", "ops", "offload", "compile"])
def test_recipes_and_remade_weights_die_with_backward_without_the_cyclic_gc(plan, monkeypatch):
    """Step after step with the cyclic garbage collector off, no recipe and no weight it remade outlives its backward
    (no reference cycle holds them: a layer's adapted weights would otherwise stay alive until a collection), under
    the plans whose hooks surround the experts' and with the decoder layers compiled (dynamo traced the hooks, and
    each step's recipes stayed in a cycle of its tracing state)."""
    from fasttune.train import offload
    from fasttune.train.recompute import decoder_layers

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    recipes, remade = _tracked(monkeypatch)
    model = _lora(_model("qwen3_moe"))
    set_fast_forward(model)
    apply_plan(model, "none" if plan == "compile" else plan)
    if plan == "compile":
        for layer in decoder_layers(model):
            layer.compile(backend="aot_eager")
    for step in range(3):
        made = len(recipes)
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
        _step(model, ids)
        assert len(recipes) > made and remade, (plan, step)
        alive = [r for r in recipes + remade if r() is not None]
        assert not alive, (plan, step, len(alive))


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_layers_train_as_plain_peft_and_compile_once():
    """--training.compile on LoRA experts (each decoder layer compiled by inductor; `auto` attention, probed inside
    the first compiled forward): loss and gradients equal plain peft's uncompiled ones step after step, and after the
    first step nothing compiles again (no new graph; `_forward`'s own frame, run eagerly, passes dynamo's callback each
    call). The hooks' setup, a probe and the attention's per-forward memo run eagerly (torch.compiler.disable): dynamo
    met the hooks' torch._C calls and recompiled their setup every step on the new weights' storage pointers (up to its
    limit, 8, on an H200), and a probe's .item() and lru_cache; the experts' forward compiles."""
    from torch._dynamo.utils import counters

    from fasttune.attention.state import STATE
    from fasttune.train.recompute import decoder_layers

    ref = _lora(_model("qwen3_moe", attn="auto"))
    ours = copy.deepcopy(ref)
    set_fast_forward(ref, enabled=False)
    for layer in decoder_layers(ours):
        layer.compile()
    compiled = None
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for step in range(4):
            ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
            got, want = _step(ours, ids), _step(ref, ids)  # ours first: auto probes in the compiled forward
            assert STATE.plans, "auto's plan was probed"
            torch.testing.assert_close(got[0], want[0], msg=str(step))
            torch.testing.assert_close(got[1], want[1], msg=str(step))
            for name, g in got[2].items():
                torch.testing.assert_close(g, want[2][name], msg=f"{step} {name}")
            now = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
            assert compiled is None or now == compiled, (step, now, compiled)
            compiled = now
    breaks = " ".join(counters["graph_break"])
    for traced in ("saved_tensors", "item()", "is_inference", "lru_cache"):
        assert traced not in breaks and not [w for w in said if traced in str(w.message)], traced
    assert all("skip" in why.lower() for why in counters["graph_break"]), breaks  # calls of disabled functions only


def _penalty_grads(model, ids) -> dict[str, torch.Tensor]:
    """The adapters' gradients of a gradient penalty: the squared norm of the loss's gradients (create_graph=True)."""
    model.train()
    model.zero_grad()
    adapters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, adapters, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("plan", ["none", "full"])
def test_double_backward_through_the_remade_weights_equals_plain_peft(plan, monkeypatch):
    """A gradient penalty (torch.autograd.grad with create_graph=True, then backward through those gradients):
    backward remakes each adapted weight on the adapters' graph, so every adapter's gradient equals plain peft's,
    whose forward built it there (remade without a graph, the experts' second-order terms were silently lost);
    a backward that builds no graph still remakes none there. Eager attention: sdpa's CPU kernel has no double
    backward."""
    torch.manual_seed(0)
    ref = _lora(_model("qwen3_moe", attn="eager"))
    ours = copy.deepcopy(ref)
    set_fast_forward(ref, enabled=False)
    assert set_fast_forward(ours) == 2 * 4 + 2
    apply_plan(ours, plan)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    graphs, remake = [], expert_lora._Recipe.remake  # whether each remake builds a graph
    monkeypatch.setattr(expert_lora._Recipe, "remake", lambda self: graphs.append(torch.is_grad_enabled()) or remake(
        self))  # fmt: skip
    want, got = _penalty_grads(ref, ids), _penalty_grads(ours, ids)
    assert got.keys() == want.keys() and True in graphs
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], msg=name)
    graphs.clear()
    _step(ours, ids)
    assert graphs and not any(graphs)


def _per_layer(kind: str, experts_n: int, plan: str, lora: str, autocast: bool = False) -> int:
    """Bytes a decoder layer keeps for backward (two layers minus one, 64 tokens; the weights not counted)."""
    make = functools.partial(_model, kind, experts_n=experts_n, width=256)
    return (_kept_bytes(2, 64, plan, lora, make=make, autocast=autocast)
            - _kept_bytes(1, 64, plan, lora, make=make, autocast=autocast))  # fmt: skip


@pytest.mark.usefixtures("frozen_gc")
@pytest.mark.parametrize("kind", KINDS)
def test_what_a_layer_keeps_does_not_grow_with_the_experts_weights(kind):
    """Four times the experts (the same tokens and routing): with peft's forward a layer keeps their whole adapted
    weight more (and the factors' bf16 copies) under `none`, with fasttune's only what the model without LoRA keeps
    more in bf16 (the router's [tokens, experts] probabilities), under plans none and ops, in bf16 and with fp32
    weights under autocast (the experts' matmuls in bf16, model/experts.py, which peft's forward cannot run: its
    parametrized weights are no parameters of the module)."""
    weight = 3 * 12 * TINY_SHAPE["hidden_size"] * 256 * 2  # 12 more experts' gate, up and down, bf16
    assert _per_layer(kind, 16, "none", "peft") - _per_layer(kind, 4, "none", "peft") >= weight
    for plan in ("none", "ops"):
        routing = _per_layer(kind, 16, plan, "") - _per_layer(kind, 4, plan, "")
        for autocast in (False, True):
            grown = _per_layer(kind, 16, plan, "fast", autocast) - _per_layer(kind, 4, plan, "fast", autocast)
            assert grown < 0.01 * weight and (autocast or grown == routing), (plan, autocast, grown, routing)


class _Peak(TorchDispatchMode):
    """The most bytes of storages that ops made while it runs were alive at once."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _gone(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            ptr = t.untyped_storage().data_ptr() if torch.is_tensor(t) else 0
            if ptr and ptr not in self.live:
                self.live[ptr] = t.untyped_storage().nbytes()
                self.now += self.live[ptr]
                weakref.finalize(t, self._gone, ptr)
        self.peak = max(self.peak, self.now)
        return out


@pytest.mark.usefixtures("frozen_gc")
@pytest.mark.parametrize("kind", KINDS)
def test_backward_remakes_one_layers_weights_at_a_time_as_the_estimate_counts(kind):
    """fold_bytes is one layer's adapted expert weights; what backward makes at its peak grows, with four times
    the experts, by between one and two times what fold_bytes grows (measured: 5/3, gate_up's weight remade and
    the gradients of both), the two times the estimate adds (Estimate.remade); with two layers, no more than one."""
    from fasttune.config import get_experiment
    from fasttune.train.estimate import Setup, estimate, setup_of

    peaks, folds = {}, {}
    for layers, n in ((1, 4), (1, 16), (2, 16)):
        torch.manual_seed(0)
        model = _lora(_model(kind, layers, n, width=256).to(torch.bfloat16))
        layer = model.base_model.model.model.layers[0].mlp.experts
        assert fold_bytes(model) == sum(p.numel() * 2 for p in layer.base_layer.base_layer.parameters())
        ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        gc.collect()
        with _Peak() as peak:
            loss.backward()
        peaks[layers, n], folds[layers, n] = peak.peak, fold_bytes(model)
    grown, fold = peaks[1, 16] - peaks[1, 4], folds[1, 16] - folds[1, 4]
    assert fold <= grown <= 2 * fold, (grown, fold)
    assert peaks[2, 16] - peaks[1, 16] < fold, peaks
    st = setup_of(get_experiment("lora"), model, liger=False, chunked=True)
    assert st.experts_fold == folds[2, 16]
    without = Setup(**{**st.__dict__, "experts_fold": 0.0})
    for plan in ("none", "ops", "full"):
        assert estimate(st, plan).total - estimate(without, plan).total == 2 * folds[2, 16]


def test_experts_under_autocast_run_their_adapted_weights_in_bf16():
    """fp32 weights under bf16 autocast with model/experts.py: the adapted weights are made in bf16 (no fp32 copy
    for the grouped matmuls to keep), within bf16's tolerance of peft's fp32 experts."""
    torch.manual_seed(0)
    ref = _lora(_model("qwen3_moe"))
    ours = copy.deepcopy(ref)
    set_fast_forward(ref, enabled=False)
    assert experts.apply(ours) == 2
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", torch.bfloat16):
        want, got = _step(ref, ids), _step(ours, ids)
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    for name, g in got[2].items():
        torch.testing.assert_close(g, want[2][name], rtol=0.1, atol=2e-3, msg=name)
