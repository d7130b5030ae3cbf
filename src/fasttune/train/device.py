"""Where and in which dtypes a run trains: the device (refusing a missing GPU, GPU-scale work on a CPU, the `offload`
memory plan on a CPU, or torch.compile on a CPU without a C++ compiler), the autocast dtype and the parameter dtype."""

from __future__ import annotations

import time

import torch

from fasttune.compiler import INSTALL, cpp_compiler, searched
from fasttune.config import BaseConfig
from fasttune.device import pick_device
from fasttune.errors import ConfigError
from fasttune.model.build import load_model_config
from fasttune.model.flops import dense_flops_per_token
from fasttune.train.footprint import fp32_master_fits
from fasttune.words import count

SLOWEST_GFLOPS = 1.0
"""A matmul rate below any CPU's (one core of a 2010 laptop does ~10 GFLOP/s in fp32): a run under an hour even at
this rate is not measured (the probe is ~10 GFLOP, 0.15 s on 2 cores, for each of the many short runs of a CPU)."""


def cpu_hours(cfg: BaseConfig) -> tuple[float, float]:
    """(estimated hours, measured GFLOP/s) for this config on this CPU, from a measured matmul rate; a run under an
    hour at SLOWEST_GFLOPS gets its hours at that rate and that rate, unmeasured. The probe's matrix comes from its
    own generator: the global one seeds the model, and --force (which skips this probe) must not change the initial
    weights."""
    conf = load_model_config(cfg.model, cfg.data.tokenizer_vocab_size)
    tokens = cfg.training.max_steps * cfg.training.grad_accum * cfg.data.micro_batch_size * cfg.data.max_length
    flops = dense_flops_per_token(conf) * tokens
    if flops <= SLOWEST_GFLOPS * 1e9 * 3600:
        return flops / (SLOWEST_GFLOPS * 1e9) / 3600, SLOWEST_GFLOPS
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    a @ a
    t0 = time.perf_counter()
    for _ in range(4):
        a @ a
    rate = 4 * 2 * 1024**3 / (time.perf_counter() - t0)
    return flops / rate / 3600, rate / 1e9


def refuse_gpu_scale(cfg: BaseConfig, device: torch.device) -> None:
    """On a CPU, without --force: refuse a run estimated at over an hour, in one line. It judges
    training.max_steps: with --training.epochs, call it once run_length has set them (not on the preset's)."""
    if device.type != "cpu" or cfg.force:
        return
    hours, gflops = cpu_hours(cfg)
    if hours <= 1.0:
        return
    t, d = cfg.training, cfg.data
    tokens = t.grad_accum * d.micro_batch_size * d.max_length
    model = f"--model {cfg.model.path}" if cfg.model.path else f"the {cfg.model.preset} preset"
    span = count(round(hours), "hour", shown=f"{hours:,.0f}")
    steps, fewer = count(t.max_steps, "step", shown=f"{t.max_steps:,}"), "--max-steps"
    if t.epochs is not None:
        steps, fewer = f"{steps} ({count(t.epochs, 'epoch', shown=f'{t.epochs:g}')})", "--epochs"
    # a preset's model can be swapped for a smaller one; the user's own --model is what they came to fine-tune
    smaller = f"fewer {fewer}" if cfg.model.path else f"--experiment quick (or a smaller --model.preset, fewer {fewer})"
    raise ConfigError(
        f"this {cfg.experiment} run is GPU-scale and no GPU is available: {steps} of up to {tokens:,} tokens "
        f"on {model} take about {span} at this CPU's measured {gflops:.0f} GFLOP/s. Run it on a CUDA machine, use "
        f"{smaller}, or pass --force to run here anyway"
    )


def resolve_device(cfg: BaseConfig, name: str | None = None) -> tuple[torch.device, torch.dtype | None, torch.dtype]:
    """(device, autocast dtype or None, parameter dtype); `name` overrides training.device (a torchrun rank's GPU)."""
    name = name or cfg.training.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"training.device={cfg.training.device} but no CUDA GPU is visible to torch "
            f"{torch.__version__}; use --training.device cpu, or run `fasttune doctor`"
        )
    device = pick_device(name)
    if cfg.training.epochs is None:  # with epochs the steps are known once the data is batched: the loop checks then
        refuse_gpu_scale(cfg, device)
    if cfg.model.dtype == "bf16":
        return device, None, torch.bfloat16  # pure bf16: weights, grads and optimizer moments
    if cfg.model.dtype == "fp32" or device.type == "cpu":
        return device, None, torch.float32
    conf = load_model_config(cfg.model, cfg.data.tokenizer_vocab_size)
    if not fp32_master_fits(conf, device, cfg.lora.enabled, optimizer=cfg.training.optimizer):
        return device, None, torch.bfloat16  # auto, an 8B-class model: pure bf16 (train/footprint.py says why)
    return device, torch.bfloat16, torch.float32  # auto on CUDA: fp32 master weights, bf16 autocast


def refuse_offload_on_cpu(memory: str, device: str, why: str | None = None, fix: str = "--model.memory full") -> None:
    """Stop a run that would train on the CPU with the `offload` plan, before its data is read: its activations are in
    host memory already (the CLI names model.memory as the user gave it). `why`: how the CPU was chosen, when the
    caller resolved `device` from what the user typed (bench train's --device auto); `fix`: the setting to use, as
    the caller's user writes it (train's flag; a bench --variant's section.field=value)."""
    if memory != "offload" or pick_device(device).type != "cpu":
        return
    why = why or ("training.device=cpu" if device == "cpu" else "no CUDA GPU is visible to torch")
    raise ConfigError(f"model.memory=offload: this run trains on the CPU ({why}), whose activations are in host memory "
                      f"already, so there is nothing to offload; use {fix}")  # fmt: skip


def refuse_cpu_compile_without_compiler(cfg: BaseConfig, device: str) -> None:
    """Stop a run that would torch.compile on the CPU with no C++ compiler, before its data is read: inductor builds
    CPU kernels in C++, and without a compiler the first compiled call fails mid-run in a long traceback. Compiled on
    a CPU: the decoder layers (training.compile) and torchao's 8-bit AdamW step."""
    users = []
    if cfg.training.compile:
        users.append(("training.compile", "drop --training.compile"))
    if cfg.training.optimizer == "adamw_8bit":
        users.append(("training.optimizer=adamw_8bit (torchao compiles its step)", "use --training.optimizer adamw"))
    if not users or pick_device(device).type != "cpu" or cpp_compiler() is not None:
        return
    raise ConfigError(
        f"{' and '.join(u for u, _ in users)}: torch.compile on the CPU needs a C++ compiler (inductor builds its "
        f"kernels with it) and no working one was found (looked for {searched()} on PATH); install one: {INSTALL}; or "
        f"{' and '.join(f for _, f in users)}"
    )
