"""A model whose weights alone exceed the GPU stops before it is built, with the numbers and what would fit (it
ended in CUDA's out-of-memory traceback while the weights loaded, before the memory plan could say anything)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fixtures.tiny_tokenizer import build_tiny_tokenizer

from fasttune.config import get_experiment
from fasttune.data.pipeline import DataBundle
from fasttune.errors import FasttuneError
from fasttune.model.build import preset_config
from fasttune.train import footprint
from fasttune.train.estimate import GiB
from fasttune.train.footprint import check_weights_fit, param_count
from fasttune.train.memory import HEADROOM
from fasttune.train.model_prep import prepare_model


def test_weights_larger_than_the_gpu_stop_before_the_model_is_built(monkeypatch):
    """--model.preset llama-3.1-8b in fp32 on a GPU with 24 GiB free: 30 GiB of weights. prepare_model stops with
    one line before touching the GPU (the device here is a CUDA device on a machine without one: anything that used
    it would fail otherwise); the advised bf16 weights pass the same check."""
    monkeypatch.setattr(footprint, "free_memory", lambda device: 24 * GiB)
    cfg = get_experiment("quick")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, preset="llama-3.1-8b", dtype="fp32"))
    data = DataBundle([], [], build_tiny_tokenizer(), None)
    with pytest.raises(FasttuneError) as e:
        prepare_model(cfg, data, torch.device("cuda"), torch.float32)
    msg = str(e.value)
    config = preset_config("llama-3.1-8b", 300)
    need = param_count(config) * 4 / GiB
    assert msg.startswith(f"the llama-3.1-8b preset: its weights alone take about {need:.1f} GiB in float32")
    assert f"may use {24 * HEADROOM:.1f} GiB" in msg and "--model.dtype bf16" in msg and "\n" not in msg
    check_weights_fit(config, torch.device("cuda"), torch.bfloat16, "x", free_bytes=24 * GiB)  # the advice fits
    with pytest.raises(FasttuneError, match="a smaller model") as e:  # bf16 that does not fit: no dtype advice
        check_weights_fit(config, torch.device("cuda"), torch.bfloat16, "x", free_bytes=12 * GiB)
    assert "--model.dtype" not in str(e.value)


def test_a_training_state_larger_than_the_ram_stops_before_the_model_is_built(monkeypatch):
    """--force on a CPU machine with the 8B preset: 120 GiB of fp32 weights, gradients and moments on a 24 GiB
    machine stops with one line (the system killed the run while it built the weights); LoRA holds the weights only."""
    monkeypatch.setattr(footprint, "available_ram", lambda: 20 * GiB)
    cfg = get_experiment("quick")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, preset="llama-3.1-8b"))
    data = DataBundle([], [], build_tiny_tokenizer(), None)
    with pytest.raises(FasttuneError) as e:
        prepare_model(cfg, data, torch.device("cpu"), torch.float32)
    need = param_count(preset_config("llama-3.1-8b", 300)) * 16 / GiB
    assert str(e.value) == (f"the llama-3.1-8b preset: its weights, gradients and AdamW moments take about {need:.1f} "
                            "GiB, and this machine has 20.0 GiB of RAM available; train it on a GPU, or pick a "
                            "smaller model")  # fmt: skip
    small = preset_config("micro", 300)
    check_weights_fit(small, torch.device("cpu"), torch.float32, "x")  # fits: nothing said
    config = preset_config("llama-3.1-8b", 300)
    with pytest.raises(FasttuneError, match="its frozen weights take about"):
        check_weights_fit(config, torch.device("cpu"), torch.float32, "x", lora=True, free_bytes=20 * GiB)
    check_weights_fit(config, torch.device("cpu"), torch.float32, "x", lora=True, free_bytes=40 * GiB)
    monkeypatch.undo()
    assert footprint.available_ram() > 0  # this Linux machine's /proc/meminfo


def test_the_checks_before_the_model_is_built_leave_the_global_random_state_alone():
    """The weight check measures the MLP activation (model/layout.py) before the model is built: it drew from torch's
    global generator, so every run's initial weights changed (quick's validation loss 8.369 -> 8.377 at step 0)."""
    from transformers.activations import ACT2FN

    from fasttune.model.layout import activation_keeps

    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    assert activation_keeps(ACT2FN["gelu_new"]) is not None
    check_weights_fit(preset_config("micro", 300), torch.device("cpu"), torch.float32, "x")
    assert torch.equal(torch.rand(3), want)
