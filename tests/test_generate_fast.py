"""Fast generation against HF `generate`, the reference, on a model trained for a moment (seconds) on a synthetic
language, so greedy choices have real margins: greedy tokens equal HF's up to HF's own first near-tie (fp32 and
bf16, batch 1 and left-padded batches), EOS, streaming, sampling, refreshed weights, the fallback, bad input."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config, Qwen3Config

from fasttune.bench.generate_check import TOLERANCE, greedy_agreement, hf_greedy, synthetic_tokens, train_briefly
from fasttune.generate.fast import Generator, unsupported_reason
from fasttune.model.build import preset_config

VOCAB, SYMBOLS, PROMPT, NEW = 96, 48, 12, 32
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.fixture(scope="module")
def trained():
    """A micro Llama after 60 AdamW steps (~1 s on one thread; two threads on a busy 2-core machine take 30x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(preset_config("micro", VOCAB), attn_implementation="sdpa")
    losses = train_briefly(model, 60, batch=16, seq_len=32, symbols=SYMBOLS, lr=1e-2)
    yield model, losses
    torch.set_num_threads(threads)


def prompts(batch: int, padded: bool, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids_BP = synthetic_tokens(batch, PROMPT, symbols=SYMBOLS, seed=1000 + batch)
    mask_BP = torch.ones_like(ids_BP)
    if padded:  # left padding of different lengths
        for row in range(1, batch):
            mask_BP[row, : 2 * row + 1] = 0
            ids_BP[row, : 2 * row + 1] = 0
    return ids_BP.to(device), mask_BP.to(device)


def recording(gen: Generator) -> list[torch.Tensor]:
    """The float32 scores the generator selects from, step by step."""
    seen: list[torch.Tensor] = []
    select = gen._select
    gen._select = lambda logits_BV, *key: (seen.append(logits_BV.clone()), select(logits_BV, *key))[1]
    return seen


def test_training_gave_real_margins(trained):
    model, losses = trained
    assert losses[-1] < 0.5 * losses[0]  # it learned the language (entropy floor ~0.7, start ~4.6)
    seq_BS, scores = hf_greedy(model, *prompts(1, False), NEW)
    top2_NB2 = torch.stack(scores).topk(2, dim=-1).values
    assert float((top2_NB2[..., 0] - top2_NB2[..., 1]).median()) > 1.0  # no near-ties everywhere, unlike random init


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True)])
def test_greedy_identical_to_hf_until_its_first_near_tie(trained, dtype, batch, padded):
    model = copy.deepcopy(trained[0]).to(dtype)
    ids_BP, mask_BP = prompts(batch, padded)
    ref_BS, ref_scores = hf_greedy(model, ids_BP, mask_BP, NEW)
    gen = Generator(model)
    scores = recording(gen)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
    assert out_BS.shape == ref_BS.shape and torch.equal(out_BS[:, :PROMPT], ids_BP)
    result = greedy_agreement(ref_scores, ref_BS[:, PROMPT:], out_BS[:, PROMPT:], TOLERANCE[dtype])
    assert result["agree"], result
    # the scores themselves are close on the steps where both saw the same tokens, far inside the tolerance
    same = result["first_mismatch_step"] or NEW
    diff = max(float((a - b).abs().max()) for a, b in zip(ref_scores[:same], scores[:same], strict=False))
    assert diff < TOLERANCE[dtype] / 2
    # a second call reuses the cache and gives the same tokens
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), out_BS)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_one_token_prompt_matches_hf_also_after_a_longer_call(trained, batch):
    """A prompt of one token (a word of a tokenizer without BOS) has no padding, so no prefill mask: its one query
    ran the decode form, which needs a mask over every cache slot (AttributeError on None); after a longer call the
    cache's other slots hold that call's keys, which it must not see."""
    model = trained[0]
    gen = Generator(model)
    gen.generate(*prompts(batch, False), max_new_tokens=4)  # fills cache slots a one-token prompt must not see
    ids_BP = prompts(batch, False)[0][:, -1:]
    mask_BP = torch.ones_like(ids_BP)
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=8), hf_greedy(model, ids_BP, mask_BP, 8)[0])


