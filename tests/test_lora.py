"""LoRA through peft: adapters train, save, reload to identical logits, and merge into a plain HF model."""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fasttune.config.base_config import LoraConfig
from fasttune.errors import FasttuneError
from fasttune.model.lora import apply_lora, linear_module_names, save_lora, set_fast_forward

peft = pytest.importorskip("peft")
# peft's own loading (PeftModel.from_pretrained in these tests) reads a deprecated transformers property
PEFT_READS_DEPRECATED = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
VOCAB = 300


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.filterwarnings(PEFT_READS_DEPRECATED)
@pytest.mark.parametrize("tie", [False, True])
def test_train_save_reload_and_merge(tmp_path, tie):
    base = tiny_llama(tie)
    base.save_pretrained(tmp_path / "base")
    cfg = LoraConfig(enabled=True, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "c_attn"))
    model = apply_lora(base, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n), "adapters must have moved"

    ids = torch.randint(0, VOCAB, (2, 12))
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(LlamaForCausalLM.from_pretrained(tmp_path / "base"), ids))
    save_lora(model, tmp_path / "adapter", tmp_path / "merged")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.equal(logits(model, ids), adapted), "saving must not change the live model"

    reloaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded.eval(), ids), adapted, rtol=0, atol=0)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)


def test_no_matching_target_lists_linear_layers():
    model = tiny_llama()
    with pytest.raises(FasttuneError, match=r"match no linear layer.*named: .*down_proj.*q_proj") as info:
        apply_lora(model, LoraConfig(targets=("c_attn", "c_proj")))
    assert "lm_head" not in str(info.value)
    assert linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("typed", [["q_proj,v_proj"], ["q_proj,", "v_proj"], ["q_proj", "v_proj"]])
def test_comma_separated_targets_on_the_command_line_are_several_names(typed):
    """`--lora.targets q_proj,v_proj`, as peft and Axolotl users write a list, was one name 'q_proj,v_proj': the run
    tokenized the data and loaded the model, then stopped saying it matches no layer while listing q_proj and v_proj."""
    from fasttune.cli import parse_train_args

    cfg = parse_train_args(["--experiment", "lora", "--model", "m", "--data", "d.jsonl", "--lora.targets", *typed])
    model = apply_lora(tiny_llama(), cfg.lora)
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


def test_the_rslora_hint_gives_peft_rsloras_scaling():
    """`--use_rslora` is answered with --lora.alpha set to alpha x sqrt(rank): that LoRA scales as peft's rsLoRA."""
    from fasttune.config.argcheck import _suggestion, option_table

    assert "--lora.alpha set to alpha x sqrt(rank)" in _suggestion("--use_rslora", option_table())
    rank, alpha = 16, 8
    ours = apply_lora(tiny_llama(), LoraConfig(rank=rank, alpha=alpha * 4, targets=("q_proj",)))  # sqrt(16) = 4
    rs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj"],
                                                           use_rslora=True))  # fmt: skip
    want = rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == want == 2.0


@pytest.mark.parametrize("typed", [",", "", " , "])
def test_targets_that_name_no_layer_are_refused_before_anything_is_loaded(typed, capsys):
    """`--lora.targets ,` (or an empty string) split into no name at all: the run tokenized the data and loaded the
    model, then stopped with 'lora.targets () match no linear layer'. Now the command line's check refuses it, naming
    the flag as typed (nothing named m or d.jsonl exists: the check comes first)."""
    import re

    from fasttune import cli

    argv = ["train", "--experiment", "lora", "--model", "m", "--data", "d.jsonl", "--lora.targets", typed]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.match(r"^error: --lora.targets=.* names no layer; .*q_proj v_proj.*all-linear", err), err


