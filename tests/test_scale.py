"""Real shapes: the Llama-3.1-8B and Qwen2.5-7B presets, a model folder with only config.json (refused; random init
with --model.random-init, said loudly), the dtype auto picks for an 8B-class model, and the disk estimate of what a
run really writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from fixtures.tiny_tokenizer import build_tiny_tokenizer
from helpers import GSM8K, sft_config, tiny_config
from transformers import AutoModelForCausalLM

from fasttune.errors import ConfigError
from fasttune.model.build import preset_config
from fasttune.train import loop
from fasttune.train.estimate import GiB
from fasttune.train.footprint import disk_needed, fp32_master_fits, param_count, planned_saves


@pytest.mark.parametrize(
    "preset,billions,model_type", [("llama-3.1-8b", 8.030, "llama"), ("qwen2.5-7b", 7.616, "qwen2")]
)
def test_real_shape_presets(preset, billions, model_type):
    """The published parameter counts (Llama-3.1-8B 8.03B, Qwen2.5-7B 7.62B), built on the meta device."""
    config = preset_config(preset, vocab_size=4096)
    assert config.model_type == model_type and config.vocab_size > 100_000  # their own vocabulary, not 4096
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) < 0.005 and param_count(config) == n


def _config_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "shape-only"
    tok = build_tiny_tokenizer()
    preset_config("micro", len(tok), max_position_embeddings=512).save_pretrained(folder)  # config.json only
    tok.save_pretrained(folder)
    return folder


def test_a_folder_without_weights_is_refused_unless_random_init_is_asked_for(tmp_path, caplog, capsys):
    """A model folder with config.json and a tokenizer but no weight files (a download that stopped early) is refused
    in one line naming the folder, what is missing and the fix, before the data is read and leaving no run folder;
    --model.random-init trains its architecture from random weights, said loudly. LoRA refuses both."""
    from fasttune import cli

    folder = _config_only_folder(tmp_path)
    cfg = sft_config(tmp_path, folder, val_fraction=0.05, max_steps=2, save_every=0, eval_every=0)
    with pytest.raises(ConfigError, match=r"holds a config.json but no weight files \(no \*.safetensors, "
                                          r"pytorch_model\*.bin, \*.index.json\).*--model.random-init"):  # fmt: skip
        loop.train(cfg)
    assert not Path(cfg.output_dir).exists()  # refused before the run folder was kept

    random = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, random_init=True))
    with caplog.at_level("WARNING", logger="fasttune"):
        result = loop.train(random)
    assert "RANDOMLY INITIALISED" in caplog.text and str(folder) in caplog.text
    assert result.last_loss is not None and (result.model_dir / "model.safetensors").is_file()
    lora = dataclasses.replace(cfg, experiment="lora", lora=dataclasses.replace(cfg.lora, enabled=True),
                               output_dir=str(tmp_path / "lora"))  # fmt: skip
    with pytest.raises(ConfigError, match="no weights: LoRA would train adapters on a frozen random base"):
        loop.train(lora)  # adapters on a random frozen base: never what a user wants
    lora = dataclasses.replace(lora, model=dataclasses.replace(lora.model, random_init=True))
    with pytest.raises(ConfigError, match="model.random_init with lora.enabled would train adapters on a frozen"):
        loop.train(lora)
    argv = ["train", "--experiment", "sft", "--model", str(folder), "--data", str(GSM8K), "--max-steps", "1",
            "--output-dir", str(tmp_path / "cli")]  # fmt: skip
    capsys.readouterr()  # the command line: one line, exit 2 (its logging setup comes last: caplog)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --model {folder} holds a config.json but no weight files")
    assert "Traceback" not in "\n".join(err)
    assert "samples:" not in "\n".join(err)  # stopped before the data was tokenized


def test_random_init_ignores_the_folders_weights(tmp_path):
    """--model.random-init on a folder that has weights: its architecture, fresh weights (pre-training that shape)."""
    from helpers import save_micro_model

    from fasttune.config import ModelConfig
    from fasttune.model.build import build_model

    folder = save_micro_model(tmp_path / "m")
    vocab = len(build_tiny_tokenizer())
    saved = build_model(ModelConfig(path=str(folder)), vocab, "sdpa", torch.float32)
    fresh = build_model(ModelConfig(path=str(folder), random_init=True), vocab, "sdpa", torch.float32)
    assert type(fresh) is type(saved) and fresh.config.hidden_size == saved.config.hidden_size
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(("method", "package"), [("bitsandbytes", "bitsandbytes"), ("gptq", "optimum")])
def test_a_prequantized_model_is_refused_for_training_in_one_line(tmp_path, method, package):
    """fasttune trains full-precision weights: a bitsandbytes/GPTQ checkpoint (a QLoRA user's usual download) stops
    before training, naming it; loading it for generate/eval without its package is one line, not an ImportError."""
    import importlib.util
    import json

    from fasttune.model.load import load_for_inference

    folder = tmp_path / "quantized"
    tok = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(preset_config("micro", len(tok), max_position_embeddings=512))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    for lora in (None, {"enabled": True}):  # sft, lora
        run = sft_config(tmp_path, folder, lora=lora, val_fraction=0.05, max_steps=1)
        with pytest.raises(ConfigError, match=f"holds {method}-quantized weights.*pass the unquantized model"):
            loop.train(run)
    if importlib.util.find_spec(package) is None:
        with pytest.raises(ConfigError, match="needs a package that is not installed"):
            load_for_inference(folder, device="cpu")


def test_auto_dtype_holds_an_8b_model_in_bf16():
    llama8b = preset_config("llama-3.1-8b", 4096)
    cuda = torch.device("cuda")
    assert not fp32_master_fits(llama8b, cuda, free_bytes=139 * GiB)  # 144 GB of fp32 state alone
    assert fp32_master_fits(preset_config("1b", 32000), cuda, free_bytes=139 * GiB)
    assert fp32_master_fits(llama8b, cuda, lora=True, free_bytes=139 * GiB)  # frozen weights: no grads or moments
    assert fp32_master_fits(llama8b, torch.device("cpu"))


def test_disk_estimate_counts_what_the_run_writes():
    assert planned_saves(500, 250, True) == 2  # steps 250 and 500 (the final save is step 500's)
    assert planned_saves(20, 250, True) == 1 and planned_saves(20, 250, False) == 0
    assert planned_saves(1000, 100, True, start_step=950) == 1
    model = torch.nn.Linear(1000, 1000, bias=False).to(torch.bfloat16)  # 2 MB of bf16 weights
    one = 3 * 2_000_000  # weights + two AdamW moments in bf16
    assert disk_needed(model, keep_last=2, saves=0) == 0
    assert disk_needed(model, keep_last=2, saves=1) == int(1.02 * one + 50e6)
    assert disk_needed(model, keep_last=2, saves=10) == int(1.02 * one * 3 + 50e6)  # keep_last + 1 at once


def test_the_disk_check_of_a_lora_run_counts_the_merged_base_only_when_it_merges(tmp_path, monkeypatch):
    """The merged model is the frozen base (adapters folded in), written only under --lora.merge-on-save: a 30B MoE
    LoRA run with --lora.no-merge-on-save was refused for the 62 GB merged model it would never write."""
    import shutil

    from fasttune.errors import FasttuneError
    from fasttune.train.checkpoint import check_disk
    from fasttune.train.run_dir import RunFolder

    model = torch.nn.Linear(1000, 1000, bias=False).to(torch.bfloat16).requires_grad_(False)  # 2 MB frozen base
    model.adapter = torch.nn.Parameter(torch.zeros(1000, 2))  # 8 kB trainable in fp32
    ckpt = int(1.02 * 3 * 8000 + 50e6)  # adapter + two fp32 moments, once; plus tokenizer/filesystem slack
    run = RunFolder(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": ckpt + 1_000_000})())
    check_disk(run, model, keep_last=2, saves=1, merge=False)
    merged = r"GB more \(1 x 0.00 GB \+ the merged model, 0.00 GB\); .*pass --lora.no-merge-on-save \(keep the"
    with pytest.raises(FasttuneError, match=merged):
        check_disk(run, model, keep_last=2, saves=1, merge=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": ckpt + 2_000_000})())
    check_disk(run, model, keep_last=2, saves=1, merge=True)  # the base's 2 MB, not base + adapter


def test_weights_that_miss_layers_the_config_describes_are_refused(tmp_path):
    """A config.json asking for more layers than the weight files hold would fine-tune the extra layers from random
    values (transformers only logs a report): one error naming the missing tensors and the fix."""
    import json

    from helpers import save_micro_model

    folder = save_micro_model(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    cfg = tiny_config(tmp_path, max_steps=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(folder)))
    layer = config["num_hidden_layers"] - 1
    with pytest.raises(ConfigError, match=rf"no tensor for \d+ parameter.*model.layers.{layer}.*num_hidden_layers"):
        loop.train(cfg)
    config["num_hidden_layers"] -= 1
    config["vocab_size"] -= 50  # the embedding's rows: transformers refuses, pointing at a table it printed
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model.embed_tokens.weight is \[\d+, 64\] in the weight files but"):
        loop.train(cfg)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_the_parameter_count_of_an_moe_config_counts_every_expert(model_type):
    """The weight checks before a model is built (GPU, RAM, fp32 master weights) counted the top-k experts a token runs
    through: Mixtral about 4x too few parameters. Against the model built on the meta device."""
    from transformers import AutoConfig

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 intermediate_size=96, num_experts_per_tok=2)  # fmt: skip
    extra = {
        "mixtral": dict(num_local_experts=8),
        "qwen2_moe": dict(num_experts=6, moe_intermediate_size=48, shared_expert_intermediate_size=80),
    }
    config = AutoConfig.for_model(model_type, **shape, **extra[model_type])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())
