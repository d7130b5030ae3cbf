"""Every error about a config value names the option as the user gave it: the flag typed (an alias as such, with
dashes), the key, its value and the --config file that set it, or the preset that did; also where the check that
refuses it runs (a cross-field check, a check of the training run), not only a section's check of one field.
config/naming.py; cli.py passes every error through it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GSM8K

from fasttune import cli
from fasttune.config.naming import OptionNames
from fasttune.errors import ConfigError

_PLAN = "means --model.memory full, but {memory} asks for another plan; drop one of the two"
_COMPILE = " does not run under {compile} (torch.compile would trace its offload hooks with each layer"
_CPU = ": this run trains on the CPU ({device}), whose activations are in host memory already"


def _files(tmp_path) -> dict[str, str]:
    """The --config files the cases use, written to tmp_path: {name: path of name.yaml}."""
    texts = {"compile": "training:\n  compile: true\n", "plan": "model:\n  gradient_checkpointing: true\n",
             "offload": "model:\n  memory: offload\n", "lora": "lora:\n  enabled: true\n"}  # fmt: skip
    for name, text in texts.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return {name: str(tmp_path / f"{name}.yaml") for name in texts}


@pytest.fixture
def config_only_model(tmp_path):
    """A model folder of config.json alone (what --model.random-init trains from)."""
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=300).save_pretrained(tmp_path / "m")  # fmt: skip
    return str(tmp_path / "m")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # typed with dashes, with underscores, as --flag=value: two options of one cross-field check
        (["--model.gradient-checkpointing", "--model.memory", "ops"],
         "--model.gradient-checkpointing " + _PLAN.format(memory="--model.memory='ops'")),
        (["--model.gradient_checkpointing", "--model.memory=ops"],
         "--model.gradient-checkpointing " + _PLAN.format(memory="--model.memory='ops'")),
        (["--model.memory=offload", "--training.device=cpu"],
         "--model.memory=offload" + _CPU.format(device="--training.device=cpu")),
        # set in a --config file: the key, its value and the file
        (["--config", "{compile}", "--model.memory", "offload"],
         "--model.memory=offload" + _COMPILE.format(compile="training.compile: true in {compile}")),
        (["--config", "{plan}", "--model.memory", "ops"],
         "model.gradient_checkpointing: true in {plan} " + _PLAN.format(memory="--model.memory='ops'")),
        (["--config", "{offload}", "--training.device", "cpu"],
         "model.memory: offload in {offload}" + _CPU.format(device="--training.device=cpu")),
    ],
)  # fmt: skip
def test_a_refused_option_is_named_as_the_user_gave_it(argv, expected, tmp_path, capsys):
    files = _files(tmp_path)
    argv = [a.format_map(files) for a in argv]
    assert cli.main(["train", *argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected.format_map(files)) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "lora"),
    [
        (["--experiment", "lora"], "the lora preset's lora.enabled"),
        (["--experiment", "sft", "--lora.enabled"], "--lora.enabled"),
        (["--experiment", "sft", "--config", "{lora}"], "lora.enabled: true in {lora}"),
    ],
)
def test_lora_on_a_random_base_names_what_turned_lora_on(argv, lora, config_only_model, tmp_path, capsys):
    """The preset, the flag or the file: "--model.random-init with LoRA" named none of them."""
    files = _files(tmp_path)
    argv = [a.format_map(files) for a in argv]
    run = tmp_path / "run"
    own = ["--model", config_only_model, "--data", str(GSM8K), "--model.random_init", "--output-dir", str(run)]
    assert cli.main(["train", *argv, *own]) == 2
    err = capsys.readouterr().err  # before the error: the log's line on data.max_length
    expected = f"error: --model.random-init with {lora.format_map(files)} would train adapters on a frozen random base"
    assert err.strip().splitlines()[-1].startswith(expected) and "Traceback" not in err, err


def test_main_py_names_the_flags_as_typed(tmp_path):
    main_py = str(Path(__file__).parents[1] / "main.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]), *sys.path])}
    argv = [sys.executable, main_py, "--model.gradient_checkpointing", "--model.memory", "ops", "--output-dir", "r"]
    ran = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    expected = "error: --model.gradient-checkpointing " + _PLAN.format(memory="--model.memory='ops'")
    assert ran.returncode == 2 and ran.stderr.startswith(expected), ran.stderr


def test_bench_train_names_its_own_option_not_a_variant(tmp_path, capsys):
    """bench train's row at HF's tokens per step was refused as `--variant "fasttune auto packed at HF's tokens per
    step (...)": data.max_length=...`: no --variant was given, --max-length was."""
    argv = ["bench", "train", "--device", "cpu", "--max-length", "2000000", "--out", str(tmp_path / "b")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-length=2000000 is too large; it must be <= 1,048,576"), err


@pytest.mark.parametrize(
    "message",
    [
        "runs/training.lr/x, model.safetensors and --training.lr stay",  # a path, a file, a flag: no keys
        "data.path is not an option of the message",  # a key the user did not set: as written
    ],
)
def test_what_is_not_an_option_the_user_set_is_left_as_written(message):
    names = OptionNames(["--training.lr", "0.5"], {"training.lr": ("--training.lr",), "data.path": ("--data",)})
    assert names.rewrite(message) == message
    assert names.rewrite("training.lr=0.5 is too large") == "--training.lr=0.5 is too large"


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ("--resume: training.lr is 0.5 but the run was started with 0.001",
         "--resume: --training.lr is 0.5 but the run was started with 0.001"),  # the flag typed, as elsewhere
        ("--resume: data.path is 'new.jsonl' but the run was started with 'd.jsonl'",
         "--resume: --data is 'new.jsonl' but the run was started with 'd.jsonl'"),  # an alias, as typed
        ("--resume: data.max_length is 512 (set by run.yaml) but the run was started with 1024",
         None),  # set in the --config file, which the message names already
        ("--resume: --training.lr 0.5 exceeds ..., and a resumed run keeps the training.lr it trained with, 0.001 "
         "(in run.yaml)", None),  # the run's record, named as its file has it
        ("--variant 'x': training.lr=0.5 is too large", None),  # a variant's keys are the variant's, not typed
    ],
)  # fmt: skip
def test_a_resume_error_names_the_keys_as_the_user_gave_them(message, named):
    """--resume's refusals named a changed option by its key (`training.lr is 0.5`), as no other error does: every
    message opening with a flag was left as written, for --variant's keys (a variant's, not the command line's)."""
    args = ["--training.lr", "0.5", "--data", "new.jsonl", "--config", "run.yaml", "--resume"]
    flags = {"training.lr": ("--training.lr",), "data.path": ("--data", "--data.path"),
             "data.max_length": ("--data.max-length",)}  # fmt: skip
    names = OptionNames(args, flags, "run.yaml", frozenset({"data.max_length"}), {"data.max_length": 512})
    assert names.rewrite(message) == (named or message)


