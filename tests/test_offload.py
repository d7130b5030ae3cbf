"""The `offload` memory plan: `full` checkpointing with each decoder layer's saved input in host memory. It trains
exactly like no plan (loss and gradients), the hooks move every layer's input and backward reads the moved copy, it
composes with the lean RMSNorm, LoRA, grad accumulation, DDP and FSDP2, and the planner picks it only when `full`
does not fit and the host can pin its memory."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch

from fasttune.config import BaseConfig, ModelConfig, TrainingConfig
from fasttune.errors import ConfigError, FasttuneError
from fasttune.model.build import build_preset, preset_config
from fasttune.train import offload
from fasttune.train.activations import Shape
from fasttune.train.estimate import GiB, Setup, estimate
from fasttune.train.memory import HOST_HEADROOM, choose_plan
from fasttune.train.recompute import apply_plan
from fasttune.train.step import forward_backward
from tests.helpers import assert_same_step
from tests.test_memory import VOCAB, _batch


@pytest.fixture
def moved(monkeypatch):
    """The hooks' counters from zero, and every saved layer input moved (the micro model's are under MIN_BYTES)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    offload.stats.reset()
    return offload.stats


def _micro():
    return build_preset("micro", VOCAB, "sdpa", torch.float32).train()


def test_offload_gives_the_gradients_of_no_plan_and_moves_each_layer_input(moved):
    ref = _micro()
    ours = copy.deepcopy(ref)
    apply_plan(ours, "offload")
    batch = _batch()
    assert_same_step(ref, ours, batch)
    layers, hidden, tokens = ref.config.num_hidden_layers, ref.config.hidden_size, batch["input_ids"].numel()
    assert moved.tensors == layers  # one hidden-states tensor per layer: the cos/sin and masks stay in the closure
    assert moved.bytes == moved.peak == layers * tokens * hidden * 4
    assert moved.live == 0  # freed with the graph after backward


def test_backward_recomputes_from_the_host_copy(moved, monkeypatch):
    """The copy the hooks unpack is what each layer recomputes from: changed, the gradients change."""
    ref = _micro()
    ours = copy.deepcopy(ref)
    apply_plan(ours, "offload")
    unpack = offload._Entry.unpack
    monkeypatch.setattr(offload._Entry, "unpack", lambda self: unpack(self) * 1.5)
    with pytest.raises(AssertionError):
        assert_same_step(ref, ours, _batch())
    assert moved.tensors > 0


def test_offload_composes_with_the_lean_norm_lora_and_accumulation(moved):
    from fasttune.config import LoraConfig
    from fasttune.model import norm
    from fasttune.model.lora import apply_lora

    lean = _micro()
    assert norm.apply(lean) > 0
    ours = copy.deepcopy(lean)
    apply_plan(ours, "offload")
    assert_same_step(lean, ours, _batch())
    ref = apply_lora(_micro(), LoraConfig(enabled=True, rank=4, alpha=8)).train()
    ours = copy.deepcopy(ref)
    apply_plan(ours, "offload")
    assert_same_step(ref, ours, _batch(), loss_rtol=1e-5)
    ref, moved.tensors = _micro(), 0  # two micro-batches into one step
    ours = copy.deepcopy(ref)
    apply_plan(ours, "offload")
    batches = [_batch(), _batch()]
    a, b = forward_backward(ref, batches, 100, None), forward_backward(ours, batches, 100, None)
    assert torch.allclose(a, b)
    for p, q in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert moved.tensors == 2 * ref.config.num_hidden_layers and moved.live == 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_offload_under_ddp_and_fsdp2(moved, mode):
    """One gloo rank: the hooks run inside DDP's and FSDP2's forward and backward and give the unwrapped gradients."""
    import torch.distributed as dist

    from fasttune.train.distributed import _shard

    ref = _micro()
    ours = copy.deepcopy(ref)
    apply_plan(ours, "offload")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(ours)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            wrapped = _shard(ours, None, init_device_mesh("cpu", (1,)))  # not FSDP2's default: a GPU host's CUDA
        batch = _batch()
        a, b = forward_backward(ref, [batch], 100, None), forward_backward(wrapped, [batch], 100, None)
        assert torch.allclose(a, b)
        for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
            got = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            assert torch.allclose(p.grad, got, rtol=1e-5, atol=1e-7), name
        assert moved.tensors == ref.config.num_hidden_layers
        del wrapped
    finally:
        dist.destroy_process_group()


