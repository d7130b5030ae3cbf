"""Liger's kernels stay on the model they were applied to (fasttune.model.liger).

Found on an H200: the README's test command, run in one process there, failed a lean-norm test because a model built
after an earlier test's Liger model carried Liger's norms and MLP: Liger patches the architecture's module classes,
not just the instance. The CPU test stands in for Liger with a function that patches what liger-kernel 0.8.5's
`apply_liger_kernel_to_llama(model=...)` patches (plus the class forward and torch globals other architectures'
functions patch); the GPU test runs the real one."""

import importlib.machinery
import sys
import types
from types import MethodType

import pytest
import torch
from transformers.models.llama import modeling_llama as m

from fasttune.model import liger
from fasttune.model.build import build_preset

VOCAB = 300
PLAIN = {"norm": m.LlamaRMSNorm, "mlp": m.LlamaMLP, "rope": m.apply_rotary_pos_emb,
         "forward": m.LlamaForCausalLM.forward, "ce": torch.nn.functional.cross_entropy,
         "ln": torch.nn.LayerNorm}  # fmt: skip


def _fake_liger(monkeypatch) -> list:
    """liger_kernel.transformers whose `_apply_liger_kernel_to_instance` patches like Liger; the test's teardown puts
    every global back whatever the code under test did."""
    for owner, name in ((m, "LlamaRMSNorm"), (m, "LlamaMLP"), (m, "apply_rotary_pos_emb"),
                        (m.LlamaForCausalLM, "forward"), (torch.nn.functional, "cross_entropy"),
                        (torch.nn, "LayerNorm")):  # fmt: skip
        monkeypatch.setattr(owner, name, getattr(owner, name))
    applied = []

    class FakeNorm(m.LlamaRMSNorm):
        pass

    class FakeMLP(m.LlamaMLP):
        pass

    def fake_rope(q, k, cos, sin, *args, **kwargs):
        if not q.is_cuda:  # Liger's Triton kernel
            raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")
        return PLAIN["rope"](q, k, cos, sin, *args, **kwargs)

    def fake_forward(self, *args, **kwargs):
        return PLAIN["forward"](self, *args, **kwargs)

    def apply(model, **kwargs):
        m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaMLP = fake_rope, FakeNorm, FakeMLP
        m.LlamaForCausalLM.forward = fake_forward  # class-wide, as Liger does where it patches no instance
        torch.nn.functional.cross_entropy = lambda *a, **k: None  # Granite's default in 0.8.5
        torch.nn.LayerNorm = FakeNorm  # its SmolVLM / SigLIP functions
        model.model.norm.forward = MethodType(FakeNorm.forward, model.model.norm)  # the instance
        applied.append((model, kwargs))

    module = types.ModuleType("liger_kernel")
    module.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    module.transformers = types.SimpleNamespace(_apply_liger_kernel_to_instance=apply)
    monkeypatch.setitem(sys.modules, "liger_kernel", module)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module.transformers)
    return applied


def test_liger_patches_only_the_model_it_is_applied_to_and_keeps_its_rope(monkeypatch):
    applied = _fake_liger(monkeypatch)
    model = build_preset("micro", VOCAB, "sdpa", torch.float32)
    liger.apply(model, rope=False)
    assert applied == [(model, {"rope": False})]
    assert "fake_forward" in model.forward.__func__.__name__  # its class-wide forward, kept on the instance
    assert "forward" in vars(model.model.norm)  # its instance patch kept
    later = build_preset("micro", VOCAB, "sdpa", torch.float32)
    assert type(later.model.norm) is PLAIN["norm"] and type(later.model.layers[0].mlp) is PLAIN["mlp"]
    assert m.LlamaForCausalLM.forward is PLAIN["forward"] and "forward" not in vars(later)
    assert torch.nn.functional.cross_entropy is PLAIN["ce"] and torch.nn.LayerNorm is PLAIN["ln"]
    # looked up at every call by the patched model's attention: Liger's on CUDA tensors, the original on others
    assert m.apply_rotary_pos_emb.__wrapped__.__name__ == "fake_rope" and m.apply_rotary_pos_emb.plain is PLAIN["rope"]
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    later.load_state_dict(model.state_dict())
    assert torch.equal(model(ids).logits, later(ids).logits)  # a CPU model runs, patched or not
    liger.apply(model)  # again: the original function is kept, not a chain of wrappers
    assert m.apply_rotary_pos_emb.plain is PLAIN["rope"]


def test_a_benchmark_block_leaves_every_global_as_it_found_it(monkeypatch):
    _fake_liger(monkeypatch)
    with liger.globals_restored("transformers.models.llama.modeling_llama"):
        liger.apply(build_preset("micro", VOCAB, "sdpa", torch.float32))
    assert m.apply_rotary_pos_emb is PLAIN["rope"] and m.LlamaRMSNorm is PLAIN["norm"]
    assert m.LlamaForCausalLM.forward is PLAIN["forward"] and torch.nn.LayerNorm is PLAIN["ln"]


@pytest.mark.gpu
def test_on_cuda_a_model_built_after_a_liger_model_has_no_liger_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
    classes = (m.LlamaRMSNorm, m.LlamaMLP, m.LlamaForCausalLM.forward)
    model = build_preset("micro", VOCAB, "sdpa", torch.bfloat16).cuda()
    liger.apply(model)
    assert type(model.model.norm.forward.__self__) is classes[0] and "forward" in vars(model.model.norm)  # Liger's
    later = build_preset("micro", VOCAB, "sdpa", torch.bfloat16).cuda()
    assert (type(later.model.norm), type(later.model.layers[0].mlp), m.LlamaForCausalLM.forward) == classes
    assert "forward" not in vars(later.model.norm) and "forward" not in vars(later)
    assert m.apply_rotary_pos_emb.__wrapped__.__module__.startswith("liger_kernel")  # on CUDA, for the Liger model
    ids = torch.randint(0, VOCAB, (2, 16))
    model(ids.cuda()).logits.float().sum().backward()
    later.cpu().float()(ids)  # a CPU model after it (was: Triton's "cannot be accessed from Triton (cpu tensor?)")


def test_liger_s_warnings_about_backends_fasttune_does_not_run_are_dropped_and_triton_s_kept(caplog):
    """On an H200 every run with Liger printed that its Huawei Ascend and its optional CuTe DSL backends could not be
    imported; a failing Triton backend (the kernels fasttune runs) must still be seen."""
    registry = __import__("logging").getLogger("liger_kernel.backends.registry")
    liger.quiet_other_backends()
    liger.quiet_other_backends()  # idempotent
    message = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
    with caplog.at_level("WARNING", logger=registry.name):
        registry.warning(message, "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError", "no tanh")
        registry.warning(message, "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "no cutlass dsl")
        registry.warning(message, "liger_kernel.ops.backends._cutedsl.rope", "rope", "RuntimeError", "broken")
        registry.warning(message, "liger_kernel.ops.backends._triton.rope", "rope", "ImportError", "no triton")
    seen = [r.getMessage().split("'")[1] for r in caplog.records]
    assert seen == ["liger_kernel.ops.backends._cutedsl.rope", "liger_kernel.ops.backends._triton.rope"]
    assert registry.filters.count(liger._QUIET) == 1
