"""`fasttune doctor` on this CPU machine, and simulated failures (ABI mismatch, nvcc mismatch, missing packages).

Simulated machines are plain `Machine` values handed to single checks, so no GPU is needed and each test is fast.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from fasttune import cli
from fasttune.attention import BACKENDS
from fasttune.attention.probe import explain_import_error
from fasttune.compiler import cpp_compiler
from fasttune.doctor import attn, checks, packages, system, tools
from fasttune.doctor.machine import Gpu, Machine
from fasttune.doctor.machine import cxx_compiler as detect_cxx
from fasttune.doctor.report import FAIL, OK, SKIP, WARN, Report, Row, render, run_check

STATUSES = {OK, WARN, FAIL, SKIP}
EXPECTED_IDS = {
    "python", "torch", "transformers", "pip_check", "cuda", "gpu", "driver", "nvcc", "gcc", "cxx", "ninja",
    "sdpa.FLASH_ATTENTION", "sdpa.EFFICIENT_ATTENTION", "sdpa.CUDNN_ATTENTION", "sdpa.MATH", "sdpa.default",
    "flex_attention", "varlen", "flash_attention_2", "flash_attention_3", "flash_attention_4", "backends",
    "triton", "liger", "peft", "alloc_conf", "disk", "disk_hf", "ram", "distributed",
}  # fmt: skip
ABI_ERROR = (
    "/venv/lib/python3.11/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
    "undefined symbol: _ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE"
)


MISSING = "package not installed (no module '{}')"
H100_BACKENDS = {"eager": None, "sdpa": None, "flex_attention": None, "varlen": None}


def machine(gpu: tuple[int, int] | None = (9, 0), torch_cuda: str | None = "13.0", **kw) -> Machine:
    """A simulated machine: an H100-like GPU by default, or CPU-only with gpu=None; no optional package installed,
    every torch backend and SDPA kernel runs, `auto` picks sdpa. Keyword arguments replace any fact."""
    gpus = [Gpu("NVIDIA H100 80GB HBM3", gpu, 79.2)] if gpu else []
    smi = {"name": "NVIDIA H100 80GB HBM3", "driver": "580.65", "cuda": "13.0"} if gpu else {}
    missing = {f"flash_attention_{i}": MISSING.format(BACKENDS[f"flash_attention_{i}"].module) for i in (2, 3, 4)}
    base = dict(
        python=(3, 11, 7),
        torch_version=f"2.11.0+cu{torch_cuda.replace('.', '')}" if torch_cuda else "2.11.0+cpu",
        torch_cuda=torch_cuda,
        cxx11_abi=True,
        cuda_available=bool(gpu),
        cuda_error=None,
        gpus=gpus,
        smi=smi,
        arch_list=["sm_80", "sm_90", "sm_100", "compute_120"] if torch_cuda else [],
        cudnn=91900 if torch_cuda else None,
        nccl="2.27.3" if torch_cuda else None,
        versions={"transformers": "5.17.0", "torch": "2.11.0"},
        imports={"triton": None} if torch_cuda else {},
        backends={**H100_BACKENDS, **missing},
        sdpa_kernels=dict.fromkeys(attn.SDPA_KERNELS),
        sdpa_default="FLASH_ATTENTION",
        sdpa_ran=["CUDNN_ATTENTION"],
        auto={"packed": "sdpa", "padded": "sdpa", "reason": "fastest usable for cuda packed D128"},
    )
    return Machine(**{**base, **kw})


@pytest.fixture(scope="module")
def cpu_json() -> dict:
    """One real doctor run through the CLI entry point (`fasttune doctor --json`), shared by the tests below."""
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        code = cli.main(["doctor", "--json"])
    payload = json.loads(out.getvalue())
    payload["_rc"] = code
    return payload


def test_cpu_json_is_complete(cpu_json):
    ids = {c["id"] for c in cpu_json["checks"]}
    assert EXPECTED_IDS <= ids, f"missing checks: {EXPECTED_IDS - ids}"
    for c in cpu_json["checks"]:
        assert c["status"] in STATUSES, c
        assert isinstance(c["reason"], str) and c["reason"], c
        assert isinstance(c["fix"], str), c
        assert c["status"] not in (WARN, FAIL) or c["fix"], f"a warn/fail row needs a fix: {c}"
    assert cpu_json["_rc"] == cpu_json["exit_code"] == (1 if cpu_json["counts"][FAIL] else 0)
    assert cpu_json["auto"]["packed"] in ("sdpa", "eager")


def test_cpu_statements_are_clear(cpu_json):
    by_id = {c["id"]: c for c in cpu_json["checks"]}
    assert by_id["gpu"]["status"] == SKIP and "no CUDA GPU" in by_id["gpu"]["reason"]
    assert by_id["sdpa.MATH"]["status"] == OK
    assert by_id["sdpa.CUDNN_ATTENTION"]["status"] == SKIP
    assert by_id["varlen"]["status"] == SKIP and "CUDA" in by_id["varlen"]["reason"]
    assert any("no CUDA GPU" in line for line in cpu_json["advice"])
    assert "attn_implementation='auto' picks" in cpu_json["closing"]


def test_table_output_has_no_color_when_piped(capsys):
    report = Report(rows=[Row("x", "S", "thing", FAIL, "broken", 'pip install "fasttune[fa4]"')], closing="done.")
    buf = io.StringIO()
    render(report, Console(file=buf, force_terminal=False, width=120))
    text = buf.getvalue()
    assert "\x1b[" not in text
    assert 'pip install "fasttune[fa4]"' in text  # brackets survive: not read as markup
    assert "fail" in text and "done." in text
    assert report.exit_code == 1


def test_undefined_symbol_is_explained_as_abi_mismatch():
    broken = {BACKENDS["flash_attention_2"].module: explain_import_error(ImportError(ABI_ERROR))}
    rows = {r.id: r for r in attn.check_flash_attn(machine(imports=broken, versions={"flash-attn": "2.8.3"}))}
    fa2 = rows["flash_attention_2"]
    assert fa2.status == FAIL
    assert "undefined symbol" in fa2.reason and "ABI mismatch" in fa2.reason
    assert "torch 2.11.0, CUDA 13.0, Python 3.11" in fa2.reason
    assert "_GLIBCXX_USE_CXX11_ABI=True" in fa2.reason
    assert "+cu13torch2.11cxx11abiTRUE-cp311-cp311" in fa2.reason  # the prebuilt wheel that would load
    assert "--no-build-isolation" in fa2.fix and "--no-cache-dir" in fa2.fix
    assert "fasttune[fa4]" in fa2.fix  # on Hopper, skipping the build is the better fix


def test_other_import_error_shows_real_text():
    broken = {"liger_kernel": explain_import_error(RuntimeError("triton 3.1 is too old for liger"))}
    (row,) = packages.check_liger(machine(imports=broken))
    assert row.status == FAIL and "triton 3.1 is too old for liger" in row.reason and row.fix


def test_missing_fa4_on_hopper_recommends_the_wheel():
    rows = {r.id: r for r in attn.check_flash_attn(machine())}
    assert rows["flash_attention_4"].status == WARN
    assert rows["flash_attention_4"].fix == 'pip install "fasttune[fa4]" "flash-attn-4[cu13]"'
    assert rows["flash_attention_3"].status == SKIP and rows["flash_attention_2"].status == SKIP
    ampere = {r.id: r for r in attn.check_flash_attn(machine(gpu=(8, 0), torch_cuda="12.8"))}
    assert ampere["flash_attention_4"].status == SKIP  # FA4 does not serve Ampere: no nagging


def test_missing_optional_packages():
    gpu, cpu = machine(imports={}), machine(gpu=None, torch_cuda=None)
    (liger,) = packages.check_liger(gpu)
    assert liger.status == WARN and liger.fix == 'pip install "fasttune[liger]"'
    assert packages.check_liger(cpu)[0].status == SKIP
    (peft,) = packages.check_peft(cpu)
    assert peft.fix == 'pip install "fasttune[lora]"' and "LoRA" in peft.reason
    (torchao,) = packages.check_torchao(gpu)
    assert torchao.status == SKIP and torchao.fix == 'pip install "fasttune[adam8bit]"'
    assert "adamw_8bit" in torchao.reason
    assert packages.check_triton(gpu)[0].status == WARN


def test_nvcc_major_mismatch():
    nvcc = dict(cuda_home="/usr/local/cuda-12.8", nvcc=("/usr/local/cuda-12.8/bin/nvcc", "12.8"))
    (row,) = tools.check_nvcc(machine(torch_cuda="13.0", **nvcc))
    assert row.status == WARN
    assert "CUDA 12.8" in row.reason and "CUDA 13.0" in row.reason
    assert "export CUDA_HOME=/usr/local/cuda-13.0" in row.fix and "fasttune[fa4]" in row.fix
    (same,) = tools.check_nvcc(machine(torch_cuda="12.6", **nvcc))
    assert same.status == OK and "torch only warns" in same.reason


def test_cxx_row_says_what_needs_a_cpp_compiler(tmp_path, monkeypatch):
    """Found: its path and version. Missing on a CPU machine: a warning naming the options that stop without one (as
    train.device.refuse_cpu_compile_without_compiler stops them) and the install; on a GPU machine it is not needed."""
    (found,) = tools.check_cxx(machine(gpu=None, torch_cuda=None, cxx=("/usr/bin/g++", "g++ (Debian 12.2.0) 12.2.0")))
    assert found.status == OK and found.reason.startswith("/usr/bin/g++: g++ (Debian 12.2.0) 12.2.0;")
    (cpu,) = tools.check_cxx(machine(gpu=None, torch_cuda=None, env={"CXX": "clang++"}))
    assert cpu.status == WARN and "looked for clang++ on PATH" in cpu.reason and "apt-get install g++" in cpu.fix
    assert "--training.compile and --training.optimizer adamw_8bit" in cpu.reason
    (gpu,) = tools.check_cxx(machine())
    assert gpu.status == SKIP and "only torch.compile on a CPU needs one" in gpu.reason
    (broken,) = tools.check_cxx(machine(gpu=None, torch_cuda=None, failed={"cxx": "ImportError: no inductor"}))
    assert broken.status == WARN and "ImportError: no inductor" in broken.reason
    real = detect_cxx()  # this machine: the compiler the training check finds, with its version
    assert real is None or (real[0] == cpp_compiler() and real[1] != "version unknown")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on PATH: none found, as training finds none
    assert detect_cxx() is None and cpp_compiler() is None


def test_cpu_torch_on_a_gpu_machine():
    m = machine(torch_cuda=None, gpus=[], cuda_available=False)
    (row,) = system.check_cuda(m)
    assert row.status == FAIL and "CPU-only build" in row.reason
    assert "--index-url https://download.pytorch.org/whl/cu130" in row.fix


def test_distributed_row():
    """One GPU: skip; several with NCCL: the torchrun command; several without NCCL: a warning with the fix."""
    (one,) = system.check_distributed(machine())
    assert one.status == SKIP
    eight = [Gpu("NVIDIA H100 80GB HBM3", (9, 0), 79.2)] * 8
    (ok,) = system.check_distributed(machine(gpus=eight))
    assert ok.status == OK and "NCCL 2.27.3" in ok.reason and "--nproc_per_node 8" in ok.reason
    (warn,) = system.check_distributed(machine(gpus=eight, nccl=None))
    assert warn.status == WARN and "gloo" in warn.reason and warn.fix


def test_driver_too_old_for_torch():
    m = machine(torch_cuda="13.0", cuda_available=False, gpus=[], smi={"name": "A100", "driver": "550", "cuda": "12.4"})
    (row,) = system.check_cuda(m)
    assert row.status == FAIL and "12.4" in row.reason and "driver" in row.fix


def test_alloc_conf_user_value_without_expandable_segments():
    (row,) = tools.check_alloc_conf(machine(env={"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}))
    assert row.status == WARN
    assert row.fix == 'export PYTORCH_ALLOC_CONF="expandable_segments:True,max_split_size_mb:512"'


def test_a_crashing_check_becomes_a_fail_row(monkeypatch, capsys):
    def check_boom(m):
        raise ValueError("probe exploded")

    (row,) = run_check(check_boom, machine(), section="X")
    assert row.status == FAIL and "ValueError: probe exploded" in row.reason and row.fix
    monkeypatch.setattr(checks, "CHECKS", (("Python", system.check_python), ("X", check_boom)))
    assert checks.main(checks.DoctorArgs(quick=True), machine=machine()) == 1
    out = capsys.readouterr()
    assert "probe exploded" in out.out and "Traceback" not in out.out + out.err
    assert checks.main(checks.DoctorArgs(debug=True), machine=machine()) == 1
    assert "Traceback" in capsys.readouterr().err  # --debug shows it


def test_a_crashing_probe_fails_the_rows_that_need_it(capsys):
    """A probe that crashed while gathering (kept in Machine.failed) fails only the rows that read its fact."""
    m = machine(backends={}, failed={"backends": "RuntimeError: CUDA error: misaligned address"})
    assert checks.main(checks.DoctorArgs(json=True), machine=m) == 1
    rows = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert rows["backends"]["status"] == FAIL and "misaligned address" in rows["backends"]["reason"]
    assert rows["sdpa.MATH"]["status"] == OK and rows["python"]["status"] in (OK, WARN)


def test_installed_flash_attn_that_fails_to_run_on_gpu():
    """On a GPU the import row also reports the backend's tiny fwd+bwd probe (simulated here)."""
    flash = {b.module: None for b in BACKENDS.values() if b.dists}
    reasons = {**H100_BACKENDS, "flash_attention_2": None, "flash_attention_3": None}
    reasons["flash_attention_4"] = "fails a tiny forward+backward on cuda:0 bfloat16: AttributeError: nvvm"
    m = machine(imports=flash, backends=reasons, versions={"flash-attn": "2.8.3", "flash-attn-4": "4.0.0b36"})
    rows = {r.id: r for r in attn.check_flash_attn(m)}
    assert rows["flash_attention_2"].status == OK
    fa4 = rows["flash_attention_4"]
    assert fa4.status == FAIL and "AttributeError: nvvm" in fa4.reason and "fasttune[fa4]" in fa4.fix


