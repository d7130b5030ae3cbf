"""`fasttune bench` from the command line: each benchmark run at tiny CPU sizes and the files it writes, the LoRA
rows and what they train, and every option checked in one line before anything runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fasttune import cli
from fasttune.model.build import preset_config


def _outputs(out, name):
    files = {s: out / f"{name}.{s}" for s in ("csv", "json", "md", "png")}
    assert all(p.is_file() and p.stat().st_size > 0 for p in files.values())
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(files["csv"].open()))
    data = json.loads(files["json"].read_text())
    assert len(rows) == len(data["rows"]) and data["env"]["torch"] == torch.__version__
    table = [line for line in files["md"].read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and len({line.count("|") for line in table}) == 1
    return data["rows"]


def test_attention_bench_cpu(tmp_path):
    argv = ["attention", "--device", "cpu", "--backends", "eager,sdpa", "--seq-lens", "8,16", "--head-dims", "8"]
    assert cli.main(["bench", *argv, "--tokens", "32", "--heads", "2", "--out", str(tmp_path)]) == 0
    rows = _outputs(tmp_path, "attention")
    assert len(rows) == 2 * 2 * 3  # layouts x seq x (eager, sdpa, auto)
    assert all(r["status"] == "ok" and r["max_err"] < 1e-5 and r["fwd_bwd_tflops"] > 0 for r in rows)
    autos = [r for r in rows if r["backend"].startswith("auto")]
    assert len(autos) == 4 and all(r["backend"] == "auto -> sdpa" and r["best"] in ("eager", "sdpa") for r in autos)
    for auto in autos:  # a shape with a noisy row (a loaded CPU) has no ratio: test_..._no_verdict_from_noisy_timings
        shape = [r for r in rows if (r["layout"], r["seq"]) == (auto["layout"], auto["seq"])]
        assert ("auto_vs_best" in auto) == (not any(r.get("noisy") for r in shape)), shape
        # auto is timed as its own function (CPU: it routes to sdpa), so the ratio is measured, not 1.0 by
        # construction; its routed kernel's row: the same measurements as best
        assert "auto_vs_best" not in auto or (auto["auto_vs_best"] > 0 and 0 < auto["route_vs_best"] <= 1.0)


def test_attention_bench_draws_no_verdict_from_noisy_timings(tmp_path, monkeypatch, capsys):
    """A row whose calls were noisy (harness.noise) says so in the table, and no ratio to the best kernel, nor the
    summary's verdict, is drawn from it; on a CPU the load average is printed beside the results. The timer is
    replaced by one of known times: sdpa and auto 1 ms, except auto's forward at seq 16, noisy at 50 ms."""
    from fasttune.bench import attention
    from fasttune.bench.harness import Timing

    calls = []

    def timer(fn, device, **_):
        calls.append(1)  # per shape: sdpa fwd, sdpa fwd+bwd, auto fwd, auto fwd+bwd
        fn()
        if len(calls) == 7:
            return Timing(50.0, "quartiles 0.03-48 ms around a median of 50 ms")
        return Timing(1.0 if len(calls) % 4 != 0 else 1.5, None)

    monkeypatch.setattr(attention, "timing", timer)
    argv = ["attention", "--device", "cpu", "--backends", "sdpa", "--seq-lens", "8,16", "--head-dims", "8"]
    assert cli.main(["bench", *argv, "--layouts", "padded", "--tokens", "32", "--heads", "2", "--out",
                     str(tmp_path)]) == 0  # fmt: skip
    rows = _outputs(tmp_path, "attention")
    autos = [r for r in rows if r["backend"].startswith("auto")]
    assert [r["seq"] for r in autos] == [8, 16] and autos[0]["auto_vs_best"] == pytest.approx(1 / 1.5 * 1.0)
    assert "auto_vs_best" not in autos[1] and "route_vs_best" not in autos[1]
    assert autos[1]["noisy"] == "fwd: quartiles 0.03-48 ms around a median of 50 ms" and "noisy" not in autos[0]
    out = capsys.readouterr().out
    assert "| fwd: quartiles 0.03-48 ms around a median of 50 ms |" in out
    [verdict] = [line for line in out.splitlines() if line.startswith("- auto (padded, D8)")]
    assert "worst 67% of the best kernel (sdpa) at seq 8" in verdict, verdict
    assert "seq 16 left out: noisy timings" in verdict, verdict
    assert "load average" in out


def test_attention_bench_left_padding_cpu(tmp_path):
    """The opt-in left-padded layout times the unpadding path; its outputs still match the fp32 reference."""
    argv = ["attention", "--device", "cpu", "--backends", "eager,sdpa", "--seq-lens", "16", "--head-dims", "8"]
    argv += ["--layouts", "padded-left", "--tokens", "32", "--heads", "2", "--out", str(tmp_path)]
    assert cli.main(["bench", *argv]) == 0
    rows = _outputs(tmp_path, "attention")
    assert [r["layout"] for r in rows] == ["padded-left"] * 3 and all(r["max_err"] < 1e-5 for r in rows)