def _eight_b(tokens: int, ram: float | None = 512 * GiB) -> Setup:
    config = preset_config("llama-3.1-8b", 128256)
    n = 8_030_261_248
    return Setup(Shape.of(config), n, n, 2, 4.0, tokens, fused_mlp=True, lean_norm=True, ram=ram)


def test_the_estimate_moves_the_layer_inputs_to_pinned_host_memory():
    st = _eight_b(131072)
    full, off = estimate(st, "full"), estimate(st, "offload")
    layer_input = 131072 * 4096 * 2  # bf16 hidden states: 1 GiB, a power of two
    assert off.pinned == 32 * layer_input and full.pinned == 0
    # on the GPU: full's 32 inputs, less the two offload keeps (the one recomputing, the one copied back ahead)
    assert full.activations - off.activations == pytest.approx(30 * layer_input)
    assert "32.0 GiB of pinned host memory" in off.describe()
    odd = estimate(_eight_b(98304), "offload")  # 0.75 GiB inputs: pinned blocks of 1 GiB
    assert odd.pinned == 32 * GiB


def test_auto_offloads_only_when_full_does_not_fit_and_the_host_can_pin_it():
    st = _eight_b(131072)
    full, off = estimate(st, "full").total, estimate(st, "offload").total
    between = (full + off) / 2 / 0.92  # free memory where offload fits and full does not
    assert choose_plan("auto", st, full / 0.9).plan == "full"
    assert choose_plan("auto", st, between).plan == "offload"
    assert choose_plan("auto", dataclasses.replace(st, ram=None), full / 0.9).plan == "full"
    with pytest.raises(FasttuneError, match="memory plan full"):  # host RAM unknown: offload is not offered
        choose_plan("auto", dataclasses.replace(st, ram=None), between)
    short = dataclasses.replace(st, ram=31 * GiB / HOST_HEADROOM)  # 1 GiB short of the 32 GiB it pins
    with pytest.raises(FasttuneError) as e:
        choose_plan("auto", short, between)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("memory plan full needs about 96.3 GiB, but a plan may use 87.1 GiB")
    assert "memory plan offload needs about 32.0 GiB of pinned host memory" in msg
    assert f"it may pin 31.0 GiB ({HOST_HEADROOM:.0%} of the" in msg
    # the tokens it names fit the host and the GPU (it said "lower the tokens per micro-batch" alone)
    tokens = int(re.search(r"try about (\d+) tokens per micro-batch", msg)[1])
    assert tokens < st.tokens and "with --model.memory offload or " in msg
    choose_plan("offload", dataclasses.replace(short, tokens=tokens, accumulating=True), between)
    with pytest.raises(FasttuneError, match="pinned host memory"):  # asked for, the same check
        choose_plan("offload", short, 139 * GiB)
    with pytest.raises(FasttuneError, match="--model.memory offload"):  # full asked for: offload is the advice
        choose_plan("full", st, between)


@pytest.mark.parametrize("tokens", [262144, 524288])
def test_the_no_fit_advice_for_offload_fits_the_host_too(tokens):
    """An explicit `offload` too large for the GPU: the tokens per micro-batch it advises fit the GPU and what the
    host may pin. With 96 GiB free and 20 GiB of RAM it advised 131072 tokens with offload (they fit the GPU), which
    then stopped on the 32 GiB they pin."""
    from tests.test_memory import _apply_advice

    st, free = _eight_b(tokens, ram=20 * GiB), 96 * GiB
    with pytest.raises(FasttuneError) as e:
        choose_plan("offload", st, free)
    advice = _apply_advice(st, str(e.value))
    assert any(plan == "offload" for _, _, plan in advice), str(e.value)
    for _, changed, plan in advice:
        choose_plan(plan, changed, free)  # raises if the advice were false


