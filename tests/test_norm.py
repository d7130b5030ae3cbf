"""The lean RMSNorm (fasttune/model/norm.py) computes what HF's RMSNorm computes, forward and backward, recomputes
its outputs exactly under every memory plan and LoRA, keeps what the planner counts, and stays out of the way where
it must: other norms, outputs written in place, inference."""

from __future__ import annotations

import copy
import dataclasses
import io
import types
import warnings
import weakref

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fasttune.data.packing import count_targets
from fasttune.model import mlp, norm
from fasttune.model.build import build_preset
from fasttune.model.liger import apply as apply_liger
from fasttune.train.activations import Shape, layer_bytes, lora_bytes
from fasttune.train.recompute import apply_plan
from fasttune.train.step import forward_backward
from tests.helpers import assert_same_losses_without, assert_same_step, rel_diff, run_module, tiny_config, twin
from tests.test_memory import VOCAB, _batch
from tests.test_memory_layers import _per_token_and_layer

SHAPE = Shape.of(LlamaConfig(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2,
                             vocab_size=VOCAB))  # fmt: skip
"""The shape _per_token_and_layer measures."""


def _norm_pair(dtype):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    ref.weight.data.uniform_(0.5, 1.5)
    return twin(ref, norm._lean_forward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_equal_hf_rmsnorm(dtype):
    """The output is HF's bit for bit; the gradients are HF's in fp32, and in bf16 as close to the fp64 truth as
    HF's own (the sums run in another order)."""
    ref, ours = _norm_pair(dtype)
    x, dy = torch.randn(3, 7, 96, dtype=dtype) * 3, torch.randn(3, 7, 96, dtype=dtype)
    got, want = run_module(ours, x, dy), run_module(ref, x, dy)
    assert torch.equal(got[0], want[0])
    truth = run_module(copy.deepcopy(ref).double(), x.double(), dy.double())
    for a, b, t in zip(got[1:], want[1:], truth[1:], strict=True):
        if dtype == torch.float32:
            assert rel_diff(a, b) <= 1e-6
        else:
            assert rel_diff(a, t) <= max(2 * rel_diff(b, t), 1e-2)


def test_it_keeps_its_input_and_the_inverse_rms_only():
    ref, ours = _norm_pair(torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    rows, weight, rstd = 4 * 96, 96 * 2, 4 * 4  # x's elements; the bf16 weight's and the fp32 inverse RMS's bytes
    for module, want in ((ours, rows * 2 + weight + rstd), (ref, rows * 4 + rstd + rows * 2 + weight)):
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t,
                                                      lambda t: t):  # fmt: skip
            module(x)
        alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        assert sum(alive.values()) == want, module  # ours: x; HF's: x's fp32 upcast and the normalized bf16 x


@pytest.mark.parametrize("plan", ["none", "ops", "attention", "mlp", "every:2", "full"])
@pytest.mark.parametrize("fused", [False, True])
def test_under_every_plan_the_model_gives_the_gradients_of_hf(plan, fused):
    """The whole model, lean norms (+ the fused MLP) + plan, against HF's modules without a plan: the recomputed norm
    outputs are the ones the matmuls would have kept. torch >= 2.14 warns (FutureWarning, every `ops` step) of the
    norm's saved-tensor hooks around selective checkpointing unless told how to treat them: it is told."""
    ref = build_preset("micro", VOCAB, "sdpa", torch.float32).train()
    ours = copy.deepcopy(ref)
    layers = ours.config.num_hidden_layers
    assert norm.apply(ours) == 2 * layers + 1 and norm.lean(ours) and not norm.lean(ref)
    if fused:
        assert mlp.apply(ours) == layers
    apply_plan(ours, plan)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="A saved_tensors_hooks context", category=FutureWarning)
        assert_same_step(ref, ours, _batch(), atol=1e-6)


def test_under_lora_the_adapters_get_the_gradients_of_hf():
    from fasttune.config import LoraConfig
    from fasttune.model.lora import apply_lora

    torch.manual_seed(0)
    ref = apply_lora(build_preset("micro", VOCAB, "sdpa", torch.float32), LoraConfig(enabled=True, rank=4))
    for p in ref.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # lora_B starts at zero: give every adapter a gradient path
    ours = copy.deepcopy(ref)
    assert norm.apply(ours) > 0
    assert_same_step(ref, ours, _batch(), atol=1e-6)


