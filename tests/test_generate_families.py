"""The fused decoder on the families beyond plain Llama, against HF `generate` on tiny random models built from
configs: sliding-window attention (Mistral, Qwen2's sliding layers, Phi-3) with a window smaller than prompt + new
tokens, Phi-3/Phi-4 (fused qkv_proj / gate_up_proj, partial rotary, longrope) and Gemma 2/3 text. Float32 scores
within 1e-5 of HF's at every step on the CPU (HF's reference with eager attention: its explicit window mask); on CUDA
(graphs and Triton kernels) within the greedy tolerance."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen2Config

from fasttune.bench.generate_check import TOLERANCE, greedy_agreement, hf_greedy, synthetic_tokens
from fasttune.generate.fast import Generator

VOCAB, PROMPT, NEW, WINDOW = 96, 12, 16, 5
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=None)  # fmt: skip
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
# Phi-4-mini's rope: longrope on the first 3/4 of each head's dims (factors per rotary pair: 16 * 0.75 / 2 = 6)
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                original_max_position_embeddings=64, short_factor=[1.0 + 0.1 * i for i in range(6)],
                long_factor=[2.0 + i for i in range(6)])  # fmt: skip

WINDOWED = {
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=WINDOW),
    # layer 0 full, layer 1 sliding: each layer gets its own mask
    "qwen2": lambda: Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "phi3": lambda: Phi3Config(**SHAPE, sliding_window=WINDOW),
}


def build(config, device: str = "cpu", attn: str = "eager"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(device).eval()


def prompts(batch: int, device: str, length: int = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    ids_BP = synthetic_tokens(batch, length, symbols=48, seed=batch)
    mask_BP = torch.ones_like(ids_BP)
    for row in range(1, batch):  # left padding of different lengths
        ids_BP[row, : 2 * row + 1] = mask_BP[row, : 2 * row + 1] = 0
    return ids_BP.to(device), mask_BP.to(device)


def check_matches_hf(model, batch: int, new: int = NEW, length: int = PROMPT) -> tuple[list, list]:
    """Fast greedy tokens and scores against HF's on prompts of `length`; returns HF's scores and the fast ones."""
    device = next(model.parameters()).device.type
    ids_BP, mask_BP = prompts(batch, device, length)
    ref_BS, ref_scores = hf_greedy(model, ids_BP, mask_BP, new)
    gen = Generator(model, use_graphs=False)  # eager steps, so that every step's scores are seen here
    assert gen.reason is None, gen.reason
    seen: list[torch.Tensor] = []
    select = gen._select
    gen._select = lambda logits_BV, *key: (seen.append(logits_BV.clone()), select(logits_BV, *key))[1]
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=new)
    assert gen.call_reason is None and len(seen) == new  # the fused decoder ran, every step
    result = greedy_agreement(ref_scores, ref_BS[:, length:], out_BS[:, length:], TOLERANCE[torch.float32])
    assert result["agree"], result
    limit = 1e-5 if device == "cpu" else TOLERANCE[torch.float32]
    assert max(float((a - b).abs().max()) for a, b in zip(ref_scores, seen, strict=True)) < limit
    if device == "cuda":  # the same steps replayed from one CUDA graph: no Python runs per step to see scores
        graphed = Generator(model)
        graphed_BS = graphed.generate(ids_BP, mask_BP, max_new_tokens=new)
        assert graphed.use_graphs and sum(len(s.graphs) for s in graphed._states.values()) == 1
        result = greedy_agreement(ref_scores, ref_BS[:, length:], graphed_BS[:, length:], TOLERANCE[torch.float32])
        assert result["agree"], result
    return ref_scores, seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(WINDOWED))
@pytest.mark.parametrize("batch", [1, 3])  # batch 1: the prompt pass has no padding mask, only the window's
def test_sliding_window_smaller_than_the_call_matches_hf(family, batch, device):
    model = build(WINDOWED[family](), device)
    ref_scores, _ = check_matches_hf(model, batch)
    # the window matters: the same weights attending to everything score otherwise
    full = WINDOWED[family]()
    full.sliding_window, full.use_sliding_window = None, False
    full.layer_types = ["full_attention"] * full.num_hidden_layers
    unwindowed = build(full, device)
    unwindowed.load_state_dict(model.state_dict())
    _, full_scores = hf_greedy(unwindowed, *prompts(batch, device), NEW)
    assert max(float((a - b).abs().max()) for a, b in zip(ref_scores, full_scores, strict=True)) > 1e-2


def test_sliding_window_matches_hf_sdpa_too():
    """HF's sdpa reference (its own window handling at decode) gives the same scores as its eager one."""
    check_matches_hf(build(WINDOWED["mistral"](), attn="sdpa"), 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope", ["default", "longrope"])
def test_phi3_fused_projections_match_hf(rope, device):
    """Phi-3's fused qkv_proj and gate_up_proj mapped onto the fused decoder; longrope (Phi-4-mini's, partial rotary)
    within original_max_position_embeddings uses its short factors, as HF does there."""
    extra = dict(rope_parameters=dict(LONGROPE), original_max_position_embeddings=64) if rope == "longrope" else {}
    check_matches_hf(build(Phi3Config(**SHAPE, **extra), device), 3)


def test_phi3_longrope_beyond_its_original_length_runs_hf_generate_for_that_call():
    """Past original_max_position_embeddings longrope switches every position to its long factors: such a call runs
    through HF `generate` (HF's tokens, `call_reason` says why); a shorter call after it is fused again."""
    model = build(Phi3Config(**SHAPE, rope_parameters=dict(LONGROPE), original_max_position_embeddings=64))
    gen = Generator(model)
    assert gen.reason is None
    ids_BP, mask_BP = prompts(2, "cpu")
    ref_BS, _ = hf_greedy(model, ids_BP, mask_BP, 60)  # 12 + 60 > 64
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=60), ref_BS)
    assert "original_max_position_embeddings=64" in gen.call_reason
    ref_BS, _ = hf_greedy(model, ids_BP, mask_BP, NEW)
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), ref_BS) and gen.call_reason is None


