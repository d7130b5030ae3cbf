"""--resume of a run whose model or project folder moved or changed: the model given again is checked against what
the run recorded, the max-length line says what a resumed run can do, and a --config of the run behaves as a bare
--resume."""

import dataclasses
import json
import shutil

import pytest
import torch
from helpers import GSM8K, losses, save_micro_model, sft_config

from fasttune.config import from_dict
from fasttune.errors import ConfigError, DataError, FasttuneError
from fasttune.train import checkpoint, loop


def _resumed(cfg, model=None, max_steps: int = 3):
    """cfg resumed to `max_steps`, with --model `model` when given."""
    model = dataclasses.replace(cfg.model, path=str(model)) if model is not None else cfg.model
    return dataclasses.replace(cfg, resume=True, model=model,
                               training=dataclasses.replace(cfg.training, max_steps=max_steps))  # fmt: skip


def _refusal(cfg, model=None) -> str:
    """The one line that refuses resuming cfg with --model `model` (when given)."""
    with pytest.raises(ConfigError) as e:
        loop.train(_resumed(cfg, model))
    return str(e.value)


def test_a_resumed_runs_max_length_beyond_its_models_context_says_what_resume_can_do(tmp_path):
    """train() resuming a run whose model's config.json now names a shorter context than the run's data.max_length,
    with no CLI ahead of it that read the model's config (the API, a script): the line says that the run keeps its
    length (a model of that context, or a new run), not "pass --data.max-length 128 or less", which resume refuses."""
    base = save_micro_model(tmp_path / "base")
    cfg = sft_config(tmp_path, base, max_steps=2, save_every=2, eval_every=0)
    loop.train(cfg)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    assert _refusal(cfg) == (
        f"--resume: the run trained with data.max_length 256 (in {tmp_path / 'run' / 'config.json'}), beyond the "
        f"context of {base} (max_position_embeddings=128); give a model of 256 positions or more (the run's own), or "
        "start a new run with another --output-dir"
    )


def _move(src, dst):
    """`src` moved to `dst` (the project folder moved: the path the run recorded is gone)."""
    shutil.move(src, dst)
    return dst


def _perturbed(base, to):
    """A copy of the model folder `base` at `to` with every weight changed a little: the same config, other weights
    (a fine-tune of the same base)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, to)
    tensors = {k: v + 0.01 for k, v in load_file(to / "model.safetensors").items()}
    save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return to


def test_a_full_fine_tune_given_its_model_anew_checks_its_config_against_the_checkpoint(tmp_path, caplog):
    """Full fine-tune, the recorded model gone, --model given again: a model of another config (a RoPE base here) is
    refused in one line naming both paths (it was taken, training another model than the run's from step 3 on); one
    of the same config but other weights goes on, logged, with the losses of an uninterrupted run: the weights are the
    checkpoint's."""
    base = save_micro_model(tmp_path / "base")
    cfg = sft_config(tmp_path, base, max_steps=3, save_every=1, eval_every=0)
    whole = loop.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))
    loop.train(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2)))
    other = _perturbed(base, tmp_path / "other")
    rope = _perturbed(base, tmp_path / "rope")
    config = json.loads((rope / "config.json").read_text())
    (rope / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_theta": 10000.0,
                                                                                 "rope_type": "default"}}))  # fmt: skip
    gone = _move(base, tmp_path / "elsewhere")
    assert _refusal(cfg, rope) == (
        f"--resume: --model {rope} is not the model this run was started with ({base}, gone): its config has "
        'rope_parameters {"rope_theta": 10000.0, "rope_type": "default"} (the run\'s: {"rope_theta": 500000.0, '
        '"rope_type": "default"}); pass that model where it is now, or start a new run with another --output-dir'
    )
    caplog.set_level("INFO", logger="fasttune")
    resumed = loop.train(_resumed(cfg, other))
    assert losses(resumed.records)[3] == losses(whole.records)[3]
    step = tmp_path / "run" / "checkpoints" / "step-000002"
    assert f"--resume: --model moved ({base}, the run's, is gone -> {other}); its config is that of the checkpoint " \
           f"{step}, whose weights the run goes on from" in caplog.messages  # fmt: skip
    assert gone.is_dir()


