"""`fasttune bench` from Python: the shared harness at tiny CPU sizes, the rows' totals, ratios, rounds and memory
target, the HF baselines and workloads, the FLOP counts against hand counts (the command line: test_bench_cli.py)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from fasttune.bench.attention import make_case, max_error, reference
from fasttune.bench.harness import markdown_table, noise, time_ms, timing
from fasttune.bench.train import MD_COLUMNS, from_records, gib_per_1k, merge_rounds
from fasttune.bench.train_verdict import add_ratios
from fasttune.bench.workload import sft_lengths, synthetic_bundle
from fasttune.model.build import preset_config
from fasttune.model.flops import attention_flops, dense_flops_per_token, step_flops


def test_attention_flops_hand_count():
    # one causal document of 4 tokens, 2 heads, head dim 8: QK^T and PV each 4*4/2 pairs * 8 MACs * 2 FLOP
    # = 128 FLOP per head -> 2 matmuls * 2 heads * 128 = 512; fwd+bwd = 3 * 512 (model FLOPs)
    assert attention_flops([4], n_heads=2, head_dim=8, backward=False) == 512
    assert attention_flops([4], n_heads=2, head_dim=8, backward=True) == 1536
    assert attention_flops([4, 2], n_heads=2, head_dim=8, backward=False) == 512 + 128  # documents never interact


def test_training_flops_hand_count():
    # micro preset: hidden 64, 2 layers, 4 heads / 2 kv heads (head dim 16), MLP 128, vocab 100
    # per layer: q,o 2*64*64 + k,v 2*64*32 = 12288; MLP 3*64*128 = 24576; lm head 64*100; x6 for fwd+bwd
    expected = 6 * (2 * (12288 + 24576) + 64 * 100)
    assert dense_flops_per_token(preset_config("micro", 100)) == expected
    assert dense_flops_per_token(preset_config("micro", 100), lora=True) == expected * 2 / 3
    # a step of documents 4 and 2 long adds their causal attention, 2 layers x 4 heads x head dim 16
    attn = 3 * 2 * 2 * 16 * 4 * 2 * (4 * 4 / 2 + 2 * 2 / 2)
    assert step_flops(preset_config("micro", 100), [4, 2]) == expected * 6 + attn


def test_moe_flops_count_the_routed_experts_and_the_router():
    """A token runs through its top-k experts (and the shared ones), not every expert, nor a dense MLP of
    intermediate_size: Mixtral-like (experts of intermediate_size) and Qwen2-MoE-like (moe_intermediate_size, a
    shared expert)."""
    import transformers as tf

    shape = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    attn = 2 * 64 * 64 + 2 * 64 * 32  # q, o and k, v (head dim 16)
    mixtral = tf.MixtralConfig(**shape, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)
    assert dense_flops_per_token(mixtral) == 6 * (2 * (attn + 3 * 64 * 2 * 128 + 64 * 8) + 64 * 100)
    qwen = tf.Qwen2MoeConfig(**shape, intermediate_size=999, moe_intermediate_size=32, num_experts=4,
                             num_experts_per_tok=2, shared_expert_intermediate_size=48)  # fmt: skip
    assert dense_flops_per_token(qwen) == 6 * (2 * (attn + 3 * 64 * (2 * 32 + 48) + 64 * 4) + 64 * 100)


def test_reference_matches_eager_per_document():
    case = make_case("packed", seq=8, tokens=24, n_heads=2, head_dim=4, device="cpu", dtype=torch.float32)
    out_BSHD = torch.empty(1, 24, 2, 4)
    for (r, s, n), ref_HND in zip(case.docs, reference(case), strict=True):
        q, k, v = (x[r, :, s : s + n] for x in (case.q_BHSD, case.k_BHSD, case.v_BHSD))
        p = (q @ k.transpose(-1, -2) / 2).masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")).softmax(-1)
        out_BSHD[r, s : s + n] = (p @ v).transpose(0, 1)
        assert torch.allclose(ref_HND, (p @ v).detach(), atol=1e-6)
    assert max_error(out_BSHD.detach(), case, reference(case)) < 1e-6


def test_padded_case_masks_padding():
    case = make_case("padded", seq=16, tokens=64, n_heads=1, head_dim=4, device="cpu", dtype=torch.float32)
    assert case.mask_BS.shape == (4, 16)
    assert case.doc_lens == [16, 15, 14, 13] == case.mask_BS.sum(1).tolist()


def test_time_ms_cpu_median():
    calls = []
    ms = time_ms(lambda: calls.append(1), torch.device("cpu"), rep_ms=5)
    assert ms >= 0 and len(calls) >= 4  # one warm-up call plus at least three timed


def test_cpu_timings_spread_apart_are_called_noisy():
    """A loaded CPU gave one kernel 12, 24 and 48 ms calls beside 0.03 ms ones, and the median of them was read as
    the kernel's time: calls whose quartiles lie far apart, or whose median is far above the fastest call, are
    noisy; steady ones are not."""
    assert noise([1.0, 1.02, 0.98, 1.01, 0.99, 1.0]) is None
    said = noise([0.03, 0.03, 0.03, 12.0, 24.0, 48.0])
    assert said is not None and "quartiles" in said and "around a median of" in said
    said = noise([0.4] + [1.0] * 9)  # steady quartiles, but the median is 2.5 times the fastest call
    assert said is not None and "2.5x its fastest call (0.4 ms)" in said
    import time

    calls = []

    def uneven():  # every other call 5 ms: what other work on the same cores does to a kernel
        calls.append(1)
        if len(calls) % 2:
            time.sleep(0.005)

    t = timing(uneven, torch.device("cpu"), warmup_ms=0, rep_ms=60)
    assert t.noise is not None and 0 <= t.ms < 6 and time_ms(lambda: None, torch.device("cpu"), rep_ms=5) >= 0


def test_sft_lengths_mix():
    lengths = sft_lengths(4000, median=400, mean=566, lo=32, hi=100_000, seed=1)
    assert abs(statistics.median(lengths) - 400) < 25
    assert abs(statistics.mean(lengths) - 566) < 40
    clipped = sft_lengths(64, 400, 566, 32, 2048)
    assert min(clipped) >= 32 and max(clipped) <= 2048 and len(clipped) == 64
    data = synthetic_bundle(clipped, vocab_size=100)
    assert [len(s["input_ids"]) for s in data.train] == clipped and len(data.tokenizer) == 100


def test_from_records_totals_not_mean_of_rates():
    records = [  # the loop's own records: step time, tokens, samples, FLOPs
        {"step": 1, "tokens": 999, "step_s": 999.0, "samples": 1, "flops": 0.0, "peak_mem_gib": 9.0},
        {"step": 2, "tokens": 100, "step_s": 1.0, "samples": 2, "flops": 0.0, "peak_mem_gib": 1.0},
        {"step": 3, "tokens": 300, "step_s": 3.0, "samples": 12, "flops": 0.0, "peak_mem_gib": 2.0},
    ]
    out = from_records(records, warm=1, peak=None)  # step 1 is warm-up: skipped
    assert out["steps"] == 2 and out["tokens_per_s"] == pytest.approx(100.0)
    assert out["samples_per_s"] == pytest.approx((2 + 12) / 4)
    assert out["peak_gib"] == 9.0  # memory is the run's peak, warm-up included
    assert out["tokens_per_step"] == 200 and out["loss"] is None
    assert out["spread_pct"] is None  # 2 measured steps: too few to split into parts


def test_spread_is_half_the_range_of_the_parts_rates():
    """8 steps in 4 parts at 100, 100, 120 and 80 tokens/s (each part 2 steps): half the range, 20 tokens/s, is 20%
    of the whole rate (800 tokens in 8 s)."""
    from fasttune.bench.baselines import aggregate

    rates = [100, 100, 100, 100, 120, 120, 80, 80]
    out = aggregate([(1.0, r, 1, 0.0) for r in rates], None)
    assert out["tokens_per_s"] == pytest.approx(100.0) and out["spread_pct"] == pytest.approx(20.0)
    assert aggregate([(1.0, 100, 1, 0.0)] * 8, None)["spread_pct"] == 0.0


def test_ratios_never_use_a_leaky_baseline():
    rows = [
        {"config": "pad", "stack": "HF", "attn": "sdpa", "packing": False, "tokens_per_s": 10.0, "status": "ok"},
        {"config": "leaky", "stack": "HF", "attn": "x", "packing": True, "tokens_per_s": 90.0, "status": "ok",
         "leak_err": 0.5},
        {"config": "clean", "stack": "HF", "attn": "y", "packing": True, "tokens_per_s": 20.0, "status": "ok",
         "leak_err": 0.0},
        {"config": "ft", "stack": "fasttune", "attn": "auto", "packing": True, "tokens_per_s": 40.0, "status": "ok"},
    ]  # fmt: skip
    add_ratios(rows)
    assert rows[3]["x_hf_sdpa_padded"] == 4.0 and rows[3]["x_best_hf"] == 2.0 and rows[3]["best_hf"] == "clean"


def test_best_leak_free_hf_is_the_fastest_of_every_leak_free_hf_row_and_the_legend_names_it():
    """A padded HF row leaks nothing either: it was left out, so a faster padded row never was the reference."""
    from fasttune.bench.train import TrainBench
    from fasttune.bench.train_verdict import target_lines, verdict_lines

    rows = [
        {"config": "HF pad", "stack": "HF", "attn": "sdpa", "packing": False, "tokens_per_s": 30.0, "status": "ok"},
        {"config": "HF leaky", "stack": "HF", "attn": "x", "packing": True, "tokens_per_s": 90.0, "status": "ok",
         "leak_err": 0.5},
        {"config": "HF packed", "stack": "HF", "attn": "y", "packing": True, "tokens_per_s": 20.0, "status": "ok",
         "leak_err": 0.0},
        {"config": "fasttune auto packed", "stack": "fasttune", "attn": "auto", "packing": True, "tokens_per_s": 60.0,
         "status": "ok"},
    ]  # fmt: skip
    add_ratios(rows)
    assert rows[3]["best_hf"] == "HF pad" and rows[3]["x_best_hf"] == pytest.approx(60 / 30)
    lines = target_lines(TrainBench(device=torch.device("cpu"), lengths=[8]), rows)
    assert lines[0] == ("- x best leak-free HF: tokens/s against HF pad, the fastest Hugging Face row (packed or "
                        "padded) whose batches let no document attend to another")  # fmt: skip
    assert "- target >= 1.4x best leak-free HF stack (HF pad): fasttune auto packed 2.00x" in lines
    gpu = TrainBench(device=torch.device("cuda"), lengths=[8])  # the results' closing lines: judged on a GPU only
    assert verdict_lines(gpu, rows) == target_lines(gpu, rows)
    cpu = verdict_lines(TrainBench(device=torch.device("cpu"), lengths=[8]), rows)
    assert cpu[0] == lines[0] and len(cpu) == 2 and "smoke test" in cpu[1] and "target >=" not in cpu[1]


def test_memory_per_1k_tokens_is_per_micro_batch_held_at_once():
    """A step of grad_accum 2 runs two micro-batches one after the other: its peak is one micro-batch's, so dividing
    by the step's tokens halved its memory per token (rows 1 and 2 hold the same 4k tokens at once)."""
    rows = [{"peak_gib": 8.0, "tokens_per_step": 4000.0}, {"peak_gib": 8.0, "tokens_per_step": 8000.0, "grad_accum": 2},
            {"peak_gib": None, "tokens_per_step": 8000.0}]  # fmt: skip
    assert [gib_per_1k(r) for r in rows] == [2.0, 2.0, None]
    rounds = [{**rows[1], "status": "ok", "tokens_per_s": t} for t in (1.0, 2.0)]
    assert merge_rounds(rounds)["gib_per_1k"] == 2.0
    assert dict(MD_COLUMNS)["gib_per_1k"] == "peak GiB per 1k micro-batch tokens"


