"""The C++ compiler torch.compile needs on a CPU: inductor writes C++ kernels and builds them with it (g++, or $CXX).

On a CUDA GPU inductor writes Triton kernels instead (those need a C compiler: doctor's gcc row). Without one on a CPU
the first compiled call fails deep in the run with inductor's `InvalidCxxCompiler` traceback; training asks here
first, before anything is loaded, and `fasttune doctor` shows the answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess

CPU_COMPILE_USERS = "--training.compile and --training.optimizer adamw_8bit (torchao's step is compiled)"
INSTALL = "apt-get install g++ (or dnf install gcc-c++), or export CXX=/path/to/c++"


def cpp_compiler() -> str | None:
    """The path of the C++ compiler inductor would build CPU kernels with, searched as inductor searches it
    (torch._inductor.config.cpp.cxx: $CXX when set, else g++; one whose --version fails does not count), or None.
    With TORCH_INDUCTOR_INSTALL_GXX set inductor fetches g++ through conda itself: that is named instead."""
    for cxx in _candidates():
        if cxx is None:
            if os.getenv("TORCH_INDUCTOR_INSTALL_GXX"):
                return "g++ from conda (TORCH_INDUCTOR_INSTALL_GXX)"
            continue
        path = shutil.which(cxx)
        if path is None:
            continue
        try:
            subprocess.run([path, "--version"], capture_output=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            continue
        return path
    return None


def searched() -> str:
    """What cpp_compiler() looks for, for a message: `g++`, or the $CXX inductor was started with."""
    return " or ".join(c for c in _candidates() if c is not None) or "g++"


def _candidates() -> tuple[str | None, ...]:
    import torch._inductor.config as inductor  # reads $CXX when first imported

    cxx = inductor.cpp.cxx
    return tuple(cxx) if isinstance(cxx, (list, tuple)) else (cxx,)