def test_resume_with_config_names_what_the_runs_own_config_json_set(tmp_path, monkeypatch, capsys):
    """--resume --config FILE: an option FILE leaves out is the run's (its config.json), named as set there, in an
    error and in the log's origin of the attention choice; it was named as the preset's ("the full preset's
    training.lr=0.0005")."""
    import dataclasses
    import json

    from fasttune.config import get_experiment, to_dict
    from fasttune.train import loop
    from fasttune.train.run_dir import MARKER

    run = tmp_path / "run"
    run.mkdir()
    full = get_experiment("full")
    cfg = dataclasses.replace(full, output_dir=str(run), attn_implementation="eager",
                              training=dataclasses.replace(full.training, lr=5e-4))  # fmt: skip
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    (run / MARKER).write_text("")
    (f := tmp_path / "more.yaml").write_text(f"seed: {cfg.seed}\n")
    seen = {}

    def train(cfg, attn_origin):
        seen["origin"] = attn_origin
        raise ConfigError(f"training.lr={cfg.training.lr} is too large for this model")

    monkeypatch.setattr(loop, "train", train)
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: training.lr: 0.0005 in {run / 'config.json'} is too large for this model"), err
    assert seen["origin"] == f"set in {run / 'config.json'}"


@pytest.mark.parametrize(
    ("typed", "named"),
    [
        ("--model.no-gradient-checkpointing", "--model.no-gradient-checkpointing"),
        ("--model.no_gradient_checkpointing", "--model.no-gradient-checkpointing"),
        ("--model.gradient-checkpointing", "--model.gradient-checkpointing"),
    ],
)
def test_a_switch_is_named_as_typed_without_its_value(typed, named):
    """A --no- switch was named `--model.no-gradient-checkpointing=False`: a flag nobody can type."""
    from fasttune.config.files import leaves

    flags = {key: leaf.flags for key, leaf in leaves().items()}
    value = "False" if ".no" in typed else "True"
    names = OptionNames([typed, "--training.lr", "0.5"], flags)
    message = f"model.gradient_checkpointing={value} and training.lr=0.5 disagree"
    assert names.rewrite(message) == f"{named} and --training.lr=0.5 disagree"


