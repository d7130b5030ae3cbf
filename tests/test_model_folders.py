"""Model folders given to generate and train: a LoRA adapter or a LoRA run folder loads as peft does, an adapter is
refused as a model to train from, a damaged or unreadable folder is one line naming the file, and architectures
without sdpa attention or without a causal LM class. References: plain HF / peft on the same files."""

import json
from pathlib import Path

import pytest
import torch
from fixtures.tiny_tokenizer import build_tiny_tokenizer
from helpers import GSM8K, deny_file, save_base_model, train_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main
from fasttune.data.sft import format_prompt
from fasttune.errors import FasttuneError


def test_lora_adapter_and_lora_run_folder_load_like_peft(tmp_path, capsys):
    from peft import PeftModel

    base = save_base_model(tmp_path / "base")
    result = train_tiny(tmp_path / "l", base, enabled=True, rank=4, alpha=8, merge_on_save=False)
    capsys.readouterr()
    run = result.run_dir
    ids = AutoTokenizer.from_pretrained(run / "adapter")(format_prompt({"instruction": "Hi"}, "alpaca"))["input_ids"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()
    want = peft_model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    want_text = AutoTokenizer.from_pretrained(base).decode(want[0, len(ids) :], skip_special_tokens=True)
    for target in (run, run / "adapter"):
        assert main(["generate", "--checkpoint", str(target), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
        out, err = capsys.readouterr()
        assert out == want_text + "\n" and f"on base model {base}" in err
    from fasttune.model.load import load_for_inference

    probe = torch.tensor([ids])
    with torch.no_grad():
        want_logits, base_logits = peft_model(probe).logits, AutoModelForCausalLM.from_pretrained(base)(probe).logits
        got = load_for_inference(run)[0](probe).logits
    torch.testing.assert_close(got, want_logits, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, base_logits)  # the adapter is applied


def test_training_refuses_a_lora_adapter_as_model_with_the_fix(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path)}))
    with pytest.raises(FasttuneError, match="is a LoRA adapter, not a full model"):
        train_tiny(tmp_path / "t", adapter)


def _damaged_copies(tmp_path, source: Path) -> tuple[Path, Path]:
    """Two copies of a model folder: weights cut short (an interrupted copy), config.json no longer JSON."""
    import shutil

    cut, bad_config = tmp_path / "cut", tmp_path / "bad_config"
    for folder in (cut, bad_config):
        shutil.copytree(source, folder)
    (cut / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:1000])
    (bad_config / "config.json").write_text('{"model_type": "llama",')
    return cut, bad_config


