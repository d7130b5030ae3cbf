"""`fasttune bench`: a model that cannot fit this machine stops before it is built, in one line (on a CPU the system
used to kill the run with no word), and names what fits instead."""

from __future__ import annotations

import pytest
import torch

from fasttune import cli
from fasttune.bench import fit
from fasttune.train.estimate import GiB
from fasttune.train.footprint import param_count


def _never(what):
    return lambda *a, **k: pytest.fail(f"{what} ran")


def test_generate_on_a_cpu_refuses_a_shape_beyond_its_ram(capsys, tmp_path, monkeypatch):
    """`bench generate --shape llama-3.1-8b` on a CPU trained the 8B model in fp32 first: ~120 GiB, killed."""
    from fasttune.bench import generate as bench_generate
    from fasttune.model import build

    monkeypatch.setattr(fit, "available_ram", lambda: 24 * GiB)
    monkeypatch.setattr(bench_generate, "run", _never("the generation benchmark"))
    monkeypatch.setattr(build, "build_preset", _never("a model build"))
    argv = ["bench", "generate", "--device", "cpu", "--shape", "llama-3.1-8b", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    n = param_count(build.preset_config("llama-3.1-8b", 32000))
    need = float(err.split("needs about ")[1].split(" GiB")[0])
    assert need >= 16 * n / GiB  # fp32 weights, gradients, two AdamW moments
    assert err.startswith("error: bench generate --shape llama-3.1-8b needs about ") and len(err.splitlines()) == 1
    assert "but this machine has 24.0 GiB of RAM available; try --shape 1b (the largest preset that fits)" in err
    assert not (tmp_path / "o").exists()
    assert cli.main([*argv[:5], "tiny", "--batch-sizes", "1,100000", "--new-tokens", "512"]) == 2  # the batch
    assert "(generating at batch 100000: " in (err := capsys.readouterr().err) and "try --batch-sizes 1 or " in err


def test_train_on_a_cpu_refuses_a_row_beyond_its_ram(capsys, tmp_path, monkeypatch):
    """The HF baselines (no memory plan of their own) run first: one beyond the RAM killed the whole run."""
    from fasttune.bench import train as bench_train

    monkeypatch.setattr(fit, "available_ram", lambda: 4 * GiB)
    monkeypatch.setattr(bench_train, "run_all", _never("a configuration"))
    argv = ["bench", "train", "--device", "cpu", "--preset", "1b", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bench train --preset 1b: row 'HF sdpa padded' needs about ")
    assert len(err.splitlines()) == 1
    assert "but this machine has 4.0 GiB of RAM available; try --preset 350m (the largest preset that fits)" in err
    assert err.endswith(" or a GPU (--device cuda)")
    assert cli.main([*argv, "--no-baselines"]) == 2  # fasttune's rows too, at the least their plan can reach
    assert "row 'fasttune auto packed' needs about " in capsys.readouterr().err


def test_on_a_gpu_only_a_run_where_no_row_fits_is_refused(monkeypatch):
    """On a GPU a row beyond its memory is an OOM row and the others still run; a run where none fits stops."""
    from fasttune.bench.baselines import Baseline
    from fasttune.bench.train import TrainBench

    bench = TrainBench(device=torch.device("cuda"), lengths=[400] * 8, preset="llama-3.1-8b", vocab=32000,
                       micro_batch=4, hf_micro_batch=8)  # fmt: skip
    runs = [{"stack": "HF", "baseline": Baseline("HF sdpa padded", "sdpa", False), "name": "HF sdpa padded"},
            {"stack": "fasttune", "attn": "auto", "packing": True, "name": "fasttune auto packed"}]  # fmt: skip
    needs = dict((n, e.total) for n, e in fit.train_needs(bench, runs))
    assert needs["HF sdpa padded"] > needs["fasttune auto packed"] > 8 * param_count_8b()  # bf16 weights, grads, AdamW
    between = (needs["HF sdpa padded"] + needs["fasttune auto packed"]) / 2 / fit.HEADROOM
    monkeypatch.setattr(fit, "free_memory", lambda device: between)
    fit.check_train(bench, runs)  # fasttune's row fits: HF's ends as an OOM row
    monkeypatch.setattr(fit, "free_memory", lambda device: needs["fasttune auto packed"] / 2)
    with pytest.raises(Exception, match=r"row 'fasttune auto packed' needs about .* usable on cuda .*--preset 1b"):
        fit.check_train(bench, runs)


def param_count_8b() -> int:
    from fasttune.model.build import preset_config

    return param_count(preset_config("llama-3.1-8b", 32000))
