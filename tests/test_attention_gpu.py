"""GPU checks of the CUDA backends (sdpa/cuDNN, flex compiled, varlen, flash-attn 2/3/4) against the fp64
per-document reference of test_attention.py, bf16, head dim 128, packed and padded, forward and backward."""

from __future__ import annotations

import pytest
import torch
from test_attention import attention_forward, make_qkv, packed_call, padded_call, reference

from fasttune.attention import kernel_report
from fasttune.attention.probe import probe

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
