"""The optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import logging
import math

import torch

from fasttune.config import BaseConfig

log = logging.getLogger("fasttune")


def build_optimizer(cfg: BaseConfig, model: torch.nn.Module, device: torch.device):
    """AdamW (fused on CUDA), no weight decay on norms and biases; linear warmup then cosine to min_lr_ratio.

    Not transformers' `get_cosine_with_min_lr_schedule_with_warmup`: its warmup starts at lr 0, so the first step
    would train at lr 0 (a wasted step, and another curve than every run so far). Both are a LambdaLR of the step,
    so resume is exact either way: the factor depends on the step alone, restored with the scheduler state."""
    t = cfg.training
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    # Not capped when it reaches past --max-steps (a warning says so): a cap would depend on --max-steps, so a run
    # stopped early and resumed with a larger --max-steps would no longer train the steps an uninterrupted run does.
    warmup = t.warmup_steps
    if warmup >= t.max_steps:
        log.warning(
            "--training.warmup-steps %d is not below --max-steps %d: the learning rate never reaches --training.lr "
            "%g in this run; set --training.warmup-steps below --max-steps (e.g. %d)", warmup, t.max_steps, t.lr,
            max(1, t.max_steps // 10),
        )  # fmt: skip

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler
