"""`fasttune train --config FILE`: YAML, TOML and JSON files of the config tree, a run's config.json as is (it trains
the same run again), the command line over the file, --resume held to the run's config like the flags, and every
mistake one line naming the file and the key path (exit 2, no traceback)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import losses, tiny_config

from fasttune import cli
from fasttune.config import get_experiment
from fasttune.train import loop

MODEL = "my-model"  # only compared: parsing loads nothing


def _config(args):
    return cli.parse(["train", *args]).config.validate()


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run (its config.json written by the run)."""
    tmp = tmp_path_factory.mktemp("files")
    cfg = tiny_config(tmp, max_steps=2, save_every=2, eval_every=0)
    loop.train(cfg)
    return Path(cfg.output_dir)


def test_a_runs_saved_config_json_trains_the_same_run_again(trained, tmp_path, capsys):
    again = tmp_path / "again"
    assert cli.main(["train", "--config", str(trained / "config.json"), "--output-dir", str(again)]) == 0
    want, got = json.loads((trained / "config.json").read_text()), json.loads((again / "config.json").read_text())
    assert got.pop("output_dir") == str(again) and want.pop("output_dir") == str(trained)
    assert got == want
    first, second = losses(_metrics(trained)), losses(_metrics(again))
    assert sorted(first) == [1, 2] and first == second


def test_a_runs_config_json_read_from_elsewhere_names_its_own_folder(trained, tmp_path, monkeypatch, capsys):
    """A run trained with --output-dir runs/a records that path as typed: read from another directory (or after the
    project folder moved), `--config runs/a/config.json` without --output-dir trained a new run in ./runs/a there;
    its folder is the file's own, refused as holding a run, and with --resume that run goes on."""
    run = tmp_path / "proj" / "runs" / "a"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "output_dir": "runs/a"}))
    (elsewhere := tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["train", "--config", str(run / "config.json")]) == 2
    assert f"error: {run / 'config.json'}: output_dir {run} already holds a run" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
    assert _config(["--config", str(run / "config.json"), "--resume"]).output_dir == str(run)
    assert _config(["--config", str(run / "config.json"), "--output-dir", "b"]).output_dir == "b"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.yaml", "experiment: lora\ntraining:\n  lr: 1e-4\n  max_steps: 7\n"
                     "data: {micro_batch_size: 2, packing: false}\nmodel:\n  path: my-model\n"
                     "lora:\n  targets: [q_proj, v_proj]\n"),
        ("run.toml", 'experiment = "lora"\n[training]\nlr = 1e-4\nmax_steps = 7\n[data]\nmicro-batch-size = 2\n'
                     'packing = false\n[model]\npath = "my-model"\n[lora]\ntargets = ["q_proj", '
                     '"v_proj"]\n'),
        ("run.json", '{"experiment": "lora", "training": {"lr": 0.0001, "max_steps": 7}, "data": {"micro_batch_size": '
                     '2, "packing": false}, "model": {"path": "my-model"}, "lora": {"targets": '
                     '["q_proj", "v_proj"]}}'),
    ],
)  # fmt: skip
def test_yaml_toml_and_json_files_equal_the_same_options_as_flags(tmp_path, name, text):
    """(The TOML writes micro-batch-size: a key with - is read as with _, as on the command line.)"""
    (tmp_path / name).write_text(text)
    flags = ["--experiment", "lora", "--training.lr", "1e-4", "--max-steps", "7", "--data.micro-batch-size", "2",
             "--data.no-packing", "--model", MODEL, "--lora.targets", "q_proj", "v_proj"]  # fmt: skip
    got = _config(["--config", str(tmp_path / name)])
    assert got == _config(flags)
    assert got.training.lr == 1e-4 and got.training.warmup_steps == 20  # YAML's 1e-4 a number; the preset's warmup kept


