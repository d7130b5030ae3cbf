"""Everything the loop needs before its first step: run directory checks, device and dtypes, the model with its
attention backend (and LoRA / Liger / compile transforms), the optimizer and schedule."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttune.config import BaseConfig, to_dict
from fasttune.data.pipeline import DataBundle
from fasttune.errors import ConfigError, FasttuneError
from fasttune.model.build import build_model, flops_per_token, head_dim, load_model_config

log = logging.getLogger("fasttune")

RUN_MARKER = ".fasttune-run"
"""Written into every run directory; only folders with it are ever resumed or cleared by --overwrite."""
RUN_ARTIFACTS = ("config.json", "metrics.jsonl", "checkpoints", "loss.png", "throughput.png", "tensorboard", "adapter",
                 "merged")  # fmt: skip
# Options that may change when a run is resumed; everything else must match the run's config.json, or the resumed
# run would silently train on other data, another tokenizer or another schedule.
RESUME_MAY_CHANGE = ("training.max_steps", "training.save_every", "training.log_every", "training.eval_every",
                     "training.eval_batches", "training.keep_last", "training.tensorboard", "training.device",
                     "training.oom_retry", "training.max_bad_steps", "training.compile", "attn_implementation",
                     "strict_attention", "resume", "overwrite", "force", "output_dir", "experiment", "data.cache_dir",
                     "model.gradient_checkpointing", "model.liger", "generation.")  # fmt: skip


def prepare_run_dir(cfg: BaseConfig) -> Path:
    """Check the output folder up front (nothing is deleted here): writable, and an existing run is only touched by
    --resume or --overwrite, and a folder of someone else's files never."""
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output-dir {run_dir} is a file; choose a folder")
    is_run = (run_dir / RUN_MARKER).is_file()
    foreign = [m for m in RUN_ARTIFACTS if (run_dir / m).exists()]
    if foreign and not is_run:
        raise ConfigError(
            f"--output-dir {run_dir} holds files that fasttune did not write ({', '.join(foreign)}); "
            "choose an empty or new folder"
        )
    if is_run and not (cfg.resume or cfg.overwrite):
        raise ConfigError(
            f"--output-dir {run_dir} already holds a run; pass --resume to continue it, --overwrite "
            "to replace it, or choose another --output-dir"
        )
    if cfg.resume and not is_run:
        raise ConfigError(f"--resume: {run_dir} holds no run to resume; run without --resume")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        msg = f"--output-dir {run_dir} is not writable ({e.strerror or e}); choose another folder"
        raise ConfigError(msg) from None
    return run_dir


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(cfg: BaseConfig, run_dir: Path) -> None:
    """--resume continues the run as it was configured: options that change the data, tokenizer, model or schedule
    must match the run's config.json (the ones in RESUME_MAY_CHANGE may differ)."""
    try:
        saved = _flat(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--resume: cannot read {run_dir / 'config.json'} ({e}); start over with --overwrite"
        ) from None
    now = _flat(to_dict(cfg))
    for key, value in now.items():
        if key.startswith(RESUME_MAY_CHANGE) or key not in saved:
            continue
        old = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
        if old != value:
            raise ConfigError(
                f"--resume: {key} is {value!r} but the run was started with {old!r}; resume with the "
                "same value (or start a new run with another --output-dir)"
            )


