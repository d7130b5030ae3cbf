"""The repository stands alone: code, docs and scripts cite nothing outside it (a user's checkout has no shared/
folder or anchor notes beside it), and the scripts in it parse."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("ANCHORS.md", "shared/tools", "../shared", "/work/")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.split()]


def test_code_docs_and_scripts_cite_nothing_outside_the_repository():
    files = _tracked("src", "docs", "scripts", ".ci", "README.md", "main.py", "pyproject.toml")
    hits = [f"{p.relative_to(ROOT)}: {needle}" for p in files if p.suffix not in (".png",)
            for needle in OUTSIDE if needle in p.read_text(errors="replace")]  # fmt: skip
    assert not hits, hits


SCRIPTS = ["scripts/device_validate.sh", "scripts/gpu_memory.sh", "docs/bench/device.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def _install(
    tmp_path, gpu: bool, torch_version: str = "", env_extra: dict | None = None, would: str = "", versions: str = ""
) -> list[str]:
    """Run scripts/install.sh with stand-ins for python and nvidia-smi; the pip commands it would run (not its
    queries). `would`: what pip's dry run would install; `versions`: what `pip index versions torch` lists."""
    import stat

    bin_dir, log = tmp_path / "bin", tmp_path / "pip.log"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    imports = f"echo {torch_version}; exit 0" if torch_version else "exit 1"
    stubs = {
        "python": f"""#!/bin/sh
case "$*" in
  *--dry-run*) [ -n "{would}" ] && echo "Would install torch-{would}"; exit 0;;
  *"index versions"*) [ -n "{versions}" ] && echo "Available versions: {versions}"; exit 0;;
esac
if [ "$1" = "-m" ]; then shift 3; echo "$*" >> {log}; exit 0; fi
case "$2" in
  *"installed fasttune"*) exit 0;;
  *"print(torch.__version__)"*) {imports};;
esac
exit 0
"""
    }
    # a failing stand-in without a GPU: the machine's own nvidia-smi (on PATH's /usr/bin) must not answer
    stubs["nvidia-smi"] = f"#!/bin/sh\nexit {0 if gpu else 1}\n"
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **(env_extra or {})}
    out = subprocess.run(["sh", str(ROOT / "scripts/install.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return log.read_text().splitlines()


def test_install_picks_the_cpu_build_without_a_gpu(tmp_path):
    torch_step, fasttune_step = _install(tmp_path, gpu=False)
    assert torch_step == "torch>=2.11 --index-url https://download.pytorch.org/whl/cpu"
    assert fasttune_step == "-e .[dev]"
    cpu = "--index-url https://download.pytorch.org/whl/cpu"
    assert _install(tmp_path, gpu=False, would="2.15.0+cpu")[0] == f"torch==2.15.0+cpu {cpu}"  # the CPU index answers
    # the CPU index is out of reach and a mirror offers a CUDA build first (seen on a CPU machine: 5.5 GB of CUDA)
    mirror = _install(tmp_path, gpu=False, would="2.14.1", versions="2.15.0, 2.14.1, 2.13.0+cpu, 2.13.0")
    assert mirror[0] == "torch==2.13.0+cpu"


def test_install_with_a_gpu_or_torch_present_or_an_override(tmp_path):
    assert _install(tmp_path, gpu=True) == ["torch>=2.11", "-e .[dev]"]
    assert _install(tmp_path, gpu=False, torch_version="2.13.0+cpu") == ["-e .[dev]"]  # kept
    assert _install(tmp_path, gpu=False, env_extra={"FASTTUNE_TORCH": "torch==2.13.0"}) == ["torch==2.13.0",
                                                                                           "-e .[dev]"]  # fmt: skip


def test_install_without_extras_gives_pip_a_requirement_it_takes(tmp_path):
    """FASTTUNE_EXTRAS="" (docs/INSTALL.md: a plain install) installs fasttune alone; the script passed pip `-e .[]`,
    which pip refuses ("not a valid editable requirement"). pip itself, offline, judges the arguments."""
    import sys

    pytest.importorskip("setuptools")
    (step,) = _install(tmp_path, gpu=False, torch_version="2.13.0+cpu", env_extra={"FASTTUNE_EXTRAS": ""})
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index"]
    out = subprocess.run([*pip, *step.split()], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "Would install fasttune" in out.stdout, (step, out.stderr)


def test_ci_installs_as_the_readme_says():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    quickstart = readme[readme.index("## Quickstart") :].split("```bash\n")[1].split("```")[0].splitlines()
    setup, tests = quickstart
    assert "scripts/install.sh" in setup and "scripts/install.sh" in ci
    assert tests.removeprefix(". .venv/bin/activate && ") in ci  # the same test command


@pytest.fixture(scope="module")
def _seen_by_a_module_fixture() -> tuple:
    import torch

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


def test_tests_without_the_gpu_marker_see_no_gpu_nor_do_their_module_fixtures(_seen_by_a_module_fixture):
    """conftest.py: on a machine with a GPU the README's test command runs the CPU tests on the CPU (their references
    are exact there) and their subprocesses see no GPU; only gpu-marked tests see it."""
    import torch

    assert _seen_by_a_module_fixture == ("", False)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()
