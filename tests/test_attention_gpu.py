"""GPU checks of the CUDA backends (sdpa/cuDNN, flex compiled, varlen, flash-attn 2/3/4) against the fp64
per-document reference of test_attention.py, bf16, head dim 128, packed and padded, forward and backward."""

from __future__ import annotations

import pytest
import torch
from test_attention import attention_forward, make_qkv, packed_call, padded_call, reference

from fasttune.attention import kernel_report
from fasttune.attention.probe import probe
from fasttune.attention.state import STATE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
LENS = (300, 1000, 37, 700, 1)
CUDA_BACKENDS = ("sdpa", "flex_attention", "varlen", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def _usable(backend):
    why = None if backend == "auto" else probe(backend, "cuda", torch.bfloat16, 128)
    if why:
        pytest.skip(f"{backend} unavailable here: {why}")


@pytest.mark.parametrize("backend", [*CUDA_BACKENDS, "auto"])
@pytest.mark.parametrize("layout", ["cu", "position_ids", "padded", "padded-left", "dense"])
@pytest.mark.parametrize("window", [None, 256])
def test_cuda_backend_matches_reference(backend, layout, window):
    _usable(backend)
    q, k, v = (x.requires_grad_() for x in make_qkv(torch.bfloat16, 8, 2, 128, sum(LENS), "cuda"))
    kw = dict(scaling=128**-0.5, sliding_window=window)
    lens = (sum(LENS),) if layout == "dense" else LENS  # dense: one unpadded row, the flash dense kernels
    if layout.startswith("padded"):  # right padding runs as dense rows, left padding through unpadding
        out = padded_call(backend, q, k, v, LENS, left=layout.endswith("left"), **kw)
    elif layout == "dense":
        out = attention_forward(backend, None, q[None], k[None], v[None], None, **kw)[0][0]
    else:
        out = packed_call(backend, q, k, v, LENS, layout, **kw)
    ref = reference(q, k, v, lens, scale=128**-0.5, window=window)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(ref)
    got_grads = torch.autograd.grad(out.double(), (q, k, v), grad_out)
    for got, want in zip(got_grads, torch.autograd.grad(ref, (q, k, v), grad_out), strict=True):
        err = (got.double() - want).norm() / want.norm()
        assert err < 2e-2, f"relative grad error {err:.3g}"


def test_sdpa_runs_cudnn_on_hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cuDNN attention is preferred on Hopper/Blackwell only")
    q, k, v = make_qkv(torch.bfloat16, 8, 8, 128, 1024, "cuda")
    attention_forward("sdpa", None, q[None], k[None], v[None], None)
    assert kernel_report()["sdpa/dense bfloat16 D128"] == "CUDNN_ATTENTION", kernel_report()


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_flex_trains_at_a_real_shape_or_is_refused_up_front(softcap):
    """GQA 8 query / 2 kv heads, D64, 4k packed tokens, forward+backward (with Gemma 2's softcap): flex either runs
    and matches the reference, or its probe refuses it before training, naming the error (#12 item 10)."""
    from fasttune.attention import resolve
    from fasttune.errors import FasttuneError

    why = probe("flex_attention", "cuda", torch.bfloat16, 64, softcap=bool(softcap))
    if why is not None:
        config = type("Config", (), {"attn_logit_softcapping": softcap})()
        with pytest.raises(FasttuneError, match="fails a forward"):
            resolve("flex_attention", device="cuda", dtype=torch.bfloat16, head_dim=64, packed=True, strict=True,
                    model_config=config)  # fmt: skip
        print(f"flex refused (softcap={softcap}): {why}")
        return
    lens = (1500, 37, 2000, 559)
    q, k, v = (x.requires_grad_() for x in make_qkv(torch.bfloat16, 8, 2, 64, sum(lens), "cuda"))
    out = packed_call("flex_attention", q, k, v, lens, "cu", scaling=64**-0.5, softcap=softcap)
    ref = reference(q, k, v, lens, scale=64**-0.5, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out.double(), (q, k, v), grad_out),
                         torch.autograd.grad(ref, (q, k, v), grad_out), strict=True):  # fmt: skip
        assert (got.double() - want).norm() / want.norm() < 2e-2


def test_auto_runs_right_padded_rows_without_per_shape_plans():
    """Right-padded training rows change length every batch: auto runs them on a kernel without cuDNN's per-shape
    execution plans (flash-attn dense or torch's varlen), never sdpa/cuDNN (#12 item 11)."""
    from fasttune.attention.select import auto_route

    q = torch.randn(4, 8, 777, 128, device="cuda", dtype=torch.bfloat16)
    opts = dict(scale=128**-0.5, window=None, softcap=None, dropout=0.0)
    assert auto_route(q, "right", opts) in ("varlen", "flash_attention_4", "flash_attention_3", "flash_attention_2")
    lens = (300, 1000, 37)
    q, k, v = (x.requires_grad_() for x in make_qkv(torch.bfloat16, 8, 2, 128, sum(lens), "cuda"))
    STATE.kernels.clear()  # auto's plan probed the backends above (sdpa among them): report this call alone
    out = padded_call("auto", q, k, v, lens, scaling=128**-0.5)  # module None: a training call, right padded
    torch.testing.assert_close(out.double(), reference(q, k, v, lens, scale=128**-0.5), atol=2e-2, rtol=2e-2)
    assert not any(tag.startswith("sdpa/dense") for tag in kernel_report()), kernel_report()
