"""Config: every preset builds and validates; bad values give one clear line naming the option and valid values."""

import dataclasses
import json
from pathlib import Path

import pytest

from fasttune.cli import main, parse_train_args
from fasttune.config import EXPERIMENTS, BaseConfig, from_dict, get_experiment, to_dict
from fasttune.errors import ConfigError


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_preset_builds_validates_and_round_trips(name):
    cfg = get_experiment(name).validate()
    assert cfg.experiment == name
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_default_attention_is_sdpa():
    assert BaseConfig().attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("change", "option", "valid"),
    [
        ({"attn_implementation": "flashy"}, "attn_implementation='flashy'", "flash_attention_4"),
        ({"model": {"preset": "huge"}}, "model.preset='huge'", "1b"),
        ({"data": {"overlong": "cut"}}, "data.overlong='cut'", "truncate"),
        ({"training": {"max_steps": 0}}, "training.max_steps=0", "> 0"),
        ({"generation": {"top_p": 1.5}}, "generation.top_p=1.5", "(0, 1]"),
        # torch.manual_seed's range: a larger one was a ValueError traceback once the model was about to be built
        ({"seed": 2**64}, "seed=18446744073709551616", "from -9223372036854775808 to 18446744073709551615"),
    ],
)
def test_bad_values_name_option_and_valid_values(change, option, valid):
    data = to_dict(get_experiment("quick"))
    for k, v in change.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    msg = str(e.value)
    assert option in msg and valid in msg and "\n" not in msg


def test_cli_overrides_and_short_flags():
    cfg = parse_train_args(
        [
            "--experiment",
            "quick",
            "--max-steps",
            "7",
            "--data.max-length",
            "128",
            "--attn-implementation",
            "eager",
            "--output-dir=/tmp/x",
            "--save-every",
            "3",
        ]
    )
    assert cfg.training.max_steps == 7 and cfg.training.save_every == 3
    assert cfg.data.max_length == 128 and cfg.attn_implementation == "eager" and cfg.output_dir == "/tmp/x"
    assert dataclasses.replace(cfg, output_dir="runs/quick").model == get_experiment("quick").model


def test_cli_bad_value_is_one_line_error_without_traceback(capsys):
    rc = main(["train", "--experiment", "quick", "--attn-implementation", "nope"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().startswith("error: --attn-implementation='nope' is not valid")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_experiment(capsys):
    assert main(["train", "--experiment", "nope"]) == 2
    assert "--experiment 'nope' is unknown; choose one of: quick, full" in capsys.readouterr().err
    assert main(["train", "--experiment", "LoRA"]) == 2  # Axolotl's and peft's spelling: the preset is named
    assert "--experiment 'LoRA' is unknown (did you mean lora?); choose one of:" in capsys.readouterr().err


def test_experiments_lists_presets(capsys):
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)


def test_full_stops_on_cpu_with_estimate(tmp_path, capsys):
    rc = main(["train", "--experiment", "full", "--output-dir", str(tmp_path / "r"), "--training.device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "GPU-scale" in err and "hours" in err and "--force" in err
    assert "2,000 steps of up to 8,192 tokens on the 1b preset take about" in err  # what the estimate assumes


def test_only_a_cpu_run_that_could_take_an_hour_times_the_cpu(tmp_path, monkeypatch):
    """The CPU estimate's matmul probe (~10 GFLOP) runs only for a run over an hour at SLOWEST_GFLOPS: a short run
    starts without it (it cost each of the many short runs 0.15 s on 2 cores), a long one is measured and refused."""
    import torch
    from helpers import tiny_config

    from fasttune.train import device

    probes, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: probes.append(a) or randn(*a, **k))
    cfg = tiny_config(tmp_path)
    device.refuse_gpu_scale(cfg, torch.device("cpu"))
    assert probes == []
    long = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=10**9))
    with pytest.raises(ConfigError, match="GPU-scale and no GPU is available"):
        device.refuse_gpu_scale(long, torch.device("cpu"))
    assert probes == [(1024, 1024)]


def test_a_fine_tune_too_long_for_the_cpu_is_told_fewer_steps_not_another_preset(tmp_path):
    """`--experiment sft --model M` with many steps on a CPU was told to "use --experiment quick (or a smaller
    --model.preset ...)": neither fine-tunes M. A preset's run still gets those."""
    import torch
    from helpers import save_micro_model, sft_config, tiny_config

    from fasttune.train import device

    cfg = sft_config(tmp_path, save_micro_model(tmp_path / "m"))
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=10**9))
    with pytest.raises(ConfigError) as info:
        device.refuse_gpu_scale(cfg, torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("this sft run is GPU-scale and no GPU is available: 1,000,000,000 steps")
    assert "use fewer --max-steps, or pass --force" in message and "--experiment quick" not in message, message
    preset = tiny_config(tmp_path)
    preset = dataclasses.replace(preset, training=dataclasses.replace(preset.training, max_steps=10**9))
    with pytest.raises(ConfigError, match=r"use --experiment quick \(or a smaller --model.preset, fewer --max-steps\)"):
        device.refuse_gpu_scale(preset, torch.device("cpu"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--experiment", "sft", "--lora.rank", "8"], "error: --lora.rank=8 is set but LoRA is off"),
        (["--lora.targets", "q_proj", "v_proj"], "error: --lora.targets=['q_proj', 'v_proj'] is set but LoRA is off"),
    ],
)
def test_a_lora_option_without_lora_is_refused(argv, expected, tmp_path, monkeypatch, capsys):
    """`--experiment sft --lora.rank 8` trained every weight, the rank unused and unsaid (as did a --config file's
    `lora: {rank: 8}` without `enabled: true`): the user asked for LoRA and got a full fine-tune."""
    from fasttune.train import loop

    monkeypatch.setattr(loop, "train", lambda cfg, **kw: pytest.fail("the options were accepted"))
    assert main(["train", *argv, "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and "--experiment lora" in err and err.count("\n") == 1, err
    Path(tmp_path / "a.yaml").write_text("experiment: sft\nlora: {rank: 8}\n")
    assert main(["train", "--config", str(tmp_path / "a.yaml"), "--output-dir", str(tmp_path / "r")]) == 2
    assert f"lora.rank: 8 in {tmp_path / 'a.yaml'} is set but LoRA is off" in capsys.readouterr().err
    assert parse_train_args(["--experiment", "lora", "--lora.rank", "8"]).lora.rank == 8
