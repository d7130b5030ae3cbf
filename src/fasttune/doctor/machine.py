"""Facts about this machine that the checks share, gathered once and never raising.

Every check is a pure function of the `Machine` value: `detect()` reads the hardware, the toolchain and the
environment, `doctor.attn.gather()` adds the probe results (imports, attention backends, SDPA kernels, `auto`'s
choice) with the same functions training uses. Tests hand simulated machines to the checks instead. Every helper
here returns None (or an empty value) when a fact cannot be read, so a missing tool or a broken driver shows up as a
row in the table rather than as a crash.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from fasttune.compiler import cpp_compiler
from fasttune.errors import one_line


@dataclass
class Gpu:
    name: str
    cc: tuple[int, int]  # compute capability
    total_gib: float


@dataclass
class Machine:
    """What the checks need to know; built by `detect()`."""

    python: tuple[int, int, int]
    torch_version: str
    torch_cuda: str | None  # torch.version.cuda: None for a CPU build
    cxx11_abi: bool | None  # torch._C._GLIBCXX_USE_CXX11_ABI: prebuilt extension wheels must match it
    cuda_available: bool
    cuda_error: str | None  # why torch.cuda.is_available() is False on a CUDA build, when torch says
    gpus: list[Gpu] = field(default_factory=list)
    smi: dict[str, str] = field(default_factory=dict)  # nvidia-smi: name, driver, cuda (driver's max CUDA)
    arch_list: list[str] = field(default_factory=list)  # torch.cuda.get_arch_list(): the kernels torch ships
    cudnn: int | None = None  # torch.backends.cudnn.version(), e.g. 91900
    distributed: bool = True  # torch.distributed.is_available()
    nccl: str | None = None  # NCCL version torch ships, None without NCCL
    cuda_home: str | None = None  # the toolkit torch.utils.cpp_extension would build with
    nvcc: tuple[str, str] | None = None  # (path, "X.Y") of that toolkit's nvcc
    cxx: tuple[str, str] | None = None  # (path, its --version line) of the C++ compiler torch.compile uses on a CPU
    env: dict[str, str] = field(default_factory=dict)  # the environment this process started with
    versions: dict[str, str] = field(default_factory=dict)  # installed pip distribution -> version
    # from doctor.attn.gather (the probes training uses); absent keys read as "not installed" / "not probed"
    imports: dict[str, str | None] = field(default_factory=dict)  # module -> None if it imports, else why not
    backends: dict[str, str | None] = field(default_factory=dict)  # attention backend -> None if usable, else why
    probed: bool = True  # backends were probed with a tiny fwd+bwd (False under --quick: static checks)
    sdpa_kernels: dict[str, str | None] = field(default_factory=dict)  # SDPA kernel -> None if it runs, else why
    sdpa_default: str = "unknown"  # the kernel torch's own priority picks for a causal call
    sdpa_ran: list[str] = field(default_factory=list)  # kernels fasttune's sdpa backend ran in its probe
    auto: dict[str, str] = field(default_factory=dict)  # what 'auto' picks: packed, padded, reason
    failed: dict[str, str] = field(default_factory=dict)  # fact -> the error of the probe that should have set it

    def import_status(self, module: str) -> str | None:
        return self.imports.get(module, f"package not installed (no module '{module}')")

    def version(self, *dists: str) -> str | None:
        """Installed version of the first of these pip distributions found."""
        found = (self.versions.get(canonicalize_name(d)) for d in dists)
        return next((v for v in found if v), None)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.gpus else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """What fasttune trains in here: bf16 on CUDA (fp16 before Ampere), fp32 on CPU."""
        if not self.gpus:
            return torch.float32
        return torch.bfloat16 if self.gpus[0].cc >= (8, 0) else torch.float16

    @property
    def cc(self) -> tuple[int, int] | None:
        return self.gpus[0].cc if self.gpus else None

    @property
    def family(self) -> str:
        """cpu | pre-ampere | ampere (8.x, incl. Ada) | hopper (9.x) | blackwell (10.x) | blackwell-consumer (12.x)."""
        cc = self.cc
        if cc is None:
            return "cpu"
        if cc[0] < 8:
            return "pre-ampere"
        return {8: "ampere", 9: "hopper", 10: "blackwell"}.get(cc[0], "blackwell-consumer")


def detect() -> Machine:
    m = Machine(
        python=tuple(sys.version_info[:3]),
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cxx11_abi=getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None),
        cuda_available=False,
        cuda_error=None,
    )
    try:
        m.cuda_available = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if m.cuda_available else 0):
            props = torch.cuda.get_device_properties(i)
            m.gpus.append(Gpu(props.name, (props.major, props.minor), props.total_memory / 2**30))
        m.arch_list = list(torch.cuda.get_arch_list())
        m.cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        m.distributed = torch.distributed.is_available()
        if m.distributed and torch.distributed.is_nccl_available() and m.torch_cuda:
            m.nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # noqa: BLE001 - a broken driver is a finding, not a crash
        m.cuda_error = one_line(exc, 300, typed=True)
    m.smi = nvidia_smi()
    m.cuda_home = cuda_home()
    m.nvcc = nvcc_version(m.cuda_home)
    try:
        m.cxx = cxx_compiler()
    except Exception as exc:  # noqa: BLE001 - a torch without inductor is a finding, not a crash
        m.failed["cxx"] = one_line(exc, 300, typed=True)
    m.env = initial_env()
    m.versions = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                  if d.metadata["Name"]}  # fmt: skip
    return m


def initial_env() -> dict[str, str]:
    """The environment this process started with: fasttune may set PYTORCH_ALLOC_CONF at startup, so os.environ
    cannot tell a user's value from ours. /proc/self/environ keeps the original (Linux); elsewhere os.environ."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def run(cmd: list[str], timeout: float = 10.0) -> tuple[int, str] | None:
    """(exit code, stdout+stderr) of a command, or None if it is missing or hangs."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.returncode, (p.stdout + p.stderr).strip()


def nvidia_smi() -> dict[str, str]:
    """GPU name, driver version and the newest CUDA the driver supports, from nvidia-smi (works without torch)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    out: dict[str, str] = {}
    q = run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if q and q[0] == 0 and q[1]:
        name, _, driver = q[1].splitlines()[0].rpartition(",")
        out.update(name=name.strip(), driver=driver.strip())
    header = run(["nvidia-smi"])
    if header and (found := re.search(r"CUDA Version:\s*([\d.]+)", header[1])):
        out["cuda"] = found.group(1)
    return out


