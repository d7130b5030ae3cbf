"""The command line: one tyro parser for every subcommand; help written for users; every mistake is one line
`error: ...` naming the option and the fix (exit 2), a traceback only with --debug."""

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_fasttune_torch_transformers_and_python(flag, capsys):
    """`fasttune --version` was 'unknown option --version': a bug report had no way to say which fasttune it ran."""
    import platform

    import torch
    import transformers

    from fasttune import __version__

    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    assert out == (f"fasttune {__version__} (torch {torch.__version__}, transformers {transformers.__version__}, "
                   f"Python {platform.python_version()})\n")  # fmt: skip


def test_top_level_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nope"], "error: unknown command 'nope'; choose one of: train, generate, chat, eval, doctor, bench, "
                   "experiments"),
        (["bench", "atention"], "error: unknown command 'atention' for `fasttune bench` (did you mean attention?); "
                                "choose one of: attention, train, generate"),
        (["train", "--stpes", "3"], "error: unknown option --stpes; did you mean --max-steps?"),
        (["train", "--max-steps", "abc"], "error: --max-steps: 'abc' is not a valid integer"),
        (["train", "--max-steps"], "error: --max-steps needs a value"),
        (["train", "--data.max-documents", "none"],
         "error: --data.max-documents: 'none' is not a valid integer (a whole number) or None"),
        (["train", "--training.grad-accum", "1e20"], "error: --training.grad-accum: '1e20' is not a valid integer"),
        (["train", "--force", "--training.grad-accum", "100000000000000000000"],
         "error: --training.grad-accum=100000000000000000000 is too large; it must be <= 65,536"),
        (["train", "--data.micro-batch-size", str(1 << 40)],
         "error: --data.micro-batch-size=1099511627776 is too large"),
        (["generate", "--checkpoint", "c", "--prompt", "p", "--max-new-tokens", "1e9"],
         "error: --max-new-tokens: '1e9' is not a valid integer"),
        (["train", "--model.trust-remote-code", "yes"],
         "error: --model.trust-remote-code is a switch and takes no value ('yes'): write --model.trust-remote-code "
         "to turn it on, --model.no-trust-remote-code to turn it off"),
        (["train", "--resume=true"], "error: --resume is a switch and takes no value ('true')"),
        (["train", "--model.fused_mlp", "false"], "error: --model.fused-mlp is a switch and takes no value ('false')"),
        (["train", "--experiment"], "error: --experiment needs a value; choose one of: quick, full, sft, lora"),
        (["generate", "--prompt", "x"], "error: `fasttune generate` needs --checkpoint"),
        (["bench"], "error: `fasttune bench` needs a command: one of attention, train, generate"),
        (["bench", "generate", "--dtype", "fp8"], "error: --dtype='fp8' is not valid; choose one of:"),
        (["doctor", "--jsn"], "error: unknown option --jsn; did you mean --json?"),
        (["eval", "--checkpoint", "c", "--data", "d", "--whole-split"],
         "error: --whole-split is for a run's own validation split (eval without --data); --data d is scored whole"),
        (["eval", "--checkpoint", "c", "--data", "d", "--format", "chatt"],
         "error: --format='chatt' is not valid (did you mean chat?); choose one of: auto, text, alpaca, "
         "prompt_completion, chat, sharegpt, conversational, chat_template"),
        # other tools' generation names: --max-steps on eval was answered with --max-length
        (["eval", "--checkpoint", "c", "--data", "d", "--max-steps", "3"],
         "error: unknown option --max-steps; did you mean --limit?"),
        # inf is > 0: "--epochs=inf ... it must be > 0" contradicted itself
        (["train", "--epochs", "inf"], "error: --epochs=inf is not valid; it must be a finite number > 0"),
        (["train", "--training.lr", "nan"], "error: --training.lr=nan is not valid; it must be a finite number > 0"),
        (["train", "--epochs", "0"], "error: --epochs=0.0 is not valid; it must be > 0"),
        *((["generate", "--checkpoint", "c", "--prompt", "p", "--temperature", t], f"error: --temperature={t} is not "
           "valid; it must be a number >= 0 (0: greedy)") for t in ("-1.0", "inf", "nan")),
        *(([command, "--checkpoint", "c", "--dtype", "bf16"], "error: unknown option --dtype; fasttune has no such "
           "option: the model runs in bf16 on a GPU, fp32 on a CPU;") for command in ("generate", "chat", "eval")),
        *((["chat", "--checkpoint", "c", flag, "x"], f"error: unknown option {flag}; chat reads your messages as you "
           "type them (or piped into it); for answers to given prompts: fasttune generate --checkpoint PATH "
           f"{flag} ...") for flag in ("--prompt", "--prompts")),
        (["generate", "--checkpoint", "c", "--do_sample"],
         "error: unknown option --do_sample; did you mean --temperature? (sampling is on when it is above 0)"),
        (["generate", "--checkpoint", "c", "--max_tokens", "9"], "error: unknown option --max_tokens; did you mean "
                                                                  "--max-new-tokens?"),
        *(([command, "--checkpoint", "c", flag, "20"], f"error: unknown option {flag}; did you mean --max-new-tokens? "
           "(it counts the answer's tokens alone, not the prompt's)") for command in ("generate", "chat")
          for flag in ("--max_length", "--max-length")),  # HF generate's: it suggested nothing
        (["chat", "--checkpoint", "c", "--repetition_penalty", "1.1"],
         "error: unknown option --repetition_penalty; fasttune has no such option: the model's generation_config.json "
         "repetition_penalty applies"),
        # HF's and vLLM's top_k was answered with --top-p (another thing), min_p and beams with nothing
        *(([*command, flag, "5"], f"error: unknown option {flag}; fasttune has no such option: the model's "
           "generation_config.json top_k applies, as in HF generate (50 when it sets none; 0: off)")
          for command in (["generate", "--checkpoint", "c"], ["chat", "--checkpoint", "c"],
                          ["eval", "--checkpoint", "c", "--data", "d"]) for flag in ("--top_k", "--top-k")),
        (["generate", "--checkpoint", "c", "--min_p", "0.1"], "error: unknown option --min_p; fasttune has no such "
                                                               "option; see"),
        (["train", "sft", "--model", "m"], "error: unexpected argument 'sft': name the experiment with --experiment "
                                           "sft"),  # it said: options look like --name VALUE
        (["generate", "--checkpoint", "c", "--num_beams", "4"], "error: unknown option --num_beams; fasttune has no "
                                                                 "such option: it decodes greedily"),
        # vLLM's, lm-eval's and TRL's name for the model: "`fasttune generate` needs --checkpoint", as if not typed
        (["generate", "--model", "m", "--prompt", "hi"], "error: unknown option --model; did you mean --checkpoint?"),
        (["eval", "--model_name_or_path=m", "--data", "d"], "error: unknown option --model_name_or_path; did you "
                                                            "mean --checkpoint?"),
        (["chat", "--model", "m", "--top_k", "5"], "error: 2 unknown options: --model -> --checkpoint, --top_k "
                                                   "(fasttune has no such option)"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "4"], "error: `fasttune generate` needs --checkpoint"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_naming_the_option(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_hub_id_as_model_or_data_says_fasttune_reads_local_folders_and_how_to_fetch_one(
    tmp_path, monkeypatch, capsys
):
    """TRL takes Hub ids (--model_name_or_path Qwen/Qwen2.5-0.5B, --dataset_name trl-lib/Capybara); fasttune said
    only "no such folder". The folder the hint names, once downloaded there, is what --model reads."""
    import huggingface_hub.constants
    from helpers import save_micro_model

    from fasttune.model.resolve import resolve

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # not the user's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    assert cli.main(["train", "--experiment", "lora", "--model", "Qwen/Qwen2.5-0.5B", "--data", "d.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model Qwen/Qwen2.5-0.5B: no such folder") and len(err.strip().splitlines()) == 1
    assert "`hf download Qwen/Qwen2.5-0.5B --local-dir Qwen2.5-0.5B`, then pass --model Qwen2.5-0.5B" in err
    save_micro_model(tmp_path / "Qwen2.5-0.5B")  # what that download leaves
    assert resolve("Qwen2.5-0.5B", "--model").model_dir == Path("Qwen2.5-0.5B")
    assert cli.main(["train", "--experiment", "lora", "--model", "Qwen2.5-0.5B", "--data", "trl-lib/Capybara"]) == 2
    err = capsys.readouterr().err
    assert "`hf download trl-lib/Capybara --repo-type dataset --local-dir Capybara`" in err, err
    (tmp_path / "runs").mkdir()
    for local in ("runs/nope", "data/train.jsonl", "./a/b"):  # paths (runs/ is a folder here), not ids: no hint
        assert cli.main(["train", "--experiment", "sft", "--model", local, "--data", "d.jsonl"]) == 2
        err = capsys.readouterr().err
        assert "no such folder" in err and "hf download" not in err, err


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="--attn-implementation='nope'"):
        cli.main(["train", "--attn-implementation", "nope", "--debug"])


