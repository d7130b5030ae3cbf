"""LoRA on MoE models whose experts transformers 5 fuses into 3-D parameters (`mlp.experts.gate_up_proj`, `down_proj`).

The Llama-style targets (gate_proj, up_proj, down_proj) adapt the fused parameters themselves on every family
(`target_parameters`: nested `lora.ParamWrapper`s on the experts module), as peft's own conversion does on some of
them (Qwen3-Next, DeepSeek-V3), and the linear layers so named beside them (shared experts, dense MLPs) as transformers
4 did, through their weights (peft's conversion would move them onto the fused experts).
merged/ must hold every tensor of the base, those adapters merged in, and load with plain `from_pretrained` to the
logits of the trained peft model; adapter/ must load with plain peft to the same logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import GSM8K, TINY_MODELS, save_tiny_model, sft_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fasttune import cli
from fasttune.config.base_config import LoraConfig
from fasttune.model.lora import (
    _check_fused_ranks,
    _say_moe_targets,
    apply_lora,
    merged_state_dict,
    save_lora,
    set_fast_forward,
)

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402

MOE = [t for t in TINY_MODELS if t != "gpt_neox"]
BESIDE = ("qwen2_moe", "qwen3_next", "deepseek_v3")  # linear layers named gate/up/down_proj beside the fused experts
MLP = ("gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained(base_dir, **lora):
    """A peft model of the base at `base_dir` (fasttune's LoRA, default targets unless `lora` says) after 3 AdamW
    steps, in eval mode."""
    cfg = LoraConfig(enabled=True, rank=RANK, alpha=ALPHA, **lora)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("model_type", MOE)
def test_merged_and_adapter_of_an_moe_model_load_in_plain_transformers_and_peft_to_the_trained_logits(
    tmp_path, model_type
):
    """Before, Qwen3-Next's merged/ had no expert tensors (the fused experts' adapters were neither merged nor named
    as the base names them) and did not load, and the other families' experts got no adapter (their merged experts
    were the base's); now every family's experts train, and so do the shared experts' and dense MLPs' linear layers
    (Qwen3-Next's and DeepSeek-V3's stayed frozen), merged/ holds the base's tensors under the base files' names, and
    both folders give the trained model's logits."""
    base_dir = save_tiny_model(tmp_path / "base", model_type)
    model = _trained(base_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, _logits(AutoModelForCausalLM.from_pretrained(base_dir).eval(), ids))
    save_lora(model, tmp_path / "adapter", tmp_path / "merged")

    assert (
        load_file(tmp_path / "merged" / "model.safetensors").keys() == load_file(base_dir / "model.safetensors").keys()
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    want = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    assert merged.state_dict().keys() == want.keys()
    experts = [k for k, v in want.items() if v.dim() == 3 and k.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")]
    dense = model.config.get_text_config().to_dict().get("first_k_dense_replace", 0)  # DeepSeek's dense layer 0
    assert len(experts) == 2 * (model.config.num_hidden_layers - dense)
    beside = [k for k, v in want.items() if v.dim() == 2 and k.split(".")[-2] in MLP]  # shared experts, dense MLPs
    assert bool(beside) == (model_type in BESIDE)
    assert not [k for k in experts + beside if torch.equal(merged.state_dict()[k], want[k])]  # every one trained
    torch.testing.assert_close(_logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)

    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded.eval(), ids), adapted, rtol=1e-5, atol=1e-5)

    # FSDP2 hands the merge the model's full state dict (PeftModel names) instead of the modules' own tensors
    ours, gathered = merged_state_dict(model), merged_state_dict(model, dict(model.state_dict()))
    assert ours.keys() == gathered.keys() and all(torch.equal(ours[k], gathered[k]) for k in ours)