def test_the_command_line_overrides_the_file_and_experiment_must_agree(tmp_path, capsys):
    f = tmp_path / "sft.yaml"
    f.write_text("experiment: sft\ntraining: {lr: 1e-4, max_steps: 7}\n")
    cfg = _config(["--config", str(f), "--training.lr", "0.01", "--experiment", "sft"])
    assert (cfg.experiment, cfg.training.lr, cfg.training.max_steps) == ("sft", 0.01, 7)
    assert _config(["--max-steps", "3", "--config", str(f)]).training.max_steps == 3  # an alias before --config
    assert cli.main(["train", "--config", str(f), "--experiment", "lora"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --experiment lora disagrees with {f}, which changes the sft")
    g = tmp_path / "plain.yaml"
    g.write_text("training:\n  lr: 1e-4\n")  # no experiment: --experiment (or quick) is the base
    assert _config(["--config", str(g), "--experiment", "lora"]).lora.enabled
    assert _config(["--config", str(g)]).experiment == "quick"
    h = tmp_path / "all.toml"
    h.write_text('[data]\nmax_documents = "None"\n')  # TOML has no null: "None", as on the command line
    assert get_experiment("quick").data.max_documents == 600
    assert _config(["--config", str(h)]).data.max_documents is None


def test_a_value_the_command_line_overrides_is_never_checked_but_its_key_is(tmp_path, monkeypatch, capsys):
    """The command line wins, so the file's value of that key is never used: a wrong type, a value out of range or
    one that contradicts another of the file's (offload under compile) no longer stops the run; the same value not
    overridden, and a misspelt key beside an overridden one, still do."""
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("the file was accepted"))
    f = tmp_path / "a.yaml"
    f.write_text("training: {lr: fast, max_steps: -3, compile: true}\nmodel: {memory: offload}\n")
    flags = ["--training.lr", "0.01", "--max-steps", "5", "--model.memory", "full"]
    cfg = _config(["--config", str(f), *flags])
    assert (cfg.training.lr, cfg.training.max_steps, cfg.model.memory, cfg.training.compile) == (0.01, 5, "full", True)
    assert cli.main(["train", "--config", str(f), *flags[2:]]) == 2
    assert f"error: {f}: training.lr: expected a number, got 'fast'" in capsys.readouterr().err
    f.write_text("training: {lr: fast, max_stepz: 3}\n")
    assert cli.main(["train", "--config", str(f), "--training.lr", "0.01"]) == 2
    assert f"error: {f}: unknown key training.max_stepz; did you mean training.max_steps?" in capsys.readouterr().err


def test_a_home_folder_path_in_the_file_is_the_home_folder(tmp_path, monkeypatch):
    """`output_dir: ~/runs/a` trained into a folder named ~ in the working directory (the shell expands ~ in a flag,
    nothing did in a file), and `model: {path: ~/m}` was "no such folder"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f = tmp_path / "c.yaml"
    f.write_text("experiment: sft\noutput_dir: ~/runs/a\nmodel: {path: ~/m}\ndata: {path: ~/d.json, cache_dir: ~/c}\n")
    cfg = _config(["--config", str(f)])
    home = tmp_path / "home"
    got = (cfg.output_dir, cfg.model.path, cfg.data.path, cfg.data.cache_dir)
    assert got == (str(home / "runs/a"), str(home / "m"), (str(home / "d.json"),), str(home / "c"))
    f.write_text("data: {path: [~/d.json, e.jsonl], val_path: [~/v.json]}\n")  # several paths: a list, each expanded
    cfg = _config(["--config", str(f)])
    assert (cfg.data.path, cfg.data.val_path) == ((str(home / "d.json"), "e.jsonl"), (str(home / "v.json"),))


def test_a_max_length_set_in_the_file_counts_as_the_users(tmp_path, capsys):
    """A preset's max_length shrinks to the model's context; one the file sets is the user's: an error, as a flag,
    naming the file and its key (it named --data.max-length, which the user never typed); a flag over it is named as
    typed."""
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=300).save_pretrained(tmp_path / "m")  # fmt: skip
    f = tmp_path / "c.yaml"
    f.write_text(f"experiment: sft\nmodel: {{path: {tmp_path / 'm'}}}\ndata:\n  path: tests/fixtures/alpaca.jsonl\n"
                 "  max_length: 1024\n")  # fmt: skip
    assert cli.main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: data.max_length 1024 exceeds the context of {tmp_path / 'm'} "
                          "(max_position_embeddings=128); set it to 128 or less, or extend"), err  # fmt: skip
    assert cli.main(["train", "--config", str(f), "--data.max-length", "256"]) == 2
    assert capsys.readouterr().err.startswith("error: --data.max-length 256 exceeds the context of")


def test_resume_never_shrinks_the_runs_max_length_to_a_smaller_model(trained, tmp_path, monkeypatch, capsys):
    """The run's recorded data.max_length is what it trained with: a --model of a smaller context given on resume is
    one line naming the run's config.json, with --config FILE (the value is the run's, from_run) as without it (the
    run's config.json is the file); it shrank silently to the context with --config."""
    from transformers import LlamaConfig

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["max_length"] == 64
    saved["model"]["path"] = str(tmp_path / "moved-model")  # the project folder moved: --model given anew
    (run / "config.json").write_text(json.dumps(saved))
    LlamaConfig(max_position_embeddings=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=384).save_pretrained(tmp_path / "m")  # fmt: skip
    monkeypatch.setattr(loop, "train", lambda cfg, **k: pytest.fail(f"trained at max_length {cfg.data.max_length}"))
    part = tmp_path / "part.yaml"
    part.write_text(f"output_dir: {run}\n")
    expected = (f"error: --resume: the run trained with data.max_length 64 (in {run / 'config.json'}), beyond the "
                f"context of {tmp_path / 'm'} (max_position_embeddings=32); give a model of 64 positions or more (the "
                "run's own), or start a new run with another --output-dir")  # fmt: skip
    for given in (["--output-dir", str(run)], ["--config", str(part)]):
        assert cli.main(["train", *given, "--resume", "--model", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert err.strip() == expected, err
    assert json.loads((run / "config.json").read_text()) == saved


def test_resume_with_a_new_max_length_beyond_the_model_names_what_resume_takes(trained, tmp_path, monkeypatch, capsys):
    """--data.max-length (or a --config FILE's data.max_length) typed on resume beyond the model's context: the line
    says the run keeps its own (drop the option, with a model of its length) or a new run, not "pass N or less",
    which resume then refuses; dropping it resumes at the run's length."""
    from transformers import LlamaConfig

    from fasttune.errors import ConfigError
    from fasttune.train.run_dir import RunFolder

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["path"] = str(tmp_path / "moved-model")  # the project folder moved: --model given anew
    (run / "config.json").write_text(json.dumps(saved))
    for context in (32, 64):
        LlamaConfig(max_position_embeddings=context, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, vocab_size=384).save_pretrained(tmp_path / f"m{context}")  # fmt: skip
    trained_at = []
    monkeypatch.setattr(loop, "train", lambda cfg, **k: trained_at.append(cfg.data.max_length) or pytest.fail("ran"))
    part = tmp_path / "part.yaml"
    part.write_text(f"output_dir: {run}\ndata:\n  max_length: 128\n")
    keeps = f"and a resumed run keeps the data.max_length it trained with, 64 (in {run / 'config.json'}); "
    for context, given, option, fix in (
        (32, ["--output-dir", str(run), "--data.max-length", "128"], "--data.max-length",
         "drop --data.max-length and give a model of 64 positions or more"),
        (64, ["--output-dir", str(run), "--data.max-length", "128"], "--data.max-length", "drop --data.max-length"),
        (32, ["--config", str(part)], f"{part}: data.max_length",
         f"drop it from {part} and give a model of 64 positions or more"),
    ):  # fmt: skip
        model = tmp_path / f"m{context}"
        assert cli.main(["train", *given, "--resume", "--model", str(model)]) == 2
        err = capsys.readouterr().err
        beyond = f"{option} 128 exceeds the context of {model} (max_position_embeddings={context})"
        assert err.strip() == f"error: --resume: {beyond}, {keeps}{fix}, or start a new run with another --output-dir"
    cfg = cli.parse(["train", "--output-dir", str(run), "--resume", "--data.max-length", "32"]).config.validate()
    with pytest.raises(ConfigError, match="data.max_length is 32 but the run was started with 64"):
        RunFolder(cfg.run_dir).check_resume(cfg)  # what "pass --data.max-length 32 or less" met next
    with pytest.raises(pytest.fail.Exception):  # dropping it, as the line says: training starts at the run's 64
        cli.main(["train", "--output-dir", str(run), "--resume", "--model", str(tmp_path / "m64")])
    assert trained_at == [64]
    assert json.loads((run / "config.json").read_text()) == saved


def test_resume_and_overwrite_in_a_file_never_act_on_a_folder(trained, tmp_path, capsys):
    """A saved config.json of a resumed (or overwritten) run records resume/overwrite: read back they would resume
    or clear --output-dir; only the command line's count."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    saved = json.loads((run / "config.json").read_text())
    f = tmp_path / "c.json"
    f.write_text(json.dumps({**saved, "output_dir": str(run), "overwrite": True}))
    assert cli.main(["train", "--config", str(f)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    f.write_text(json.dumps({**saved, "output_dir": str(tmp_path / "new"), "resume": True}))
    assert _config(["--config", str(f)]).resume is False


def test_resume_with_config_keeps_the_run_and_refuses_a_file_that_changes_it(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    f = tmp_path / "changed.yaml"
    f.write_text(json.dumps({**saved, "output_dir": str(run), "training": {**saved["training"], "lr": 0.5}}))
    assert cli.main(["train", "--config", str(f), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: training.lr is 0.5 (set by {f}) but the run was started with 0.001")
    own = ["--config", str(run / "config.json"), "--output-dir", str(run), "--resume"]  # the copy's names trained
    assert cli.main(["train", *own, "--training.lr", "0.5"]) == 2  # a flag: named as before
    assert capsys.readouterr().err.startswith("error: --resume: --training.lr is 0.5 but the run was started")
    assert cli.main(["train", *own, "--max-steps", "3"]) == 0  # max_steps may change on resume
    assert sorted(losses(_metrics(run))) == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["training"]["max_steps"] == 3


def test_resume_with_a_partial_config_takes_what_it_leaves_out_from_the_run(tmp_path, capsys):
    """A run started with a file and a flag (`--config part.yaml --data.max-length 48`), resumed with the file alone:
    what the file leaves out is the run's (it was the preset's: "data.max_length is 64 but the run was started with
    48"); what it sets is still held to the run, and a file of another preset is refused."""
    base = tiny_config(tmp_path, max_steps=2, save_every=2, eval_every=0)
    run = tmp_path / "run"
    part = tmp_path / "part.yaml"
    part.write_text(f"output_dir: {run}\ntraining:\n  max_steps: 2\n  save_every: 2\n  eval_every: 0\n")
    flags = ["--model.preset", "micro", "--data.max-documents", "40", "--data.tokenizer-vocab-size", "384",
             "--data.cache-dir", base.data.cache_dir, "--training.warmup-steps", "1"]  # fmt: skip
    assert cli.main(["train", "--config", str(part), *flags, "--data.max-length", "48"]) == 0
    part.write_text(f"output_dir: {run}\ntraining:\n  max_steps: 3\n")
    assert cli.main(["train", "--config", str(part), "--resume"]) == 0
    assert sorted(losses(_metrics(run))) == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["data"]["max_length"] == 48
    part.write_text(f"output_dir: {run}\ndata:\n  max_length: 32\ntraining:\n  max_steps: 4\n")
    assert cli.main(["train", "--config", str(part), "--resume"]) == 2
    assert f"data.max_length is 32 (set by {part}) but the run was started with 48" in capsys.readouterr().err
    part.write_text(f"experiment: full\noutput_dir: {run}\n")
    assert cli.main(["train", "--config", str(part), "--resume"]) == 2
    assert "changes the full preset, but the run was started with quick" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("a.yaml", "training:\n  learning_rate: 1e-4\n",
         "a.yaml: unknown key training.learning_rate; did you mean training.lr (fasttune's name for learning_rate)?"),
        ("a.yaml", "micro_batch_size: 2\n", "unknown key micro_batch_size; did you mean data.micro_batch_size?"),
        ("a.yaml", "num_epochs: 3\n",
         "a.yaml: unknown key num_epochs; did you mean training.epochs (fasttune's name for num_epochs)?"),
        ("a.yaml", "report_to: wandb\n", "a.yaml: unknown key report_to; fasttune has no such option: it logs to "
         "metrics.jsonl"),
        ("a.yaml", "dataset_text_field: content\n",
         "a.yaml: unknown key dataset_text_field; fasttune has no such option: text data is read from each record's"),
        ("a.yaml", "completion_only_loss: true\n", "did you mean data.train_on_prompt: false (fasttune's name for"),
        ("a.yaml", "trainig:\n  lr: 1e-4\n", "a.yaml: unknown key trainig; did you mean training?"),
        ("a.yaml", "data:\n  packng: false\n", "a.yaml: unknown key data.packng; did you mean data.packing?"),
        ("a.yaml", "training:\n  lr: fast\n", "a.yaml: training.lr: expected a number, got 'fast' (a string)"),
        ("a.toml", "[training]\nmax_steps = 1.5\n", "a.toml: training.max_steps: expected an integer, got 1.5"),
        ("a.json", '{"data": {"packing": "no"}}', "a.json: data.packing: expected true or false, got 'no'"),
        ("a.json", '{"data": {"max_documents": "all"}}',
         'a.json: data.max_documents: expected an integer or null ("None" in TOML), got \'all\''),
        ("a.yaml", "training: 3\n", "a.yaml: training: expected a section (a mapping of its options), got 3"),
        # as the short flags --model PATH and --data PATH take them: the key they set is named
        ("a.yaml", "model: ./m\n", "a.yaml: model: expected a section (a mapping of its options), got './m' (a "
         "string); for its folder or file write model: {path: ./m} (the flag --model is model.path)"),
        ("a.yaml", "data: d.jsonl\n", "got 'd.jsonl' (a string); for its folder or file write data: {path: d.jsonl} "
         "(the flag --data is data.path)"),
        ("a.yaml", "training:\n  lr: -1\n", "a.yaml: training.lr=-1.0 is not valid; it must be > 0"),
        ("a.yaml", "experiment: SFT\n", "a.yaml: experiment: 'SFT' is unknown (did you mean sft?); choose one of"),
        ("a.yaml", "training:\n  lr: 1e-4\n  max_steps: [3\n", "a.yaml: line 4, column 1: YAML syntax error: expected"),
        ("a.yaml", "training:\n  lr: 1\n   max_steps: 3\n", "a.yaml: line 3, column 13: YAML syntax error: mapping"),
        ("a.toml", "[training]\nlr = \n", "a.toml: TOML syntax error: Invalid value (at line 2, column 6)"),
        ("a.json", '{"training": {"lr": 1,}}', "a.json: line 1, column 23: JSON syntax error: Expecting property"),
        ("a.yaml", "- lr\n", "a.yaml: expected a mapping of options and sections at the top"),
        ("a.txt", "lr: 1\n", "--config a.txt: unknown file type '.txt'; use .yaml/.yml (YAML), .toml or .json"),
        # an empty (unsaved) file trained the quick preset, as with no --config at all
        *((name, text, f"--config {name} sets no option (it is empty); write the run's options in it") for name, text
          in (("a.yaml", ""), ("a.yaml", "# training: {lr: 1e-4}\n"), ("a.toml", "\n"), ("a.json", "{}"))),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_line_naming_the_file_and_key(tmp_path, monkeypatch, capsys, name, text, expected):
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("the file was accepted"))
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text)
    assert cli.main(["train", "--config", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


_RECORDS = [{"instruction": f"Question {i}: " + "words " * 40, "input": "", "output": "an answer"} for i in range(500)]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        # the data file meant for --data: the error line printed the whole file (4 MB for GSM8K's train split)
        ("train.json", _RECORDS, "train.json holds a list of 500 records, not a mapping of options: a data file? pass "
         "it as --data train.json"),
        ("run.json", {"data": _RECORDS}, "run.json: data: expected a section (a mapping of its options), got "
         "[{'instruction': 'Question 0: words"),
        # a model folder's config.json: its keys were answered as fasttune's (model_type -> model.dtype)
        ("my-llama/config.json", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64},
         "my-llama/config.json is a model's config.json (model_type, architectures), not fasttune options: pass its "
         "folder as --model my-llama"),
    ],
)  # fmt: skip
def test_a_file_that_is_no_config_is_named_for_what_it_is_in_a_short_line(
    tmp_path, monkeypatch, capsys, name, content, expected
):
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("the file was accepted"))
    monkeypatch.chdir(tmp_path)
    Path(name).parent.mkdir(exist_ok=True)
    Path(name).write_text(json.dumps(content))
    assert cli.main(["train", "--config", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert len(err) < 300, err


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("run.yaml", "training:\n  lr: 1e-4\ndata: {}\ntraining:\n  max_steps: 3\n",
         "run.yaml: line 4: training is set again (first on line 1): keep one"),
        ("run.yaml", "experiment: sft\ntraining:\n  lr: 1e-4\n  max_steps: 3\n  lr: 2e-4\n",
         "run.yaml: line 5: training.lr is set again (first on line 3): keep one"),
        ("run.yaml", "data:\n  packing: false\ntraining: {lr: 1e-4,\n  lr: 2e-4}\n",
         "run.yaml: line 4: training.lr is set again (first on line 3): keep one"),
        ("run.yaml", "training:\n  max_steps: 3\n  warmup_steps: 1\n  max-steps: 4\n",  # - reads as _
         "run.yaml: line 4: training.max-steps sets training.max_steps again (first on line 2): keep one"),
        ("run.json", '{"data": {"packing": false}, "training": {"lr": 1, "max_steps": 3, "lr": 2}}',
         "run.json: training.lr is set again: keep one"),
        ("run.json", '{"training": {"max_steps": 1}, "training": {"lr": 2}}',
         "run.json: training is set again: keep one"),
        ("run.json", '{"training": {"max-steps": 1, "max_steps": 2}}',
         "run.json: training.max_steps sets training.max-steps again: keep one"),
        ("run.toml", "[training]\nmax_steps = 3\nmax-steps = 4\n",
         "run.toml: training.max-steps sets training.max_steps again: keep one"),
        ("run.toml", 'experiment = "sft"\n[training]\nlr = 1e-4\nmax_steps = 3\nlr = 2e-4\n',  # tomllib's words were
         "run.toml: line 5: training.lr is set again (first on line 3): keep one"),  # "Cannot overwrite a value"
        ("run.toml", "[training]\nlr = 1e-4\n[data]\npacking = false\n[training]\nmax_steps = 3\n",
         "run.toml: line 5: training is set again (first on line 1): keep one"),
        ("run.toml", "training.lr = 1e-4\n[training]\nmax_steps = 3\n",
         "run.toml: line 2: training is set again (first on line 1): keep one"),
        ("run.toml", '[data]\npath = [\n  "a.jsonl",\n]\npath = "b.jsonl"\n',  # a value over several lines: its first
         "run.toml: line 5: data.path is set again (first on line 2): keep one"),
    ],
)  # fmt: skip
def test_a_key_set_twice_is_one_line_naming_the_file_its_lines_and_key(tmp_path, monkeypatch, capsys, name, text,
                                                                       expected):  # fmt: skip
    """yaml.safe_load and json keep a key's last value and drop the first without a word (two `lr:` under training:,
    or a second `training:` that drops the first's options); `max-steps` beside `max_steps` (read as one key) did
    the same in every format; TOML's refusal was tomllib's ("Cannot overwrite a value (at line 5, column 1)"). Refused
    in one line: the dotted key, and in YAML and TOML both lines."""
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("the file was accepted"))
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text)
    assert cli.main(["train", "--config", name]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_a_yaml_merge_key_is_read_as_yaml_reads_it(tmp_path):
    """`<<:` merges a mapping whose keys the section's own override (YAML's rule, not a key set twice): the check of
    repeated keys stopped it with "could not determine a constructor for the tag 'tag:yaml.org,2002:merge'"."""
    (f := tmp_path / "run.yaml").write_text("training:\n  <<: {lr: 1e-3, max_steps: 7}\n  lr: 1e-4\n")
    assert _config(["--config", str(f)]) == _config(["--training.lr", "1e-4", "--max-steps", "7"])


def test_every_unknown_key_of_a_trl_file_is_named_at_once(tmp_path, monkeypatch, capsys):
    """A TRL/Axolotl-style file has several keys of other names: one line names them all with fasttune's, so the
    user fixes the file once instead of once per run."""
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("the file was accepted"))
    monkeypatch.chdir(tmp_path)
    Path("trl.yaml").write_text("model_name_or_path: m\nlearning_rate: 1e-4\ntraining:\n  num_train_epochs: 1\n"
                                "  max_steps: 3\nreport_to: wandb\nxyzzy_plugh: steps\n")  # fmt: skip
    assert cli.main(["train", "--config", "trl.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trl.yaml: 5 unknown keys: model_name_or_path -> model.path, learning_rate -> "
                          "training.lr, training.num_train_epochs -> training.epochs, report_to (fasttune has no "
                          "such option), xyzzy_plugh (fasttune's names after ->"), err  # fmt: skip
    assert err.count("\n") == 1


def test_a_missing_file_or_a_folder_is_named(trained, tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"error: --config {tmp_path / 'nope.yaml'}: no such file\n"
    assert cli.main(["train", "--config", str(trained)]) == 2
    assert f"is a folder; pass a .yaml, .toml or .json file (a run's settings are its {trained}/config" in (
        capsys.readouterr().err
    )
    assert cli.main(["train", "--config"]) == 2
    assert capsys.readouterr().err.startswith("error: --config needs a file")


def test_main_py_takes_config_and_help_lists_it(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("training:\n  learning_rate: 1e-4\n")
    env = {"PYTHONPATH": ":".join([str(Path("src").resolve()), *sys.path]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "main.py", "--config", str(tmp_path / "bad.yaml")], capture_output=True,
                         text=True, env=env)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("did you mean training.lr (fasttune's name for learning_rate)? (options: "
                                       "`fasttune train --help`)")  # fmt: skip
    assert cli.main(["train", "--help"]) == 0
    assert "--config FILE" in capsys.readouterr().out


def test_resume_without_config_takes_the_options_not_given_from_the_run(trained, tmp_path, capsys):
    """`fasttune train --output-dir RUN --resume`: the options not typed again are the run's (its config.json), not
    the preset's, which resume refused as changes ("model.preset is 'tiny' but the run was started with 'micro'")."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--training.lr", "0.5"]) == 2  # typed: refused
    assert capsys.readouterr().err.startswith("error: --resume: --training.lr is 0.5 but the run was started")
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--max-steps", "3"]) == 0
    assert sorted(losses(_metrics(run))) == [1, 2, 3]
    assert " sets resume: true" not in (err := capsys.readouterr().err) and " sets overwrite: true" not in err


def test_resume_with_another_experiment_says_the_run_keeps_its_preset(trained, tmp_path, capsys):
    """`--resume --experiment lora` on a quick run told the user to change the file's experiment: the run's own
    config.json, which no --config named."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--experiment", "sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("(experiment: quick); drop --experiment: a run keeps the preset it was started with")


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        (("--resume",), "sets resume: true; this run resumes because --resume is on the command line (resume and "
         "overwrite are read from there, never from a file)"),
        ((), "sets resume: true, which only the command line can ask: this run does not resume; pass --resume for it"),
    ],
)  # fmt: skip
def test_a_files_resume_notice_says_what_the_run_does(typed, message, tmp_path, caplog):
    """`--config runs/a/config.json --resume` said the file's resume "is not used" while the run did resume."""
    from fasttune.config.files import ConfigFile

    f = tmp_path / "config.json"
    f.write_text(json.dumps({"resume": True}))
    caplog.set_level("INFO", logger="fasttune")
    assert ConfigFile.load(str(f), typed=typed).values == {}  # never read from the file
    assert [r.getMessage() for r in caplog.records] == [f"{f} {message}"]


def test_an_older_runs_config_json_with_a_lora_option_and_lora_off_still_resumes_and_evaluates(trained, tmp_path,
                                                                                              capsys):  # fmt: skip
    """Before a lora option without LoRA was refused, `--experiment sft --lora.rank 8` trained (every weight) and its
    config.json records lora.rank 8 with LoRA off: read back on --resume (this one ends at once, complete) or by eval,
    it was refused as if typed anew, with fixes (--experiment lora, drop lora.rank) that change or cannot touch the
    run, and eval said only 'cannot read config.json (ConfigError)'."""
    from fasttune.eval.of_run import run_config

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "lora": {**saved["lora"], "rank": 8}}))
    assert cli.main(["train", "--output-dir", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert "is already complete" in capsys.readouterr().err
    assert run_config(run, needed=True).lora.rank == 8
    assert cli.main(["train", "--config", str(run / "config.json"), "--output-dir", str(tmp_path / "new")]) == 2
    assert "lora.rank: 8 in " in capsys.readouterr().err  # a new run from it is refused: its own options