@pytest.mark.parametrize("new", [55, 56])
def test_phi3_longrope_counts_the_real_prompt_not_its_padding(new):
    """HF's longrope takes its long factors once a forward's largest position id + 1 passes
    original_max_position_embeddings (64), and positions count real tokens only: a batch left-padded to 12 columns
    whose longest prompt is 10 tokens feeds 10 + new - 1 positions. 55 new tokens stay within 64: the fused decoder
    runs (it ran HF `generate` when it counted the padded width, 12 + 55), with HF's tokens; 56 go past: HF's."""
    model = build(Phi3Config(**SHAPE, rope_parameters=dict(LONGROPE), original_max_position_embeddings=64))
    ids_BP, mask_BP = prompts(2, "cpu")
    ids_BP[:, :2] = mask_BP[:, :2] = 0  # every row padded: the longest prompt has 10 tokens
    ref_BS, ref_scores = hf_greedy(model, ids_BP, mask_BP, new)
    gen = Generator(model)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=new)
    assert (gen.call_reason is None) == (new == 55), gen.call_reason
    result = greedy_agreement(ref_scores, ref_BS[:, PROMPT:], out_BS[:, PROMPT:], TOLERANCE[torch.float32])
    assert result["agree"], result


def test_phi3_longrope_calls_past_its_original_length_are_logged_once(caplog):
    """Calls of other lengths past original_max_position_embeddings share one reason: one log line, not one per
    batch of a --prompts file."""
    model = build(Phi3Config(**SHAPE, rope_parameters=dict(LONGROPE), original_max_position_embeddings=64))
    gen = Generator(model)
    ids_BP, mask_BP = prompts(2, "cpu")
    with caplog.at_level(logging.INFO, logger="fasttune"):
        for new in (56, 57, 58):  # 12 + new > 64
            gen.generate(ids_BP, mask_BP, max_new_tokens=new)
            assert gen.call_reason is not None
    assert sum("HF generate for this call" in r.getMessage() for r in caplog.records) == 1


def test_phi3_weights_changed_in_place_are_used():
    """An in-place update of the fused qkv_proj / gate_up_proj (an optimizer step) is re-fused at the next call."""
    model = build(Phi3Config(**SHAPE))
    gen = Generator(model)
    assert gen.reason is None
    ids_BP, mask_BP = prompts(1, "cpu")
    before_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight.mul_(-2.0)
            layer.mlp.gate_up_proj.weight.mul_(1.5)
    ref_BS, _ = hf_greedy(model, ids_BP, mask_BP, NEW)
    assert not torch.equal(ref_BS, before_BS)  # the change matters
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), ref_BS)


