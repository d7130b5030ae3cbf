"""--resume of a full fine-tune of models whose weights transformers converts as it loads them: transformers 5 holds
an MoE layer's experts fused (`mlp.experts.gate_up_proj`, 3-D) and `save_pretrained` writes them back one per expert
(`mlp.experts.0.gate_proj.weight`, ...), as the Hub's files hold them; GPT-NeoX's head is `embed_out` in its files.
A checkpoint is loaded on resume as `from_pretrained` loads it, and the resumed run equals the uninterrupted one, also
for LoRA on the fused experts."""

import dataclasses

import pytest
import torch
from helpers import TINY_MODELS, crash_at, losses, save_tiny_model, sft_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fasttune.errors import FasttuneError
from fasttune.train import loop
from fasttune.train.checkpoint import load_weights

ONE_THREAD = {"gpt_oss"}
"""Families whose CPU training is bit-reproducible on one thread only, even uninterrupted (GPT-OSS: on 2 threads the
gradient of transformers' experts' biases differs in the last bits from one backward of a batch to the next, which
AdamW makes large in the k_proj biases, whose gradient is 0 but for rounding)."""


def _config(tmp, base):
    return sft_config(tmp, base, max_length=128, val_fraction=0.05, max_steps=4, save_every=2, eval_every=0)


@pytest.fixture
def set_threads():
    """torch.set_num_threads for one test: the thread count is put back after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("model_type", list(TINY_MODELS))
def test_a_resumed_run_equals_the_uninterrupted_one_and_its_checkpoints_load_in_plain_transformers(
    tmp_path, set_threads, model_type
):
    """Crashed at step 3 and resumed from the step-2 checkpoint: the losses and the final weights of the run that never
    stopped (before, resume stopped with "weights do not match the model": the checkpoint's per-expert tensors were
    loaded by name into the fused experts). The checkpoints hold the model folder's names, and resume loads from
    them exactly the weights plain `from_pretrained` loads."""
    if model_type in ONE_THREAD:
        set_threads(1)
    base = save_tiny_model(tmp_path / "base", model_type)
    ref = loop.train(_config(tmp_path / "ref", base))
    cfg = _config(tmp_path / "cut", base)
    crash_at(cfg, 3)
    resumed = loop.train(dataclasses.replace(cfg, resume=True))
    got, want = losses(resumed.records), losses(ref.records)
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    saved, uninterrupted = (load_file(r.checkpoint / "model.safetensors") for r in (resumed, ref))
    assert saved.keys() == uninterrupted.keys() == load_file(base / "model.safetensors").keys()
    assert got == want  # bit-identical on CPU
    assert all(torch.equal(saved[k], uninterrupted[k]) for k in saved)

    plain = AutoModelForCausalLM.from_pretrained(resumed.checkpoint).state_dict()
    model = AutoModelForCausalLM.from_pretrained(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, resumed.checkpoint, lora=False)
    ours = model.state_dict()
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
    assert all(not torch.equal(ours[k], before[k]) for k in ours if "expert" in k or "embed" in k)  # all trained


@pytest.mark.parametrize("shape", [dict(num_experts=8), dict(moe_intermediate_size=16)])
def test_a_checkpoint_of_another_moe_shape_is_one_line(tmp_path, shape):
    """Experts of another count or width than the model's: one line naming the checkpoint and the fix."""
    ckpt = save_tiny_model(tmp_path / "ckpt", "qwen3_moe", **shape)
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "base", "qwen3_moe"))
    with pytest.raises(FasttuneError, match=r"ckpt: weights do not fit the model \(.*\); resume with the same --model"
                       ) as e:  # fmt: skip
        load_weights(model, ckpt, lora=False)
    assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft (<= 0.21) reads transformers' is_gradient_checkpointing
def test_a_resumed_lora_run_of_an_moe_model_equals_the_uninterrupted_one_and_merges_as_plain_peft(tmp_path):
    """LoRA on Qwen3-MoE's fused experts (model/expert_lora.py: the adapted weights remade in backward) and on a
    dense layer's MLP (mlp_only_layers: adapted through its weights), under `ops` with two micro-batches a step:
    crashed at step 3 and resumed, the losses and adapter of the run that never stopped, bit for bit; plain peft's
    merge_and_unload of adapter/ gives merged/'s weights, the experts' among them trained."""
    import peft

    base = save_tiny_model(tmp_path / "base", "qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])

    def config(tmp):
        cfg = sft_config(tmp, base, lora=dict(enabled=True, rank=4, alpha=8), max_length=128, val_fraction=0.1,
                         max_steps=4, save_every=2, eval_every=0, grad_accum=2)  # fmt: skip
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory="ops"))

    ref = loop.train(config(tmp_path / "ref"))
    cfg = config(tmp_path / "cut")
    crash_at(cfg, 3)
    resumed = loop.train(dataclasses.replace(cfg, resume=True))
    assert losses(resumed.records) == losses(ref.records) and len(losses(ref.records)) == 4
    got, want = (load_file(r.run_dir / "adapter" / "adapter_model.safetensors") for r in (resumed, ref))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    merged = AutoModelForCausalLM.from_pretrained(ref.run_dir / "merged").state_dict()
    by_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ref.run_dir / "adapter")
    plain, before = by_peft.merge_and_unload().state_dict(), AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert merged.keys() == plain.keys()
    for name, weight in plain.items():
        torch.testing.assert_close(merged[name], weight, rtol=1e-6, atol=1e-7, msg=name)
    trained = {k.split(".")[-2] if ".experts." not in k else k.rsplit(".", 1)[-1] for k in merged
               if not torch.equal(merged[k], before[k])}  # fmt: skip
    assert {"gate_up_proj", "gate_proj", "up_proj", "down_proj", "q_proj", "o_proj"} <= trained, trained
