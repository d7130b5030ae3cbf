"""Reliability: a real `kill -9` at a random step, then --resume, gives the losses of an uninterrupted run; random
and corrupt command lines always end in one clear error, never a traceback."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttune.cli import parse_train_args
from fasttune.config.argcheck import option_table
from fasttune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.preset", "micro", "--data.max-documents", "40", "--data.tokenizer-vocab-size", "384",
        "--data.max-length", "64", "--data.micro-batch-size", "4", "--training.eval-every", "4",
        "--training.eval-batches", "2", "--training.log-every", "1", "--training.warmup-steps", "2",
        "--generation.sample-prompt", "", "--max-steps", "12", "--save-every", "2"]  # fmt: skip


def _train(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "main.py"), "--experiment", "quick", *TINY, "--data.cache-dir", str(cache),
           "--output-dir", str(out), *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}


@pytest.mark.slow
def test_kill_9_at_random_step_then_resume_matches_uninterrupted(tmp_path):
    cache = tmp_path / "cache"
    ref = _train(tmp_path / "ref", cache)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    want = _losses(tmp_path / "ref")

    run = tmp_path / "killed"
    proc = _train(run, cache)
    target = random.Random().randint(2, 9)  # wait for at least one checkpoint, then kill somewhere after it
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        has_checkpoint = any((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else False
        if has_checkpoint and (run / "metrics.jsonl").exists() and max(_losses(run) or {0: 0}) >= target:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _train(run, cache, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert _losses(run) == want  # bit-identical on CPU, wherever the kill landed


def test_interrupted_run_exit_code_and_message(tmp_path):
    proc = _train(tmp_path / "run", tmp_path / "cache", "--max-steps", "200")
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "interrupted at step" in out and "--resume" in out and "Traceback" not in out


_flags = sorted(option_table())
_token = st.one_of(
    st.sampled_from(_flags),
    st.sampled_from(["--", "-x", "--bogus", "--model", "--data", "--max-steps", "--experiment"]),
    st.text(max_size=8),
    st.integers(-5, 5).map(str),
    st.sampled_from(["None", "nan", "inf", "-1e9", "1e-3", "True", "false", "1b", "cuda:x"]),
)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(_token, max_size=6))
def test_random_command_lines_give_a_clear_error_or_a_valid_config(argv):
    if any(a in ("-h", "--help") for a in argv):
        return
    try:
        cfg = parse_train_args(argv)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert cfg.validate() is cfg
