"""The docs name only options that exist: every `--option` written in README.md and docs/*.md is one that a fasttune
command takes (or another tool's, listed below with the reason), and every fasttune command line the docs show parses
as written. docs/BENCHMARKS.md is a record of past measurements and is not checked."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fasttune import cli
from fasttune.config.argcheck import option_table
from fasttune.config.other_tools import GENERATION_NAMES, NO_SUCH_OPTION, OTHER_NAMES

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "BENCHMARKS.md")]

ELSEWHERE = {
    # pip (installing torch, fasttune, flash-attn)
    "--index-url": "pip",
    "--no-cache-dir": "pip",
    "--no-build-isolation": "pip",
    "--no-deps": "pip",
    "--force-reinstall": "pip",
    "--check": "ruff format --check",
    "--version": "nvcc --version, ninja --version; fasttune's, answered before parsing, is tested in test_cli.py",
    "--help": "every command's own; `fasttune train --help` is tested in test_cli.py",
    "--nproc-per-node": "torchrun's",
    "--shutdown-timeout": "torchrun's (newer torch releases)",
    "--gpus": "docker run --gpus all",
    "--local-dir": "hf download",
    "--repo-type": "hf download",
    "--sync-tensorboard": "wandb sync",
    "--doctor": "python main.py --doctor (main.py's own, tested below)",
    "--dry-run": "scripts/multi_gpu.py's own (tested below)",
    "--section.field": "a placeholder for any config option",
}
"""Options the docs name that belong to another program, or to fasttune's scripts; each with its program."""


def _fasttune_options() -> set[str]:
    """Every --flag of every fasttune command (tyro also takes them with underscores)."""
    out: set[str] = set()

    def walk(table: dict) -> None:
        for target in table.values():
            if isinstance(target, dict):
                walk(target)
            else:
                out.update(option_table(cli._load(target)))

    walk(cli.COMMANDS)
    return out


def _answered() -> set[str]:
    """Other tools' names that fasttune answers with its own option or with what it does instead (the docs list
    some: --learning_rate, --use_dora, --do_sample, ...)."""
    return {"--" + name for name in (*OTHER_NAMES, *NO_SUCH_OPTION, *GENERATION_NAMES)}


def _named_options() -> list[tuple[str, int, str]]:
    """(file, line, option) for every `--option` written in the docs."""
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"(?<![\w-])--[a-zA-Z][\w.-]*", line):
                found.append((path.name, number, m.group(0).rstrip(".-")))
    return found


def test_every_option_the_docs_name_exists():
    known, answered = _fasttune_options(), _answered()
    wrong = [f"{file}:{line}: {option}" for file, line, option in _named_options()
             if (flag := option.replace("_", "-")) not in known and flag not in answered
             and flag not in ELSEWHERE]  # fmt: skip
    assert not wrong, "options the docs name that no command takes:\n" + "\n".join(wrong)
    assert "--dry-run" in (ROOT / "scripts/multi_gpu.py").read_text()
    assert '"--doctor" in argv' in (ROOT / "main.py").read_text()


def _command_lines() -> list[tuple[str, int, str]]:
    """(file, line, command) for each fasttune or main.py command line with an option that the docs show: in code
    blocks, or inline in backticks. Lines with placeholders ([--generate], ...), --help and --version are left out."""
    found = []
    for path in DOCS:
        block = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                block = not block
                continue
            for span in [line] if block else re.findall(r"`([^`]+)`", line):
                span = re.split(r"\s+#|\s>\s", span)[0]  # a comment, a redirection
                for m in re.finditer(r"(?:^|\s)(?:fasttune|main\.py)(\s[^|;&]*)", span):
                    text = m.group(1)
                    if "--" in text and not re.search(r"\.\.\.|\[|--help|--doctor|--version", text):
                        found.append((path.name, number, text.strip()))
    return found


def test_every_command_line_the_docs_show_parses(tmp_path, monkeypatch):
    """Each command as written parses: its options belong to that command and take the values shown. Run where
    README's run.yaml (its example) is written, which `--config run.yaml` reads."""
    readme = (ROOT / "README.md").read_text()
    example = readme.partition("```yaml\n# run.yaml\n")[2].partition("```")[0]
    assert example, "README.md's run.yaml example is gone: update this test"
    (tmp_path / "run.yaml").write_text(example)
    monkeypatch.chdir(tmp_path)
    lines = _command_lines()
    assert len(lines) > 20  # the extraction still finds the docs' commands
    wrong = []
    for file, line, text in lines:
        argv = shlex.split(text)
        if argv[0] not in cli.COMMANDS:
            argv = ["train", *argv]  # main.py's default command
        try:
            cli.parse(argv)
        except Exception as e:  # noqa: BLE001 - each is reported
            wrong.append(f"{file}:{line}: {text}: {e}")
    assert not wrong, "command lines in the docs that do not parse:\n" + "\n".join(wrong)


@pytest.mark.parametrize("flag", sorted(ELSEWHERE))
def test_other_programs_options_are_not_fasttunes(flag):
    """An option listed as another program's is no fasttune option (it would be checked as one then)."""
    if flag not in ("--help", "--section.field"):
        assert flag not in _fasttune_options()
