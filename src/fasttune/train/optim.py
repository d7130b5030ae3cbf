"""The optimizer and learning-rate schedule of a run: AdamW (torch's), or 8-bit AdamW (torchao's) when
`training.optimizer adamw_8bit` asks for it and torchao is installed."""

from __future__ import annotations

import logging
import math
import os
import re

import torch

from fasttune.config import BaseConfig
from fasttune.errors import ConfigError, one_line
from fasttune.quiet import ignore_warning, quiet_torchao
from fasttune.train.length import length_option

log = logging.getLogger("fasttune")

BLOCK = 256
"""torchao's quantisation block: one fp32 scale per 256 moment values (AdamW8bit's default)."""
MIN_QUANTISED = 4096
"""torchao keeps the moments of tensors below 4096 values (or not a multiple of BLOCK) in full precision (as
bitsandbytes does): norms, biases, small LoRA matrices."""


DECAY_RULE = 2
"""Which parameters weight decay skips: 2, norms and biases as HF Trainer's get_decay_parameter_names finds them
(`no_decay`); 1 (fasttune before it, and the checkpoints it wrote, which record no rule), every tensor of fewer than
2 dimensions: it also skipped 1-D parameters that are neither (Qwen3-Next's A_log, GPT-OSS's attention sinks) and
decayed 2-D biases (GPT-OSS's experts'). A resumed run keeps the rule it started with (its optimizer state is
grouped by it)."""
NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
"""HF Trainer's names of parameters it does not decay (transformers 5), matched in the lowercased name."""
NORM_CLASS = re.compile(r"Norm(?:Gated|1P)?$")
"""A norm layer by its class name: LayerNorm, LlamaRMSNorm, Qwen3NextRMSNormGated, NemotronLayerNorm1P, LigerRMSNorm;
not a class that only contains the word (RobertaPreLayerNormForCausalLM, its ...LMHead: the whole model or its head)."""


def no_decay(model: torch.nn.Module, rule: int = DECAY_RULE) -> set[int]:
    """The ids of the parameters weight decay skips under `rule` (DECAY_RULE). Rule 2: those named like a norm or a
    bias (HF's patterns) and those of norm layers whatever their names (torch's LayerNorm, as HF, and any class named
    ...Norm: an RMSNorm HF would match by name alone, fasttune's lean norm and Liger's keep the module's class).
    Deliberately one step past HF: a norm whose name none of HF's patterns match (Mamba's, FalconMamba's and
    Nemotron-H's `norm_f`, xLSTM's `norm_mlstm`, HyperCLOVA X's `post_norm1`) is not decayed, where HF decays it."""
    if rule == 1:
        return {id(p) for p in model.parameters() if p.ndim < 2}
    skip = {id(p) for name, p in model.named_parameters() if NO_DECAY_NAME.search(name.lower())}
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or NORM_CLASS.search(type(module).__name__):
            skip.update(id(p) for p in module.parameters())
    return skip