@pytest.mark.parametrize("model_type", MOE)
def test_fused_experts_get_adapters_of_the_intended_rank_without_a_warning_and_so_do_the_linear_layers_beside_them(
    model_type, tmp_path, caplog
):
    """The gate and up adapters are fused as their weights are: one adapter of twice the rank and twice the alpha
    (the same scaling) on gate_up_proj, rank r on down_proj, through rank_pattern / alpha_pattern keys that peft's
    own check says matched nothing (it reads the module's name, not the parameter's): applied all the same, as the
    adapter shapes show, so that warning is not shown. The linear layers named gate/up/down_proj beside them (shared
    experts, DeepSeek's dense MLP) get rank r adapters through their weights, run by fasttune's fast forward: before,
    on Qwen3-Next and DeepSeek-V3, peft moved those targets onto the fused experts and left them frozen."""
    base = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "base", model_type))
    caplog.set_level("INFO", logger="fasttune")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(base, LoraConfig(enabled=True, rank=RANK, alpha=ALPHA))
    assert not [w for w in caught if "pattern keys did not match" in str(w.message)]
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper) and m.parameter_name != "weight"]
    assert {m.parameter_name for m in wrappers} == {"gate_up_proj", "down_proj"}
    for m in wrappers:
        experts, r = m.num_experts, RANK * (2 if m.parameter_name == "gate_up_proj" else 1)
        assert m.r["default"] == r and m.scaling["default"] == ALPHA / RANK
        assert m.lora_A["default"].weight.shape[0] == r * experts == m.lora_B["default"].weight.shape[1]
    assert "peft gave the fused experts" not in caplog.text
    assert f"fused down_proj, gate_up_proj in place ({len(wrappers)} tensors" in caplog.text
    beside = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in MLP]
    assert bool(beside) == (model_type in BESIDE)
    for m in beside:
        assert isinstance(m, ParamWrapper) and m.parameter_name == "weight" and m.num_experts == 1
        assert m.r["default"] == RANK and m.scaling["default"] == ALPHA / RANK and "forward" in m.__dict__
    layers = "; and the linear layers named gate_proj, up_proj, down_proj (shared experts, dense MLPs) through their"
    assert (layers in caplog.text) == bool(beside)
    assert "dense MLPs) stay frozen" not in caplog.text and "gave no adapter" not in caplog.text  # the log said so
    model.peft_config["default"].rank_pattern[r".*\.gate_up_proj"] = 3  # what a peft that ignored it would hold
    _check_fused_ranks(model)
    assert "rank 8 and alpha 16, not the 3 and 16 of its own MoE conversion" in caplog.text


def test_a_linear_layer_the_targets_name_that_peft_left_without_an_adapter_is_named(tmp_path, caplog):
    """peft 0.21 moves linear-layer targets onto fused experts on some families; should a peft version leave any
    linear layer the targets name without an adapter again, the log says which (here: k_proj, not given to peft)."""
    base = save_tiny_model(tmp_path / "base", "qwen2_moe")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(enabled=True, targets=("q_proj",)))
    caplog.set_level("INFO", logger="fasttune")
    _say_moe_targets(model, ["q_proj", "k_proj"], [], {})
    assert f"LoRA: peft {peft.__version__} gave no adapter to some linear layers named k_proj: they stay" in caplog.text
    assert "q_proj" not in caplog.text


def test_the_fast_forward_of_a_linear_layer_adapted_through_its_weight_equals_peft(tmp_path):
    """DeepSeek-V3's dense MLP and shared experts (lora.ParamWrapper on a linear weight): fasttune's forward gives
    peft's outputs and adapter gradients, without building the layer's weight plus delta."""
    base = save_tiny_model(tmp_path / "base", "deepseek_v3")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(enabled=True, rank=RANK, alpha=ALPHA))
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the adapters would add nothing
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    runs = []
    for fast in (True, False):
        # 2 layers x q, o, gate, up, down (dense MLP, then the shared expert), and the MoE layer's fused experts
        assert set_fast_forward(model, enabled=fast) == (2 * (2 + 3) + 1 if fast else 0)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "mlp" in n and p.grad is not None}
        runs.append((loss.detach(), grads))
    (fast_loss, fast_grads), (peft_loss, peft_grads) = runs
    assert len(fast_grads) == 2 * 2 * 3 + 2 * 2  # A and B of 6 linear layers and of 2 fused experts tensors
    torch.testing.assert_close(fast_loss, peft_loss, rtol=1e-6, atol=1e-6)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("model_type", "named"), [("qwen3_next", "gate_proj"), ("deepseek_v3", "up_proj")])
def test_gate_proj_or_up_proj_alone_adapts_the_linear_layers_so_named_and_leaves_gate_up_proj_frozen(
    tmp_path, capsys, model_type, named
):
    """peft (0.21) ended `--lora.targets gate_proj` (or up_proj) on Qwen3-Next and DeepSeek-V3 in its ValueError
    traceback: it moved the name onto the fused experts' gate_up_proj, which holds up_proj too. Now the run trains
    the linear layers so named (shared experts, dense MLP) and nothing else, and one log line says gate_up_proj stays
    frozen and how to adapt it."""
    base = save_tiny_model(tmp_path / "base", model_type)
    code = cli.main(["train", "--experiment", "lora", "--model", str(base), "--data", str(GSM8K), "--max-steps", "2",
                     "--training.eval-every", "0", "--data.max-length", "128", "--output-dir", str(tmp_path / "run"),
                     "--lora.targets", named])  # fmt: skip
    printed = "".join(capsys.readouterr())
    assert code == 0 and "Traceback" not in printed, printed
    assert (f"LoRA: the MoE experts' fused gate_up_proj holds gate_proj and up_proj; --lora.targets names {named} "
            f"alone, so it stays frozen (name both to adapt it); adapting the linear layers named {named} (shared "
            "experts, dense MLPs) through their weights") in printed  # fmt: skip
    want = AutoModelForCausalLM.from_pretrained(base).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").state_dict()
    trained = {k for k in want if not torch.equal(merged[k], want[k])}
    assert trained and trained == {k for k in want if k.split(".")[-2] == named}