def test_a_damaged_model_folder_is_one_line_naming_the_file(tmp_path, capsys):
    """Training and generation name what is wrong (the weights, config.json; never the tokenizer) in one line."""
    from helpers import save_micro_model

    cut, bad_config = _damaged_copies(tmp_path, save_micro_model(tmp_path / "model"))
    for folder, what in ((cut, "the model cannot be loaded (SafetensorError"), (bad_config, "config.json cannot be")):
        train = ["train", "--experiment", "sft", "--model", str(folder), "--data", str(GSM8K), "--max-steps", "1",
                 "--output-dir", str(tmp_path / f"run-{folder.name}"), "--training.device", "cpu"]  # fmt: skip
        for argv, option in (
            (train, "--model"),
            (["generate", "--checkpoint", str(folder), "--prompt", "a"], "--checkpoint"),
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()  # the log, then the error line
            assert err.splitlines()[-1].startswith(f"error: {option} {folder}: {what}"), err
            assert "Traceback" not in err and "tokenizer" not in err.splitlines()[-1]


def test_an_unreadable_weights_file_is_named_as_a_permission_problem_not_as_damage(tmp_path, monkeypatch):
    """safetensors reports a file it may not open as 'No such file or directory': the message said the folder was
    damaged and to copy it again."""
    from helpers import save_micro_model

    from fasttune.model.build import load_weights_error

    model = save_micro_model(tmp_path / "model")
    weights = model / "model.safetensors"
    error = FileNotFoundError(f"No such file or directory: {weights}")  # what safetensors raises for chmod 000
    assert "incomplete or damaged" in str(load_weights_error(model, error))  # readable: it is damaged (or gone)
    deny_file(monkeypatch, "open", weights)
    assert str(load_weights_error(model, error, "--checkpoint")) == (
        f"--checkpoint {model}: model.safetensors cannot be read (permission denied); make it readable "
        f"(chmod u+r {weights}) or pass another folder"
    )


def test_models_without_sdpa_or_without_a_causal_lm_class(tmp_path, capsys):
    """Bloom has no sdpa attention: inference falls back to eager (the sample after training included). T5 is no
    causal LM: one line saying so, not that its files are damaged."""
    from transformers import BloomConfig, T5Config, T5ForConditionalGeneration

    tok = build_tiny_tokenizer()
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    bloom = BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4, **ids)
    AutoModelForCausalLM.from_config(bloom).save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    argv = ["train", "--experiment", "sft", "--model", str(tmp_path / "bloom"), "--data", str(GSM8K),
            "--max-steps", "1", "--output-dir", str(tmp_path / "run"), "--data.max-length", "256",
            "--generation.max-new-tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "sample (" in out and "no sample generated" not in err
    t5 = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    assert main(["generate", "--checkpoint", str(tmp_path / "t5"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "T5Config" in err and "models that AutoModelForCausalLM loads" in err and "damaged" not in err


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_with_tokens_the_model_has_no_embedding_for_says_they_stay_frozen_and_how_peft_loads_it(
    tmp_path, caplog, recwarn
):
    """A tokenizer with added tokens (a TRL user's new special tokens): the resized rows are frozen under LoRA, so
    the run cannot learn them, and nothing said so; peft's own warning came with a site-packages path at the end.
    The warning's recipe for plain peft (resize the base first) gives merged/'s logits, and the rows did not train."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base = save_base_model(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    tok.save_pretrained(base)
    caplog.set_level("WARNING", logger="fasttune")
    run = train_tiny(tmp_path / "l", base, enabled=True, rank=4, alpha=8).run_dir
    rows = AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    assert f"the 2 token(s) the tokenizer adds beyond the {rows} embeddings" in caplog.text
    assert "<tool>, </tool>) stay at their initial rows, frozen" in caplog.text
    assert f"base.resize_token_embeddings({rows + 2})" in caplog.text
    assert not [w for w in recwarn if "save_embedding_layers" in str(w.message)]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    first = load_file(run / "checkpoints" / "step-000002" / "adapter_model.safetensors")  # saved at the same step
    embed = next(k for k in saved if k.endswith("embed_tokens.weight"))
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    torch.testing.assert_close(merged.get_input_embeddings().weight[rows:], saved[embed][rows:])
    assert torch.equal(saved[embed], first[embed])
    hf = AutoModelForCausalLM.from_pretrained(base)
    hf.resize_token_embeddings(rows + 2)
    ids = torch.tensor([[5, 17, 42, rows, rows + 1, 7]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(hf, run / "adapter").eval()(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_a_config_field_of_the_wrong_type_and_a_model_without_attention_are_one_line(tmp_path, capsys):
    """A config.json whose max_position_embeddings is null (huggingface_hub's validation error is no ValueError) and a
    Mamba model (no attention heads, which the memory plan and FLOP count read) printed tracebacks."""
    from helpers import save_micro_model
    from transformers import MambaConfig, MambaForCausalLM

    null = save_micro_model(tmp_path / "null")
    config = json.loads((null / "config.json").read_text())
    (null / "config.json").write_text(json.dumps({**config, "max_position_embeddings": None}))
    tok = build_tiny_tokenizer()
    mamba = tmp_path / "mamba"
    config = MambaConfig(vocab_size=len(tok), hidden_size=16, state_size=4, num_hidden_layers=1)
    MambaForCausalLM(config).save_pretrained(mamba)
    tok.save_pretrained(mamba)
    for folder, what in ((null, "config.json cannot be used (Validation error for field 'max_position_embeddings'"),
                         (mamba, "MambaConfig has no attention layers")):  # fmt: skip
        argv = ["train", "--experiment", "sft", "--model", str(folder), "--data", str(GSM8K), "--max-steps", "1",
                "--output-dir", str(tmp_path / f"run-{folder.name}")]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith(f"error: --model {folder}: {what}"), err
        assert "Traceback" not in err
    assert main(["generate", "--checkpoint", str(null), "--prompt", "a"]) == 2
    assert "config.json cannot be used" in capsys.readouterr().err.strip().splitlines()[-1]