def start_run(cfg: BaseConfig, run_dir: Path) -> None:
    """Called once everything is checked: clear an old run for --overwrite (only fasttune's files), mark the folder
    as a fasttune run and write the resolved config."""
    if cfg.overwrite:
        for name in RUN_ARTIFACTS:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (run_dir / RUN_MARKER).write_text("fasttune run directory; see config.json\n")
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def check_disk(run_dir: Path, model: torch.nn.Module, keep_last: int) -> None:
    """Refuse to start when a checkpoint could not fit: better now than after an hour of training."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # Pruning happens after a new checkpoint is complete, so keep_last + 1 exist at once (+ a merged LoRA model).
    lora = trainable < weights
    per_ckpt = (trainable if lora else weights) + 2 * trainable  # weights (or adapters) + AdamW moments
    need = int(1.1 * per_ckpt * (keep_last + 1) + (weights if lora else 0) + 50e6)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise FasttuneError(
            f"--output-dir {run_dir}: {free / 1e9:.2f} GB free, a checkpoint needs about "
            f"{need / 1e9:.2f} GB; free some space or choose another --output-dir"
        )


def cpu_hours(cfg: BaseConfig) -> tuple[float, float]:
    """(estimated hours, measured GFLOP/s) for this config on this CPU, from a measured matmul rate."""
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(4):
        a @ a
    rate = 4 * 2 * 1024**3 / (time.perf_counter() - t0)
    conf = load_model_config(cfg.model, cfg.data.tokenizer_vocab_size)
    tokens = cfg.training.max_steps * cfg.training.grad_accum * cfg.data.micro_batch_size * cfg.data.max_length
    return flops_per_token(conf) * tokens / rate / 3600, rate / 1e9


def resolve_device(cfg: BaseConfig, name: str | None = None) -> tuple[torch.device, torch.dtype | None, torch.dtype]:
    """(device, autocast dtype or None, parameter dtype); `name` overrides training.device (a torchrun rank's GPU)."""
    name = name or cfg.training.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"training.device={cfg.training.device} but no CUDA GPU is visible to torch "
            f"{torch.__version__}; use --training.device cpu, or run `fasttune doctor`"
        )
    device = torch.device(name)
    if device.type == "cpu" and not cfg.force:
        hours, gflops = cpu_hours(cfg)
        if hours > 1.0:  # GPU-scale work: say so before hours of tokenizing and training
            raise ConfigError(
                f"experiment {cfg.experiment!r} is GPU-scale and no GPU is available: about {hours:,.0f} hours at "
                f"this CPU's measured {gflops:.0f} GFLOP/s. Run it on a CUDA machine, use --experiment quick, or "
                "pass --force to run here anyway"
            )
    if cfg.model.dtype == "bf16":
        return device, None, torch.bfloat16  # pure bf16: weights, grads and optimizer moments
    if cfg.model.dtype == "fp32" or device.type == "cpu":
        return device, None, torch.float32
    return device, torch.bfloat16, torch.float32  # auto on CUDA: fp32 master weights, bf16 autocast


@dataclass
class AttentionChoice:
    requested: str
    name: str
    hf_name: str
    reason: str

    def describe(self) -> str:
        from fasttune import attention

        kernels = attention.kernel_report()
        kernel = f"; kernels: {', '.join(f'{k} -> {v}' for k, v in kernels.items())}" if kernels else ""
        return f"{self.name} (requested {self.requested}: {self.reason}){kernel}"


def _choose_attention(cfg: BaseConfig, device, dtype, model_config) -> AttentionChoice:
    from fasttune import attention

    r = attention.resolve(
        cfg.attn_implementation,
        device=device,
        dtype=dtype,
        head_dim=head_dim(model_config),
        packed=cfg.data.packing,
        strict=cfg.strict_attention,
        model_config=model_config,
    )
    log.info("attention: %s (%s)", r.name, r.reason)
    return AttentionChoice(cfg.attn_implementation, r.name, r.hf_name, r.reason)


def _apply_liger(model, device: torch.device) -> None:
    from fasttune.attention.probe import import_status

    if device.type != "cuda":
        log.warning("model.liger: Liger kernels need a CUDA GPU; running without them")
        return
    if (why := import_status("liger_kernel")) is not None:
        log.warning("model.liger: %s (pip install 'fasttune[liger]'); running without Liger", why)
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    log.info("Liger kernels applied (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)")


def prepare_model(cfg: BaseConfig, data: DataBundle, device: torch.device, param_dtype: torch.dtype):
    vocab = len(data.tokenizer)
    model_config = load_model_config(cfg.model, vocab)
    compute_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.model.dtype != "fp32") else param_dtype
    attn = _choose_attention(cfg, device, compute_dtype, model_config)
    context = getattr(model_config, "max_position_embeddings", None)
    if cfg.model.path and context and cfg.data.max_length > context:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the context of {cfg.model.path} "
            f"(max_position_embeddings={context}); pass --data.max-length {context} or less"
        )
    model = build_model(cfg.model, vocab, attn.hf_name, param_dtype, device)
    if cfg.model.liger:
        _apply_liger(model, device)
    if cfg.lora.enabled:
        from fasttune.model.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.training.compile:
        for layer in model.model.layers if hasattr(model, "model") else []:
            layer.compile()
    return model, attn


def build_optimizer(cfg: BaseConfig, model: torch.nn.Module, device: torch.device):
    """AdamW (fused on CUDA), no weight decay on norms and biases; linear warmup then cosine to min_lr_ratio."""
    t = cfg.training
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda")

    def schedule(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler
