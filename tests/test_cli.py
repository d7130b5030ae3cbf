"""The command line: one tyro parser for every subcommand; help written for users; every mistake is one line
`error: ...` naming the option and the fix (exit 2), a traceback only with --debug."""

import os
import subprocess
import sys

import pytest

from fasttune import cli
from fasttune.errors import ConfigError

SUBCOMMANDS = [["train"], ["generate"], ["chat"], ["eval"], ["doctor"], ["experiments"], ["bench", "attention"],
               ["bench", "train"], ["bench", "generate"]]  # fmt: skip


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_is_for_users_and_offers_debug(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: fasttune {' '.join(command)}" in out and "--debug" in out
    # no developer docstrings: module docstrings of the implementing modules never reach the help
    for dev in ("parse, build", "Thin:", "fasttune.bench.generate)", "Entry point", "Base of every"):
        assert dev not in out


def test_top_level_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nope"], "error: unknown command 'nope'; choose one of: train, generate, chat, eval, doctor, bench, "
                   "experiments"),
        (["train", "--stpes", "3"], "error: unknown option --stpes; did you mean --max-steps?"),
        (["train", "--max-steps", "abc"], "error: --training.max-steps: 'abc' is not a valid integer"),
        (["train", "--max-steps"], "error: --training.max-steps needs a value"),
        (["train", "--training.grad-accum", "1e20"], "error: --training.grad-accum: '1e20' is not a valid integer"),
        (["train", "--model.trust-remote-code", "yes"],
         "error: --model.trust-remote-code is a switch and takes no value ('yes'): write --model.trust-remote-code "
         "to turn it on, --model.no-trust-remote-code to turn it off"),
        (["train", "--resume=true"], "error: --resume is a switch and takes no value ('true')"),
        (["train", "--experiment"], "error: --experiment needs a value; choose one of: quick, full, sft, lora"),
        (["generate", "--prompt", "x"], "error: `fasttune generate` needs --checkpoint"),
        (["bench"], "error: `fasttune bench` needs a command: one of attention, train, generate"),
        (["bench", "generate", "--dtype", "fp8"], "error: --dtype='fp8' is not valid; choose one of:"),
        (["doctor", "--jsn"], "error: unknown option --jsn; did you mean --json?"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_naming_the_option(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="attn_implementation='nope'"):
        cli.main(["train", "--attn-implementation", "nope", "--debug"])


def test_stable_short_flags_and_main_py_forms():
    cfg = cli.parse_train_args(["--model", "m", "--data=d.jsonl", "--max-steps", "7", "--save-every", "3",
                                "--output-dir", "o", "--attn-implementation", "eager", "--resume"])  # fmt: skip
    assert (cfg.model.path, cfg.data.path, cfg.training.max_steps, cfg.training.save_every) == ("m", "d.jsonl", 7, 3)
    assert (cfg.output_dir, cfg.attn_implementation, cfg.resume) == ("o", "eager", True)
    sft = cli.parse_train_args(["--experiment", "sft", "--training.lr", "1e-4"])
    assert sft.experiment == "sft" and sft.training.lr == 1e-4 and sft.data.max_length == 1024  # preset, then options


def test_importing_fasttune_leaves_the_environment_alone_the_cli_sets_it():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    code = ("import os, fasttune, fasttune.train.loop, fasttune.cli; print(os.environ.get('PYTORCH_ALLOC_CONF'));"
            "fasttune.cli.set_environment(); print(os.environ.get('PYTORCH_ALLOC_CONF'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "expandable_segments:True"]
    env["PYTORCH_ALLOC_CONF"] = "backend:native"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["backend:native", "backend:native"]  # the user's value wins


def test_ctrl_c_notice_is_not_an_error(monkeypatch, capsys):
    from fasttune.train import cli as train_cli
    from fasttune.train.loop import Interrupted

    def stopped(self):
        raise Interrupted("interrupted at step 2; saved runs/x/checkpoints/step-000002. Resume with --resume", 130)

    monkeypatch.setattr(train_cli.TrainArgs, "run", stopped)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err.startswith("interrupted at step 2; saved")