def test_a_lora_run_given_its_base_anew_checks_its_config_and_weights_against_its_record(tmp_path, caplog):
    """LoRA, the recorded base gone, --model given again: the run recorded its base at its start (base-model.json:
    config and a digest of the weights); another config or other weights (a fine-tune of the same base) are refused
    in one line naming both paths and the fix (other weights were taken: adapters trained on one base went on on
    another); the same weights sharded otherwise go on. A run that recorded nothing (an older fasttune) goes on,
    saying it could not be checked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = save_micro_model(tmp_path / "base")
    cfg = sft_config(tmp_path, base, lora=dict(enabled=True, rank=4, alpha=8), max_steps=2, save_every=1,
                     eval_every=0)  # fmt: skip
    loop.train(cfg)
    record = tmp_path / "run" / "base-model.json"
    assert json.loads(record.read_text())["config"]["hidden_size"] == 64
    other, small = _perturbed(base, tmp_path / "other"), tmp_path / "small"
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(base).save_pretrained(sharded)
    shutil.copytree(base, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 384}))
    _move(base, tmp_path / "elsewhere")
    assert _refusal(cfg, small) == (
        f"--resume: --model {small} is not the model this run was started with ({base}, gone): its config has "
        "max_position_embeddings 384 (the run's: 512); pass that model where it is now, or start a new run with "
        "another --output-dir"
    )
    assert _refusal(cfg, other) == (
        f"--resume: --model {other} is not the base model this LoRA run was started with ({base}, gone): its weights "
        f"differ from those recorded in {record}; pass that base model where it is now (the adapters were trained on "
        "it), or start a new run with another --output-dir"
    )
    caplog.set_level("INFO", logger="fasttune")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert loop.train(_resumed(cfg, sharded)).checkpoint.name == "step-000003"
    assert f"--resume: --model moved ({base}, the run's, is gone -> {sharded}); its config and weights are those " \
           f"recorded in {record}" in caplog.messages  # fmt: skip
    record.unlink()  # a run from before fasttune recorded its base
    _move(sharded, tmp_path / "sharded-elsewhere")
    assert loop.train(_resumed(cfg, other, max_steps=4)).checkpoint.name == "step-000004"
    assert f"--resume: --model moved ({sharded}, the run's, is gone -> {other}); the run recorded nothing to check " \
           "it against (it was started before fasttune recorded a LoRA run's base model in base-model.json): make " \
           "sure it is the base model the adapters were trained on" in caplog.messages  # fmt: skip


def test_resume_with_the_runs_config_after_the_project_folder_moved_is_a_bare_resume(tmp_path, monkeypatch, capsys):
    """--resume --config runs/a/config.json (or a copy of that file) after the project folder moved: one line names
    every recorded path that is gone, in the file given, as a bare --resume does (a copy said `--model /old/base: no
    such folder`, a flag never typed, and only the model), and the flags typed again go on."""
    from fasttune.cli import main

    old, new = tmp_path / "proj", tmp_path / "moved"
    save_micro_model(old / "base")
    shutil.copy(GSM8K, old / "d.json")
    monkeypatch.chdir(old)
    assert main(["train", "--experiment", "sft", "--model", "base", "--data", "d.json", "--training.save-every", "1",
                 "--training.eval-every", "0", "--output-dir", "runs/a", "--max-steps", "2"]) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)
    old.rename(new)
    monkeypatch.chdir(new)
    shutil.copy("runs/a/config.json", "copy.json")
    capsys.readouterr()
    for given in (["--config", "runs/a/config.json"], ["--config", "copy.json", "--output-dir", "runs/a"]):
        assert main(["train", *given, "--resume", "--max-steps", "3"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --resume: the run's model.path {old / 'base'} and data.path {old / 'd.json'} (in {given[1]}) are "
            "gone: moved or renamed? pass --model and --data with where they are now (the run goes on from its "
            "checkpoint)"
        )
    retyped = ["--model", "base", "--data", "d.json", "--resume", "--max-steps", "3"]
    assert main(["train", "--config", "runs/a/config.json", *retyped]) == 0
    saved = json.loads((new / "runs/a/config.json").read_text())
    assert (saved["model"]["path"], saved["data"]["path"]) == (str(new / "base"), [str(new / "d.json")])


def test_the_weights_digest_reads_the_files_transformers_loads_and_never_trusts_a_header_length(tmp_path):
    """weights_digest covers the safetensors files from_pretrained loads: model.safetensors, else the shards its index
    names. A consolidated.safetensors beside them (Mistral's repositories ship their original format too), never
    loaded, is left out: a copy downloaded without it is the same base. A file whose first 8 bytes are no header
    length (a git-lfs pointer: a clone without `git lfs pull`) is no digest (None: loading names the problem), not a
    read of 2e18 bytes (MemoryError)."""
    from safetensors.torch import save_file

    from fasttune.model.identity import weights_digest

    base = save_micro_model(tmp_path / "base")
    mistral = shutil.copytree(base, tmp_path / "mistral")
    save_file({"layers.0.attention.wq.weight": torch.ones(4, 4)}, mistral / "consolidated.safetensors")
    assert weights_digest(mistral) == weights_digest(base) is not None
    lfs = shutil.copytree(base, tmp_path / "lfs")
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    assert weights_digest(lfs) is None


@pytest.mark.parametrize("damaged", ['{"config": ["model_type"]}', '{"config": {}, "weights": 5}', '{"conf'])
def test_a_lora_runs_damaged_base_record_is_said_as_such_not_a_traceback(tmp_path, caplog, damaged):
    """base-model.json that is not the record the run wrote (a list for its config, a number for its digest, a torn
    file): the base given anew goes on unchecked, as for a run that recorded nothing, and the warning says the record
    cannot be read (not that the run predates it); never a TypeError, nor 'its weights differ'."""
    from fasttune.train.run_dir import RunFolder

    base = save_micro_model(tmp_path / "base")
    cfg = sft_config(tmp_path, base, lora=dict(enabled=True, rank=4, alpha=8))
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.config.write_text(json.dumps({"model": {"path": str(tmp_path / "gone")}}))
    folder.base_model.write_text(damaged)
    caplog.set_level("INFO", logger="fasttune")
    folder.check_moved_model(cfg, None)
    assert caplog.messages == [
        f"--resume: --model moved ({tmp_path / 'gone'}, the run's, is gone -> {base}); its record {folder.base_model} "
        "cannot be read, so nothing checks it: make sure it is the base model the adapters were trained on"
    ]


def test_a_gone_file_of_several_data_paths_asks_for_all_of_them_again(tmp_path, capsys):
    """data.path [a.jsonl, b.jsonl] with b.jsonl moved: the fix said `pass --data with where it is now`, and --data
    with b's new path alone replaces both, the run's data then refused as 'records added, removed or edited'."""
    from fasttune.cli import main
    from fasttune.config import get_experiment, to_dict
    from fasttune.train.run_dir import MARKER

    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("")
    save_micro_model(tmp_path / "base")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    cfg = to_dict(get_experiment("sft"))
    cfg["model"]["path"], cfg["output_dir"] = str(tmp_path / "base"), str(run)
    cfg["data"]["path"] = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    (run / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: the run's data.path {tmp_path / 'b.jsonl'} (in {run / 'config.json'}) is gone: moved or "
        "renamed? pass --data with where it is now (--data takes all 2 of its paths again; the run goes on from its "
        "checkpoint)"
    )


def _complete(run) -> list[str]:
    """The one line of the resume of finished_sft's run, with nothing to train."""
    return [
        f"the run in {run} is already complete (step 2 of training.max_steps: 2 in {run / 'config.json'}); its final "
        f"checkpoint is {run / 'checkpoints' / 'step-000002'}; to train further, resume with a larger "
        "--max-steps (or --epochs)"
    ]


def test_a_finished_run_whose_data_is_gone_is_complete_and_one_with_steps_left_is_refused(finished_sft, capsys):
    """--resume of a finished run (a scheduler's retry) whose data file was removed since: refused for the missing
    data, which a finished run never reads; it says it is complete (exit 0) as with the data there. A resume with
    steps to train still refuses the missing data."""
    from fasttune.cli import main

    run, data = finished_sft / "run", finished_sft / "d.json"
    data.unlink()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    assert capsys.readouterr().err.splitlines() == _complete(run)
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: the run's data.path {data} (in {run / 'config.json'}) is gone: moved or renamed? pass "
        "--data with where it is now (the run goes on from its checkpoint)"
    )
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    with pytest.raises(DataError, match=f"^{data}: no such file or folder"):  # the loop alone refuses it as well
        loop.train(_resumed(cfg))