def test_train_bench_cpu(tmp_path, caplog, capsys):
    caplog.set_level("INFO", logger="fasttune")  # as under the CLI: the bench reads the logged memory plan
    argv = ["train", "--device", "cpu", "--attn", "auto", "--packing", "on", "--samples", "6", "--median", "12"]
    argv += ["--mean", "16", "--min-length", "4", "--max-length", "32", "--micro-batch", "2", "--epochs", "1"]
    argv += ["--hf-micro-batch", "4", "--hf-ckpt"]  # and a row at equal tokens per step: on by default
    assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 0
    rows = _outputs(tmp_path, "train")
    assert [r["config"] for r in rows] == [
        "HF sdpa padded", "HF sdpa packed (4D mask)", "HF sdpa packed (4D mask) + grad ckpt", "fasttune auto packed",
        "fasttune auto packed at HF's tokens per step (2 x 32)",
    ]  # fmt: skip
    hf_tokens = rows[0]["tokens_per_step"]  # 4 samples per HF step; fasttune packs 2 x 32 tokens
    assert 4 * 4 <= hf_tokens <= 4 * 32 and rows[3]["tokens_per_step"] <= 2 * 32
    assert rows[3]["plan"] == "none" and rows[3]["loss"] > 0  # no GPU to fit: auto is none
    assert all(r["status"] == "ok" for r in rows), rows
    rows = rows[:2] + rows[3:4]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[1]["leak_err"] < 1e-4  # the packed HF baseline really is leak-free (fp32 on CPU)
    assert rows[2]["x_hf_sdpa_padded"] == pytest.approx(rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"])
    # no GPU: said before the first configuration trains, and instead of the targets' verdicts at the end
    captured = capsys.readouterr()
    err, out = captured.err, captured.out
    cpu = "bench train without a GPU (device cpu): its targets and ratios are meant for a GPU;"
    assert err.startswith(cpu) and err.index(cpu) < err.index("configurations:"), err[-2000:]
    # the rows' runs are quiet (the progress bar, then the table): no run's own lines or summary, a warning once
    assert "training: " not in err and "step 1/" not in err and "data: " not in err, err[-2000:]
    assert err.count("model.liger: Liger kernels need a CUDA GPU") == 1, err[-2000:]
    assert "run summary" not in out and out.count("| fasttune auto packed |") == 1, out
    md = (tmp_path / "train.md").read_text()
    assert "the CPU numbers are only a smoke test" in md and "- target >=" not in md


def _adapter_count(config, r: int) -> int:
    """LoRA parameters of a Llama config with adapters on q, k, v, o, gate, up, down: r x (fan in + fan out) each."""
    h, i, d = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return config.num_hidden_layers * sum(r * (a + b) for a, b in shapes)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft (<= 0.21) reads transformers' is_gradient_checkpointing
def test_train_bench_lora_cpu(tmp_path, caplog):
    """--lora: HF + peft and fasttune rows train the same adapters, and only them (the optimizer's parameter count on
    the HF side, the loop's trainable count on fasttune's, both against a hand count of r=16 adapters)."""
    caplog.set_level("INFO", logger="fasttune")
    argv = ["train", "--device", "cpu", "--attn", "auto", "--packing", "on", "--samples", "4", "--median", "12"]
    argv += ["--mean", "16", "--min-length", "4", "--max-length", "32", "--epochs", "1", "--lora"]
    argv += ["--hf-ckpt", "--hf-only", "packed", "--variant", "r8:lora.rank=8,training.grad_accum=2"]
    argv += ["--no-equal-tokens"]
    assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 0
    rows = _outputs(tmp_path, "train")
    assert [r["config"] for r in rows] == [
        "HF + peft sdpa packed (4D mask)", "HF + peft sdpa packed (4D mask) + grad ckpt", "fasttune LoRA auto packed",
        "r8",
    ]  # fmt: skip
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    adapters = _adapter_count(preset_config("micro", 512), r=16)
    assert [r["trained_params"] for r in rows] == [adapters, adapters, adapters, adapters // 2]  # variant on top
    assert rows[2]["tokens_per_step"] <= 4 * 32  # the full experiment's 4 x max-length packs by default
    assert [r.get("grad_accum") for r in rows] == [None, None, 1, 2]  # what the memory per 1k tokens divides by
    assert rows[2]["x_best_hf"] == pytest.approx(rows[2]["tokens_per_s"] / max(r["tokens_per_s"] for r in rows[:2]))
    md = (tmp_path / "train.md").read_text()
    assert "MFU with LoRA" in md and "only a smoke test" in md and "target >=" not in md  # CPU: targets not judged
    from fasttune.bench.train import TrainBench
    from fasttune.bench.train_verdict import target_lines  # on a GPU the same rows are judged against LoRA's

    judged = target_lines(TrainBench(device=torch.device("cuda"), lengths=[8], lora=True), rows)
    assert any(line.startswith("- target >= 1.8x best leak-free HF + peft stack") for line in judged), judged


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft (<= 0.21) reads transformers' is_gradient_checkpointing
def test_train_bench_of_the_lora_experiment_trains_lora_without_asking_for_it(tmp_path):
    """--experiment lora is a LoRA benchmark: its rows train the adapters --lora trains (it asked for --lora before,
    even with --no-baselines, where no full-weight row remained to compare against)."""
    argv = ["train", "--device", "cpu", "--experiment", "lora", "--no-baselines", "--no-equal-tokens", "--samples", "4"]
    argv += ["--median", "12", "--mean", "16", "--min-length", "4", "--max-length", "32", "--epochs", "1"]
    assert cli.main(["bench", *argv, "--packing", "on", "--out", str(tmp_path)]) == 0
    (row,) = _outputs(tmp_path, "train")
    assert row["config"] == "fasttune LoRA auto packed" and row["status"] == "ok"
    assert row["trained_params"] == _adapter_count(preset_config("micro", 512), r=16)


def test_train_bench_lora_needs_peft(capsys, monkeypatch):
    import fasttune.attention.probe as probe

    real = probe.import_status
    monkeypatch.setattr(probe, "import_status", lambda m: "package not installed" if m == "peft" else real(m))
    assert cli.main(["bench", "train", "--device", "cpu", "--lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --lora needs the peft package (package not installed): pip install 'fasttune[lora]'"
    assert cli.main(["bench", "train", "--device", "cpu", "--experiment", "lora"]) == 2  # the preset asked for it
    err = capsys.readouterr().err.strip()
    assert err == ("error: --experiment lora (LoRA) needs the peft package (package not installed): pip install "
                   "'fasttune[lora]'")  # fmt: skip


@pytest.mark.parametrize("order", [["--experiment", "lora", "--no-lora"], ["--no_lora", "--experiment=lora"]])
def test_train_bench_refuses_no_lora_with_the_lora_experiment(order, capsys, tmp_path):
    """--no-lora contradicts a LoRA preset (whose rows all train adapters): one line before anything runs, not a LoRA
    benchmark the user asked not to get."""
    assert cli.main(["bench", "train", "--device", "cpu", *order, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --no-lora: --experiment lora benchmarks LoRA (every row trains adapters); drop --no-lora, "
                   "or benchmark full fine-tuning with --experiment sft")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_train_bench_names_its_own_seed_option(capsys, tmp_path):
    """A seed the rows' training config refuses is bench train's --seed: it was named as the config key, seed=..."""
    assert cli.main(["bench", "train", "--device", "cpu", "--seed", str(2**64), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --seed={2**64} is not valid; choose one from ")
    assert not (tmp_path / "out").exists()


def test_cli_usage_and_errors(capsys):
    assert cli.main(["bench", "--help"]) == 0 and "attention" in capsys.readouterr().out
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown command 'nope' for `fasttune bench`; choose one of: attention, train, generate"
    assert cli.main(["bench", "attention", "--layouts", "diagonal"]) == 2
    assert "--layouts 'diagonal' is not valid; choose from: padded, packed, padded-left" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--samples", "0"], "--samples 0: must be >= 1"),
        (["train", "--epochs", "0"], "--epochs 0: must be >= 1"),
        (["train", "--warmup-epochs", "-1"], "--warmup-epochs -1: must be >= 0"),
        (["train", "--packing", "onn"], "--packing 'onn' is not valid"),
        (["train", "--packing", ","], "--packing ',' is not valid"),
        (["train", "--preset", "foo"], "--preset 'foo' is not valid"),
        (["train", "--attn", "fa9"], "--attn 'fa9' is not valid"),
        (["train", "--device", "gpu"], "--device 'gpu' is not valid"),
        (["train", "--variant", "x:model.memroy=ops"], "--variant 'x': unknown option --model.memroy; did you mean"),
        (["train", "--variant", "x:model.liger=ture"], "model.liger is a switch; write model.liger=true or"),
        (["train", "--variant", "x:model.memory=every:0"], "--variant 'x': model.memory='every:0' is not valid"),
        (["train", "--variant", "a:model.liger=false", "--variant", "a:data.micro_batch_size=2"],
         "--variant 'a': another row has that name; give each variant its own"),
        (["train", "--variant", "fasttune auto packed:model.liger=false"], "'fasttune auto packed': another row"),
        (["train", "--variant", ":model.liger=false"], "--variant ':model.liger=false': write NAME:"),
        (["train", "--variant", "x:training.epochs=1"], "--variant 'x': training.epochs: every row's length is the "
         "benchmark's (--warmup-epochs + --epochs passes over its samples); drop it from the variant and set bench "
         "train's --epochs"),
        (["train", "--variant", "y:model.liger=false,training.max_steps=9"], "'y': training.max_steps: every row's"),
        (["train", "--hf-only", "nosuch"], "--hf-only 'nosuch' matches none of the Hugging Face baselines"),
        (["train", "--device", "cpu", "--hf-only", "FA4"], "'HF sdpa packed (4D mask)'); HF flash_attention_4 "
         "baselines: need CUDA; name one of them"),
        (["train", "--median", "100", "--mean", "50"], "--median 100 is above --mean 50: a lognormal mix's mean"),
        (["train", "--device", "cpu", "--median", "100"], "--median 100 is above --mean 68"),
        (["train", "--min-length", "300", "--max-length", "64"], "--min-length 300 is above --max-length 64"),
        (["train", "--data", "x.json", "--median", "30"], "--median shapes the synthetic length mix, which --data"),
        (["train", "--no-baselines", "--hf-only", "sdpa"], "--hf-only sets the Hugging Face baselines, which"),
        (["train", "--no-baselines", "--hf-ckpt"], "--hf-ckpt sets the Hugging Face baselines, which --no-baselines"),
        (["train", "--model", "tok"], "--model is the tokenizer for --data's texts; without --data"),
        (["train", "--hf-only", "sdpa packed (4D mask) + grad ckpt"], "need CUDA; the '+ grad ckpt' baselines run "
         "with --hf-ckpt; name one of them"),
        (["attention", "--layouts", ","], "--layouts ',' is not valid; choose from: padded, packed, padded-left"),
        (["train", "--attn", ","], "--attn ',' names no backend; choose from: auto, eager"),
        (["train", "--device", "cpu", "--attn", "varlen", "--no-baselines"], "nothing to measure here (fasttune "
         "varlen: unavailable (needs a CUDA GPU (device is cpu))): name an --attn that runs here"),
        (["attention", "--tokens", "-5"], "--tokens -5: must be >= 1"),
        (["attention", "--heads", "0"], "--heads 0: must be >= 1"),
        (["generate", "--batch-sizes", "1,x"], "--batch-sizes '1,x': write comma-separated whole numbers"),
        (["generate", "--batch-sizes", "0"], "--batch-sizes '0': write comma-separated numbers > 0"),
        (["generate", "--new-tokens", "0"], "--new-tokens 0: must be >= 1"),
        (["generate", "--prompt-len", "-1"], "--prompt-len -1: must be >= 1"),
        (["generate", "--prompt-len", "1", "--batch-sizes", "1,4"], "--prompt-len 1: a batch above 1 takes prompts"),
        (["generate", "--shape", "nope"], "--shape 'nope' is not valid; choose one of: micro, tiny"),
        pytest.param(["generate", "--device", "cuda"], "--device cuda: no CUDA GPU is visible to torch",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
        (["generate", "--device", "cpu", "--eager"], "--eager adds rows without CUDA graphs beside the graphed ones"),
        (["generate", "--device", "cpu", "--profile"], "--profile counts CUDA kernels per decode step: it needs a GPU"),
    ],
)  # fmt: skip
def test_bench_options_are_checked_before_anything_runs(argv, message, capsys, tmp_path, monkeypatch):
    """One line, exit 2, and no configuration run (a bad variant used to fail only at its own row, exit 0)."""
    from fasttune.bench import generate as bench_generate
    from fasttune.bench import train as bench_train

    monkeypatch.setattr(bench_train, "run_all", lambda *a, **k: pytest.fail("a configuration ran"))
    monkeypatch.setattr(bench_generate, "run", lambda *a, **k: pytest.fail("the generation benchmark ran"))
    assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_bench_generate_says_it_trains_the_model_before_the_first_row(monkeypatch, caplog):
    """`bench generate` trains its model first (30 steps: over a minute on a 2-core CPU) and printed nothing then."""
    import logging

    from fasttune.bench import generate as bench

    monkeypatch.setattr(bench, "build_model", lambda shape, device: torch.nn.Linear(2, 2))
    monkeypatch.setattr(bench, "train_briefly", lambda model, steps, **kw: [1.0, 0.5])
    monkeypatch.setattr(bench, "_batch_rows", lambda *a: [])
    with caplog.at_level(logging.INFO, logger="fasttune"):
        bench.run("tiny", (1,), 8, 4, "cpu", torch.float32, train_steps=30)
    assert "training the tiny model for 30 steps" in caplog.text
