"""Fine-tuning a local HF model: SFT on a real GSM8K slice (Alpaca format), LoRA that saves and reloads."""

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch
from helpers import GSM8K, copy_of_run, losses, save_micro_model, sft_config, tiny_config, train_fresh
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.errors import ConfigError
from fasttune.train import loop


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A micro Llama with a tokenizer, saved like any local HF model folder."""
    return save_micro_model(tmp_path_factory.mktemp("base") / "model")


def _sft_config(tmp_path, model_path, **lora):
    return sft_config(tmp_path, model_path, lora=lora, max_steps=4, save_every=2, eval_every=2)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_model):
    """The result of _sft_config's 4 steps of sft from base_model, trained once for the tests that read it."""
    return train_fresh(_sft_config(tmp_path_factory.mktemp("sft"), base_model))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model):
    """(config, result) of _sft_config's 4 steps of LoRA (rank 4, alpha 8) from base_model, checkpoints at steps 2
    and 4, trained once: tests read it, or resume their own copy (copy_of_run)."""
    cfg = _sft_config(tmp_path_factory.mktemp("lora"), base_model, enabled=True, rank=4, alpha=8)
    return cfg, train_fresh(cfg)


def test_sft_smoke_on_gsm8k_slice(sft_run, base_model):
    result = sft_run
    assert result.last_val_loss < result.first_val_loss
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(result.model_dir).chat_template is not None


def test_lora_smoke_saves_reloads_and_merges(lora_run, base_model):
    from peft import PeftModel

    _, result = lora_run
    run = result.run_dir
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), run / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(base_model).eval()
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        a, m, b = adapted(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, b)  # the adapters learned something


def test_lora_resume_continues(lora_run, tmp_path):
    cfg, first = copy_of_run(lora_run, tmp_path)
    longer = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=6))
    resumed = loop.train(longer)
    assert [r["step"] for r in resumed.records if r.get("loss") is not None][-1] == 6
    assert first.checkpoint.name == "step-000004"


def test_resume_of_a_finished_lora_run_ends_at_once_unless_its_adapter_is_of_an_earlier_step(
    lora_run, tmp_path, monkeypatch, caplog
):
    """A finished LoRA run resumed as it was ends before its data is read or its model built, naming its checkpoint,
    adapter and merged model; one whose adapter/ is of an earlier step (a resume killed after its last checkpoint,
    before its end wrote adapter/), or records none (an older fasttune), goes on to write it."""
    from fasttune.model.resolve import MERGED_STEP

    cfg, first = copy_of_run(lora_run, tmp_path)
    run, step = first.run_dir, first.run_dir / "checkpoints" / "step-000004"
    caplog.set_level("INFO", logger="fasttune")

    def never(*_a, **_k):
        raise AssertionError("the resume of a finished run read its data or built its model")

    monkeypatch.setattr(loop, "build_data", never)
    monkeypatch.setattr(loop, "prepare_model", never)
    result = loop.train(dataclasses.replace(cfg, resume=True))
    assert (result.steps, result.checkpoint, result.model_dir) == (4, step, run / "merged")
    assert (f"already complete (step 4 of training.max_steps=4); its final checkpoint is {step}, its adapter "
            f"{run / 'adapter'}, its merged model {run / 'merged'}; to train further") in caplog.text  # fmt: skip
    monkeypatch.undo()
    (run / "adapter" / MERGED_STEP).write_text('{"step": 2}')
    loop.train(dataclasses.replace(cfg, resume=True))
    assert json.loads((run / "adapter" / MERGED_STEP).read_text()) == {"step": 4}


def test_max_length_beyond_model_context_is_clear(tmp_path, base_model):
    cfg = _sft_config(tmp_path, base_model)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=1024))
    with pytest.raises(ConfigError, match="exceeds the context .*max_position_embeddings=512"):
        loop.train(cfg)