@pytest.mark.parametrize(
    ("argv", "fsdp"),
    [(["--config", "{fsdp}"], "training.fsdp: true in {fsdp}"), (["--training.fsdp"], "--training.fsdp")],
)
def test_a_warning_names_the_option_as_the_user_gave_it(argv, fsdp, tmp_path, capsys):
    """A warning about a value set in --config named the flag (`--training.fsdp shards ...`) the user never typed."""
    (tmp_path / "fsdp.yaml").write_text("training:\n  fsdp: true\n")
    files = {"fsdp": str(tmp_path / "fsdp.yaml")}
    (theirs := tmp_path / "theirs").mkdir()
    (theirs / "notes.txt").write_text("mine")  # a folder fasttune did not make: refused after the warning
    argv = [a.format_map(files) for a in argv]
    assert cli.main(["train", *argv, "--output-dir", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert f"\n{fsdp.format_map(files)} shards the model over the processes of a torchrun launch" in f"\n{err}", err


def test_a_training_warning_names_the_file_and_key_that_set_the_value(tmp_path, capsys):
    """The warmup and no-validation warnings of a run: the --config file's keys, the flags typed."""
    from helpers import save_micro_model

    (f := tmp_path / "run.yaml").write_text("training:\n  warmup_steps: 5\ndata:\n  val_fraction: 0.0\n")
    argv = ["train", "--experiment", "sft", "--model", str(save_micro_model(tmp_path / "m")), "--data", str(GSM8K),
            "--config", str(f), "--training.eval-every", "1", "--max-steps", "2", "--output-dir", str(tmp_path / "r"),
            "--generation.sample-prompt", ""]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"\ntraining.warmup_steps: 5 in {f} is not below --max-steps=2: the learning rate never" in err, err
    assert "set it below 2 (e.g. 1)" in err
    assert f"no validation: data.val_fraction: 0.0 in {f}, so --training.eval-every=1 computes no val_loss" in err


@pytest.mark.parametrize(
    ("text", "argv", "expected"),
    [
        ("experiment: sft\nmodel:\n  path: {tmp}/nowhere\ndata:\n  path: {tmp}/d.jsonl\n", [],
         "{file}: model.path {tmp}/nowhere: no such folder; pass a checkpoint, run or model folder"),
        ("experiment: sft\nmodel:\n  path: {tmp}/elsewhere\ndata:\n  path: {tmp}/d.jsonl\n",
         ["--model", "{tmp}/nowhere"], "--model {tmp}/nowhere: no such folder"),  # typed: the flag, as typed
        ("output_dir: {tmp}/theirs\n", [], "{file}: output_dir {tmp}/theirs is not empty (notes.txt)"),
    ],
)  # fmt: skip
def test_an_error_that_opens_with_an_option_set_in_a_config_file_names_the_file_and_key(text, argv, expected, tmp_path,
                                                                                         capsys):  # fmt: skip
    """`--model nowhere: no such folder` for a model.path set in run.yaml: a flag the user never typed."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    names = {"tmp": str(tmp_path), "file": str(tmp_path / "run.yaml")}
    (tmp_path / "run.yaml").write_text(text.format_map(names))
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml"), *(a.format_map(names) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected.format_map(names)) and len(err.strip().splitlines()) == 1, err


def test_an_error_that_opens_with_dashes_but_no_flag_is_said_as_written(tmp_path, monkeypatch, capsys):
    """A data path the user named `--.jsonl` (given as --data=--.jsonl) opens the error with two dashes and no flag:
    the line as the check wrote it, exit 2 (the naming crashed with a TypeError traceback, exit 1)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--data=--.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --.jsonl: no such file") and len(err.strip().splitlines()) == 1, err