def test_markdown_table():
    md = markdown_table([{"a": 1234.5, "b": None}, {"a": 0.5, "b": "ok"}], [("a", "A"), ("b", "B")])
    assert md.splitlines() == ["| A | B |", "|---|---|", "| 1,234 | - |", "| 0.50 | ok |"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("ckpt", [False, True])
def test_hf_peft_baseline_trains_only_adapters(ckpt):
    """The HF + peft baseline as built for a step: adapters get gradients (also through non-reentrant gradient
    checkpointing over frozen embeddings), the base, lm_head and embeddings none."""
    from fasttune.bench import baselines as hf

    b = hf.Baseline("HF + peft sdpa padded", "sdpa", False, ckpt=ckpt, lora=True)
    model = hf._build("micro", 64, b, torch.device("cpu"), torch.float32)
    ids = torch.randint(2, 64, (2, 9))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    lora = [n for n in grads if ".lora_" in n]
    assert len(lora) == 2 * 7 * 2  # layers x targets x (A, B)
    assert all(grads[n] is not None for n in lora)  # lora_A's is 0 at the first step: peft starts B at 0
    assert all(grads[n].abs().sum() > 0 for n in lora if ".lora_B" in n)
    assert all(g is None for n, g in grads.items() if ".lora_" not in n)


def test_hf_peft_baseline_prints_no_peft_deprecation_warning(recwarn):
    """`bench train --lora` wraps the HF baseline with peft, which reads transformers' deprecated
    `is_gradient_checkpointing`: its FutureWarning (a site-packages path) is hidden as in fasttune's own LoRA."""
    import warnings

    from fasttune.bench import baselines as hf

    warnings.simplefilter("always")
    b = hf.Baseline("HF + peft sdpa padded", "sdpa", False, lora=True)
    hf._build("micro", 64, b, torch.device("cpu"), torch.float32)
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


def test_train_bench_rows_survive_a_run_cut_short(tmp_path):
    """Each row is written as soon as it is measured: a run killed by a time limit keeps the rows it finished."""
    from fasttune.bench import train as bench
    from fasttune.bench.harness import Results

    cfg = bench.TrainBench(torch.device("cpu"), [12, 20, 9, 30], preset="micro", attns=[], vocab=64, micro_batch=2,
                           max_length=32, epochs=1, hf_only=["sdpa"])  # fmt: skip
    results, written = Results("train", {}), []

    def after_row():
        results.write(tmp_path, bench.MD_COLUMNS, None)
        written.append([r["config"] for r in json.loads((tmp_path / "train.json").read_text())["rows"]])

    bench.run_all(cfg, results, after_row=after_row)
    assert written == [["HF sdpa padded"], ["HF sdpa padded", "HF sdpa packed (4D mask)"]]


def test_synthetic_bundle_trains_through_the_real_loop(tmp_path):
    """What `bench train` and scripts/multi_gpu.py hand the loop: it must accept the synthetic tokenizer."""
    from helpers import tiny_config

    from fasttune.train import loop

    cfg = tiny_config(tmp_path, max_steps=1, eval_every=0, save_every=0, save_final=False)
    data = synthetic_bundle(sft_lengths(32, 40, 50, 8, 64), vocab_size=cfg.data.tokenizer_vocab_size)
    assert [r["step"] for r in loop.train(cfg, data=data).records if r.get("loss")] == [1]


def test_baselines_compute_in_the_precision_of_fasttunes_rows():
    """On a CPU `full` trains in pure bf16: the HF rows too (they used fp32 there, a bf16 vs fp32 comparison)."""
    import dataclasses

    from fasttune.bench.train import TrainBench, hf_dtype, plan_runs, precision_note

    full = TrainBench(device=torch.device("cpu"), lengths=[8], preset="micro", experiment="full")
    assert not [
        r
        for r in plan_runs(dataclasses.replace(full, baselines=False, equal_tokens=True))[0]
        if "tokens per step" in r["name"]
    ]  # HF's tokens per step: only beside HF rows
    quick = TrainBench(device=torch.device("cpu"), lengths=[8], preset="micro", experiment="quick")
    assert hf_dtype(full) == torch.bfloat16 and hf_dtype(quick) == torch.float32
    assert "HF baselines pure bf16" in precision_note(full) and "model.dtype bf16: pure bf16" in precision_note(full)
    assert "HF baselines pure fp32" in precision_note(quick)


def test_a_dataset_workload_keeps_its_prompt_masks(tmp_path):
    """--data: the samples' lengths and label masks as training tokenizes them (alpaca prompts have no label), and
    the synthetic tokens carry the same masks to fasttune's and HF's rows."""
    import json

    from fasttune.bench.workload import dataset_workload

    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."}
               for i in range(12)]  # fmt: skip
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    lengths, trained = dataset_workload(str(path), None, 64, 5)
    assert len(lengths) == len(trained) == 5 and [len(t) for t in trained] == lengths
    for mask in trained:
        assert not mask[0] and mask[-1] and 0 < sum(mask) < len(mask)  # the prompt untrained, the response trained
    data = synthetic_bundle(lengths, vocab_size=100, trained=trained)
    for s, mask in zip(data.train, trained, strict=True):
        assert [label != -100 for label in s["labels"]] == mask
        kept = [t for t, keep in zip(s["input_ids"], mask, strict=True) if keep]
        assert kept == [t for t in s["labels"] if t != -100]


