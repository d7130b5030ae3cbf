"""`fasttune bench`: what the runs leave in --out (an earlier run's results kept, rows kept when a run fails or is
cut short), the ratios across rounds, and the header's versions."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fasttune import cli


@pytest.mark.parametrize("command", ["attention", "train", "generate"])
def test_out_must_be_a_writable_folder(command, capsys, tmp_path):
    """--out naming a file used to fail with a traceback after the whole run, its measurements lost."""
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["bench", command, "--device", "cpu", "--out", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {tmp_path / 'notes.txt'}: is a file, not a folder; name a folder (it is created if " \
        "missing)"  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_earlier_runs_results_are_kept_unless_overwrite(capsys, tmp_path, monkeypatch):
    """Running a benchmark again into the same --out silently replaced the earlier run's tables (the default --out
    is the same folder every time); --overwrite replaces them all, the plot included."""
    from fasttune.bench import attention as bench_attention

    argv = ["bench", "attention", "--device", "cpu", "--backends", "sdpa", "--seq-lens", "8", "--head-dims", "8"]
    argv += ["--layouts", "packed", "--tokens", "16", "--heads", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["attention.csv", "attention.json", "attention.md", "attention.png"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {tmp_path} already holds an earlier run's attention.csv, attention.json, "
                   "attention.md, attention.png; name another folder, or pass --overwrite to replace them")  # fmt: skip
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert cli.main([*argv, "--overwrite", "--seq-lens", "8,x"]) == 2  # a typo keeps them too
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert cli.main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "attention.json").read_text())["env"]["command"].endswith(" --overwrite")
    monkeypatch.setattr(bench_attention, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main([*argv, "--overwrite"]) == 130  # cut short before a row: no earlier file passes for this run's
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), KeyboardInterrupt])
def test_generate_bench_keeps_the_batches_measured_before_one_fails(failure, tmp_path, monkeypatch):
    """A batch size that runs out of memory is a row saying so, not a traceback that loses the table; a run cut
    short (Ctrl-C, a time limit) keeps the batch sizes it finished in --out."""
    from fasttune.bench import generate as bench_generate

    real = bench_generate.bench_batch

    def bench_batch(model, batch, *args, **kwargs):
        if batch == 2:
            raise failure
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(bench_generate, "bench_batch", bench_batch)
    argv = ["bench", "generate", "--device", "cpu", "--shape", "micro", "--batch-sizes", "1,2", "--prompt-len", "4"]
    code = cli.main([*argv, "--new-tokens", "2", "--train-steps", "0", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    assert [(r["impl"], r["batch"], r["status"]) for r in rows[:2]] == [("hf_generate", 1, "ok"), ("fasttune", 1, "ok")]
    assert all(r["tok_s"] > 0 for r in rows[:2])
    if failure is KeyboardInterrupt:
        assert code == 130 and len(rows) == 2
        return
    assert code == 0 and rows[2:] == [{**rows[2], "impl": "hf_generate, fasttune", "batch": 2, "status": "OOM"}]
    assert "tok_s" not in rows[2] and "speedup" not in rows[2]
    assert "| hf_generate, fasttune | float32 | 2 | - | - | - |" in (tmp_path / "generate.md").read_text()


def test_generate_bench_logs_each_row_as_a_line_and_its_losses_rounded(tmp_path, capsys):
    """While it runs, each row is a line a person reads (batch, implementation, tok/s, x HF, greedy agreement), not a
    Python dict; the note gives the training losses first and last, rounded."""
    argv = ["bench", "generate", "--device", "cpu", "--shape", "micro", "--batch-sizes", "1", "--prompt-len", "4"]
    assert cli.main([*argv, "--new-tokens", "2", "--train-steps", "2", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("batch 1 ")]
    assert len(lines) == 2 and not any("{" in line for line in lines), lines
    assert re.fullmatch(r"batch 1 hf_generate float32: [\d,]+ tok/s", lines[0]), lines
    assert re.fullmatch(r"batch 1 fasttune float32: [\d,]+ tok/s \(\d+\.\d\dx HF generate\), greedy (= HF|differs .*)",
                        lines[1]), lines  # fmt: skip
    note = json.loads((tmp_path / "generate.json").read_text())["notes"][0]
    assert re.fullmatch(r"trained 2 steps in [\d.]+ s, loss \d+\.\d{4} -> \d+\.\d{4}", note), note


def test_the_header_names_the_versions_the_rows_ran_on():
    """--lora rows train through peft on the HF side: its version belongs in the header beside transformers'."""
    import importlib.metadata

    from fasttune.bench.harness import environment

    env = environment(torch.device("cpu"), ["train", "--lora"])
    assert env["command"] == "fasttune bench train --lora" and env["torch"] == torch.__version__
    assert env["transformers"] == importlib.metadata.version("transformers")
    assert env["peft"] == importlib.metadata.version("peft")


def test_a_baseline_that_fails_in_a_later_round_is_no_ratios_reference(tmp_path):
    """--rounds 2 with the best HF stack out of memory in round 2: its row fails, and no row keeps round 1's claim
    that it was the reference (the targets printed a ratio against the failed row, or crashed on its missing one)."""
    from fasttune.bench import train as bench
    from fasttune.bench.harness import Results
    from fasttune.bench.train_verdict import target_lines

    cfg = bench.TrainBench(torch.device("cpu"), [12, 20], preset="micro", attns=["auto"], packings=[True], vocab=64,
                           micro_batch=2, max_length=32, epochs=1, rounds=2)  # fmt: skip
    calls = []

    def run_one(b, spec, data, tmp):
        calls.append(spec["name"])
        row = {"config": spec["name"], "stack": spec["stack"], "attn": "sdpa", "packing": "packed" in spec["name"]}
        if spec["name"] == "HF sdpa packed (4D mask)" and calls.count(spec["name"]) == 2:
            return {**row, "status": "OOM"}
        return {**row, "status": "ok", "tokens_per_s": 100.0 * len(calls), "leak_err": 0.0}

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bench, "_run_one", run_one)
        rows = {r["config"]: r for r in bench.run_all(cfg, Results("train", {})).rows}
    assert rows["HF sdpa packed (4D mask)"]["status"] == "OOM"
    main = rows["fasttune auto packed"]
    assert main["status"] == "ok" and main["best_hf"] == "HF sdpa padded"  # the leak-free row that ran, not the OOM
    assert main["x_hf_sdpa_padded"] == pytest.approx(main["tokens_per_s"] / rows["HF sdpa padded"]["tokens_per_s"])
    assert main["x_best_hf"] == main["x_hf_sdpa_padded"]
    lines = target_lines(cfg, list(rows.values()))
    assert lines[0].startswith("- x best leak-free HF: tokens/s against HF sdpa padded, ")
    assert lines[1].startswith("- target >= 3.2x HF sdpa padded: ") and not any("(4D mask)" in x for x in lines)
