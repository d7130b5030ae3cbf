"""model/resolve.py: which folder a user's --checkpoint / --model path means (run folders, checkpoints, adapters)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import deny

from fasttune.cli import main
from fasttune.errors import FasttuneError
from fasttune.model.resolve import refuse_remote_code, resolve, resolve_for_training


def _model(path: Path, tokenizer: bool = True, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return path


def _weights(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, path / "model.safetensors")
    return path


def _checkpoint(run: Path, step: int, complete: bool = True, adapter_base: str | None = None) -> Path:
    ckpt = run / "checkpoints" / f"step-{step:06d}"
    if adapter_base is None:
        _model(ckpt)
    else:
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": adapter_base}))
        (ckpt / "tokenizer.json").write_text("{}")
    if complete:
        (ckpt / "trainer_state.pt").write_bytes(b"")
    return ckpt


def _run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / ".fasttune-run").write_text("")
    (path / "config.json").write_text(json.dumps({"experiment": "quick"}))  # the run's config, not a model's
    return path


def test_run_folder_means_its_latest_complete_checkpoint(tmp_path):
    run = _run(tmp_path / "run")
    _checkpoint(run, 2)
    latest = _checkpoint(run, 10)
    _checkpoint(run, 12, complete=False)  # a save in progress / killed: never used
    src = resolve(run)
    assert src.model_dir == latest and src.tokenizer_dir == latest and src.adapter_dir is None
    assert "run folder" in src.note and str(latest) in src.note
    assert resolve_for_training(str(run)) == str(latest)
    assert resolve(run / "checkpoints").model_dir == latest  # the checkpoints folder itself: the same


def test_checkpoint_and_model_folders_are_taken_as_given(tmp_path):
    model = _model(tmp_path / "m")
    assert resolve(model).model_dir == model and resolve(model).note is None
    assert resolve_for_training(str(model)) == str(model)


def test_lora_run_uses_merged_model_when_present(tmp_path):
    base = _model(tmp_path / "base")
    run = _run(tmp_path / "lora")
    _checkpoint(run, 4, adapter_base=str(base))
    merged = _weights(_model(run / "merged"))
    src = resolve(run)
    assert src.model_dir == merged and src.adapter_dir is None and "merged" in src.note


def test_a_merged_model_older_than_the_latest_checkpoint_or_damaged_is_passed_over(tmp_path, caplog):
    """A LoRA run resumed past its merged model and stopped before it merged again: its newest checkpoint is the
    model. So is a merged folder without loadable weights (an older fasttune cut by a full disk)."""
    from fasttune.model.resolve import MERGED_STEP

    base = _model(tmp_path / "base")
    run = _run(tmp_path / "lora")
    _checkpoint(run, 10, adapter_base=str(base))
    merged = _weights(_model(run / "merged"))
    (merged / MERGED_STEP).write_text('{"step": 10}')
    src = resolve(run)
    assert src.model_dir == merged and "(step 10)" in src.note
    newer = _checkpoint(run, 31, adapter_base=str(base))  # resumed, stopped at step 31
    src = resolve(run)
    assert src.adapter_dir == newer and "its merged model" in src.note and "of step 10" in src.note
    (merged / MERGED_STEP).unlink()  # a run from before the step was recorded: its merged model as before
    assert resolve(run).model_dir == merged
    (merged / "model.safetensors").write_bytes(b"cut")
    with caplog.at_level("WARNING"):
        assert resolve(run).adapter_dir == newer
    assert "skipping the run's merged model" in caplog.text


def test_lora_run_without_merged_is_base_plus_latest_adapter(tmp_path):
    base = _model(tmp_path / "base")
    run = _run(tmp_path / "lora")
    ckpt = _checkpoint(run, 4, adapter_base=str(base))
    src = resolve(run)
    assert src.model_dir == base and src.adapter_dir == ckpt and src.tokenizer_dir == ckpt
    with pytest.raises(FasttuneError, match="is a LoRA adapter, not a full model; pass its run's merged model"):
        resolve_for_training(str(run))


def test_adapter_with_a_relative_base_path_is_found_from_another_directory(tmp_path, monkeypatch):
    base = _model(tmp_path / "work" / "base")
    adapter = tmp_path / "work" / "runs" / "lora" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    monkeypatch.chdir(tmp_path)  # not the folder training ran in
    src = resolve(adapter)
    assert src.model_dir.resolve() == base.resolve() and src.tokenizer_dir.resolve() == base.resolve()


def test_adapter_whose_base_is_missing_names_the_file_and_fix(tmp_path):
    """A base recorded by its absolute path (as fasttune and peft record it) that is gone was "not found from here;
    ... or run from the folder training ran in": no folder finds an absolute path. Its run's merged model needs no
    base, and is named where there is one."""
    run = _run(tmp_path / "run")
    (adapter := run / "adapter").mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base"}))
    gone = (f"{adapter / 'adapter_config.json'}: base model /nowhere/base is gone (moved or deleted); put it back, or "
            "set base_model_name_or_path in that file to where it is now")  # fmt: skip
    with pytest.raises(FasttuneError) as e:
        resolve(adapter)
    assert str(e.value) == gone
    _weights(_model(run / "merged"))
    with pytest.raises(FasttuneError) as e:
        resolve(adapter)
    assert str(e.value) == f"{gone}; or pass the run's merged model {run / 'merged'}, which needs no base model"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    with pytest.raises(FasttuneError, match=r"base model 'base' not found from here; .*run from the folder training"):
        resolve(adapter)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("empty_run", "this run folder has no complete checkpoint yet"),
        ("no_tokenizer", "no tokenizer in this folder; save one there with tokenizer.save_pretrained"),
        ("random", "not a model folder .* a LoRA adapter .* or a fasttune run folder"),
        ("missing", "no such folder"),
    ],
)
def test_bad_folders_are_one_line_with_the_fix(tmp_path, layout, message):
    path = tmp_path / "x"
    if layout == "empty_run":
        _run(path)
    elif layout == "no_tokenizer":
        _model(path, tokenizer=False)
    elif layout == "random":
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    with pytest.raises(FasttuneError, match=message):
        resolve(path)


@pytest.mark.parametrize("layout", ["model", "run"])
def test_a_folder_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch, capsys, layout):
    """chmod 000 on --model / --checkpoint: Python 3.11's Path.is_file raised PermissionError (a traceback)."""
    path = _model(tmp_path / "x") if layout == "model" else _run(tmp_path / "x")
    deny(monkeypatch, path)
    for call, option in ((resolve, "--checkpoint"), (resolve_for_training, "--model")):
        with pytest.raises(FasttuneError, match=f"^{option} {path}: permission denied; .*chmod -R u\\+rX {path}"):
            call(str(path))
    assert main(["generate", "--checkpoint", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --checkpoint {path}: permission denied") and err.count("\n") == 1


def test_remote_code_model_is_refused_with_the_flag_never_a_prompt(tmp_path, monkeypatch, capsys):
    model = _model(tmp_path / "custom", model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "m.MyLM"})
    (model / "m.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(FasttuneError, match="m.MyLM .* pass --trust-remote-code"):
        refuse_remote_code(model, False, "--trust-remote-code")

    def no_prompt(*a):
        raise AssertionError("asked on the terminal")

    monkeypatch.setattr("builtins.input", no_prompt)
    rc = main(["generate", "--checkpoint", str(model), "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "--trust-remote-code" in err[-1]


def test_a_known_architecture_with_auto_map_needs_no_remote_code(tmp_path):
    model = _model(tmp_path / "m", auto_map={"AutoModelForCausalLM": "m.MyLM"})  # model_type llama: transformers' own
    refuse_remote_code(model, False, "--trust-remote-code")


def test_a_tokenizer_needing_remote_code_is_refused_with_the_flag(tmp_path, monkeypatch, capsys):
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    folder = _model(tmp_path / "m", vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    build_tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tok.MyTok", None]}, tokenizer_class="MyTok")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tok.py").write_text("raise SystemExit('custom code ran')\n")
    monkeypatch.setattr("builtins.input", lambda *a: (_ for _ in ()).throw(AssertionError("asked on the terminal")))
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "hi"]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