def test_advice_fits_the_gpu(monkeypatch):
    from fasttune.doctor.advice import advise

    hopper = advise(machine(), [Row("flash_attention_4", "A", "fa4", WARN, "not installed", "pip ...")])
    assert any("fasttune[fa4]" in line and "no compiler" in line for line in hopper)
    assert not any("MAX_JOBS" in line for line in hopper)
    ampere = machine(gpu=(8, 0), torch_cuda="12.8")
    fast = advise(ampere, [Row("varlen", "A", "varlen", OK, "runs"), Row("sdpa.FLASH_ATTENTION", "A", "f", OK, "")])
    assert any("without compiling" in line for line in fast) and not any("MAX_JOBS" in line for line in fast)
    stuck = advise(ampere, [Row("varlen", "A", "varlen", WARN, "broken", "x")])
    build = " ".join(stuck)
    assert "MAX_JOBS=" in build and "--no-build-isolation" in build and "cu12torch2.11cxx11abiTRUE" in build


def test_simulated_h100_run(capsys):
    """The whole report on a simulated H100 without flash-attn-4: every check runs, advice and closing fit."""
    assert checks.main(checks.DoctorArgs(json=True), machine=machine()) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {c["id"]: c for c in report["checks"]}
    assert EXPECTED_IDS <= set(rows)
    assert rows["gpu"]["status"] == OK and "9.0 (hopper)" in rows["gpu"]["reason"]
    assert rows["flash_attention_4"]["status"] == WARN
    assert "cuDNN first" in rows["sdpa.default"]["reason"]
    assert any("flash-attn-4[cu13]" in line for line in report["advice"])
    assert "NVIDIA H100" in report["closing"] and report["auto"]["packed"] == "sdpa"
