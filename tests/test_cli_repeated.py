"""An option given twice is refused before anything runs (argparse kept the last value, silently): one line naming the
option and both values, exit 2, no traceback; the spellings of one option (dashes, underscores, =VALUE, an alias, a
switch's --no- form) are one option. Options that repeat by design (--stop, bench train's --variant) and options that
take several values after one flag (--data a b) keep working."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasttune import cli


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--experiment", "quick", "--output-dir", "A", "--output_dir", "B"],
         "--output-dir was given twice (A, then B): keep one"),
        (["train", "--training.lr", "1e-3", "--training.lr=1e-4"], "--training.lr was given twice (1e-3, then 1e-4)"),
        (["train", "--max-steps", "5", "--training.max_steps", "6"],
         "--max-steps and --training.max-steps are the same option, given twice (5, then 6): keep one"),
        (["train", "--model.liger", "--model.no-liger"],
         "--model.liger was given twice (--model.liger, then --model.no-liger): keep one"),
        (["train", "--experiment", "sft", "--experiment", "lora"], "--experiment was given twice (sft, then lora)"),
        (["train", "--config", "a.yaml", "--config", "b.yaml"], "--config was given twice (a.yaml, then b.yaml)"),
        (["train", "--data", "a.jsonl", "b.jsonl", "--data", "c.jsonl"],
         "--data was given twice (a.jsonl b.jsonl, then c.jsonl): keep one, with all its values after one flag "
         "(--data a.jsonl b.jsonl c.jsonl)"),
        (["train", "--seed", "1", "--seed", "2", "--seed", "3"], "--seed was given 3 times (1, 2, then 3)"),
        (["eval", "--checkpoint", "a", "--limit", "4", "--limit", "8"], "--limit was given twice (4, then 8)"),
        (["generate", "--checkpoint", "a", "--checkpoint", "b", "--prompt", "hi"],
         "--checkpoint was given twice (a, then b)"),
        (["chat", "--checkpoint", "a", "--temperature", "0", "--temperature", "1"],
         "--temperature was given twice (0, then 1)"),
        (["bench", "train", "--epochs", "2", "--epochs", "3"], "--epochs was given twice (2, then 3)"),
        (["bench", "attention", "--out", "x", "--out=y"], "--out was given twice (x, then y)"),
        (["doctor", "--json", "--json"], "--json was given twice (--json, then --json)"),
    ],
)  # fmt: skip
def test_an_option_given_twice_is_refused_naming_both_values(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: not A, not B
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected) and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_main_py_refuses_a_repeated_option_too(tmp_path):
    main_py = str(Path(__file__).parents[1] / "main.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]), *sys.path])}
    out = subprocess.run([sys.executable, main_py, "--experiment", "quick", "--output-dir", str(tmp_path / "A"),
                          "--output_dir", str(tmp_path / "B")], capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    a, b = tmp_path / "A", tmp_path / "B"
    assert out.stderr.strip() == f"error: --output-dir was given twice ({a}, then {b}): keep one"
    assert not a.exists() and not b.exists()


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["train", "--data", "a.jsonl", "b.jsonl", "--data.val-path", "c.jsonl", "d.jsonl"], "config.data.path",
         ("a.jsonl", "b.jsonl")),
        (["train", "--data", "a.jsonl", "b.jsonl", "--data.val-path", "c.jsonl", "d.jsonl"], "config.data.val_path",
         ("c.jsonl", "d.jsonl")),
        (["train", "--lora.targets", "q_proj", "v_proj", "--max-steps", "5"], "config.lora.targets",
         ("q_proj", "v_proj")),
        (["generate", "--checkpoint", "m", "--prompt", "hi", "--stop", "\n\n", "--stop", "END"], "stop",
         ("\n\n", "END")),
        (["eval", "--checkpoint", "m", "--stop", "a", "--stop", "b", "--train-on-prompt"], "stop", ("a", "b")),
        (["bench", "train", "--variant", "a:training.lr=1e-3", "--variant", "b:training.lr=1e-4"], "variant",
         ("a:training.lr=1e-3", "b:training.lr=1e-4")),
    ],
)  # fmt: skip
def test_options_that_repeat_by_design_or_take_several_values_are_parsed(argv, field, value):
    from fasttune.config.naming import value_of

    assert value_of(cli.parse(argv), field) == value
