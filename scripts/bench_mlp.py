#!/usr/bin/env python3
"""The fused SwiGLU MLP's kernels against Liger's and the MLP's forward + backward against HF's and Liger's modules, on
one CUDA GPU (docs/BENCHMARKS.md, "Memory", fourth run). Liger rows only where liger-kernel is installed.

    python scripts/bench_mlp.py [--tokens 8192] [--hidden 2048] [--intermediate 5632]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fasttune.model import mlp  # noqa: E402


def timed(fn, n: int = 100) -> float:
    """Mean seconds per call after 5 warm-up calls, the GPU synchronised around the timed calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    args = p.parse_args()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate)
    hf = LlamaMLP(config).cuda().bfloat16()
    fused = copy.deepcopy(hf)
    fused.forward = types.MethodType(mlp._forward, fused)
    modules = {"HF": hf, "fused": fused}
    g, u, dc = (torch.randn(args.tokens, args.intermediate, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernels = {"fused forward": lambda: mlp.swiglu(g, u), "fused backward": lambda: mlp.swiglu_backward(dc, g, u)}
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        modules["Liger"] = LigerSwiGLUMLP(config).cuda().bfloat16()
        kernels["Liger forward"] = lambda: swiglu_forward(g, u)
        kernels["Liger backward (in place: two copies of its inputs included)"] = lambda: swiglu_backward(
            g.clone(), u.clone(), dc
        )
    except ImportError:
        pass
    x = torch.randn(1, args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, {args.tokens} tokens, MLP width {args.intermediate}")
    for name, module in modules.items():
        print(f"MLP forward + backward, {name}: {timed(lambda m=module: m(x).backward(dy), 50) * 1e3:.3f} ms")
    for name, fn in kernels.items():
        print(f"kernel, {name}: {timed(fn) * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
