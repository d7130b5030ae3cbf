"""`bench train --variant NAME:section.field=value,...`: list values (section.field=[a,b]) and their errors."""

from __future__ import annotations

import pytest
import torch

from fasttune import cli
from fasttune.bench.cli import _variant
from fasttune.bench.train import TrainBench, fasttune_config
from fasttune.config import get_experiment
from fasttune.config.argcheck import parse_overrides


def test_a_variant_sets_a_list_field_as_the_command_line_does(tmp_path):
    """lora.targets=[q_proj,v_proj] (the comma separates assignments, so the list is bracketed) gives the run the
    same targets as `fasttune train --lora.targets q_proj v_proj`; the assignment after it still applies."""
    name, overrides = _variant("qv:lora.targets=[q_proj, v_proj],lora.rank=8")
    assert name == "qv" and overrides == ["lora.targets=[q_proj, v_proj]", "lora.rank=8"]
    bench = TrainBench(device=torch.device("cpu"), lengths=[12, 20], preset="micro", vocab=64, max_length=32)
    cfg, _ = fasttune_config(bench, "auto", True, ["lora.enabled=true", *overrides], tmp_path / "run")
    reference = parse_overrides(get_experiment("full"), ["--lora.enabled", "--lora.targets", "q_proj", "v_proj"])
    assert cfg.lora.targets == reference.lora.targets == ("q_proj", "v_proj") and cfg.lora.rank == 8


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("qv:lora.targets=[q_proj,v_proj", "--variant 'qv': 'lora.targets=[q_proj,v_proj': a '[' without its ']'"),
        ("qv:lora.targets=q_proj],lora.rank=8", "--variant 'qv': 'lora.targets=q_proj],lora.rank=8': a stray ]"),
        ("qv:lora.targets=[[q_proj]]", "--variant 'qv': 'lora.targets=[[q_proj]]': a nested ["),
        ("r:lora.rank=[8,16]", "--variant 'r': 'lora.rank=[8,16]': lora.rank takes one value, not a list"),
        ("qv:lora.targets=q_proj,v_proj", "--variant 'qv': 'v_proj' is not section.field=value (a list value: "
         "section.field=[a,b])"),
    ],
)  # fmt: skip
def test_a_bad_list_in_a_variant_is_one_line_naming_it(variant, message, capsys, tmp_path, monkeypatch):
    from fasttune.bench import train as bench_train

    monkeypatch.setattr(bench_train, "run_all", lambda *a, **k: pytest.fail("a configuration ran"))
    argv = ["bench", "train", "--device", "cpu", "--lora", "--variant", variant, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("x:training.lr=1e-3,lora.rank=8,training.lr=1e-4", "--variant 'x': training.lr is given twice (1e-3, then "
         "1e-4): keep one"),
        ("y:data.micro_batch_size=2,data.micro-batch-size=4", "--variant 'y': data.micro_batch_size is given twice "
         "(data.micro_batch_size=2, then data.micro-batch-size=4): keep one"),
        ("z:model.liger=true,model.no-liger=true", "--variant 'z': model.liger is given twice (model.liger=true, "
         "then model.no-liger=true): keep one"),
    ],
)  # fmt: skip
def test_an_option_set_twice_in_a_variant_is_one_line_naming_it(variant, message, capsys, tmp_path, monkeypatch):
    """`--variant 'x:training.lr=1,training.lr=2'` measured the last value under a name that showed both, as argparse
    keeps the last of an option typed twice (which `fasttune train` refuses): refused the same way."""
    from fasttune.bench import train as bench_train

    monkeypatch.setattr(bench_train, "run_all", lambda *a, **k: pytest.fail("a configuration ran"))
    argv = ["bench", "train", "--device", "cpu", "--lora", "--variant", variant, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_variant_that_offloads_on_the_cpu_is_refused_as_train_refuses_it(capsys, tmp_path, monkeypatch):
    """`fasttune train --model.memory offload` on the CPU is one line, exit 2; the same plan in a variant ran. The fix
    is named as a variant spells it (model.memory=full in that variant), not train's flag."""
    from fasttune.bench import train as bench_train

    monkeypatch.setattr(bench_train, "run_all", lambda *a, **k: pytest.fail("a configuration ran"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device auto picks the CPU, also on a GPU host
    rest = "whose activations are in host memory already, so there is nothing to offload; use model.memory=full in "
    rest += "that variant"  # the variant's spelling, not train's --model.memory full
    for typed, why in (("cpu", "--device cpu"), ("auto", "--device auto: no CUDA GPU is visible to torch")):
        argv = ["bench", "train", "--device", typed, "--variant", "x:model.memory=offload", "--out", str(tmp_path)]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()  # what the user typed, not the resolved training.device=cpu
        assert err == f"error: --variant 'x': model.memory=offload: this run trains on the CPU ({why}), {rest}", err


def test_a_variant_that_sets_a_lora_option_without_lora_is_refused(capsys, tmp_path, monkeypatch):
    """`--variant r8:lora.rank=8` without --lora measured a full fine-tune under the name of a LoRA setting, as
    `fasttune train --experiment sft --lora.rank 8` trained one: refused as train refuses it."""
    from fasttune.bench import train as bench_train

    monkeypatch.setattr(bench_train, "run_all", lambda *a, **k: pytest.fail("a configuration ran"))
    argv = ["bench", "train", "--device", "cpu", "--variant", "r8:lora.rank=8", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "lora.rank=8 is set but LoRA is off" in err and len(err.splitlines()) == 1, err