def test_sample_prompt_is_a_held_out_question_for_supervised_data(tmp_path, base_model):
    from fasttune.config import GenerationConfig

    cfg = dataclasses.replace(_sft_config(tmp_path, base_model), generation=GenerationConfig())  # default prompt
    result = loop.train(cfg)
    assert result.sample_prompt.startswith("### Instruction:\n") and result.sample_prompt.endswith("### Response:\n")


def test_sample_prompt_comes_from_the_users_data_with_nothing_held_out_and_for_text(tmp_path, base_model):
    """With no validation samples the prompt is a trained sample's question, and for a user's text file its first
    words: both fell back to "def ", the embedded Python corpus's prompt."""
    from fasttune.config import GenerationConfig

    cfg = dataclasses.replace(_sft_config(tmp_path, base_model), generation=GenerationConfig())
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0))
    assert loop.train(cfg).sample_prompt.startswith("### Instruction:\n")
    text = tmp_path / "story.txt"
    text.write_text("Natalia sold clips to her friends in April and then in May. " * 20)
    cfg = dataclasses.replace(
        cfg, output_dir=str(tmp_path / "text"), data=dataclasses.replace(cfg.data, path=str(text))
    )
    assert loop.train(cfg).sample_prompt.startswith("Natalia sold")


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_models_without_intermediate_size_fine_tune(tmp_path, kind):
    """GPT-2 (n_inner, default 4 x hidden) and OPT (ffn_dim) name their MLP width differently from Llama: the planner
    and the FLOP count read it, and the run trains and saves a model plain HF loads."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from transformers import GPT2Config, OPTConfig

    from fasttune.model.flops import dense_flops_per_token

    tok = build_tiny_tokenizer()
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
        mlp = 2 * 32 * 128  # c_fc, c_proj at 4 x hidden
    else:
        config = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           ffn_dim=48, max_position_embeddings=512, word_embed_proj_dim=32, **ids)  # fmt: skip
        mlp = 2 * 32 * 48  # fc1, fc2
    want = 2 * 3 * (2 * (4 * 32 * 32 + mlp) + 32 * len(tok))  # q, k, v, o + MLP per layer, and the head
    assert dense_flops_per_token(config) == want
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    result = loop.train(_sft_config(tmp_path / "run", tmp_path / "model"))
    assert result.last_val_loss < result.first_val_loss
    assert type(AutoModelForCausalLM.from_pretrained(result.model_dir)).__name__.lower().startswith(kind)


def test_checkpoints_stop_generation_at_the_eos_training_taught(sft_run, tmp_path, base_model):
    """Every training sample ends with the tokenizer's EOS. A preset model takes the tokenizer's special-token ids
    (transformers' LlamaConfig defaults, bos 1 / eos 2, name other tokens); a pretrained model whose generation config
    stops elsewhere (the micro model's: eos 2) gets the tokenizer's EOS added, its own kept."""
    from transformers import GenerationConfig

    from fasttune.generate.generate import stop_ids

    assert GenerationConfig.from_pretrained(base_model).eos_token_id == 2  # the input model's own, not the tokenizer's
    result = sft_run
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    gen = GenerationConfig.from_pretrained(result.model_dir)
    assert gen.eos_token_id == [2, tok.eos_token_id]
    assert tok.eos_token_id in stop_ids(AutoModelForCausalLM.from_pretrained(result.model_dir), tok)

    preset = loop.train(tiny_config(tmp_path / "preset", max_steps=1, save_every=1, eval_every=0))
    tok = AutoTokenizer.from_pretrained(preset.model_dir)
    model = AutoModelForCausalLM.from_pretrained(preset.model_dir)
    for name in ("bos_token_id", "eos_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == getattr(tok, name), name
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.pad_token_id is None  # it would be the embedding's padding_idx (a row without gradient) on load
    assert stop_ids(model, tok) == [tok.eos_token_id]  # nothing else ends a reply (the old default, 2, was '!')


def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path, base_model):
    """--resume continues the same data order and split: records added to the file since would silently move
    samples between the training and validation sets, so the run stops and says what to do instead."""
    import json

    data = tmp_path / "data.json"
    records = json.loads(GSM8K.read_text())
    data.write_text(json.dumps(records))
    cfg = _sft_config(tmp_path / "run", base_model)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)),
                              training=dataclasses.replace(cfg.training, max_steps=2))  # fmt: skip
    loop.train(cfg)
    longer = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=3))
    data.write_text(json.dumps(records + records[:5]))
    with pytest.raises(ConfigError, match="--resume: the data is not what this run trained on"):
        loop.train(longer)
    data.write_text(json.dumps(records))  # restored: the run continues
    assert loop.train(longer).checkpoint.name == "step-000003"


def test_resume_takes_moved_data_when_its_content_is_the_same(tmp_path, base_model):
    """A data file moved or renamed between a run and its --resume: the run goes on when the tokenized data is the
    one it trained on (the checkpoint's fingerprint), with the losses of an uninterrupted run; an edited copy at the
    new path is refused as changed data, and a checkpoint without a fingerprint as a changed path."""
    import json

    from fasttune.train.resume import check_moved_data

    records = json.loads(GSM8K.read_text())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    cfg = _sft_config(tmp_path / "run", base_model)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)),
                              training=dataclasses.replace(cfg.training, max_steps=3))  # fmt: skip
    whole = loop.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))
    loop.train(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2)))
    moved = tmp_path / "elsewhere" / "renamed.json"
    moved.parent.mkdir()
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(records[:-3]))
    data.rename(moved)
    with pytest.raises(ConfigError, match="--resume: the data is not what this run trained on"):
        loop.train(dataclasses.replace(cfg, resume=True, data=dataclasses.replace(cfg.data, path=str(edited))))
    resumed = loop.train(dataclasses.replace(cfg, resume=True, data=dataclasses.replace(cfg.data, path=str(moved))))
    assert resumed.checkpoint.name == "step-000003"
    assert losses(resumed.records)[3] == losses(whole.records)[3]
    bundle = types.SimpleNamespace(summary=types.SimpleNamespace(fingerprint=resumed.records and "f"))
    with pytest.raises(ConfigError, match="data.path is .* but the run was started with .*data.json"):
        check_moved_data(cfg, {"data.path": str(data)}, {"state": {}}, bundle)  # a checkpoint from before fingerprints


def test_resume_after_the_project_folder_moved(tmp_path, monkeypatch, capsys):
    """config.json records --model and --data absolute: after the project folder (model, data and runs/ in it) moved,
    a bare --resume says the run's model is gone and how to go on (it said `--model /old/base: no such folder`, a
    flag never typed), and --model and --data typed again relative, as first typed, go on with the losses of an
    uninterrupted run (--model was refused as another value than the recorded absolute path)."""
    import shutil

    from fasttune.cli import main

    old, new = tmp_path / "proj", tmp_path / "moved"
    save_micro_model(old / "base")
    shutil.copy(GSM8K, old / "d.json")
    args = ["train", "--experiment", "sft", "--model", "base", "--data", "d.json", "--training.save-every", "1",
            "--training.eval-every", "0", "--output-dir"]  # fmt: skip
    monkeypatch.chdir(old)
    assert main([*args, "whole", "--max-steps", "3"]) == 0
    assert main([*args, "runs/a", "--max-steps", "2"]) == 0
    monkeypatch.chdir(tmp_path)
    old.rename(new)
    monkeypatch.chdir(new)
    capsys.readouterr()
    assert main(["train", "--output-dir", "runs/a", "--resume", "--max-steps", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume: the run's model.path {old / 'base'} and data.path {old / 'd.json'} (in runs/a/config.json) "
        "are gone: moved or renamed? pass --model and --data with where they are now (the run goes on from its "
        "checkpoint)"
    )
    assert main([*args, "runs/a", "--resume", "--max-steps", "3"]) == 0
    metrics = [json.loads(x) for x in (new / "runs/a/metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(x) for x in (new / "whole/metrics.jsonl").read_text().splitlines()]
    assert losses(metrics)[3] == losses(whole)[3]


def test_embeddings_smaller_than_the_tokenizer_are_resized_in_one_line(tmp_path, caplog):
    """A tokenizer that adds a token (Qwen2's <|endoftext|>) resizes the embeddings, and a line says so (before,
    only transformers' two lines about how new rows are initialised did)."""
    from fasttune.config import ModelConfig
    from fasttune.model.build import build_model

    path = save_micro_model(tmp_path / "model")
    vocab = AutoModelForCausalLM.from_pretrained(path).config.vocab_size
    with caplog.at_level("INFO"):
        model = build_model(ModelConfig(path=str(path)), vocab + 1, "eager", torch.float32)
    assert model.config.vocab_size == vocab + 1
    lines = [r.getMessage() for r in caplog.records if "resizing" in r.getMessage() or "initialized" in r.getMessage()]
    assert lines == [f"--model {path}: its tokenizer has {vocab + 1} tokens, its embeddings {vocab} rows: resizing "
                     f"them to {vocab + 1} (new rows start at the mean of the others; the saved model has vocab_size "
                     f"{vocab + 1})"]  # fmt: skip


def test_a_lora_adapter_of_a_model_resized_to_its_tokenizer_loads_like_its_merged_model(tmp_path):
    """Training resizes embeddings smaller than the tokenizer, and peft saves them in the adapter: loading the
    adapter folder (generate, chat, eval --checkpoint ADAPTER) must resize the base first, as training did."""
    from fasttune.model.load import load_for_inference

    path = save_micro_model(tmp_path / "model")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    model.resize_token_embeddings(len(tok) - 8)  # a model folder with fewer rows than its tokenizer has tokens
    model.save_pretrained(path)
    cfg = _sft_config(tmp_path, path, enabled=True)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2, eval_every=0))
    result = loop.train(cfg)
    adapted, _ = load_for_inference(result.run_dir / "adapter", device="cpu")
    merged, _ = load_for_inference(result.run_dir / "merged", device="cpu")
    assert adapted.get_input_embeddings().num_embeddings == len(tok)
    ids = torch.arange(len(tok) - 12, len(tok)).unsqueeze(0)  # the new rows too
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_lora_run_that_cannot_write_its_merged_model_says_so_and_resume_writes_it(tmp_path, base_model, monkeypatch):
    """adapter/ and merged/ are written whole or not at all: a full disk while merging leaves no half-written
    merged/ (which `--checkpoint RUN` would pick over the checkpoints), one line says how to finish, and --resume of
    the complete run writes it."""
    from fasttune.errors import FasttuneError
    from fasttune.model import lora
    from fasttune.model.resolve import MERGED_STEP, resolve

    cfg = _sft_config(tmp_path, base_model, enabled=True, rank=4, alpha=8)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2, eval_every=0))
    real = lora.save_merged

    def full_disk(model, out_dir, state=None):
        real(model, out_dir, state)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora, "save_merged", full_disk)
    with pytest.raises(FasttuneError, match=r"could not write the merged model .*merged \(No space left on device\); "
                       r"the checkpoints are intact.*--resume"):  # fmt: skip
        loop.train(cfg)
    run = cfg.run_dir
    assert not (run / "merged").exists() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]
    assert resolve(run).adapter_dir == run / "checkpoints" / "step-000002"  # base + the last adapter, not a half
    monkeypatch.setattr(lora, "save_merged", real)
    result = loop.train(dataclasses.replace(cfg, resume=True))  # the run is complete: only the end is redone
    assert result.model_dir == run / "merged" and (run / "merged" / MERGED_STEP).read_text().strip() == '{"step": 2}'
    assert resolve(run).model_dir == run / "merged"