@pytest.mark.parametrize("config_class", [Qwen2Config, Qwen3Config])
def test_other_families_match_hf(config_class):
    """Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) through the same fused decoder: float32 scores within
    1e-5 of HF's at every step (random weights: no training needed for a score comparison)."""
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids_BP, mask_BP = prompts(2, padded=True)
    ref_BS, ref_scores = hf_greedy(model, ids_BP, mask_BP, 12)
    gen = Generator(model)
    assert gen.reason is None
    scores = recording(gen)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=12)
    assert greedy_agreement(ref_scores, ref_BS[:, PROMPT:], out_BS[:, PROMPT:], TOLERANCE[torch.float32])["agree"]
    assert max(float((a - b).abs().max()) for a, b in zip(ref_scores, scores, strict=False)) < 1e-5


def test_triton_kernels_match_torch_ops_under_the_interpreter():
    """The Triton kernels (kernels.py) on the CPU through Triton's interpreter: float32 scores as HF's. Runs where
    Triton is installed (the interpreter must be chosen before Triton compiles anything: a fresh process)."""
    pytest.importorskip("triton", reason="Triton is not installed (the GPU tests cover the kernels on CUDA)")
    code = textwrap.dedent("""
        import torch
        from transformers import AutoModelForCausalLM
        from fasttune.bench.generate_check import greedy_agreement, hf_greedy
        from fasttune.generate.fast import Generator
        from fasttune.model.build import preset_config
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(preset_config("micro", 96), attn_implementation="sdpa").eval()
        ids, mask = torch.randint(3, 96, (2, 7)), torch.ones(2, 7, dtype=torch.long)
        mask[1, :3] = 0
        ref, ref_scores = hf_greedy(model, ids, mask, 8)
        gen = Generator(model)
        assert gen.decoder.use_kernels
        seen = []
        select = gen._select
        gen._select = lambda logits, *key: (seen.append(logits.clone()), select(logits, *key))[1]
        out = gen.generate(ids, mask, max_new_tokens=8)
        assert greedy_agreement(ref_scores, ref[:, 7:], out[:, 7:], 1e-3)["agree"]
        assert max(float((a - b).abs().max()) for a, b in zip(ref_scores, seen)) < 1e-4
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_longer_call_grows_the_cache_and_kernels_agree_with_torch_ops(trained, device):
    """A 300-token left-padded prompt after a short call: a larger cache (and graph), the prefill attends over the
    prompt only (its mask is P x P, not P x T: GBs at long prompts), and on CUDA the Triton kernels and the torch
    ops both agree with HF."""
    model = copy.deepcopy(trained[0]).to(device, torch.bfloat16)
    gen = Generator(model)
    gen.generate(*prompts(2, True, device), max_new_tokens=8)
    long_BP = synthetic_tokens(2, 300, symbols=SYMBOLS, seed=7).to(device)  # 300 + 40 > 256: a larger cache
    mask_BP = torch.ones_like(long_BP)
    mask_BP[1, :50] = 0
    ref_BS, ref_scores = hf_greedy(model, long_BP, mask_BP, 40)
    plain = Generator(model)
    plain.decoder.use_kernels = False  # the torch-ops path of the same decoder
    for engine in (gen, plain):
        out_BS = engine.generate(long_BP, mask_BP, max_new_tokens=40)
        result = greedy_agreement(ref_scores, ref_BS[:, 300:], out_BS[:, 300:], TOLERANCE[torch.bfloat16])
        assert result["agree"], result
    assert gen._states[2].capacity == 512


def test_eos_stops_and_pads_like_hf(trained):
    model = trained[0]
    ids_BP, mask_BP = prompts(3, padded=True)
    free_BS, _ = hf_greedy(model, ids_BP, mask_BP, NEW)
    eos = [int(free_BS[0, PROMPT + 3]), int(free_BS[1, PROMPT + 9])]  # rows finish at different steps
    model.generation_config.eos_token_id = eos
    ref_BS = model.generate(ids_BP, attention_mask=mask_BP, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    gen = Generator(model, check_every=4)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert ref_BS.shape[1] < PROMPT + NEW
    assert torch.equal(out_BS, ref_BS)


def test_streaming_callback_sees_every_token_in_order(trained):
    model = trained[0]
    ids_BP, mask_BP = prompts(2, padded=True)
    seen: list[list[int]] = []
    gen = Generator(model, check_every=5)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, on_token=seen.append)
    assert torch.tensor(seen).t().tolist() == out_BS[:, PROMPT:].tolist()
    # with EOS the stream ends where the output ends
    eos = int(out_BS[0, PROMPT + 2])
    seen.clear()
    out_BS = gen.generate(ids_BP[:1], mask_BP[:1], max_new_tokens=NEW, eos_token_id=eos, on_token=seen.append)
    assert [s[0] for s in seen] == out_BS[0, PROMPT:].tolist() and seen[-1] == [eos]


def test_sampling_in_range_and_tiny_top_p_is_greedy(trained):
    model = trained[0]
    ids_BP, mask_BP = prompts(2, padded=True)
    gen = Generator(model)
    torch.manual_seed(1)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=50)
    assert out_BS.shape == (2, PROMPT + NEW) and 0 <= int(out_BS.min()) and int(out_BS.max()) < VOCAB
    # top-p keeps at least the most likely token, so a tiny top-p samples greedily
    nucleus_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=0.7, top_p=1e-9)
    assert torch.equal(nucleus_BS, gen.generate(ids_BP, mask_BP, max_new_tokens=NEW))
    # high temperature draws other tokens than greedy
    hot_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=5.0)
    assert not torch.equal(hot_BS, nucleus_BS)


def test_weights_changed_after_the_first_call_are_used(trained):
    model = trained[0]
    ids_BP, mask_BP = prompts(1, padded=False)
    gen = Generator(model)
    before_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():  # an in-place update, as an optimizer step does
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(-1.5)
                layer.mlp.up_proj.weight.mul_(1.7)
        ref_BS, ref_scores = hf_greedy(model, ids_BP, mask_BP, NEW)
        out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
        assert not torch.equal(ref_BS, before_BS)  # the change matters
        assert greedy_agreement(ref_scores, ref_BS[:, PROMPT:], out_BS[:, PROMPT:], TOLERANCE[torch.float32])["agree"]
        # a change of dtype rebuilds the fused copies (they are copied into, so would keep the old dtype)
        model.to(torch.bfloat16)
        ref_BS, ref_scores = hf_greedy(model, ids_BP, mask_BP, NEW)
        out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
        assert greedy_agreement(ref_scores, ref_BS[:, PROMPT:], out_BS[:, PROMPT:], TOLERANCE[torch.bfloat16])["agree"]
    finally:
        model.float()
        model.load_state_dict(saved)


def test_unsupported_model_falls_back_to_hf_with_a_reason():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    model.eval()
    gen = Generator(model)
    assert gen.reason is not None and "gpt2" in gen.reason
    assert "phi3, mixtral, qwen2_moe, qwen3_moe, olmoe, gemma2, gemma3_text" in gen.reason  # every family named
    ids_BP = torch.randint(3, 64, (1, 5))
    seen: list[list[int]] = []
    out_BS = gen.generate(ids_BP, max_new_tokens=6, on_token=seen.append)
    ref_BS = model.generate(ids_BP, attention_mask=torch.ones_like(ids_BP), max_new_tokens=6, do_sample=False,
                            pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(out_BS, ref_BS) and [s[0] for s in seen] == out_BS[0, 5:].tolist()


def test_hf_fallback_is_greedy_and_quiet_beside_a_sampling_generation_config(caplog):
    """An Instruct model's generation config samples (temperature 0.6, top_p 0.9): greedy decoding through the
    fallback neither samples nor warns that the sampling settings are ignored."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    model.eval().generation_config.update(do_sample=True, temperature=0.6, top_p=0.9)
    ids_BP = torch.randint(3, 64, (1, 5))
    with caplog.at_level("WARNING"):
        out_BS = Generator(model).generate(ids_BP, max_new_tokens=6)
    ref_BS = model.generate(ids_BP, attention_mask=torch.ones_like(ids_BP), max_new_tokens=6, do_sample=False,
                            temperature=1.0, top_p=1.0, pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(out_BS, ref_BS)
    assert not [r for r in caplog.records if "generation flags" in r.getMessage() or "deprecated" in r.getMessage()]


def test_a_generation_config_repetition_penalty_is_applied_as_hf_does(trained):
    """Plain HF `generate` applies the generation config's repetition_penalty (Qwen2.5-Instruct ships 1.05), greedy
    too; the fused decoder does not, so such a model runs through HF `generate` and gives HF's tokens (the fused
    decoder gave those of no penalty)."""
    model = copy.deepcopy(trained[0])
    model.generation_config.repetition_penalty = 1.8
    ids_BP, mask_BP = prompts(2, padded=True)
    ref_BS = model.generate(ids_BP, attention_mask=mask_BP, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain_BS, _ = hf_greedy(trained[0], ids_BP, mask_BP, NEW)
    assert not torch.equal(ref_BS, plain_BS)  # the penalty changes the answer
    gen = Generator(model)
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, pad_token_id=0), ref_BS)
    assert "repetition_penalty" in gen.reason
    model.generation_config.repetition_penalty, model.generation_config.suppress_tokens = 1.0, []  # none suppressed
    assert Generator(model).reason is None


def test_unmerged_lora_falls_back_instead_of_dropping_the_adapter(trained):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(trained[0])
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config).eval()
    gen = Generator(lora)
    assert gen.reason is not None and "merge" in gen.reason
    ids_BP, mask_BP = prompts(1, padded=False)
    ref_BS, _ = hf_greedy(lora, ids_BP, mask_BP, 8)
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=8), ref_BS)
    # adapters injected into a plain model's projections are refused too
    injected = peft.inject_adapter_in_model(config, copy.deepcopy(trained[0]))
    assert "q_proj" in Generator(injected).reason