def cuda_home() -> str | None:
    """The toolkit torch.utils.cpp_extension builds with: CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if nvcc := shutil.which("nvcc"):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda") else None


def nvcc_version(home: str | None) -> tuple[str, str] | None:
    """(path, 'X.Y') of the toolkit's nvcc, or None when there is none."""
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    res = run([nvcc, "--version"])
    found = re.search(r"release (\d+\.\d+)", res[1]) if res else None
    return (nvcc, found.group(1)) if found else (nvcc, "unknown")


def cxx_compiler() -> tuple[str, str] | None:
    """(path, first line of its --version) of the C++ compiler inductor builds CPU kernels with, or None."""
    path = cpp_compiler()
    if path is None:
        return None
    res = run([path, "--version"])
    return path, res[1].splitlines()[0] if res and res[0] == 0 and res[1] else "version unknown"


def major_minor(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a version string ("2.11.0+cu130", "13.0", "580.65"), or None when it is not one."""
    try:
        release = Version(version or "").release
    except InvalidVersion:
        return None
    return (release[0], release[1] if len(release) > 1 else 0)


def wheel_tag(m: Machine) -> str:
    """The build tags a prebuilt flash-attn 2 wheel must carry to load here, in its release file naming."""
    cu = (m.torch_cuda or "?").split(".")[0]
    tv = ".".join(m.torch_version.split("+")[0].split(".")[:2])
    abi = {True: "TRUE", False: "FALSE"}.get(m.cxx11_abi, "?")
    py = f"cp{m.python[0]}{m.python[1]}"
    return f"+cu{cu}torch{tv}cxx11abi{abi}-{py}-{py}-linux_{platform.machine()}"