@pytest.mark.parametrize("ram", [31, 8])
def test_auto_names_what_else_fits_when_the_host_cannot_pin_offload(ram):
    """auto, `full` too large for the GPU, `offload` too large for the host: the message named only what the host
    lacks (free host memory, fewer tokens with offload); now also, as a GPU no-fit does, `full` with fewer tokens,
    8-bit moments, LoRA. Each alternative, applied as written and nothing else, fits the GPU and the host."""
    from tests.test_memory import _apply_advice

    st = _eight_b(131072, ram=ram * GiB / HOST_HEADROOM)
    free = (estimate(st, "full").total + estimate(st, "offload").total) / 2 / 0.92  # offload fits the GPU, full not
    with pytest.raises(FasttuneError, match="pinned host memory") as e:
        choose_plan("auto", st, free)
    msg = str(e.value)
    advice = _apply_advice(st, msg)
    for needed in ("--model.memory offload", "--model.memory full", "adamw_8bit", "--lora.enabled"):
        assert any(needed in alt for alt, _, _ in advice), (needed, msg)
    for alt, changed, plan in advice:
        est = choose_plan(plan, changed, free)  # raises if the advice were false, on the GPU or the host
        assert est.total <= free * 0.92 and (not est.pinned or est.pinned <= changed.ram * HOST_HEADROOM), alt


def test_offload_is_refused_where_the_run_trains_on_the_cpu():
    with pytest.raises(FasttuneError, match="trains on the CPU.*--model.memory full"):
        choose_plan("offload", dataclasses.replace(_eight_b(1024), host=True), 512 * GiB)
    assert choose_plan("auto", dataclasses.replace(_eight_b(1024), host=True), 512 * GiB).plan == "none"


@pytest.mark.parametrize("typed", [["--model.memory", "offload"], ["--model.memory=offload"]])
def test_offload_on_the_cpu_is_refused_with_the_command_line_naming_the_flag(typed, monkeypatch, capsys, tmp_path):
    """Refused while the command line is checked (the data is never read), naming the option as typed and the fix; a
    CPU run of `auto` (no GPU visible) and one from a --config file too."""
    from fasttune import cli
    from fasttune.train import loop

    def tokenized(*a, **k):
        raise AssertionError("the data was read before the refusal")

    monkeypatch.setattr(loop, "_data", tokenized)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["--output-dir", str(tmp_path / "run")]
    assert cli.main(["train", *typed, "--training.device", "cpu", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --model.memory=offload: this run trains on the CPU")
    assert "(--training.device=cpu)" in err and err.endswith("use --model.memory full")
    assert cli.main(["train", *typed, *out]) == 2
    assert "(no CUDA GPU is visible to torch)" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("model:\n  memory: offload\n")
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), *out]) == 2
    assert f"error: model.memory: offload in {tmp_path / 'c.yaml'}: this run trains" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_offload_spelling_is_checked():
    assert ModelConfig(memory="offload").memory == "offload"
    assert ModelConfig(memory="offload", gradient_checkpointing=True).memory == "offload"  # offload recomputes all
    for bad in ("Offload", "offload:2", "full+offload", "offloaded", "cpu"):
        with pytest.raises(ConfigError, match="model.memory"):
            ModelConfig(memory=bad)
    with pytest.raises(ConfigError, match="does not run under training.compile"):
        BaseConfig(model=ModelConfig(memory="offload"), training=TrainingConfig(compile=True))


def test_the_plan_line_names_every_part_of_its_total():
    """The end-of-backward recompute and the attention backward's buffers are part of the total (9 GiB of offload's
    69 GiB at 64k tokens): the log line names them, so that its parts account for the total."""
    off = estimate(_eight_b(65536), "offload")
    said = off.describe()
    assert said.startswith(f"{off.total / GiB:.1f} GiB (")
    assert f"beside the grads at the end of backward {off.end_of_backward / GiB:.1f}" in said
    assert f"attention backward workspace {off.workspace / GiB:.1f}" in said
    parts = [float(p.rsplit(" ", 1)[1]) for p in said.split("(", 1)[1].split(")")[0].split(", ")]
    weights, grads, optimizer, activations, loss, end, workspace = parts
    peak = weights + optimizer + max(grads + end, activations + loss) + workspace + 0.6  # 0.6: Estimate.fixed
    assert peak == pytest.approx(off.total / GiB, abs=0.2)