def test_bad_input_is_refused_with_the_reason(trained):
    model = trained[0]
    ids_BP, mask_BP = prompts(2, padded=True)
    gen = Generator(model)
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate(ids_BP, mask_BP.flip(-1), max_new_tokens=2)
    with pytest.raises(ValueError, match="context of 4096"):
        gen.generate(ids_BP, mask_BP, max_new_tokens=5000)
    with pytest.raises(ValueError, match="non-empty"):
        gen.generate(ids_BP[:, :0], mask_BP[:, :0], max_new_tokens=2)
    model.config.model_type = "bert"
    try:
        assert "bert" in unsupported_reason(model)
    finally:
        model.config.model_type = "llama"


def test_bench_runs_on_cpu(tmp_path):
    from fasttune.bench import generate as bench

    argv = ["--device", "cpu", "--batch-sizes", "1,2", "--prompt-len", "6", "--new-tokens", "5", "--train-steps", "2"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"generate.json", "generate.csv", "generate.md", "generate.png"}
    import json

    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    impls = {(r["impl"], r["batch"], r["dtype"]) for r in rows}
    assert ("hf_generate", 2, "float32") in impls and ("fasttune", 2, "float32") in impls
    assert all(r["tok_s"] > 0 for r in rows) and all("agree" in r for r in rows if r["impl"] == "fasttune")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True)])