@pytest.mark.usefixtures("frozen_gc")
@pytest.mark.parametrize("plan", ["none", "ops", "attention", "mlp", "full"])
def test_bytes_kept_match_what_the_planner_counts(plan):
    """Per token and decoder layer (bf16, measured by what the forward leaves alive), within 2% of layer_bytes with
    and without the lean norm, and for LoRA (fasttune's forward and peft's own) within 5% of the change
    lora_bytes predicts."""
    for fused in (False, True):
        for lean in (False, True):
            got = _per_token_and_layer(plan, "", fused_mlp=fused, lean=lean)
            want = layer_bytes(SHAPE, plan, fused_mlp=fused, lean_norm=lean)
            assert abs(got - want) <= 0.02 * want, (fused, lean, got, want)
    for lora, upcast in (("fast", False), ("peft", True)):
        got = _per_token_and_layer(plan, lora, lean=True) - _per_token_and_layer(plan, lora)
        lora_change = lora_bytes(SHAPE, plan, 16, upcast=upcast, lean_norm=True) - lora_bytes(SHAPE, plan, 16,
                                                                                            upcast=upcast)  # fmt: skip
        want = layer_bytes(SHAPE, plan, lean_norm=True) - layer_bytes(SHAPE, plan) + lora_change
        assert abs(got - want) <= 0.05 * max(abs(want), 4 * SHAPE.hidden), (lora, got, want)
    assert layer_bytes(SHAPE, plan, lean_norm=True) <= layer_bytes(SHAPE, plan) - (
        {"none": 12, "attention": 10, "mlp": 12}.get(plan, 0) * SHAPE.hidden)  # fmt: skip


class _InPlace(nn.Module):
    """A norm whose output is scaled in place before a matmul keeps it (as some model code does)."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = LlamaRMSNorm(32), nn.Linear(32, 8, bias=False)
        self.norm.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.norm(x)
        h.mul_(2.0)
        return self.proj(h)


def test_an_output_written_in_place_is_kept_not_recomputed():
    torch.manual_seed(0)
    ref = _InPlace()
    ours = copy.deepcopy(ref)
    assert norm.apply(ours) == 1
    x = torch.randn(5, 32, requires_grad=True)
    for m in (ref, ours):
        m(x).square().sum().backward()
    assert torch.allclose(ref.proj.weight.grad, ours.proj.weight.grad, rtol=1e-6)
    assert torch.allclose(ref.norm.weight.grad, ours.norm.weight.grad, rtol=1e-5)


def test_other_norms_are_left_alone_and_inference_packs_nothing():
    """Gemma's RMSNorm (1 + weight) is not Llama's: untouched. Under no_grad no hook is entered, and after a training
    forward none is left behind."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, num_hidden_layers=1, vocab_size=VOCAB)  # fmt: skip
    gemma = GemmaForCausalLM(config)
    assert norm.apply(gemma) == 0 and not norm.lean(gemma)
    model = build_preset("micro", VOCAB, "sdpa", torch.float32)
    norm.apply(model)
    ids = torch.randint(2, VOCAB, (1, 12))
    with torch.no_grad():
        model(input_ids=ids)
    assert getattr(norm._state, "outputs", None) is None
    model(input_ids=ids).logits.sum().backward()
    assert getattr(norm._state, "outputs", None) is None
    with pytest.raises(ValueError):
        model(input_ids=ids, inputs_embeds=torch.zeros(1, 12, model.config.hidden_size))  # a forward that raises
    assert getattr(norm._state, "outputs", None) is None  # ... leaves no hook behind


