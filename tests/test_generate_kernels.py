"""The decode step's RMSNorm with Gemma's rounding (fasttune/generate/kernels.py): the torch path (CPU) is HF's Gemma
RMSNorm op for op; on CUDA the Triton kernel gives HF's module's bits wherever the row's sum of squares is exact in
any order, and differs by at most one unit in the last place elsewhere (its sum runs in another order)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fasttune.generate import kernels

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hf_norm(width: int, dtype: torch.dtype, device: str = "cpu", gemma: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    norm = Gemma3RMSNorm(width, eps=1e-6) if gemma else LlamaRMSNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.0 if gemma else 1.0, 0.3)  # Gemma's init is 0: a missing 1 + w would pass unseen
    return norm.to(device, dtype)


def exact_rows(rows: int, width: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Multiples of 1/8 up to 2: their squares are multiples of 1/64, summed exactly in float32 in any order."""
    gen = torch.Generator().manual_seed(rows)
    return (torch.randint(-16, 17, (rows, width), generator=gen) / 8).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_path_is_hf_gemma_norm_bit_for_bit(dtype):
    norm = hf_norm(1152, dtype)
    x = (torch.randn(3, 5, 1152) * 3).to(dtype)
    assert torch.equal(kernels.rms_norm_reference(x, norm.weight, norm.eps, gemma=True), norm(x))
    # the Llama rounding (before the weight) is another norm: the flag matters
    assert not torch.equal(kernels.rms_norm_reference(x, norm.weight, norm.eps), norm(x))


def test_mean_factor_is_cudas_mean_factor():
    """CUDA's mean multiplies the sum by float32(rows) / float32(numel): 1/n, until numel passes 2^24."""
    assert kernels.mean_factor(torch.empty(4, 1152)) == float(torch.tensor(1 / 1152, dtype=torch.float32))
    rows, width = 4099, 4097  # numel 16,793,603: past 2^24 and odd, so float32(numel) is rounded
    f32 = torch.float32
    want = float(torch.tensor(float(rows), dtype=f32) / torch.tensor(float(rows * width), dtype=f32))
    assert want != float(torch.tensor(1 / width, dtype=f32))
    assert kernels.mean_factor(torch.empty(rows, width, device="meta")) == want


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1152, 256, 96])  # Gemma 3 1B's hidden size and head dim; Phi-3-mini's head dim
def test_gemma_kernel_is_hf_gemma_norm_on_cuda(dtype, width):
    norm = hf_norm(width, dtype, "cuda")
    for rows in (1, 7, 300):  # a decode step's rows, a few, a prefill's
        x = exact_rows(rows, width, dtype, "cuda")
        assert torch.equal(kernels.rms_norm(x, norm.weight, norm.eps, gemma=True), norm(x)), (rows, width)
        x = torch.randn(rows, width, device="cuda", dtype=dtype) * 3
        got, want = kernels.rms_norm(x, norm.weight, norm.eps, gemma=True), norm(x)
        if dtype != torch.float32:  # the sum's order: a rare last-place difference once rounded to 16 bits
            assert float((got != want).float().mean()) < 2e-3
        # float32 keeps the sum's order in its last bits: a few ulps (3.3e-7 relative measured on an H200)
        torch.testing.assert_close(got, want, rtol=4 * torch.finfo(dtype).eps, atol=0)
    # q/k heads: (B, Q, H, D) slices of a qkv row, normalized per head as HF's (B, H, Q, D) view of them
    qkv = exact_rows(2 * 3, 6 * width, dtype, "cuda").view(2, 3, 6, width)
    heads = qkv[:, :, 1:5]
    got = kernels.rms_norm(heads, norm.weight, norm.eps, gemma=True)
    assert got.shape == heads.shape and torch.equal(got, norm(heads.transpose(1, 2)).transpose(1, 2))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_llama_rounding_is_unchanged_on_cuda():
    """Without the flag the kernel keeps Llama's rounding (normalized row rounded before the weight)."""
    norm = hf_norm(1152, torch.bfloat16, "cuda", gemma=False)
    x = exact_rows(7, 1152, torch.bfloat16, "cuda")
    got = kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(got, norm(x), rtol=2**-7, atol=0)
    assert not torch.equal(kernels.rms_norm(x, norm.weight, norm.variance_epsilon, gemma=True), got)
