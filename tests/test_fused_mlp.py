"""The fused SwiGLU MLP (fasttune/model/mlp.py) computes what HF's MLP computes, forward and backward, under every
memory plan, in a whole training run, and only where the architecture's MLP is that SwiGLU."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from fasttune.model import mlp
from fasttune.model.build import build_preset
from fasttune.train.recompute import apply_plan
from tests.helpers import assert_same_losses_without, assert_same_step, rel_diff, run_module, twin
from tests.test_memory import VOCAB, _batch


def _pair(dtype, device="cpu"):
    torch.manual_seed(0)
    return twin(LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=160)).to(device, dtype), mlp._forward)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_forward_and_gradients_equal_hf_mlp(dtype, tol):
    """Output, input and weight gradients against HF's LlamaMLP (bf16: dx is one addmm, one rounding less)."""
    ref, ours = _pair(dtype)
    x, dy = torch.randn(3, 7, 64, dtype=dtype), torch.randn(3, 7, 64, dtype=dtype)
    for a, b in zip(run_module(ours, x, dy), run_module(ref, x, dy), strict=True):
        assert rel_diff(a, b) <= tol


def test_frozen_projections_keep_no_input_and_still_pass_the_gradient():
    """LoRA on the attention alone freezes the MLP: x then serves no weight gradient and is not kept, and the
    input gradient is still HF's."""
    ref, ours = _pair(torch.float32)
    for p in (*ref.parameters(), *ours.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ours(x)
    assert saved and not any(t.data_ptr() == x.data_ptr() for t in saved if t is not None)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (want,) = torch.autograd.grad(ref(x), x, torch.ones_like(y))
    assert torch.allclose(dx, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plan", ["none", "ops", "attention", "mlp", "every:2", "full"])
def test_fused_mlp_under_every_plan_gives_the_gradients_of_hf(plan):
    """The whole model, fused MLP + plan, against HF's modules without a plan: selective checkpointing replays the
    matmul outputs the function saved, so the function must never write into them."""
    ref = build_preset("micro", VOCAB, "sdpa", torch.float32).train()
    ours = copy.deepcopy(ref)
    assert mlp.apply(ours) == ours.config.num_hidden_layers and mlp.fused(ours) and not mlp.fused(ref)
    apply_plan(ours, plan)
    assert_same_step(ref, ours, _batch())


def test_training_run_with_the_fused_mlp_equals_one_without(tmp_path, caplog):
    """On by default (the log says so), and a CPU run trains the same losses as --model.no-fused-mlp."""
    assert_same_losses_without(tmp_path, caplog, "fused_mlp", "fused SwiGLU MLP on")


def test_only_plain_swiglu_mlps_are_replaced():
    """Another activation, an MLP bias, an unknown architecture or an MLP class that is not transformers' own:
    untouched; LoRA-wrapped projections keep peft's forward while the other layers' plain MLPs are fused."""
    from fasttune.config import LoraConfig
    from fasttune.model.lora import apply_lora

    gelu = build_preset("micro", VOCAB, "sdpa", torch.float32)
    gelu.config.hidden_act = "gelu"
    assert mlp.apply(gelu) == 0 and "activation 'gelu'" in mlp.unsupported_reason(gelu)
    other = build_preset("micro", VOCAB, "sdpa", torch.float32)
    other.config.model_type = "gemma"
    assert mlp.apply(other) == 0 and "model type 'gemma'" in mlp.unsupported_reason(other)
    remote = build_preset("micro", VOCAB, "sdpa", torch.float32)  # remote code reusing the llama model type
    for layer in remote.model.layers:
        layer.mlp.__class__ = type("CustomMLP", (type(layer.mlp),), {"__module__": "transformers_modules.custom"})
    assert mlp.apply(remote) == 0
    lora = apply_lora(build_preset("micro", VOCAB, "sdpa", torch.float32), LoraConfig(enabled=True, rank=4))
    assert mlp.apply(lora) == 0  # all-linear targets: every projection is a LoRA layer
    attn_only = apply_lora(build_preset("micro", VOCAB, "sdpa", torch.float32),
                           LoraConfig(enabled=True, rank=4, targets=("q_proj", "v_proj")))  # fmt: skip
    assert mlp.apply(attn_only) == attn_only.config.num_hidden_layers  # frozen plain MLPs: fused, no weight grads


def test_triton_kernels_match_torch_ops_under_the_interpreter():
    """The two Triton kernels on the CPU through Triton's interpreter, against torch's ops: fp32 to rounding, bf16
    within a few bf16 steps; and a whole fused MLP's gradients against HF's MLP with them. Runs where Triton is
    installed (the interpreter must be chosen before Triton compiles anything: a fresh process)."""
    import os
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("triton", reason="Triton is not installed (the GPU test covers the kernels on CUDA)")
    code = textwrap.dedent("""
        import torch
        from tests.test_fused_mlp import _pair
        from tests.helpers import rel_diff, run_module
        from fasttune.model import mlp
        torch.manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
            g, u, dc = (torch.randn(37, 200, dtype=dtype) * 3 for _ in range(3))
            assert mlp.on_triton(g)
            silu = torch.nn.functional.silu(g)
            assert rel_diff(mlp.swiglu(g, u), silu * u) <= tol
            dg, du = mlp.swiglu_backward(dc, g, u)
            assert rel_diff(dg, torch.ops.aten.silu_backward(dc * u, g)) <= tol and rel_diff(du, dc * silu) <= tol
            ref, ours = _pair(dtype)
            x, dy = torch.randn(3, 7, 64, dtype=dtype), torch.randn(3, 7, 64, dtype=dtype)
            assert all(rel_diff(a, b) <= 10 * tol for a, b in zip(run_module(ours, x, dy), run_module(ref, x, dy)))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.gpu
def test_triton_kernels_equal_the_torch_path_on_cuda():
    """The CUDA kernels against the CPU/torch path in bf16, and fp32 weights under bf16 autocast (gradients in the
    weights' dtype), against HF's MLP."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if mlp.triton is None:
        pytest.skip("needs triton")
    g, u, dc = (torch.randn(1000, 700, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(3))
    cuda_c, cuda_grads = mlp.swiglu(g, u), mlp.swiglu_backward(dc, g, u)
    torch_c = torch.nn.functional.silu(g) * u
    torch_dg = torch.ops.aten.silu_backward(dc * u, g)
    assert rel_diff(cuda_c, torch_c) <= 1e-2 and rel_diff(cuda_grads[0], torch_dg) <= 1e-2
    assert rel_diff(cuda_grads[1], dc * torch.nn.functional.silu(g)) <= 1e-2
    ref, ours = _pair(torch.float32, "cuda")
    x, dy = torch.randn(4, 33, 64, device="cuda"), torch.randn(4, 33, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = run_module(ours, x, dy), run_module(ref, x, dy)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and rel_diff(a, b) <= 2e-2


def test_a_model_with_fasttunes_forwards_survives_torch_save():
    """torch.save pickles the instance-bound forwards by name: the loaded copy runs the classes' own forwards (HF's
    MLP, peft's LoRA layer) and computes the same logits."""
    import io

    from fasttune.config import LoraConfig
    from fasttune.model.lora import apply_lora
    from fasttune.model.loss import apply_chunked_loss

    model = apply_lora(build_preset("micro", VOCAB, "sdpa", torch.float32), LoraConfig(enabled=True, rank=4,
                       targets=("q_proj", "v_proj")))  # fmt: skip
    assert mlp.apply(model) == model.config.num_hidden_layers
    assert apply_chunked_loss(model.get_base_model())  # the loss's forward too
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    ids = torch.randint(2, VOCAB, (2, 12))
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert torch.allclose(loaded(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss, atol=1e-5)