def test_the_memory_target_takes_the_fastest_fasttune_row_that_fits_the_leanest_hf_memory():
    from fasttune.bench.train_verdict import memory_target_line

    def row(config, stack, tps, gib, **kw):
        return {"config": config, "stack": stack, "status": "ok", "tokens_per_s": tps, "peak_gib": gib, **kw}

    hf_rows = [row("HF FA4", "HF", 50.0, 24.0, packing=True, leak_free=True),
               row("HF FA4 + Liger", "HF", 40.0, 16.0, packing=True, leak_free=True),
               row("HF sdpa padded", "HF", 90.0, 10.0, packing=False, leak_free=True)]  # fmt: skip
    ours = [row("fasttune 8k", "fasttune", 85.0, 15.5), row("fasttune 10k", "fasttune", 95.0, 16.5)]
    assert memory_target_line(hf_rows + ours) == (
        "- target >= 1.6x the fastest HF stack (HF FA4) in no more memory than the leanest (HF FA4 + Liger, 16.0 "
        "GiB): fasttune 8k 1.70x in 15.5 GiB"
    )
    assert memory_target_line(hf_rows + ours[1:]).endswith("16.0 GiB): no fasttune row fits that memory")
    assert memory_target_line(ours) is None


def test_synthetic_data_summary_does_not_claim_a_packing_saving_it_never_counted():
    """The benchmarks' synthetic data counts no padded batches: its summary says nothing of packing, rather than
    "packing saves -140,624 of 0 padded tokens" (seen in an FSDP2 run's log on the GPU)."""
    lines = synthetic_bundle([40, 60, 80], 300, seed=0).summary.lines()
    assert lines[1].endswith("180 train tokens, longest 80") and not any("packing" in x for x in lines), lines