def test_ctrl_c_while_merging_says_the_checkpoints_are_intact_and_resume_writes_the_same_model(
    tmp_path, base_model, monkeypatch
):
    """Ctrl-C after the last step, while merged/ is written (no longer between steps: it stops at once): no half
    merged/, exit 130 with what to do (it said only "interrupted (Ctrl-C)", as if the run were lost), and --resume
    writes the merged model an uninterrupted run writes."""
    from safetensors.torch import load_file

    from fasttune.model import lora
    from fasttune.train.signals import Interrupted

    cfg = _sft_config(tmp_path / "cut", base_model, enabled=True, rank=4, alpha=8)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2, eval_every=0))
    real = lora.save_merged

    def ctrl_c(model, out_dir, state=None):
        real(model, out_dir, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "save_merged", ctrl_c)
    with pytest.raises(Interrupted) as e:
        try:
            loop.train(cfg)
        except KeyboardInterrupt:  # not as a KeyboardInterrupt, which would end the test session
            pytest.fail("a bare KeyboardInterrupt: the CLI says only 'interrupted (Ctrl-C)'")
    run = cfg.run_dir
    assert e.value.exit_code == 130 and "\n" not in str(e.value)
    assert f"interrupted while writing the merged model {run / 'merged'} (not written)" in str(e.value)
    assert "checkpoints are intact" in str(e.value) and "--resume" in str(e.value)
    assert not (run / "merged").exists() and not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setattr(lora, "save_merged", real)
    loop.train(dataclasses.replace(cfg, resume=True))
    ref = dataclasses.replace(cfg, output_dir=str(tmp_path / "ref"))
    loop.train(ref)
    got, want = load_file(run / "merged" / "model.safetensors"), load_file(ref.run_dir / "merged" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_sigterm_while_merging_says_what_ctrl_c_says_and_exits_143(tmp_path, base_model, monkeypatch):
    """SIGTERM (a scheduler, `kill`) after the last step, while merged/ is written: the line Ctrl-C gets there and
    exit 143, not a silent death (no step is left to stop after: the default action killed the process)."""
    import os
    import signal

    from fasttune.model import lora
    from fasttune.train.signals import Interrupted

    cfg = _sft_config(tmp_path / "cut", base_model, enabled=True, rank=4, alpha=8)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2, eval_every=0))
    real = lora.save_merged

    def sigterm(model, out_dir, state=None):
        real(model, out_dir, state)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards what a scheduler also sent: still the one line

    class Killed(BaseException):
        pass

    def killed(signum, frame):  # what the default action does, without ending the test session
        raise Killed

    monkeypatch.setattr(lora, "save_merged", sigterm)
    old = signal.signal(signal.SIGTERM, killed)
    try:
        with pytest.raises(Interrupted) as e:
            try:
                loop.train(cfg)
            except Killed:
                pytest.fail("killed without a word: the default SIGTERM action")
    finally:
        signal.signal(signal.SIGTERM, old)
    run = cfg.run_dir
    assert e.value.exit_code == 143 and "\n" not in str(e.value)
    assert f"interrupted while writing the merged model {run / 'merged'} (not written)" in str(e.value)
    assert "checkpoints are intact" in str(e.value) and "--resume" in str(e.value)
    assert not (run / "merged").exists() and not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_lora_run_without_a_merged_model_gets_one_from_resume_with_merge_on_save(tmp_path, base_model):
    """--lora.no-merge-on-save only skips writing merged/; --resume with --lora.merge-on-save refused the changed
    option, so the run's adapter could never be merged by fasttune. Resuming the complete run with it writes merged/,
    which gives plain HF + peft's logits (base + adapter)."""
    from peft import PeftModel

    cfg = _sft_config(tmp_path, base_model, enabled=True, rank=4, alpha=8, merge_on_save=False)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2, eval_every=0, lr=1e-2))
    loop.train(cfg)
    run = cfg.run_dir
    assert not (run / "merged").exists()
    result = loop.train(dataclasses.replace(cfg, resume=True, lora=dataclasses.replace(cfg.lora, merge_on_save=True)))
    assert result.model_dir == run / "merged"
    ids = torch.tensor([[5, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_model)
        before = base(ids).logits
        want = PeftModel.from_pretrained(base, run / "adapter").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(run / "merged").eval()(ids).logits
    assert (want - before).abs().max() > 1e-3  # the adapter trained: merging it changes the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
