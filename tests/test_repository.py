"""The repository stands alone: code, docs and scripts cite nothing outside it (a user's checkout has no shared/
folder or anchor notes beside it), and the scripts in it parse."""

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


@pytest.mark.parametrize("script", ["scripts/device_validate.sh", "docs/bench/device.sh", ".ci/run"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
