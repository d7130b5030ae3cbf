"""Fast generation against HF `generate`, the reference: same greedy tokens (and on CPU the same float32 scores, bit for
bit), batch 1 and a left-padded batch, EOS handling, sampling, and the benchmark's rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fasttune.generate.fast import FastGenerator, fast_generate, unsupported_reason
from fasttune.model.build import preset_config

VOCAB, PROMPT, NEW = 300, 9, 24


def micro_model(device: str = "cpu", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    config = preset_config("micro", VOCAB)
    config.initializer_range = 0.3  # at the default 0.02 a micro model repeats one token: a weak comparison
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def prompts(batch: int, padded: bool, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids_BP = torch.randint(3, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    mask_BP = torch.ones_like(ids_BP)
    if padded:  # left padding of different lengths
        for row in range(1, batch):
            mask_BP[row, : 2 * row + 1] = 0
            ids_BP[row, : 2 * row + 1] = 0
    return ids_BP.to(device), mask_BP.to(device)


def hf_generate(model, ids_BP, mask_BP, new_tokens: int = NEW, eos_token_id=None, **kwargs):
    model.generation_config.eos_token_id = eos_token_id
    return model.generate(
        ids_BP,
        attention_mask=mask_BP,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        temperature=None,
        top_p=None,
        top_k=None,
        **kwargs,
    )


def recording(gen: FastGenerator) -> list[torch.Tensor]:
    """The float32 scores the generator selects from, step by step."""
    seen: list[torch.Tensor] = []
    select = gen._select
    gen._select = lambda logits_BV, *key: (seen.append(logits_BV.clone()), select(logits_BV, *key))[1]
    return seen


@pytest.mark.parametrize("batch,padded", [(1, False), (2, True), (3, True)])
def test_greedy_tokens_and_scores_identical_to_hf(batch, padded):
    model = micro_model()
    ids_BP, mask_BP = prompts(batch, padded)
    ref = hf_generate(model, ids_BP, mask_BP, output_logits=True, return_dict_in_generate=True)
    gen = FastGenerator(model)
    scores = recording(gen)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
    assert torch.equal(out_BS, ref.sequences)
    assert len(set(out_BS[0, PROMPT:].tolist())) > 3  # a real comparison, not one repeated token
    # same computation, not merely the same argmax: every score is equal bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, scores, strict=True))
    # a second call reuses the preallocated cache and still matches
    assert torch.equal(gen.generate(ids_BP, mask_BP, max_new_tokens=NEW), ref.sequences)


def test_eos_stops_and_pads_like_hf():
    model = micro_model()
    ids_BP, mask_BP = prompts(2, padded=True)
    free_BS = hf_generate(model, ids_BP, mask_BP)
    eos = [int(free_BS[0, PROMPT + 3]), int(free_BS[1, PROMPT + 10])]  # rows finish at different steps
    ref_BS = hf_generate(model, ids_BP, mask_BP, eos_token_id=eos)
    gen = FastGenerator(model, check_every=4)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert ref_BS.shape[1] < PROMPT + NEW
    assert torch.equal(out_BS, ref_BS)


def test_streaming_callback_sees_every_token():
    model = micro_model()
    ids_BP, mask_BP = prompts(1, padded=False)
    seen: list[list[int]] = []
    out_BS = fast_generate(model, ids_BP, mask_BP, max_new_tokens=NEW, on_token=seen.append)
    assert [s[0] for s in seen] == out_BS[0, PROMPT:].tolist()
    assert torch.equal(out_BS, hf_generate(model, ids_BP, mask_BP))


def test_sampling_in_range_and_tiny_top_p_is_greedy():
    model = micro_model()
    ids_BP, mask_BP = prompts(2, padded=True)
    gen = FastGenerator(model)
    torch.manual_seed(1)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=50)
    assert out_BS.shape == (2, PROMPT + NEW) and 0 <= int(out_BS.min()) and int(out_BS.max()) < VOCAB
    # top-p keeps at least the most likely token, so a tiny top-p samples greedily
    nucleus_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=0.7, top_p=1e-9)
    assert torch.equal(nucleus_BS, hf_generate(model, ids_BP, mask_BP))


def test_refuses_right_padding_and_unsupported_models():
    model = micro_model()
    ids_BP, mask_BP = prompts(2, padded=True)
    with pytest.raises(ValueError, match="left padding"):
        FastGenerator(model).generate(ids_BP, mask_BP.flip(-1), max_new_tokens=2)
    model.set_attn_implementation("eager")
    assert "eager" in unsupported_reason(model)


def test_bench_runs_on_cpu(tmp_path):
    from fasttune.bench import generate as bench

    rows = bench.run("tiny", batch_sizes=(1, 2), prompt_len=8, new_tokens=6, device="cpu", dtype=torch.float32)
    assert [(r["impl"], r["batch"]) for r in rows] == [
        ("hf_generate", 1),
        ("fasttune_eager", 1),
        ("hf_generate", 2),
        ("fasttune_eager", 2),
    ]
    assert all(r["tokens_match"] and r["tok_s"] > 0 and r["model_shape"] == "tiny" for r in rows)
    argv = ["--device", "cpu", "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "3", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"generate.json", "generate.csv", "generate.md", "generate.png"}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch,padded", [(1, False), (2, True)])
def test_cuda_graphs_identical_to_hf(batch, padded):
    model = micro_model("cuda", torch.bfloat16)
    ids_BP, mask_BP = prompts(batch, padded, "cuda")
    ref_BS = hf_generate(model, ids_BP, mask_BP)
    gen = FastGenerator(model)
    assert gen.use_graphs
    first_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)
    graphs = sum(len(s.graphs) for s in gen._slots.values())
    assert gen.use_graphs and graphs == NEW - 2  # the first decode step of a kind runs eagerly (warm-up)
    again_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW)  # replays only
    assert torch.equal(first_BS, ref_BS) and torch.equal(again_BS, ref_BS)
    assert sum(len(s.graphs) for s in gen._slots.values()) == graphs + 1  # the warm-up step's length, now captured


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_eos_and_sampling():
    model = micro_model("cuda", torch.bfloat16)
    ids_BP, mask_BP = prompts(2, True, "cuda")
    free_BS = hf_generate(model, ids_BP, mask_BP)
    eos = [int(free_BS[0, PROMPT + 3]), int(free_BS[1, PROMPT + 20])]
    gen = FastGenerator(model, check_every=4)
    out_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, eos_token_id=eos)
    assert torch.equal(out_BS, hf_generate(model, ids_BP, mask_BP, eos_token_id=eos))
    torch.manual_seed(0)
    a_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=1.0, top_p=0.9)
    b_BS = gen.generate(ids_BP, mask_BP, max_new_tokens=NEW, temperature=1.0, top_p=0.9)
    assert not torch.equal(a_BS, b_BS)  # replays draw fresh random numbers
    assert int(a_BS.max()) < VOCAB and int(b_BS.min()) >= 0
