"""Mixture-of-experts models on the fused decoder (generate/moe.py) against HF `generate`: Mixtral, Qwen2-MoE (shared
expert behind its gate, a dense layer between sparse ones), Qwen3-MoE (q/k norms, normalized top-k) and OLMoE (q/k
norms over all heads, clip_qkv), tiny random models with sliding windows where the family has them. Float32 scores
within 1e-5 of HF's at every step on the CPU, greedy and sampled, batches with left padding, on both decode paths
(gathered experts and all experts dense); on CUDA the same within the greedy tolerance, and the CUDA graph's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from fasttune.bench.generate_check import TOLERANCE, hf_greedy
from fasttune.generate import moe
from fasttune.generate.fast import Generator, unsupported_reason
from fasttune.generate.sampling import hf_sampling, sample_key
from tests.test_generate_families import DEVICES, NEW, PROMPT, SHAPE, WINDOW, build, check_matches_hf, prompts

MOE = {
    # router softmax, top-2 always renormalized (weights kept in float32); every layer sliding
    "mixtral": lambda: MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    # top-3 of 6 not renormalized; the shared expert's sigmoid gate; layer 1 dense (mlp_only_layers), layer 0 sliding
    "qwen2_moe": lambda: Qwen2MoeConfig(**SHAPE, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    # top-2 of 8 renormalized (norm_topk_prob), per-head q/k norms, every layer sliding
    "qwen3_moe": lambda: Qwen3MoeConfig(**SHAPE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                        norm_topk_prob=True, use_sliding_window=True, sliding_window=WINDOW),
    # q/k norms over the whole projection, q/k/v clamped to +-0.5
    "olmoe": lambda: OlmoeConfig(**SHAPE, num_experts=6, num_experts_per_tok=2, clip_qkv=0.5),
}  # fmt: skip


def build_moe(family: str, device: str = "cpu"):
    """A tiny random model whose routing has margins (router weights ~N(0, 1): HF's 0.02 init makes the experts' top-k
    near ties, which a rounding difference may swap) and random norm weights."""
    model = build(MOE[family](), device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.fixture(params=["gathered", "dense"])
def path(request, monkeypatch):
    """Both decode paths, whatever the batch: the gathered chosen experts, or every expert under a 0/weight mask."""
    monkeypatch.setattr(moe, "gathers", lambda *args: request.param == "gathered")
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(MOE))
@pytest.mark.parametrize("batch", [1, 3])
def test_moe_greedy_matches_hf(family, batch, device, path):
    check_matches_hf(build_moe(family, device), batch)


def hf_sampled(model, ids_BP, mask_BP, keys: list[int], sampling: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF `generate` sampling as the fast path does (sampling.hf_sampling, the rows' own keys): sequences, logits."""
    model.generation_config.eos_token_id = None
    out = model.generate(ids_BP, attention_mask=mask_BP, max_new_tokens=NEW, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         logits_processor=hf_sampling(*sampling, keys, PROMPT))  # fmt: skip
    return out.sequences, [s.float() for s in out.logits]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_sampled_matches_hf(family, device, path):
    """temperature 1.5, top-k 20, top-p 0.9, each row's own key: HF's tokens, and its scores at every step."""
    model = build_moe(family, device)
    ids_BP, mask_BP = prompts(3, device)
    keys, sampling = [sample_key(11, row) for row in range(3)], (1.5, 0.9, 20)
    ref_BS, ref_scores = hf_sampled(model, ids_BP, mask_BP, keys, sampling)
    gen = Generator(model, use_graphs=False)
    seen: list[torch.Tensor] = []
    select = gen._select
    gen._select = lambda logits_BV, *key: (seen.append(logits_BV.clone()), select(logits_BV, *key))[1]
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=1.5, top_p=0.9, top_k=20, keys=keys)
    assert gen.reason is None and gen.call_reason is None and len(seen) == NEW
    assert torch.equal(out_BS, ref_BS)
    assert not torch.equal(out_BS, hf_greedy(model, ids_BP, mask_BP, NEW)[0])  # it sampled
    limit = 1e-5 if device == "cpu" else TOLERANCE[torch.float32]
    assert max(float((a - b).abs().max()) for a, b in zip(ref_scores, seen, strict=True)) < limit
    if device == "cuda":
        graphed = Generator(model)
        kwargs = dict(max_new_tokens=NEW, temperature=1.5, top_p=0.9, top_k=20, keys=keys)
        assert torch.equal(graphed.generate(ids_BP, mask_BP, **kwargs), ref_BS) and graphed.use_graphs


def test_default_decode_path_is_gathered_only_for_small_batches():
    """3 * batch * top-k experts' bytes moved (gathered) against all E (dense): Qwen3-30B-A3B's 128 experts, top-8,
    gather up to batch 5; Mixtral's 8, top-2, at batch 1 only."""
    assert [b for b in range(1, 33) if moe.gathers(b, 8, 128)] == [1, 2, 3, 4, 5]
    assert [b for b in range(1, 33) if moe.gathers(b, 2, 8)] == [1]


@pytest.mark.parametrize("changed", ["gate.weight", "shared_expert_gate.weight", "shared_expert.up_proj.weight"])
def test_moe_router_and_shared_expert_changed_in_place_are_used(changed):
    """An in-place update (an optimizer step) of only the router, only the shared expert's gate, or only its up
    projection is re-fused at the next call."""
    model = build_moe("qwen2_moe")
    gen = Generator(model)
    ids_BP, mask_BP = prompts(3, "cpu")
    before_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.get_parameter(changed)
        weight.copy_(-4.0 * weight.flip(0))
    ref_BS, _ = hf_greedy(model, ids_BP, mask_BP, NEW)
    assert not torch.equal(ref_BS, before_BS)  # the change matters
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), ref_BS)


TINY_MOE = dict(SHAPE, num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize(
    "config,words",
    [
        (lambda: DeepseekV3Config(**SHAPE, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1),
         "'deepseek_v3'"),
        (lambda: GptOssConfig(**TINY_MOE, head_dim=16, sliding_window=WINDOW), "'gpt_oss'"),
    ],
)  # fmt: skip
def test_moe_families_not_covered_fall_back_with_the_reason(config, words):
    """DeepSeek-V3 (MLA attention) and GPT-OSS (attention sinks, biased experts) run through HF `generate`."""
    model = build(config())
    reason = unsupported_reason(model)
    assert reason is not None and words in reason


@pytest.mark.parametrize("layout,words", [("is_transposed", "is_transposed=True"), ("has_bias", "has_bias=True")])
def test_moe_experts_in_another_layout_fall_back_with_the_reason(layout, words):
    model = build_moe("mixtral")
    assert unsupported_reason(model) is None
    setattr(model.model.layers[1].mlp.experts, layout, True)
    assert words in unsupported_reason(model)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_weights_changed_are_re_fused_once(family):
    """A changed router is used at the next call, and the call after re-fuses nothing: Mixtral's router, used as it
    is (no shared-expert gate to fuse it with), was copied onto itself, a change of its own, so every later call
    re-fused the whole model."""
    model = build_moe(family)
    gen = Generator(model)
    ids_BP, mask_BP = prompts(3, "cpu")
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.mul_(-1.0)
    ref_BS, _ = hf_greedy(model, ids_BP, mask_BP, NEW)
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), ref_BS)
    assert gen.decoder.refresh() is False