def build_optimizer(cfg: BaseConfig, model: torch.nn.Module, device: torch.device, decay_rule: int = DECAY_RULE):
    """AdamW (fused on CUDA) or torchao's AdamW8bit, no weight decay on norms and biases (`no_decay`); linear warmup
    then cosine to min_lr_ratio.

    Not transformers' `get_cosine_with_min_lr_schedule_with_warmup`: its warmup starts at lr 0, so the first step
    would train at lr 0 (a wasted step, and another curve than every run so far). Both are a LambdaLR of the step,
    so resume is exact either way: the factor depends on the step alone, restored with the scheduler state."""
    t = cfg.training
    skip = no_decay(model, decay_rule)
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if id(p) not in skip], "weight_decay": t.weight_decay},
              {"params": [p for p in trained if id(p) in skip], "weight_decay": 0.0}]  # fmt: skip
    adam = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optimizer == "adamw_8bit":
        # the same groups, betas and eps; torchao holds lr as a tensor, which LambdaLR fills in place
        optimizer = adamw_8bit_class()(groups, **adam, block_size=BLOCK)
    else:
        optimizer = torch.optim.AdamW(groups, **adam, fused=device.type == "cuda")
    # Not capped when it reaches past --max-steps (a warning says so): a cap would depend on --max-steps, so a run
    # stopped early and resumed with a larger --max-steps would no longer train the steps an uninterrupted run does.
    warmup = t.warmup_steps
    if warmup >= t.max_steps:
        log.warning(
            "training.warmup_steps=%d is not below %s: the learning rate never reaches its peak, %g, in this run; "
            "set it below %d (e.g. %d)", warmup, length_option(t), t.lr, t.max_steps,
            min(max(1, t.max_steps // 10), t.max_steps - 1),  # below the run's steps: 0 for a 1-step run
        )  # fmt: skip

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


def sync_lr(optimizer, scheduler) -> None:
    """After a resume: each group's rate as this run's schedule gives it for the restored step. The optimizer state
    holds the rate of the run that saved it, which is another one when --max-steps changed (the cosine spans it):
    the first resumed step would train at the old schedule's rate, the next at the new one's."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        rate = base * factor(scheduler.last_epoch)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)  # torchao's 8-bit AdamW holds it as a tensor
        else:
            group["lr"] = rate
    scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]  # what get_last_lr() reports


def state_bytes(optimizer: str, params) -> float:
    """Bytes of optimizer state for `params` (the trainable ones): AdamW's two moments in the parameter dtype; 8-bit
    AdamW's two int8 moments plus one fp32 scale per BLOCK values each (~2.03 bytes per parameter), full precision
    for the small tensors torchao does not quantise."""
    total = 0.0
    for p in params:
        n = p.numel()
        if optimizer == "adamw_8bit" and n >= MIN_QUANTISED and n % BLOCK == 0:
            total += 2 * (n + n // BLOCK * 4)
        else:
            total += 2 * n * p.element_size()
    return total


def require_optimizer(cfg: BaseConfig, ranks: bool = False, fsdp: bool = False) -> None:
    """Import the optimizer's optional package now: before the model loads (a missing one is one line, not a
    traceback after minutes of loading), and before a checkpoint is read (torchao registers its 8-bit state tensors
    for torch.load(weights_only=True) on import). Nothing to do for adamw. `ranks`: under torchrun; `fsdp`: FSDP2.

    8-bit AdamW under FSDP2 trains (torchao quantises each rank's shard), but its checkpoints do not round-trip
    (torch 2.13, torchao 0.18, two gloo ranks): gathering the state into a full one (torch.distributed.checkpoint's
    full_state_dict, as fasttune's FSDP2 checkpoints are written) leaves the codes and scales inside torchao's
    OptimState8bit as never-waited AsyncCollectiveTensors (the file does not load with weights_only); waited by
    hand, the file loads, but sharding it back onto the ranks needs aten.split, which OptimState8bit does not
    implement. Refused until one of them changes."""
    if cfg.training.optimizer != "adamw_8bit":
        return
    if ranks and fsdp:
        raise ConfigError(
            "training.optimizer=adamw_8bit does not work with --training.fsdp yet (its sharded 8-bit state cannot "
            "be gathered into a checkpoint that resumes); use --training.optimizer adamw with --training.fsdp, or "
            "adamw_8bit without --training.fsdp (DDP: one full copy of the 8-bit state per GPU)"
        )
    adamw_8bit_class()
    if ranks and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # The 8-bit step is compiled by inductor, whose pool of compile workers can hang a rank at exit under
        # torchrun (pytorch/pytorch#125235, #162199: a 300 s wait at shutdown; seen once in 4 DDP resumes on 2 CPU
        # ranks here, torch 2.13). One compile thread runs no pool; the step's few small graphs compile serially
        # in seconds. A user's TORCHINDUCTOR_COMPILE_THREADS wins.
        import torch._inductor.config as inductor

        inductor.compile_threads = 1


def adamw_8bit_class() -> type[torch.optim.Optimizer]:
    """torchao's AdamW8bit, imported quietly; ConfigError naming the install command when torchao is missing."""
    quiet_torchao()
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "torchao":  # absent, or < 0.13
            raise ConfigError("training.optimizer=adamw_8bit needs torchao: pip install 'fasttune[adam8bit]'") from None
        # installed but broken (built for another torch, a dependency missing): its own reason, in one line
        raise ConfigError(
            f"training.optimizer=adamw_8bit: torchao is installed but does not import ({one_line(e, 160)}"
            "); reinstall it: pip install --force-reinstall 'fasttune[adam8bit]', or use --training.optimizer adamw"
        ) from None
    # torch >= 2.13 asks tensor subclasses for a cache hash when the 8-bit step compiles; torchao's has none (the
    # compile works, it is only not cached across processes): one UserWarning per run the user can do nothing about
    ignore_warning("OptimState8bit does not implement _stable_hash_for_caching", UserWarning)
    return AdamW8bit