def test_rounds_interleave_every_configuration_and_report_medians(tmp_path):
    """--rounds 2: the list runs twice in turn (HF, fasttune, HF, fasttune); a row holds both rounds' tokens/s and
    their median, a failed round fails its row."""
    from fasttune.bench import train as bench
    from fasttune.bench.harness import Results

    cfg = bench.TrainBench(torch.device("cpu"), [12, 20, 9, 30], preset="micro", attns=["auto"], packings=[True],
                           vocab=64, micro_batch=2, max_length=32, epochs=1, hf_only=["packed"], rounds=2)  # fmt: skip
    order = []
    real = bench._run_one

    def run_one(b, spec, data, tmp):
        order.append(spec["name"])
        return real(b, spec, data, tmp)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bench, "_run_one", run_one)
        rows = bench.run_all(cfg, Results("train", {})).rows
    assert order == ["HF sdpa packed (4D mask)", "fasttune auto packed"] * 2
    assert [r["config"] for r in rows] == order[:2]
    for r in rows:
        assert r["status"] == "ok" and len(r["round_tok_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(sum(r["round_tok_s"]) / 2)  # the median of two
        assert r["rounds_pct"] == pytest.approx(50 * abs(r["round_tok_s"][0] - r["round_tok_s"][1]) / r["tokens_per_s"])
    failed = bench.merge_rounds(
        [{"config": "x", "status": "ok", "tokens_per_s": 5.0}, {"config": "x", "status": "OOM"}]
    )
    assert failed["status"] == "OOM" and failed["round_tok_s"] == [5.0, None]


def test_the_memory_target_is_also_judged_round_by_round():
    from fasttune.bench.train_verdict import memory_target_line

    def row(config, stack, rates, gib, **kw):
        tps = sorted(rates)[1]
        return {"config": config, "stack": stack, "status": "ok", "tokens_per_s": tps, "round_tok_s": rates,
                "peak_gib": gib, "packing": True, "leak_free": True, **kw}  # fmt: skip

    rows = [row("HF FA4", "HF", [50.0, 60.0, 40.0], 24.0), row("HF FA4 + Liger", "HF", [55.0, 45.0, 40.0], 16.0),
            row("fasttune 8k", "fasttune", [80.0, 81.0, 79.0], 15.0)]  # fmt: skip
    # rounds: 80/55, 81/60, 79/40; medians: 80/50
    assert memory_target_line(rows).endswith(
        "fasttune 8k 1.60x in 15.0 GiB (round by round: 1.45x, 1.35x, 1.98x; median 1.45x)"
    )