def test_a_model_with_lean_norms_survives_torch_save():
    """It pickles and loads (its norms back to HF's forward, as pickle rebinds methods by name) and computes the
    same; its forward hooks still run, and a training forward on it gives HF's gradients."""
    model = build_preset("micro", VOCAB, "sdpa", torch.float32)
    norm.apply(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = torch.randint(2, VOCAB, (1, 12))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    loaded(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_training_run_with_lean_norms_equals_one_without(tmp_path, caplog):
    """On by default (the log says so), and a CPU run trains the same losses as --model.no-lean-norm."""
    assert_same_losses_without(tmp_path, caplog, "lean_norm", "lean RMSNorm on")


def _cuda_pair(liger: bool):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    ref = build_preset("micro", VOCAB, "sdpa", torch.bfloat16).cuda().train()
    if liger:  # on this model only: Liger also patches the module's classes, and every later model took its norms
        pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
        apply_liger(ref)
    ours = copy.deepcopy(ref)
    assert norm.apply(ours, liger=liger) == 2 * ours.config.num_hidden_layers + 1
    return ref, ours


@pytest.mark.gpu
@pytest.mark.parametrize("liger", [False, True])
def test_on_cuda_the_lean_norms_give_the_gradients_of_the_model_without(liger):
    """bf16 on CUDA, against the same model without them: HF's RMSNorm (the lean function's own backward), or
    Liger's (its outputs recomputed by its own kernel: the same bits, so the same gradients up to the kernels'
    run-to-run order)."""
    ref, ours = _cuda_pair(liger)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _batch().items()}
    n = count_targets(batch)
    a, b = forward_backward(ref, [batch], n, None), forward_backward(ours, [batch], n, None)
    assert torch.allclose(a, b, rtol=1e-3), (a, b)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert rel_diff(q.grad, p.grad) < 2e-2, name


def test_triton_kernels_match_the_torch_path_under_the_interpreter():
    """The forward and backward Triton kernels on the CPU through Triton's interpreter, against the torch path (HF's
    rounding): pure bf16, fp32, and fp32 weights on a bf16 input (autocast's residual stream); with and without the
    weight gradient; a row width that is not a power of two. A fresh process: the interpreter must be chosen before
    Triton compiles anything."""
    import os
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("triton", reason="Triton is not installed (the GPU test covers the kernels on CUDA)")
    code = textwrap.dedent("""
        import os
        import torch
        from tests.helpers import rel_diff
        from fasttune.model import norm
        torch.manual_seed(0)
        for xd, wd, tol in ((torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
                            (torch.bfloat16, torch.float32, 2e-2)):
            x, w = torch.randn(3, 11, 200, dtype=xd) * 3, torch.rand(200, dtype=wd) + 0.5
            assert norm.on_triton(x)
            y, rstd = norm._norm(x, w, 1e-5)
            os.environ["TRITON_INTERPRET"] = "0"  # the torch path, same process
            y_ref, rstd_ref = norm._norm(x, w, 1e-5)
            dy = torch.randn_like(y_ref)
            dx_ref, dw_ref = norm._norm_backward(dy, x, w, rstd_ref, True)
            os.environ["TRITON_INTERPRET"] = "1"
            assert y.dtype == y_ref.dtype and rel_diff(y, y_ref) <= tol and rel_diff(rstd, rstd_ref) <= 1e-5
            for wgrad in (True, False):
                dx, dw = norm._norm_backward(dy, x, w, rstd, wgrad)
                assert dx.dtype == xd and rel_diff(dx, dx_ref) <= tol
                assert (dw is None) if not wgrad else (dw.dtype == wd and rel_diff(dw, dw_ref) <= tol)
            empty = torch.randn(0, 200, dtype=xd, requires_grad=True)  # no rows: forward and backward still run
            norm.RMSNormFunction.apply(empty, w.requires_grad_(), 1e-5).sum().backward()
            assert empty.grad.shape == (0, 200) and not w.grad.any()
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


class LigerRMSNorm:
    """Stands in for Liger's patched RMSNorm on a CPU (norm.liger_rmsnorm knows a module by this forward's name): it
    keeps its input, as Liger's kernel does."""

    def forward(self, hidden_states):
        return norm.RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _with_liger_norms(dtype=torch.float32):
    model = build_preset("micro", VOCAB, "sdpa", dtype).train()
    for module in model.modules():
        if norm.llama_rmsnorm(module):
            module.forward = types.MethodType(LigerRMSNorm.forward, module)
    assert norm.has_liger_norms(model) and norm.apply(model) == 0  # left to the planner
    return model


def test_tagged_liger_norms_give_the_gradients_of_untagged_ones():
    ref = _with_liger_norms()
    ours = copy.deepcopy(ref)
    assert norm.apply(ours, liger=True) == 2 * ours.config.num_hidden_layers + 1 and not norm.has_liger_norms(ours)
    assert_same_step(ref, ours, _batch(), atol=1e-6)


def test_liger_norms_are_recomputed_only_when_the_run_needs_that_memory(tmp_path):
    """Recomputing Liger's norm outputs costs ~4% of the step: the planner tags them only when that makes `auto` fit
    with less recomputation, or an explicit plan fit at all; never when the run fits without, or with
    --model.no-lean-norm."""
    from fasttune.errors import FasttuneError
    from fasttune.train.estimate import Setup, estimate, setup_of
    from fasttune.train.memory import HEADROOM, plan_memory

    cfg = tiny_config(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=64))  # activations dominate
    st = setup_of(cfg, _with_liger_norms(), False, True)
    plain = estimate(st, "none").total / HEADROOM
    lean = estimate(Setup(**{**st.__dict__, "lean_norm": True}), "none").total / HEADROOM
    assert lean < plain
    between = (lean + plain) / 2
    for requested, free, plan, tagged in (("auto", plain * 1.01, "none", False), ("auto", between, "none", True),
                                          ("none", between, "none", True)):  # fmt: skip
        model = _with_liger_norms()
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory=requested))
        est = plan_memory(c, model, torch.device("cpu"), free_bytes=free)
        assert (est.plan, norm.has_liger_norms(model)) == (plan, not tagged), (requested, free)
    model = _with_liger_norms()
    off = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory="auto", lean_norm=False))
    assert plan_memory(off, model, torch.device("cpu"), free_bytes=between).plan != "none"
    assert norm.has_liger_norms(model)
    with pytest.raises(FasttuneError, match="needs about"):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory="none"))
        plan_memory(c, _with_liger_norms(), torch.device("cpu"), free_bytes=lean * 0.9)


