"""A short training run and save through the command line, in a process of its own as a user starts it, prints none
of the third-party lines fasttune hides (quiet.py: its filters and progress_bars_off): torchao's, torch's and
transformers'; nor does a script that calls `train()` itself. The reference is the same run with --debug (the script:
with fasttune's logger at DEBUG), which shows them all: a line this machine's versions do not print there is skipped
with the reason, never passed unseen."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import GSM8K, save_micro_model

TORCHAO = importlib.metadata.version("torchao") if importlib.util.find_spec("torchao") else None

# what the line holds -> why this machine may print no such line, --debug included
NOISE = {
    "Failed to load ": f"torchao {TORCHAO} loads all its extensions on this machine",
    "Detected no triton": f"triton is installed: torchao {TORCHAO} does not say it is missing",
    "is an Enum subclass and is now natively supported": f"torch {torch.__version__} does not log it (2.13 does)",
    "Loading weights": f"transformers {transformers.__version__} shows no bar loading this model",
    "Writing model shards": f"transformers {transformers.__version__} shows no bar saving this model",
}
FROM_TORCHAO = ("Failed to load ", "Detected no triton", "is an Enum subclass and is now natively supported")


def _argv(model, out) -> list[str]:
    return ["train", "--experiment", "sft", "--model", str(model), "--data", str(GSM8K), "--output-dir", str(out),
            "--max-steps", "1", "--save-every", "1", "--data.max-length", "256", "--training.warmup-steps", "0",
            "--training.eval-every", "0", "--generation.sample-prompt", ""]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """stdout + stderr of one sft step from a micro model, saved at that step: as typed ("run-q"), with --debug
    ("run-d"; same-length names, so that the summary table cuts its paths alike)."""
    tmp = tmp_path_factory.mktemp("noise")
    model = save_micro_model(tmp / "model")
    out = {}
    for name, extra in (("run-q", []), ("run-d", ["--debug"])):
        cmd = [sys.executable, "-m", "fasttune", *_argv(model, tmp / name), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert (tmp / name / "checkpoints" / "step-000001").is_dir()
        out[name] = done.stdout + done.stderr
    return out


def _skip_unless_shown(needle: str, debug: str) -> None:
    if needle not in debug:
        reason = "torchao is not installed" if needle in FROM_TORCHAO and TORCHAO is None else NOISE[needle]
        pytest.skip(f"no {needle.strip()!r} line here, --debug included: {reason}")


@pytest.mark.parametrize("needle", NOISE)
def test_a_run_prints_no_third_party_noise_and_debug_shows_it(runs, needle):
    _skip_unless_shown(needle, runs["run-d"])
    assert needle not in runs["run-q"], runs["run-q"]


SCRIPT = """
import logging, sys
from pathlib import Path

logging.basicConfig(level=logging.DEBUG if sys.argv[3] == "debug" else logging.INFO, format="%(message)s")
from fasttune.train.loop import train  # first, as a script imports it: torch and transformers come with it
from helpers import sft_config

train(sft_config(Path(sys.argv[2]), Path(sys.argv[1]), max_steps=1, save_every=1, eval_every=0, warmup_steps=0))
from transformers.utils import logging as hf_logging

print("progress bars after train():", "on" if hf_logging.is_progress_bar_enabled() else "off")
"""


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """stdout + stderr of a script that calls train() for one sft step from a micro model, saved at that step: with
    fasttune's log at INFO ("quiet") and at DEBUG ("debug", --debug's)."""
    tmp = tmp_path_factory.mktemp("script")
    model, script = save_micro_model(tmp / "model"), tmp / "script.py"
    script.write_text(SCRIPT)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests), *sys.path])}
    out = {}
    for name in ("quiet", "debug"):
        done = subprocess.run([sys.executable, str(script), str(model), str(tmp / name), name], capture_output=True,
                              text=True, timeout=300, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        out[name] = done.stdout + done.stderr
    return out


@pytest.mark.parametrize("needle", NOISE)
def test_a_script_calling_train_prints_no_third_party_noise_either(script_runs, needle):
    """A script that calls train() (a notebook's, bench/train.py's way) printed torchao's and torch's lines as it
    imported the loop and transformers' bars on every model load and save: the filters were the command line's alone.
    The bars it turned off are back on once train() returns."""
    assert "progress bars after train(): on" in script_runs["quiet"]
    _skip_unless_shown(needle, script_runs["debug"])
    assert needle not in script_runs["quiet"], script_runs["quiet"]


def _same(line: str, run: str) -> str:
    """`line` without its numbers, its run folder's name and a table's padding."""
    return " ".join(re.sub(r"\d[\d,.]*", "N", line).replace(run, "run-X").split())


def test_debug_shows_every_line_the_run_shows(runs):
    """--debug adds lines and takes none away: fasttune's own are the same (numbers aside) with and without it."""
    debug = {_same(line, "run-d") for line in runs["run-d"].splitlines()}
    quiet = [_same(line, "run-q") for line in runs["run-q"].splitlines()]
    assert [line for line in quiet if line not in debug] == []
    assert any(line.startswith("training: ") for line in quiet)
