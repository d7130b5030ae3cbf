"""A Hub id (`--model Qwen/Qwen2.5-0.5B`, as TRL and peft take models) whose model the local Hugging Face cache holds
is read from there, downloading nothing: training, --resume with the same id, generate, and an adapter whose
base_model_name_or_path is the id. Not cached (or cached without weights): the one line saying how to fetch it. A
dataset in the cache is named, never read whole (its splits would mix). Reference: the same model from its folder."""

import json
from pathlib import Path

import pytest
import torch
from helpers import GSM8K, save_micro_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main
from fasttune.errors import FasttuneError
from fasttune.model.resolve import resolve


def _cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache that huggingface_hub reads (the user's own is never touched)."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def _cached(hub: Path, repo: str, kind: str = "models", revision: str = "0123abcd") -> Path:
    """The snapshot folder of `repo` laid out as huggingface_hub leaves it (refs/main names the snapshot)."""
    root = hub / f"{kind}--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    return root / "snapshots" / revision


def test_a_cached_hub_model_trains_resumes_and_generates_from_the_cache(tmp_path, monkeypatch, capsys):
    hub = _cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    snapshot = save_micro_model(_cached(hub, "Qwen/Tiny"))
    assert resolve("Qwen/Tiny", "--model").model_dir == snapshot
    args = ["train", "--experiment", "sft", "--model", "Qwen/Tiny", "--data", str(GSM8K), "--output-dir", "run"]
    args += ["--training.eval-every", "0"]
    assert main([*args, "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"--model Qwen/Tiny: the copy in the Hugging Face cache, {snapshot}") <= 1, err
    assert json.loads(Path("run/config.json").read_text())["model"]["path"] == str(snapshot)
    assert main([*args, "--max-steps", "2", "--resume"]) == 0, capsys.readouterr().err  # the same id: the same model
    assert "resumed from" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", "Qwen/Tiny", "--prompt", "Hi", "--max-new-tokens", "3", "--raw"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    ids = tokenizer("Hi", return_tensors="pt").input_ids
    want = AutoModelForCausalLM.from_pretrained(snapshot).generate(ids, max_new_tokens=3, do_sample=False)
    new = tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    assert capsys.readouterr().out == f"Hi{new}\n"  # --raw: the text, continued


def test_an_uncached_or_weightless_hub_id_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    hub = _cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    snapshot = _cached(hub, "Qwen/ConfigOnly")
    snapshot.mkdir(parents=True)
    save_micro_model(tmp_path / "m")
    (snapshot / "config.json").write_text((tmp_path / "m" / "config.json").read_text())  # AutoConfig's fetch alone
    for repo in ("Qwen/ConfigOnly", "Qwen/Nope"):
        assert main(["train", "--experiment", "sft", "--model", repo, "--data", str(GSM8K)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --model {repo}: no such folder") and f"`hf download {repo}" in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_cached_dataset_repo_is_named_not_read_whole(tmp_path, monkeypatch, capsys):
    hub = _cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    save_micro_model(tmp_path / "m")
    split = _cached(hub, "me/gsm", kind="datasets") / "data" / "train.json"
    split.parent.mkdir(parents=True)
    split.write_text(GSM8K.read_text())
    assert main(["train", "--experiment", "sft", "--model", "m", "--data", "me/gsm"]) == 2
    err = capsys.readouterr().err
    assert f"the Hugging Face cache holds me/gsm in {split.parent.parent}: point --data at one split's file" in err


@pytest.mark.parametrize("cached", [True, False])
def test_an_adapter_whose_base_is_a_hub_id_loads_its_base_from_the_cache(tmp_path, monkeypatch, capsys, cached):
    """peft records `base_model_name_or_path` as the Hub id the adapter was trained on."""
    from peft import LoraConfig, PeftModel, get_peft_model

    hub = _cache(tmp_path, monkeypatch)
    base = save_micro_model(_cached(hub, "Qwen/Tiny") if cached else tmp_path / "elsewhere")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "Qwen/Tiny"}))
    monkeypatch.chdir(tmp_path)
    if not cached:
        with pytest.raises(FasttuneError, match="neither a folder here nor in the Hugging Face cache.*download Qwen/"):
            resolve("adapter")
        return
    src = resolve("adapter")
    assert (src.model_dir, src.adapter_dir) == (base, Path("adapter"))
    from fasttune.model.load import load_for_inference

    probe = torch.tensor([[5, 6, 7]])
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(load_for_inference("adapter")[0](probe).logits, want(probe).logits)