@pytest.mark.parametrize("where", ["run", "check"])
def test_a_permission_error_no_check_caught_is_one_line_naming_the_file(monkeypatch, capsys, where):
    """Whatever a command meets that the user may not read or write: one line with the file and the fix, exit 2;
    the traceback with --debug."""
    from fasttune.config.experiments import ExperimentsArgs

    def denied(self):
        raise PermissionError(13, "Permission denied", "/data/locked.jsonl")

    monkeypatch.setattr(ExperimentsArgs, where, denied)
    assert cli.main(["experiments"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /data/locked.jsonl: permission denied; give your user access to it")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(PermissionError):
        cli.main(["experiments", "--debug"])


def test_stable_short_flags_and_main_py_forms():
    cfg = cli.parse_train_args(["--model", "m", "--data=d.jsonl", "--max-steps", "7", "--save-every", "3",
                                "--output-dir", "o", "--attn-implementation", "eager", "--resume"])  # fmt: skip
    assert (cfg.model.path, cfg.data.path, cfg.training.max_steps, cfg.training.save_every) == ("m", ("d.jsonl",), 7, 3)
    assert (cfg.output_dir, cfg.attn_implementation, cfg.resume) == ("o", "eager", True)
    sft = cli.parse_train_args(["--experiment", "sft", "--training.lr", "1e-4"])
    assert sft.experiment == "sft" and sft.training.lr == 1e-4 and sft.data.max_length == 1024  # preset, then options


def test_main_py_runs_the_other_commands_too():
    """`python main.py generate ...` (or eval, chat, doctor, bench) was "unexpected argument 'generate'" pointing at
    `fasttune train --help`; it now runs that command, and anything else still trains."""
    main_py = str(Path(__file__).parents[1] / "main.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]), *sys.path])}
    ran = subprocess.run([sys.executable, main_py, "experiments"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0 and [line.split()[0] for line in ran.stdout.splitlines()] == ["quick", "full", "sft",
                                                                                           "lora"]  # fmt: skip
    ran = subprocess.run([sys.executable, main_py, "--experiment", "nope"], capture_output=True, text=True, env=env)
    assert ran.returncode == 2 and ran.stderr.startswith("error: --experiment 'nope' is unknown")
    # a mistyped command was read as train's: "unexpected argument 'genrate'; options look like --name VALUE"
    argv = [sys.executable, main_py, "genrate", "--prompt", "hi"]
    ran = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert ran.returncode == 2 and ran.stderr == ("error: unknown command 'genrate' (did you mean generate?); "
                                                  "choose one of: train, generate, chat, eval, doctor, bench, "
                                                  "experiments\n")  # fmt: skip
    ran = subprocess.run([sys.executable, main_py, "--version"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0 and ran.stdout == cli.version() + "\n"  # it was "unknown option --version" of train


def test_main_py_in_a_python_without_fasttune_says_how_to_get_one():
    """`python main.py` with the environment not activated was a ModuleNotFoundError traceback (python -S: no
    site-packages, so neither fasttune nor its dependencies import)."""
    main_py = str(Path(__file__).parents[1] / "main.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = subprocess.run([sys.executable, "-S", main_py, "--max-steps", "1"], capture_output=True, text=True, env=env)
    assert ran.returncode == 2 and ran.stderr == (
        f"error: fasttune is not installed for this Python ({sys.executable}); activate fasttune's environment "
        "(. .venv/bin/activate) or install fasttune (scripts/install.sh)\n"
    )


def test_help_wraps_each_option_as_one_paragraph(capsys, monkeypatch):
    """An option's docstring is one paragraph in --help, wrapped by the terminal: tyro kept a break before every
    indented source line (mid-sentence, e.g. after "None:" in eval's --data)."""
    from fasttune.config.argcheck import paragraphs

    monkeypatch.setenv("COLUMNS", "400")
    assert cli.main(["eval", "--help"]) == 0
    assert "(alpaca, prompt/completion, chat, text). None: the validation samples of the run" in capsys.readouterr().out
    assert paragraphs("a\n    b\n\n    c\n    - d\n      e\n") == "a b\n\nc\n- d e"


def test_train_help_and_readme_list_every_stable_short_flag(capsys):
    from fasttune.config.argcheck import SHORT_FLAGS, option_table

    assert cli.main(["train", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split()).partition("Short flags: ")[2].partition(".")[0]
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    listed = readme.partition("Stable short flags: ")[2].partition(". ")[0]
    assert shown.split(", ") == list(SHORT_FLAGS) and set(SHORT_FLAGS) <= set(option_table())
    assert [f.strip("`").split()[0] for f in listed.split(", ")] == list(SHORT_FLAGS)


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


_MODEL, _DATA = "--model PATH (a Hugging Face model folder or a fasttune run)", "--data FILE (a .jsonl/.json/.csv/"


@pytest.mark.parametrize(("argv", "missing"), [([], f"{_MODEL} and {_DATA}"), (["--model", "m"], _DATA),
                                               (["--data", "d.jsonl"], f"{_MODEL}. ")])  # fmt: skip
@pytest.mark.parametrize("experiment", ["sft", "lora"])
def test_fine_tuning_needs_the_users_model_and_data(experiment, argv, missing, capsys):
    assert cli.main(["train", "--experiment", experiment, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --experiment {experiment} fine-tunes your model on your data: pass {missing}")
    assert ".jsonl" not in err or "--data FILE (a .jsonl" in err  # the data formats describe --data, never --model
    assert "--experiment quick" in err and len(err.strip().splitlines()) == 1


def test_module_entry_points_take_a_command_line(capsys):
    from fasttune.bench import cli as bench_cli
    from fasttune.doctor import checks

    assert bench_cli.main(["nope"]) == 2 and "unknown command 'nope' for `fasttune bench`" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown option --jsn; did you mean --json"):
        checks.main(["--jsn"])


def test_under_torchrun_the_first_rank_alone_reports_a_bad_command_line(capsys, monkeypatch):
    """Every torchrun rank parses and checks the same command line: the other ranks exit with rank 0's code,
    silently. Errors after that may be a rank's own (a local rank with no GPU, a file missing on one node): printed,
    named by rank (a missing --model or --data: once rank 0 has checked them, under a real launch). Other commands,
    where RANK is set by a cluster rather than torchrun, print as usual. A later rank waits before it exits with a bad
    command line, so that torchrun does not stop rank 0 before it has said why."""
    slept: list[float] = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert cli.main(["train", "--training.max-steps", "many"]) == 2  # tyro's own parse error
        captured = capsys.readouterr()
        assert bool(captured.err.strip()) == says and not captured.out.strip(), (rank, captured)
    assert cli.main(["train", "--experiment", "sft"]) == 2  # checked with parsing: the same on every rank
    assert not capsys.readouterr().err.strip()
    for launch in (
        ["--training.oom-retry"],
        ["--training.device", "cuda:1"],
        ["--training.optimizer", "adamw_8bit", "--training.fsdp"],
    ):  # options against the launch: the same
        for rank, says in (("0", True), ("1", False)):
            monkeypatch.setenv("RANK", rank)
            assert cli.main(["train", "--max-steps", "1", *launch]) == 2
            assert bool(capsys.readouterr().err.strip()) == says, (launch, rank)
    assert slept == [cli.REPORT_WAIT_S] * 5  # the later rank's five bad command lines, and only those
    # a missing --model or --data is checked once rank 0 has (tests/test_distributed.py: one line for the launch)
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["eval", "--checkpoint", "/nonexistent", "--data", "x.json"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_ctrl_c_while_the_command_line_is_read_is_one_quiet_line(capsys, monkeypatch):
    """Ctrl-C in the first seconds (while the command line is parsed) ends like a Ctrl-C later:
    exit 130 and one line, no traceback; under torchrun the ranks after the first say nothing."""

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "parse", interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert cli.main(["train"]) == 130 and not capsys.readouterr().err.strip()


def test_ctrl_c_while_torch_is_imported_is_one_quiet_line(capsys, monkeypatch):
    """The command's checks import torch after the command line is parsed (train: train/loop.py): a Ctrl-C there, in
    the first second or two, ends with one line too, not a KeyboardInterrupt traceback."""
    from fasttune.train.cli import TrainArgs

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainArgs, "check", interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"


def test_a_command_run_in_process_leaves_the_callers_logging_as_it_was(capsys, caplog):
    """cli.main called from Python (a script, a notebook, these tests) logs on the command's stderr while it runs,
    then leaves the root logger's handlers and the levels as they were: it kept a handler on the stderr the command
    had, so a later log line of the caller (a train() call's) went to that stream, gone by then: '--- Logging
    error ---' and a traceback in whatever stderr was current."""
    import contextlib
    import io
    import logging

    root, own = logging.getLogger(), logging.getLogger("fasttune")
    before = root.handlers[:], root.level, own.level
    gone = io.StringIO()
    with contextlib.redirect_stderr(gone):
        assert cli.main(["train", "--experiment", "nope"]) == 2
    assert gone.getvalue().startswith("error: --experiment 'nope' is unknown")
    gone.close()
    assert (root.handlers, root.level, own.level) == before
    own.warning("a line of the caller's")
    assert "Logging error" not in capsys.readouterr().err and "a line of the caller's" in caplog.text


def test_a_model_without_a_preset_is_refused_not_trained_at_quicks_learning_rate(tmp_path, monkeypatch, capsys):
    """`fasttune train --model M --data D` (TRL's sft takes a model and a data set, nothing more) fine-tuned M with
    the default preset, quick: lr 3e-3 (150x sft's 2e-5), 256-token samples, 300 steps, unsaid. A --config file that
    sets model.path and no experiment did the same."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"prompt": "1 + 1 =", "completion": " 2"}\n')
    (tmp_path / "m").mkdir()
    (tmp_path / "run.yaml").write_text("model: {path: m}\ndata: {path: d.jsonl}\n")
    (tmp_path / "data.yaml").write_text("data: {path: d.jsonl}\n")
    for argv, expected in (
        (["--model", "m", "--data", "d.jsonl"], "error: --model without --experiment: to fine-tune it, pass "),
        (["--model.path=m", "--data", "d.jsonl"], "error: --model without --experiment"),
        (["--config", "run.yaml"], "error: run.yaml sets model.path but names no experiment: add `experiment: sft`"),
        (["--config", "data.yaml", "--model", "m"], "error: --model without --experiment"),
    ):
        assert cli.main(["train", *argv, "--output-dir", "out"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err
        assert "--experiment sft" in err and "--experiment lora" in err and "lr 0.003" in err
        assert not (tmp_path / "out").exists()
    for argv in (["--experiment", "quick", "--model", "m"], ["--experiment", "sft", "--model", "m"], ["--data", "d"]):
        assert cli.parse(["train", *argv]).unnamed_preset is None  # a preset named, or no model to fine-tune
    (tmp_path / "run.yaml").write_text("experiment: lora\nmodel: {path: m}\n")
    assert cli.parse(["train", "--config", "run.yaml"]).unnamed_preset is None


@pytest.mark.parametrize("before", [["--debug", "experiments"], ["--debug", "bench", "attention", "--bogus"]])
def test_debug_before_the_command_is_taken_as_after_it(before, capsys):
    """`fasttune --debug experiments` was 'unknown option --debug' (with a traceback): --debug is every command's."""
    if before[-1] == "--bogus":
        with pytest.raises(ConfigError, match="unknown option --bogus;"):
            cli.main(before)
    else:
        assert cli.main(before) == 0
        assert "quick" in capsys.readouterr().out


def test_main_py_takes_debug_before_a_command():
    main_py = str(Path(__file__).parents[1] / "main.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]), *sys.path])}
    out = subprocess.run([sys.executable, main_py, "--debug", "experiments"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "quick" in out.stdout