def test_a_finished_run_whose_model_is_gone_is_complete_and_one_with_steps_left_is_refused(finished_sft, capsys,
                                                                                           monkeypatch):  # fmt: skip
    """--resume of a finished run whose base model folder was removed since (the run's own checkpoints hold its
    weights): refused for the missing model, which a finished run never loads; it says it is complete (exit 0), its
    data gone too or not, from the command line and from train(). A resume with steps to train still refuses the
    missing model, in the line it had."""
    from fasttune.cli import main

    run, base, data = finished_sft / "run", finished_sft / "base", finished_sft / "d.json"
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    shutil.rmtree(base)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    assert capsys.readouterr().err.splitlines() == _complete(run)
    with monkeypatch.context() as m:
        m.setattr(loop, "prepare_model", lambda *_a, **_k: pytest.fail("a finished run built its model"))
        done = loop.train(_resumed(cfg, max_steps=2))
    assert (done.steps, done.checkpoint) == (2, run / "checkpoints" / "step-000002")
    with pytest.raises(FasttuneError, match=f"^--model {base}: "):  # the loop alone refuses it with steps left
        loop.train(_resumed(cfg))
    data.unlink()  # the project folder is gone: model and data
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    assert capsys.readouterr().err.splitlines() == _complete(run)
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: the run's model.path {base} and data.path {data} (in {run / 'config.json'}) are gone: "
        "moved or renamed? pass --model and --data with where they are now (the run goes on from its checkpoint)"
    )
    assert checkpoint.list_checkpoints(run)[-1].name == "step-000002"