def test_the_hooks_stay_out_of_the_way():
    """Nothing the tags hold keeps a tensor alive (under `full` the post-attention norms' inputs are freed during the
    forward);
    outer saved-tensor hooks (save_on_cpu) and disabled hooks leave the forward to them, unrecomputed, with HF's
    gradients; a nested forward keeps the outer one's hooks; after a KeyboardInterrupt mid-forward the next forward of
    the model removes the stale hooks."""
    ref = build_preset("micro", VOCAB, "sdpa", torch.float32).train()
    ours = copy.deepcopy(ref)
    norm.apply(ours)
    seen, inputs = {}, []

    def at_final_norm(module, args):
        seen["active"] = norm._state.outputs is not None
        seen["alive"] = sum(r() is not None for r in inputs)
        with torch.no_grad():
            ref(input_ids=torch.randint(2, VOCAB, (1, 4)))  # a nested forward of another hooked-or-not model

    ours.model.norm.register_forward_pre_hook(at_final_norm)
    for layer in ours.model.layers:  # nothing but the tags could keep these alive under `full`
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
    apply_plan(ours, "full")
    full = copy.deepcopy(ref)
    apply_plan(full, "full")
    assert_same_step(full, ours, _batch(), atol=1e-6)
    assert seen == {"active": True, "alive": 0} and norm._state.outputs is None and inputs
    ours = copy.deepcopy(ref)
    norm.apply(ours)
    ours.model.norm.register_forward_pre_hook(at_final_norm)
    for context in (torch.autograd.graph.save_on_cpu, lambda: torch.autograd.graph.disable_saved_tensors_hooks("x")):
        for model in (ref, ours):
            model.zero_grad()
        with context():
            assert_same_step(ref, ours, _batch(), atol=1e-6)
        assert not seen["active"] and norm._state.outputs is None

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = ours.model.layers[0].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        ours(input_ids=torch.randint(2, VOCAB, (1, 8)))
    handle.remove()
    assert norm._state.outputs is not None  # forward hooks do not run on a KeyboardInterrupt
    for model in (ref, ours):
        model.zero_grad()
    assert_same_step(ref, ours, _batch(), atol=1e-6)
    assert seen["active"] and norm._state.outputs is None


def test_in_place_writes_to_saved_tensors_still_fail():
    """Saved-tensor hooks switch off autograd's check for tensors written in place after they were saved: the lean
    norm's hooks do the check themselves, so such a model fails as it does without them, and a write into the norm's
    input (HF's norm keeps an fp32 copy instead) fails with a line naming the switch."""

    class Model(nn.Module):
        def __init__(self, where: str):
            super().__init__()
            self.pre, self.norm, self.proj = nn.Linear(16, 16), LlamaRMSNorm(16), nn.Linear(16, 4)
            self.where = where

        def forward(self, x):
            r = self.pre(x)
            h = self.norm(r)
            a = torch.sigmoid(r)
            (r if self.where == "input" else a).add_(1.0)
            return self.proj(h * a)

    x = torch.randn(3, 16)
    for where, match in (("other", "modified by an inplace operation"), ("input", "--model.no-lean-norm")):
        model = Model(where)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # HF's norm: fp32 keeps x
            copy.deepcopy(model)(x).sum().backward()
        norm.apply(model)
        with pytest.raises(RuntimeError, match=match):
            model(x).sum().backward()


def test_per_head_norms_are_lean_but_not_recomputed():
    """Qwen3's q/k norms (over the head size) run the lean function, but only the norms over the hidden size (what
    the projections keep) have their outputs recomputed; the model's gradients are HF's."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=2, vocab_size=VOCAB)  # fmt: skip
    torch.manual_seed(0)
    ref = Qwen3ForCausalLM(config).train()
    ours = copy.deepcopy(ref)
    assert norm.apply(ours) == 4 * 2 + 1
    tagged = {name for name, m in ours.named_modules() if m.__dict__.get("_fasttune_tag")}
    assert tagged and all(not name.endswith(("q_norm", "k_norm")) for name in tagged)
    assert_same_step(ref, ours, _batch(), atol=1e-6)