def test_default_targets_on_a_model_naming_no_layer_like_llama_adapt_all_its_linear_layers():
    """GPT-NeoX names its layers query_key_value, dense, dense_h_to_4h, dense_4h_to_h: `lora` with the default
    (Llama's) names stopped with an error for an option the user never gave; it adapts every linear layer but the
    head, as --lora.targets all-linear does."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    def neox():
        torch.manual_seed(0)
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                                num_hidden_layers=2, intermediate_size=64))  # fmt: skip

    default, every = apply_lora(neox(), LoraConfig()), apply_lora(neox(), LoraConfig(targets=("all-linear",)))
    assert sorted(default.peft_config["default"].target_modules) == linear_module_names(neox())
    assert default.peft_config["default"].target_modules == every.peft_config["default"].target_modules
    trainable = [n for n, p in default.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * 2  # lora_A and lora_B of 4 linear layers in each of 2 layers


def test_missing_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(FasttuneError, match=r"pip install 'fasttune\[lora\]'"):
        apply_lora(tiny_llama(), LoraConfig())


def test_lora_module_does_not_import_peft():
    import subprocess

    code = "import sys, fasttune.model.lora; assert 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_apply_lora_warns_nothing_and_counts_trainable_parameters(caplog, recwarn):
    """No FutureWarning from transformers (printed with a site-packages path) on a LoRA run; the trainable share is
    logged with the numbers peft counts."""
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    with caplog.at_level("INFO", logger="fasttune"):
        model = apply_lora(model, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], [str(w.message) for w in recwarn]
    # q_proj 32 -> 32 and v_proj 32 -> 16 (2 kv heads of 8), rank 4, 2 layers
    trainable = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    line = (
        f"trainable parameters: {trainable:,} of {total + trainable:,} ({100 * trainable / (total + trainable):.2f}%)"
    )
    assert line in caplog.text


@pytest.mark.filterwarnings(PEFT_READS_DEPRECATED)
def test_adapter_config_records_the_absolute_base_path(tmp_path, monkeypatch):
    """A base given relative to the working directory is recorded absolute, so the adapter loads from anywhere."""
    tiny_llama().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = apply_lora(AutoModelForCausalLM.from_pretrained("base"), LoraConfig(rank=4, targets=("q_proj",)))
    save_lora(model, tmp_path / "adapter")
    monkeypatch.chdir("/")
    config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config.base_model_name_or_path == str((tmp_path / "base").resolve())
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # base found through the path
    assert isinstance(reloaded, peft.PeftModel)


@pytest.mark.filterwarnings(PEFT_READS_DEPRECATED)
def test_a_base_inside_another_runs_checkpoints_is_named_as_prunable(tmp_path, caplog):
    """A LoRA base that is a checkpoint of a run (`--model runs/x` resolves to runs/x/checkpoints/step-N) goes when
    that run is resumed and prunes it: the adapter would lose its base, so the run says so; a plain folder is quiet."""
    from fasttune.train.run_dir import RunFolder

    run = RunFolder(tmp_path / "runs" / "x")
    step = run.checkpoints / "step-000010"
    tiny_llama().save_pretrained(step)
    run.marker.write_text("{}")
    tiny_llama().save_pretrained(tmp_path / "base")
    for base, warned in ((tmp_path / "base", False), (step, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fasttune"):
            apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(rank=4, targets=("q_proj",)))
        assert ("a checkpoint of the run" in caplog.text) is warned, caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_lora_on_cuda_holds_the_frozen_base_in_bf16(tmp_path):
    """On a GPU (dtype auto) the frozen base is bf16 and the adapters train in fp32: the merged model is bf16, the
    adapter file fp32, and a checkpoint's optimizer state covers the adapters alone."""
    import dataclasses

    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from helpers import tiny_config
    from safetensors.torch import load_file

    from fasttune.train import loop

    tok = build_tiny_tokenizer()
    tiny_llama().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = tiny_config(tmp_path, max_steps=2, eval_every=0, save_every=2, device="cuda")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tmp_path / "base")),
                              lora=dataclasses.replace(cfg.lora, enabled=True, rank=4, alpha=8))  # fmt: skip
    result = loop.train(cfg)
    assert {t.dtype for t in load_file(result.run_dir / "merged" / "model.safetensors").values()} == {torch.bfloat16}
    adapter = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    state = torch.load(result.checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) == len(adapter)


def _adapted(dtype: torch.dtype, **lora) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(fasttune's LoRA model, the same model on peft's own forward): all linear layers, rank 3, alpha 5 (a scaling
    of 5/3, not a power of two), lora_B random rather than peft's zeros so the adapters change the output."""
    model = apply_lora(tiny_llama().to(dtype), LoraConfig(rank=3, alpha=5, **lora))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ref = copy.deepcopy(model)
    assert set_fast_forward(ref, enabled=False) == 0
    return model.train(), ref.train()


def _step(model, ids: torch.Tensor, seed: int = 3):
    """Logits, loss and adapter gradients of one forward + backward."""
    torch.manual_seed(seed)  # the same dropout masks for both models
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(got, want, **tol) -> None:
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys() and got[2]
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, **tol, msg=name)


@pytest.mark.filterwarnings(PEFT_READS_DEPRECATED)  # the test's own get_peft_model
def test_fast_forward_equals_peft_in_fp32():
    """Every adapted layer of an fp32 model takes the fast forward, whose logits, loss and adapter gradients are
    peft's own forward's."""
    model, ref = _adapted(torch.float32)
    assert set_fast_forward(copy.deepcopy(model)) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    ids = torch.randint(0, VOCAB, (2, 16))
    _assert_same_step(_step(model, ids), _step(ref, ids), rtol=1e-5, atol=1e-6)
    # patched per layer, not in peft's class: a peft model built as a peft user does (the bench's HF + peft
    # baseline, in the same process) keeps peft's forward
    plain = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=3, target_modules=["q_proj"]))
    assert not [name for name, m in plain.named_modules() if "forward" in vars(m)]