def test_cuda_graphs_agree_with_hf_and_are_reused(trained, batch, padded):
    model = copy.deepcopy(trained[0]).to("cuda", torch.bfloat16)
    ids_BP, mask_BP = prompts(batch, padded, "cuda")
    ref_BS, ref_scores = hf_greedy(model, ids_BP, mask_BP, NEW)
    gen = Generator(model)
    assert gen.use_graphs
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
    assert greedy_agreement(ref_scores, ref_BS[:, PROMPT:], out_BS[:, PROMPT:], TOLERANCE[torch.bfloat16])["agree"]
    graphs = sum(len(s.graphs) for s in gen._states.values())
    assert gen.use_graphs and graphs == 1  # one graph for every step of the call
    # another prompt length and another call replay the same graph
    again_BS = gen.generate(ids_BP[:, 2:], mask_BP[:, 2:], max_new_tokens=NEW)
    assert again_BS.shape == (batch, PROMPT - 2 + NEW)
    assert sum(len(s.graphs) for s in gen._states.values()) == graphs
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), out_BS)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_eos_and_sampling(trained):
    model = copy.deepcopy(trained[0]).to("cuda", torch.bfloat16)
    ids_BP, mask_BP = prompts(3, True, "cuda")
    free_BS = Generator(model).generate(ids_BP, mask_BP, max_new_tokens=NEW)
    eos = [int(free_BS[0, PROMPT + 3]), int(free_BS[1, PROMPT + 20])]
    gen = Generator(model, check_every=4)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, eos_token_id=eos)
    model.generation_config.eos_token_id = eos
    ref_BS = model.generate(ids_BP, attention_mask=mask_BP, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out_BS, ref_BS)
    torch.manual_seed(0)
    a_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=3.0, top_p=0.95)
    b_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=3.0, top_p=0.95)
    assert not torch.equal(a_BS, b_BS)  # replays draw fresh random numbers
    assert int(a_BS.max()) < VOCAB and int(b_BS.min()) >= 0