def test_resume_given_chat_data_the_runs_prompt_format_drops_says_the_data_is_not_the_runs(tmp_path, capsys):
    """--resume of a run trained on prompt/completion records, given chat records with a system message: refused by
    the role check with a fix that cannot help (remove the messages, or start from the base model: the resume
    refuses changed data anyway). It says the data is not what the run trained on; a new run from the checkpoint
    keeps the fix that does help there."""
    from fasttune.cli import main

    save_micro_model(tmp_path / "base")
    pairs, chat = tmp_path / "pc.jsonl", tmp_path / "chat.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"Add {i} and 3.", "completion": f"{i + 3}"}) + "\n" for i in range(8))
    )
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]  # fmt: skip
    chat.write_text(json.dumps({"messages": turns}) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--experiment", "sft", "--model", str(tmp_path / "base"), "--data", str(pairs),
                 "--training.eval-every", "0", "--output-dir", str(run), "--max-steps", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume", "--data", str(chat), "--max-steps", "3"]) == 2
    said = f"error: {chat} line 1 has a 'system' message, which the tokenizer's chat template drops: it is the "
    said += "prompt_completion prompt format a fasttune run trained this model on (user and assistant turns only); "
    assert capsys.readouterr().err.strip() == said + (
        "the data is not what that run trained on (records added or edited since, or other data): restore it, or "
        "train on these records in a new run (another --output-dir) from the base model that run began with"
    )
    step = run / "checkpoints" / "step-000002"
    assert main(["train", "--experiment", "sft", "--model", str(step), "--data", str(chat), "--output-dir",
                 str(tmp_path / "new"), "--max-steps", "1"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines()[-1] == said + (
        "remove them from the data, or start from the base model that run began with (its own chat template)"
    )