# Gemma: 4 layers alternating sliding (window 5) and full; the scale 1/sqrt(24), not 1/sqrt(head_dim)
GEMMA = dict(SHAPE, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, bos_token_id=1)
GEMMAS = {
    # attention scores capped at 0.1 (checkpoints: 50): the cap moves this tiny model's logits by ~2e-3, >> 1e-5
    "gemma2": lambda: Gemma2Config(**GEMMA, attn_logit_softcapping=0.1, final_logit_softcapping=3.0),
    "gemma2-uncapped": lambda: Gemma2Config(**GEMMA, attn_logit_softcapping=None, final_logit_softcapping=None),
    # local and global RoPE differ (base and linear scaling), as Gemma 3's 4b+ models
    "gemma3": lambda: Gemma3TextConfig(**GEMMA, sliding_window_pattern=2, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "gemma3-softcap": lambda: Gemma3TextConfig(**GEMMA, sliding_window_pattern=2, final_logit_softcapping=3.0),
}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(GEMMAS))
def test_gemma_matches_hf(family, device):
    """Gemma's layer (scaled embedding, (1 + w) norms around attention and MLP, q/k norms, GELU-tanh, per-type RoPE,
    sliding layers, Gemma 2's attention and final soft-capping) on the fused decoder. The norms' weights are random
    (Gemma's init is 0, which would hide a missing 1 + w)."""
    model = build(GEMMAS[family](), device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    check_matches_hf(model, 3)


def test_yarn_past_max_position_embeddings_matches_hf():
    """Qwen2.5's documented long context: YaRN with factor 4 over max_position_embeddings = original. The context is
    4x the config's positions (model/context.py, which the call is checked against), and so is the RoPE table: a call
    past max_position_embeddings ran off its end (IndexError)."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    model = build(Qwen2Config(**dict(SHAPE, max_position_embeddings=32), rope_parameters=rope))
    check_matches_hf(model, 3, new=40)  # 12 + 40 > 32


# the `bench generate` shapes of these families (model/build.py), shrunk to 2 layers of a small width and vocabulary
# with their head dims (Gemma 3 1B: 256, 4 query heads on 1 kv head; Phi-3-mini: 96, 48 RoPE pairs, not a power of
# 2), RoPE and layer kinds; Gemma 3's window shrunk to 5 so that the call passes it
SHRINK = dict(num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB, pad_token_id=0, eos_token_id=None)
SHRUNK = {
    "gemma-3-1b": dict(SHRINK, hidden_size=64, sliding_window=WINDOW, sliding_window_pattern=2),
    "phi-3-mini": dict(SHRINK, hidden_size=192, num_attention_heads=2, num_key_value_heads=2),
}


@pytest.mark.parametrize(
    "shape,billions,model_type", [("gemma-3-1b", 0.99989, "gemma3_text"), ("phi-3-mini", 3.82108, "phi3")]
)
def test_bench_generate_family_shapes_build_and_run_fused(shape, billions, model_type, monkeypatch):
    """`bench generate --shape gemma-3-1b / phi-3-mini`: the published shapes (meta device), which the fused decoder
    runs, and the options check passes them on to the benchmark."""
    from fasttune import cli
    from fasttune.bench import fit
    from fasttune.bench import generate as bench_generate
    from fasttune.generate.fast import unsupported_reason
    from fasttune.model.build import preset_config

    config = preset_config(shape, 32000)
    assert config.model_type == model_type and config.vocab_size >= 32000
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 1e-5
    assert unsupported_reason(model) is None
    ran = []
    facts = {"train_steps": 0, "train_s": 0.0, "losses": []}
    monkeypatch.setattr(bench_generate, "run", lambda *a, **k: (ran.append(a[0]), ([], facts))[1])
    monkeypatch.setattr(fit, "available_ram", lambda: 1 << 50)  # a machine it fits (the check's own test: bench_fit)
    assert cli.main(["bench", "generate", "--device", "cpu", "--shape", shape]) == 0
    assert ran == [shape]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", sorted(SHRUNK))
def test_bench_generate_family_shapes_shrunk_match_hf(shape, device):
    from fasttune.model.build import preset_config

    config = preset_config(shape, VOCAB)
    for key, value in SHRUNK[shape].items():
        setattr(config, key, value)
    if shape == "gemma-3-1b":
        config.layer_types = ["sliding_attention", "full_attention"]
    model = build(config, device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    check_matches_hf(model, 3)
