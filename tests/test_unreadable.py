"""Files and folders the user may not read (chmod 000): one line naming them as a permission problem and the fix,
never safetensors' "No such file or directory" traceback, never "damaged", never an older checkpoint in their place.
Tests run as root, who may read anything: helpers.deny / deny_file make Python see what a non-root user sees."""

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import GSM8K, deny, deny_file, losses, save_micro_model
from test_resolve import _checkpoint, _model, _run, _weights

from fasttune.cli import main
from fasttune.errors import FasttuneError
from fasttune.model.resolve import resolve, resolve_for_training
from fasttune.train import loop


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A peft LoRA adapter (nonzero B: it changes the model) on a micro Llama, saved as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("adapter")
    base = save_micro_model(tmp / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp / "adapter")
    return tmp / "adapter"


@pytest.mark.parametrize("command", ["generate", "eval", "chat"])
def test_an_unreadable_adapter_file_is_one_line_naming_it(adapter, tmp_path, monkeypatch, capsys, command):
    """safetensors opens the file itself and says 'No such file or directory' (a traceback from load.py)."""
    weights = adapter / "adapter_model.safetensors"
    assert main(["generate", "--checkpoint", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]) == 0  # loads
    deny_file(monkeypatch, "open", weights)
    monkeypatch.setattr("builtins.input", lambda *a: (_ for _ in ()).throw(EOFError))  # chat: Ctrl-D at once
    args = {"generate": ["--prompt", "hi"], "eval": ["--data", str(GSM8K), "--limit", "2"], "chat": []}[command]
    capsys.readouterr()
    assert main([command, "--checkpoint", str(adapter), "--max-new-tokens", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: --checkpoint {adapter}: adapter_model.safetensors cannot be read (permission denied); make it "
        f"readable (chmod u+r {weights}) or pass another folder"
    )
    assert "Traceback" not in err and "damaged" not in err


def test_an_unreadable_adapter_config_is_not_called_damaged(adapter, monkeypatch):
    deny_file(monkeypatch, "open", adapter / "adapter_config.json")
    with pytest.raises(FasttuneError, match=r"adapter_config.json cannot be read \(permission denied\)") as e:
        resolve(adapter)
    assert "damaged" not in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_train_from_a_model_folder_with_an_unreadable_file_names_it(tmp_path, monkeypatch, name):
    """An unreadable tokenizer.json of --model said "no usable tokenizer there ...; save one with save_pretrained"."""
    model = save_micro_model(tmp_path / "model")
    assert resolve_for_training(str(model)) == str(model)
    deny_file(monkeypatch, "open", model / name)
    with pytest.raises(FasttuneError) as e:
        resolve_for_training(str(model))
    assert str(e.value) == (f"--model {model}: {name} cannot be read (permission denied); make it readable "
                            f"(chmod u+r {model / name}) or pass another folder")  # fmt: skip


def _run_with_merged(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run folder (resolve's view of one): checkpoints of steps 2 and 4 with weights, and a merged model."""
    run = _run(tmp_path / "run")
    for step in (2, 4):
        _weights(_checkpoint(run, step))
    return run, run / "checkpoints" / "step-000004", _weights(_model(run / "merged"))


@pytest.mark.parametrize("what", ["checkpoint file", "checkpoint folder", "merged model"])
def test_a_run_folder_with_an_unreadable_model_stops_and_never_takes_another(tmp_path, monkeypatch, caplog, what):
    """An unreadable newest checkpoint was skipped as 'damaged' for the older one (another model), an unreadable
    merged model for the adapter; a checkpoint folder that cannot be looked into was a PermissionError."""
    run, newest, merged = _run_with_merged(tmp_path)
    (merged / "fasttune_step.json").write_text('{"step": 2}')  # older than step 4: the newest checkpoint is the model
    assert resolve(run).model_dir == newest
    if what == "merged model":
        (merged / "fasttune_step.json").write_text('{"step": 4}')
        assert resolve(run).model_dir == merged
    denied = merged if what == "merged model" else newest
    if what == "checkpoint folder":
        deny(monkeypatch, newest)
        message = f"{newest}: permission denied, the folder cannot be read; make it readable (chmod -R u+rX {newest})"
    else:
        deny_file(monkeypatch, "open", denied / "model.safetensors")
        message = f"{denied}: model.safetensors cannot be read (permission denied); make it readable"
    for call, option in ((resolve, "--checkpoint"), (resolve_for_training, "--model")):
        with pytest.raises(FasttuneError) as e:
            call(str(run))
        assert str(e.value).startswith(f"{option} {message}") and "damaged" not in str(e.value)
    assert "skipping" not in caplog.text


@pytest.mark.parametrize("what", ["model.safetensors", "trainer_state.pt", "tokenizer.json", "folder"])
def test_resume_from_an_unreadable_checkpoint_stops_naming_it_not_damaged(two_checkpoints, monkeypatch, caplog, what):
    """It was 'skipping a damaged checkpoint' and resumed from the older one (training its steps again, then
    replacing the newer checkpoint); a folder that cannot be looked into was a bare PermissionError."""
    caplog.set_level("INFO", logger="fasttune")
    cfg, result = two_checkpoints
    newest = result.checkpoint
    if what == "folder":
        deny(monkeypatch, newest)
        message = f"--resume {newest}: permission denied, the folder cannot be read; make it readable (chmod -R u+rX"
    else:
        deny_file(monkeypatch, "open", newest / what)
        message = f"--resume {newest}: {what} cannot be read (permission denied); make it readable (chmod u+r"
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=6))
    with pytest.raises(FasttuneError) as e:
        loop.train(more)
    assert str(e.value).startswith(message) and "resume again" in str(e.value) and "damaged" not in str(e.value)
    assert "skipping" not in caplog.text
    monkeypatch.undo()  # readable again: the run resumes from the newest checkpoint
    assert sorted(losses(loop.train(more).records)) == [1, 2, 3, 4, 5, 6]
    assert "step-000004 (step 4)" in caplog.text


def test_resume_with_an_unreadable_run_config_says_so_not_to_start_over(two_checkpoints, monkeypatch):
    """It said to start over with --overwrite, which deletes the run, for a permission."""
    cfg, result = two_checkpoints
    config = result.run_dir / "config.json"
    json.loads(config.read_text())
    deny_file(monkeypatch, "read_text", config)
    with pytest.raises(FasttuneError) as e:
        loop.train(dataclasses.replace(cfg, resume=True))
    assert str(e.value) == (
        f"--resume: {config} cannot be read (permission denied); make it readable (chmod u+r {config}) and resume again"
    )
