"""--resume of a full fine-tune of models whose weights transformers converts as it loads them: transformers 5 holds
an MoE layer's experts fused (`mlp.experts.gate_up_proj`, 3-D) and `save_pretrained` writes them back one per expert
(`mlp.experts.0.gate_proj.weight`, ...), as the Hub's files hold them; GPT-NeoX's head is `embed_out` in its files.
A checkpoint is loaded on resume as `from_pretrained` loads it, and the resumed run equals the uninterrupted one."""

import dataclasses

import pytest
import torch
from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer
from helpers import GSM8K, losses, tiny_config
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from fasttune.errors import FasttuneError
from fasttune.train import loop, run
from fasttune.train.checkpoint import load_weights

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=96, max_position_embeddings=512)  # fmt: skip
# fmt: off
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # block_sparse_moe.experts.N.w1/w2/w3 in its files
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),  # renamed, not split: input_linear, output_linear
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),  # fused in its files too
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, layer_types=["linear_attention", "full_attention"],
                       linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_shared_experts=1),
    "gpt_neox": dict(),  # dense: its head is embed_out in its files, lm_head in the model
}
# fmt: on
ONE_THREAD = {"gpt_oss"}
"""Families whose CPU training is bit-reproducible on one thread only, even uninterrupted (GPT-OSS's eager experts:
two runs of the same config on 2 threads differ in the last bits, which AdamW makes large in the k_proj biases, whose
gradient is 0 but for rounding)."""


def _save_base(path, model_type: str, **shape):
    """A tiny model of `model_type` (seed 0) with the tiny tokenizer, saved by save_pretrained as a model folder."""
    tok = build_tiny_tokenizer(chat_template=CHATML)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **{**SHAPE, **FAMILIES[model_type], **shape})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _config(tmp, base):
    cfg = tiny_config(tmp, max_steps=4, save_every=2, eval_every=0)
    return dataclasses.replace(cfg, experiment="sft", model=dataclasses.replace(cfg.model, path=str(base)),
                               data=dataclasses.replace(cfg.data, path=str(GSM8K), max_length=128))  # fmt: skip


def _crash_at_step_3(monkeypatch):
    real, calls = run.forward_backward, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "forward_backward", crashing)


@pytest.fixture
def set_threads():
    """torch.set_num_threads for one test: the thread count is put back after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_resumed_run_equals_the_uninterrupted_one_and_its_checkpoints_load_in_plain_transformers(
    tmp_path, monkeypatch, set_threads, model_type
):
    """Crashed at step 3 and resumed from the step-2 checkpoint: the losses and the final weights of the run that never
    stopped (before, resume stopped with "weights do not match the model": the checkpoint's per-expert tensors were
    loaded by name into the fused experts). The checkpoints hold the model folder's names, and resume loads from
    them exactly the weights plain `from_pretrained` loads."""
    if model_type in ONE_THREAD:
        set_threads(1)
    base = _save_base(tmp_path / "base", model_type)
    ref = loop.train(_config(tmp_path / "ref", base))
    cfg = _config(tmp_path / "cut", base)
    _crash_at_step_3(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg)
    monkeypatch.undo()
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
    ckpt = _save_base(tmp_path / "ckpt", "qwen3_moe", **shape)
    model = AutoModelForCausalLM.from_pretrained(_save_base(tmp_path / "base", "qwen3_moe"))
    with pytest.raises(FasttuneError, match=r"ckpt: weights do not fit the model \(.*\); resume with the same --model"
                       ) as e:  # fmt: skip
        load_weights(model, ckpt, lora=False)
    assert "\n" not in str(e.value)
