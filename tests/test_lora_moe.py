"""LoRA on MoE models whose experts transformers 5 fuses into 3-D parameters (`mlp.experts.gate_up_proj`, `down_proj`).

The Llama-style targets (gate_proj, up_proj, down_proj) adapt the fused parameters themselves on every family
(`target_parameters`: nested `lora.ParamWrapper`s on the experts module), as peft's own conversion does on some of
them (Qwen3-Next, DeepSeek-V3).
merged/ must hold every tensor of the base, those adapters merged in, and load with plain `from_pretrained` to the
logits of the trained peft model; adapter/ must load with plain peft to the same logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TINY_MODELS, save_tiny_model, sft_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fasttune.config.base_config import LoraConfig
from fasttune.model.lora import _check_fused_ranks, apply_lora, merged_state_dict, save_lora

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402

MOE = [t for t in TINY_MODELS if t != "gpt_neox"]
RANK, ALPHA = 4, 8


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained(base_dir):
    """A peft model of the base at `base_dir` (fasttune's LoRA, default targets) after 3 AdamW steps, in eval mode."""
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(enabled=True, rank=RANK, alpha=ALPHA))
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
    were the base's); now every family's experts train, merged/ holds the base's tensors under the base files'
    names, and both folders give the trained model's logits."""
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
    assert not [k for k in experts if torch.equal(merged.state_dict()[k], want[k])]  # every expert tensor trained
    torch.testing.assert_close(_logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)

    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded.eval(), ids), adapted, rtol=1e-5, atol=1e-5)

    # FSDP2 hands the merge the model's full state dict (PeftModel names) instead of the modules' own tensors
    ours, gathered = merged_state_dict(model), merged_state_dict(model, dict(model.state_dict()))
    assert ours.keys() == gathered.keys() and all(torch.equal(ours[k], gathered[k]) for k in ours)


@pytest.mark.parametrize("model_type", MOE)
def test_fused_experts_get_adapters_of_the_intended_rank_without_a_warning_and_the_layers_left_frozen_are_named(
    model_type, tmp_path, caplog
):
    """The gate and up adapters are fused as their weights are: one adapter of twice the rank and twice the alpha
    (the same scaling) on gate_up_proj, rank r on down_proj, through rank_pattern / alpha_pattern keys that peft's
    own check says matched nothing (it reads the module's name, not the parameter's): applied all the same, as the
    adapter shapes show, so that warning is not shown. On Qwen3-Next and DeepSeek-V3 peft moves the targets onto the
    fused experts, and the log says that the linear layers named gate/up/down_proj (shared experts, DeepSeek's dense
    MLP) stay frozen; Qwen2-MoE's shared expert keeps its adapters."""
    base = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "base", model_type))
    caplog.set_level("INFO", logger="fasttune")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(base, LoraConfig(enabled=True, rank=RANK, alpha=ALPHA))
    assert not [w for w in caught if "pattern keys did not match" in str(w.message)]
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert {m.parameter_name for m in wrappers} == {"gate_up_proj", "down_proj"}
    for m in wrappers:
        experts, r = m.num_experts, RANK * (2 if m.parameter_name == "gate_up_proj" else 1)
        assert m.r["default"] == r and m.scaling["default"] == ALPHA / RANK
        assert m.lora_A["default"].weight.shape[0] == r * experts == m.lora_B["default"].weight.shape[1]
    assert "peft gave the fused experts" not in caplog.text
    assert f"fused down_proj, gate_up_proj in place ({len(wrappers)} tensors" in caplog.text
    shared = {n for n, m in model.named_modules() if "shared_expert" in n and isinstance(m, torch.nn.Linear)}
    adapted = {n for n, _ in model.named_parameters() if "shared_expert" in n and "lora_" in n}
    if model_type in ("qwen3_next", "deepseek_v3"):
        assert shared and not adapted
        assert "named down_proj, gate_proj, up_proj (shared experts, dense MLPs) stay frozen" in caplog.text
    else:
        assert bool(shared) == bool(adapted) and "stay frozen" not in caplog.text
    model.peft_config["default"].rank_pattern[r".*\.gate_up_proj"] = 3  # what a peft that ignored it would hold
    _check_fused_ranks(model)
    assert "rank 8 and alpha 16, not the 3 and 16 of its own MoE conversion" in caplog.text


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