@pytest.mark.parametrize(
    ("model_type", "options", "expected"),
    [
        ("qwen3_moe", ["--lora.targets", "gate_proj"], "error: --lora.targets (gate_proj) match no linear layer of "
         "this model; its linear layers are named: k_proj, o_proj, q_proj, v_proj; pass some of them, or all-linear; "
         "its MoE experts' fused gate_up_proj holds gate_proj and up_proj: name both to adapt it"),
        ("deepseek_v3", ["--lora.targets", "gate_proj", "--lora.dropout", "0.1"], "error: --lora.dropout=0.1: peft's "
         "adapters on parameters (the weights of the linear layers named gate_proj) take no dropout; pass "
         "--lora.dropout 0"),
    ],
)  # fmt: skip
def test_targets_that_adapt_no_layer_or_cannot_take_dropout_are_refused_in_one_line(
    tmp_path, capsys, model_type, options, expected
):
    """gate_proj alone names no linear layer of Qwen3-MoE, only half of its fused gate_up_proj: the error says so;
    dropout on adapters through weights is refused before peft's ValueError traceback."""
    base = save_tiny_model(tmp_path / "base", model_type)
    code = cli.main(["train", "--experiment", "lora", "--model", str(base), "--data", str(GSM8K), "--max-steps", "2",
                     "--output-dir", str(tmp_path / "run"), *options])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(expected), err


def test_without_target_parameters_the_experts_stay_frozen_and_dropout_on_them_is_refused(
    tmp_path, caplog, monkeypatch
):
    """A peft without `target_parameters` (older than 0.17) adapts the linear layers as before and says the experts
    stay frozen; peft's adapters on fused parameters take no dropout: refused in one line naming the option."""
    from fasttune.errors import FasttuneError

    base_dir = save_tiny_model(tmp_path / "base", "qwen3_moe")
    with pytest.raises(FasttuneError, match=r"lora.dropout=0.1: .* pass --lora.dropout 0"):
        apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(enabled=True, dropout=0.1))
    fields = {k: v for k, v in peft.LoraConfig.__dataclass_fields__.items() if k != "target_parameters"}
    monkeypatch.setattr(peft.LoraConfig, "__dataclass_fields__", fields)
    caplog.set_level("INFO", logger="fasttune")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(enabled=True, rank=RANK))
    assert not [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    assert "the MoE experts' fused down_proj, gate_up_proj stay frozen" in caplog.text


def test_a_lora_run_of_qwen3_next_writes_a_merged_model_and_an_adapter_that_generate(tmp_path, recwarn):
    """The run's own end: merged/ (gathered by wrap_up) loads for inference, as its sample and `fasttune generate
    --checkpoint RUN` load it (before, that load failed on the 4 expert tensors merged/ lacked), and adapter/ loads
    through peft's own merge (`--checkpoint RUN/adapter`) to the same logits, without peft's warnings."""
    from fasttune.generate.generate import generate
    from fasttune.model.load import load_for_inference
    from fasttune.train import loop

    base = save_tiny_model(tmp_path / "base", "qwen3_next")
    cfg = sft_config(tmp_path, base, lora=dict(enabled=True, rank=RANK, alpha=ALPHA), max_steps=2, save_every=2,
                     eval_every=0, warmup_steps=1)  # fmt: skip
    result = loop.train(cfg)
    assert result.model_dir == result.run_dir / "merged"
    model, tok = load_for_inference(result.run_dir, "cpu")
    assert generate(model, tok, "Hello", max_new_tokens=4, temperature=0.0).text is not None
    recwarn.clear()
    adapter, _ = load_for_inference(result.run_dir / "adapter", "cpu")
    assert not [str(w.message) for w in recwarn if "peft" in w.filename]
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    trained = _logits(model, ids)
    assert not torch.allclose(trained, _logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids))
    torch.testing.assert_close(_logits(adapter, ids), trained, rtol=1e-5, atol=1e-5)