class _Fp32Activations(TorchDispatchMode):
    """The fp32 tensors of at least `numel` elements ops create: activations (the adapters themselves are smaller)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.shapes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(t) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_fast_forward_on_a_bf16_base_keeps_fp32_adapters_and_makes_no_fp32_activations():
    """bf16 base, fp32 adapters (what a LoRA run on a GPU holds): close to peft's forward at bf16 precision; the
    adapters stay fp32 with fp32 gradients; no adapted layer makes an fp32 activation, where peft upcasts inputs."""
    model, ref = _adapted(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 16))
    got, want = _step(model, ids), _step(ref, ids)
    _assert_same_step(got, want, rtol=0.05, atol=0.05)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {g.dtype for g in got[2].values()} == {torch.float32}
    layers = [m for m in model.modules() if type(m) is peft.tuners.lora.Linear]
    refs = [m for m in ref.modules() if type(m) is peft.tuners.lora.Linear]
    for layer, expect_fp32 in [(m, False) for m in layers] + [(m, True) for m in refs]:
        x = torch.randn(ids.numel(), layer.in_features, dtype=torch.bfloat16)
        with _Fp32Activations(ids.numel() * 8) as seen:  # more than rank 3 (the adapters' own fp32 sizes)
            out = layer(x)
        assert out.dtype == torch.bfloat16
        assert bool(seen.shapes) == expect_fp32, seen.shapes


def test_dropout_merged_and_disabled_adapters_fall_back_to_peft():
    """States the fast forward does not compute run peft's own forward, output for output: adapter dropout in
    training (the same masks), merged adapters (the base weights already hold them), adapters disabled."""
    ids = torch.randint(0, VOCAB, (2, 16))
    model, ref = _adapted(torch.float32, dropout=0.5)
    _assert_same_step(_step(model, ids), _step(ref, ids), rtol=1e-5, atol=1e-6)
    model.eval(), ref.eval()  # dropout off: the fast forward again, still peft's result
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-6)

    model, ref = _adapted(torch.float32)
    model.eval(), ref.eval()
    with model.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=0)
    model.merge_adapter()
    ref.merge_adapter()
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=0)
    model.unmerge_adapter()
    ref.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _saved_for_backward(model):
    """Bytes of the storages autograd saves for backward inside the block (by storage, weights left out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if (ptr := t.untyped_storage().data_ptr()) not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_fast_forward_on_cuda_under_autocast_matches_peft_in_less_memory():
    """What a LoRA run on a GPU does (bf16 base, fp32 adapters, bf16 autocast): the fast forward's loss and adapter
    gradients are peft's at bf16 precision, and backward keeps less (no per-layer copies of the adapted inputs)."""
    model, ref = _adapted(torch.bfloat16)
    model, ref = model.cuda(), ref.cuda()
    ids = torch.randint(0, VOCAB, (4, 256), device="cuda")
    kept = {}
    for name, m in (("fast", model), ("peft", ref)):
        with _saved_for_backward(m) as saved, torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids)
        kept[name] = sum(saved.values())  # what backward keeps; a memory_allocated delta also counts other allocations
        out.loss.backward()
        kept[name, "grads"] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        kept[name, "loss"] = out.loss.detach()
    torch.testing.assert_close(kept["fast", "loss"], kept["peft", "loss"], rtol=0.02, atol=0.02)
    for n, g in kept["peft", "grads"].items():
        assert kept["fast", "grads"][n].dtype == torch.float32
        torch.testing.assert_close(kept["fast", "grads"][n], g, rtol=0.05, atol=0.05, msg=n)
    assert kept["fast"] < kept["peft"], kept


def test_targets_of_another_family_name_the_layers_left_frozen_and_all_linear_adapts_them(caplog):
    """Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj): the default targets adapt o_proj and down_proj only,
    which the log now says, naming the frozen ones; all-linear (peft's keyword) adapts every linear layer but the
    head."""
    import transformers as tf

    config = tf.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)  # fmt: skip
    with caplog.at_level("INFO", logger="fasttune"):
        apply_lora(tf.Phi3ForCausalLM(config), LoraConfig(rank=4))
    assert "its other linear layers stay frozen: gate_up_proj, qkv_proj" in caplog.text
    model = apply_lora(tf.Phi3ForCausalLM(config), LoraConfig(rank=4, targets=("all-linear",)))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if "lora_A" in n}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
