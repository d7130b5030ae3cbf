"""The state of one run and its four phases: `Run.step` (one optimizer step, queued; `Run.settle` completes its
record), `Run.evaluate`, `Run.save`, `Run.log`. The loop in fasttune.train.loop builds a Run and calls them; nothing
else threads state through by hand. What one step computes (the forward and backward passes, its timing marks) is in
fasttune.train.step, called through this module's names: a test that replaces run.forward_backward replaces the
loop's."""

from __future__ import annotations

import logging
import math
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fasttune.config import BaseConfig
from fasttune.data.packing import Batcher, count_targets, real_tokens
from fasttune.data.pipeline import DataBundle
from fasttune.data.sample import Sample
from fasttune.data.sft import MASKING_RULES
from fasttune.errors import FasttuneError
from fasttune.model.flops import step_flops
from fasttune.train import checkpoint as ckpt
from fasttune.train.distributed import Dist
from fasttune.train.length import micro_batches_per_step
from fasttune.train.metrics import MetricsLog, peak_flops, peak_memory_gib
from fasttune.train.model_prep import AttentionChoice
from fasttune.train.run_dir import RunFolder
from fasttune.train.step import Reading, forward_backward, mark, router_loss, split_samples, step_end, to_device
from fasttune.words import count

log = logging.getLogger("fasttune")

HISTORY = 50
"""Healthy losses kept for the health check."""


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights, optimizer, scheduler and RNG to continue exactly."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    """Index of the next micro-batch in this epoch's plan."""
    bad_steps: int = 0
    micro_split: int = 1
    """Each planned micro-batch runs as this many pieces (raised by the OOM retry; same global batch)."""
    healthy_checkpoint: int = -1
    """Step of the newest checkpoint saved right after a healthy step (never pruned; -1: none yet)."""
    decay_rule: int = 1
    """The weight-decay grouping the optimizer state follows (train/optim.DECAY_RULE; 1: checkpoints before it)."""
    loss_history: deque[float] = field(default_factory=deque)
    """The recent healthy losses an exploding loss is measured against (Run.exploding), the newest HISTORY of them:
    saved, so a resumed run decides as the uninterrupted one (a checkpoint from before it was saved: empty)."""

    def __post_init__(self):
        self.loss_history = deque(self.loss_history, maxlen=HISTORY)

    def as_dict(self) -> dict:
        return {**self.__dict__, "loss_history": list(self.loss_history)}  # a list: torch.load(weights_only) reads it


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    first_loss: float | None = None
    last_loss: float | None = None
    first_val_loss: float | None = None
    last_val_loss: float | None = None
    checkpoint: Path | None = None
    model_dir: Path | None = None
    """A folder plain `AutoModelForCausalLM.from_pretrained` loads (the last checkpoint, or the merged LoRA model)."""
    sample_prompt: str = ""
    """What to generate from after training: generation.sample_prompt, or for supervised data whose prompt was left
    at its default, the prompt of the first held-out sample (the model answers a question it did not train on)."""
    records: list[dict] = field(default_factory=list)


class DataStream:
    """Deterministic micro-batch order: epoch plans depend only on (seed, epoch), position is (epoch, cursor)."""

    def __init__(self, samples: list[Sample], batcher: Batcher, state: TrainState):
        self.samples, self.batcher, self.state = samples, batcher, state
        self.lengths = [len(s) for s in samples]
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[int]]:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.batcher.plan(self.lengths, epoch), epoch
        return self._plan

    def next(self) -> list[Sample]:
        s = self.state
        if s.cursor >= len(self.plan(s.epoch)):
            s.epoch, s.cursor = s.epoch + 1, 0
        idx = self.plan(s.epoch)[s.cursor]
        s.cursor += 1
        return [self.samples[i] for i in idx]


@dataclass
class Run:
    """One run's state: config, data and its batcher, the model (`model`: the HF model, for evaluation and saving;
    `trained`: what the steps run, DDP around it or it sharded), optimizer, schedule, data stream, metrics, device,
    distributed place and run folder."""

    cfg: BaseConfig
    data: DataBundle
    batcher: Batcher
    folder: RunFolder
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    model: torch.nn.Module
    trained: torch.nn.Module
    attn: AttentionChoice
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    stream: DataStream
    metrics: MetricsLog
    result: RunResult
    memory_plan: str = "none"
    """The activation plan in force (model.memory, with auto resolved)."""
    report: bool = True
    """False: the caller reports the run (train()'s `report`): no progress bar, validation line or summary table."""
    saved_step: int = -1
    clock: float | torch.cuda.Event | None = None
    """Where the last settled step ended, or the current stretch of steps started, on the device's timeline (a CUDA
    event, or the host's clock on a CPU); None: the next step starts a stretch."""

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.peak = peak_flops(self.device)
        # the recent healthy losses "exploding" is measured against: every rank keeps them (only rank 0 reads
        # metrics.jsonl), and checkpoints save them (TrainState), so every rank and a resumed run decide alike
        self.history = self.state.loss_history
        self.healthy = True
        """Whether the last step was healthy (finite, non-exploding loss): a checkpoint saved now is healthy."""
        self._say_validation_share()

    def _say_validation_share(self) -> None:
        """Once, before training: a validation split of more micro-batches than training.eval_batches is validated on
        its first ones only (the same ones every time), while the data summary counts all its samples."""
        val, most = self.data.val, self.cfg.training.eval_batches
        plan = self.batcher.plan([len(s) for s in val], epoch=0) if val else []
        if len(plan) > most and self.dist.main:
            held = sum(len(b) for b in plan[:most])
            log.info("validation: val_loss is computed on the first %d of %d micro-batches (%d of %d held-out samples, "
                     "the same ones each time); --training.eval-batches %d covers them all", most, len(plan), held,
                     len(val), len(plan))  # fmt: skip

    # -- step ---------------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One optimizer step over grad_accum x world micro-batches (this rank trains every world-th one), queued;
        returns its record for `settle`, which completes it (loss, grad norm, throughput, ...: all for the whole
        step over all ranks). Between the two the host may queue the next step while this one runs."""
        t, state, d = self.cfg.training, self.state, self.dist
        if self.clock is None:
            self.clock = mark(self.device)
        micro = [self.stream.next() for _ in range(micro_batches_per_step(t.grad_accum, d.world))]
        samples = [s for mb in micro for s in mb]
        lr = float(self.optimizer.param_groups[0]["lr"])  # this step's rate (torchao's lr is a tensor, filled in place)
        reading, tokens, targets = self._update(micro)
        self.scheduler.step()
        state.step += 1
        lengths = [len(s) for s in samples]
        return {
            "step": state.step,
            "lr": lr,
            "tokens": tokens,
            "target_tokens": targets,
            "samples": len(samples),
            "flops": step_flops(self.model.config, lengths, lora=self.cfg.lora.enabled),
            "reading": reading,
            "end": mark(self.device),
        }

    def settle(self, rec: dict) -> dict:
        """The record of a step with its loss and grad norm (waiting for them if they are still being copied), its
        health checked, and its time: from the end of the previous step (or the start of this stretch of steps) to
        its own end, on the device's timeline, so a step's time is its own however far ahead the host queued."""
        reading = rec.pop("reading")
        loss_f, gn = reading.values()
        self._check_health(rec["step"], loss_f, gn)
        end = step_end(rec.pop("end"), reading.backward_done, wait=self.due(rec["step"]))
        if isinstance(end, float):
            dt = end - self.clock
        else:
            end.synchronize()
            dt = self.clock.elapsed_time(end) / 1e3
        self.clock = end
        peak = (self.peak or 0.0) * self.dist.world
        tokens, samples, flops = rec["tokens"], rec["samples"], rec["flops"]
        return {"step": rec["step"], "loss": loss_f, "lr": rec["lr"], "grad_norm": gn, "tokens_per_s": tokens / dt,
                "samples_per_s": samples / dt, "tokens": tokens, "target_tokens": rec["target_tokens"],
                "samples": samples, "step_s": dt, "flops": flops, "mfu": flops / dt / peak if peak else None,
                "peak_mem_gib": peak_memory_gib(self.device)}  # fmt: skip

    def _update(self, micro: list[list[Sample]]) -> tuple[Reading, int, int]:
        """forward+backward, clip, update. Returns (loss and grad norm, real tokens, target tokens). A CUDA
        out-of-memory anywhere in it is explained, or retried with each micro-batch split in two when
        --training.oom-retry is on (the global batch and the loss normalisation stay the same)."""
        t, state, d, device = self.cfg.training, self.state, self.dist, self.device
        while True:
            pieces = [p for mb in micro for p in split_samples(mb, state.micro_split)]
            cpu_batches = [self.batcher.collate(p) for p in pieces]
            n_targets = sum(count_targets(b) for b in cpu_batches)  # counted before the copy: no device sync
            tokens = sum(real_tokens(b) for b in cpu_batches)
            batches = [to_device(b, device) for b in cpu_batches[d.rank :: d.world]]
            oom = False
            try:
                loss = forward_backward(self.trained, batches, n_targets, self.amp_dtype, d.world)
                return self._optimizer_step(loss, t.max_grad_norm), tokens, n_targets
            except torch.OutOfMemoryError:
                oom = True  # handled below, outside the except block, so the traceback's tensors can be freed
            finally:
                self.optimizer.zero_grad(set_to_none=True)
            if oom:
                del batches, cpu_batches
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if not t.oom_retry or state.micro_split >= max(len(mb) for mb in micro):
                    raise FasttuneError(self._oom_message())
                state.micro_split *= 2
                log.warning(
                    "out of memory; retrying with each micro-batch split %dx (same global batch)", state.micro_split
                )

    def _optimizer_step(self, loss: torch.Tensor, max_norm: float) -> Reading:
        """Clip the gradients to `max_norm` (0: no clipping) and update unless the loss (summed over ranks) or the
        gradient norm is non-finite; returns both. With torch's fused AdamW the host reads neither before queuing
        the update: the fused kernel skips a non-finite step on the device (its `found_inf`, as under a GradScaler)
        and divides the gradients by max(1, norm / max_norm) as it reads them (its `grad_scale`: the clipping, with
        no pass of its own over the gradients), and the two numbers are copied to pinned host memory ahead of the
        optimizer's kernels: whoever reads them (`Reading.values`) waits for that copy alone, and the loop reads them
        after it queued the next step when nothing else was due (loop._fit), so the host never waits for the GPU to
        drain between steps. Other optimizers (torchao's, a non-fused AdamW, FSDP2's sharded states) clip and wait
        for the numbers first."""
        d, opt = self.dist, self.optimizer
        if d.fsdp or not all(g.get("fused") for g in opt.param_groups):  # param_groups: what a resume restored
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else 1e30)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
            loss_f, gn = d.sum_([float(loss)], self.device)[0], float(grad_norm)  # gradients are synchronised
            done = mark(self.device)  # the backward pass has run: the host just read its results
            if math.isfinite(loss_f) and math.isfinite(gn):
                opt.step()
            return Reading(torch.tensor([loss_f, gn], dtype=torch.float64), None if isinstance(done, float) else done)
        loss = loss.detach().double()
        if d.on:
            torch.distributed.all_reduce(loss)  # summed over ranks; the norm is the same on every rank
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        stats = torch.stack([loss, grad_norm.double()])
        try:
            opt.found_inf = (~torch.isfinite(stats).all()).float()
            if max_norm > 0:  # clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), as a divisor
                opt.grad_scale = ((grad_norm.float() + 1e-6) / max_norm).clamp(min=1.0)
            if stats.is_cuda:
                host = torch.empty(2, dtype=torch.float64, pin_memory=True)  # pinned: the copy is truly asynchronous
                host.copy_(stats, non_blocking=True)
                copied = mark(self.device)
            else:
                host, copied = stats, None
            opt.step()
        finally:
            vars(opt).pop("found_inf", None)
            vars(opt).pop("grad_scale", None)
        return Reading(host, copied)

    def _oom_message(self) -> str:
        d, device = self.cfg.data, self.device
        free, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
        fewer = "--data.micro-batch-size" if d.micro_batch_size > 1 else "--data.max-length"  # 1 sample: its length
        fixes = [f"Lower {fewer} (raise --training.grad-accum to keep the batch)", self._more_recompute()]
        # not offered where it cannot help: on (it split the micro-batches as far as they go) or refused (torchrun)
        if not (self.cfg.training.oom_retry or self.dist.on):
            fixes.append("pass --training.oom-retry")
        *most, last = [f for f in fixes if f]
        return (
            f"CUDA out of memory at step {self.state.step + 1}: micro-batch {d.micro_batch_size} samples / "
            f"{d.micro_batch_size * d.max_length} tokens, split {self.state.micro_split}x; peak "
            f"{peak_memory_gib(device) or 0:.1f} GiB, free {free / 2**30:.1f} of {total / 2**30:.1f} GiB. "
            f"{', '.join(most)}{' or ' if most else ''}{last}"
        )

    def _more_recompute(self) -> str:
        """The OOM message's plans that recompute more than the one in force ('' when it recomputes every layer)."""
        if self.memory_plan == "full":
            return "keep the layers' inputs in host memory (--model.memory offload)"
        if self.memory_plan == "offload":
            return ""
        layers = getattr(getattr(self.model, "config", None), "num_hidden_layers", 0) or 0
        every = "every:2 or " if layers >= 2 and self.memory_plan != "every:2" else ""
        return f"recompute more activations (--model.memory {every}full, now {self.memory_plan})"

    def exploding(self, loss: float) -> bool:
        """Far above the run's recent losses: more than 3x their median and more than 2 nats above it (a spike
        of a healthy run stays well inside both; divergence goes far past them, e.g. 7.5e6 after 5.1)."""
        if len(self.history) < 3:
            return False
        median = statistics.median(self.history)
        return loss > max(3 * median, median + 2)

    def _check_health(self, step: int, loss_f: float, gn: float) -> None:
        """Count an unhealthy step: non-finite loss or gradients (its update was skipped) or an exploding loss.
        Stop with a diagnosis naming the last healthy checkpoint once there are more than max_bad_steps."""
        finite = math.isfinite(loss_f) and math.isfinite(gn)
        self.healthy = finite and not self.exploding(loss_f)
        if self.healthy:
            self.history.append(loss_f)
            return
        state, t = self.state, self.cfg.training
        state.bad_steps += 1
        what = "non-finite loss/gradients" if not finite else "an exploding loss"
        if state.bad_steps > t.max_bad_steps:
            good = self.folder.checkpoints / f"step-{state.healthy_checkpoint:06d}"
            raise FasttuneError(
                f"stopped at step {step}: {count(state.bad_steps, 'unhealthy step')}, the last with {what} (loss "
                f"{loss_f:.4g}, grad norm {gn:.4g}); last healthy checkpoint: {good if good.is_dir() else 'none'}. "
                "Lower --training.lr, check the data, or use --model.dtype fp32"
            )
        if not finite:
            log.warning("step %d: non-finite loss %s / grad norm %s, update skipped (%d of %d allowed)",
                        step, loss_f, gn, state.bad_steps, t.max_bad_steps)  # fmt: skip
        else:
            log.warning("step %d: loss %.4g is far above the run's recent median %.4g: diverging? (%d of %d "
                        "unhealthy steps allowed)", step, loss_f, statistics.median(self.history),
                        state.bad_steps, t.max_bad_steps)  # fmt: skip

    # -- evaluate -----------------------------------------------------------------------------------------------
    def eval_due(self, step: int | None = None) -> bool:
        t, step = self.cfg.training, self.state.step if step is None else step
        return bool(t.eval_every and step % t.eval_every == 0) or step == t.max_steps

    def due(self, step: int) -> bool:
        """Whether anything besides its record follows `step`: evaluation, generation scores, a checkpoint, the end."""
        every = self.cfg.training.eval_generate_every
        return self.eval_due(step) or self.save_due(step) or bool(every and step % every == 0)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per target token over the first eval_batches batches (shared out over ranks)."""
        val, d, device = self.data.val, self.dist, self.device
        if not val:
            return None
        plan = self.batcher.plan([len(s) for s in val], epoch=0)[: self.cfg.training.eval_batches]
        self.model.eval()
        loss_sum, n_sum = 0.0, 0
        # ranks share the batches out; under FSDP2 every rank runs as many forwards (they all-gather the weights
        # together): one with fewer batches runs its first again and leaves it out of the sums
        mine = plan[d.rank :: d.world]
        rounds = -(-len(plan) // d.world) if d.fsdp else len(mine)
        for r in range(rounds):
            b = to_device(self.batcher.collate([val[i] for i in (mine[r] if r < len(mine) else plan[0])]), device)
            n = b["labels"].fasttune_targets  # counted on the host (a count of the device copy waits for it)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.model(**b, use_cache=False, num_items_in_batch=1)  # loss = sum over target tokens
            if r < len(mine):
                router = router_loss(self.model, out)
                loss_sum += float(out.loss if router is None else out.loss - router)  # the cross-entropy alone
                n_sum += n
        self.model.train()
        loss_sum, n_sum = d.sum_([loss_sum, n_sum], device)
        return loss_sum / n_sum if n_sum else None

    # -- save ---------------------------------------------------------------------------------------------------
    def save_due(self, step: int | None = None) -> bool:
        t, step = self.cfg.training, self.state.step if step is None else step
        return bool(t.save_every and step % t.save_every == 0) or (step == t.max_steps and t.save_final)

    def save(self) -> Path | None:
        """Checkpoint the current step (once: a Ctrl-C right after a periodic save does not save it twice)."""
        d, state = self.dist, self.state
        if self.saved_step != state.step:
            weights, optimizer_state = d.full_state(self.model, self.optimizer)  # every rank (FSDP2 gathers)
            rng_ranks = d.gather_rng()  # every rank's random state (dropout), None in one process
            if self.healthy:
                state.healthy_checkpoint = state.step
            keep = self.folder.checkpoints / f"step-{state.healthy_checkpoint:06d}"
            if d.main:
                trainer_state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                                 "state": state.as_dict(), "threads": torch.get_num_threads(),
                                 "data": self.data.summary.fingerprint, "masking_rules": MASKING_RULES,
                                 "val_data": self.data.summary.val_fingerprint, "inputs": self.data.summary.inputs,
                                 "grad_accum": self.cfg.training.grad_accum,
                                 "eval_batches": self.cfg.training.eval_batches,  # may change on resume: eval
                                 "batching": self.batcher.layout}  # fmt: skip
                if rng_ranks is not None:
                    trainer_state.update(rng_ranks=rng_ranks, world=d.world)
                self.result.checkpoint = ckpt.save_checkpoint(self.folder, state.step, self.model,
                                                              self.data.tokenizer, trainer_state,
                                                              self.cfg.training.keep_last, weights, keep)  # fmt: skip
            d.barrier()  # no rank runs ahead of (or exits before) the checkpoint
            self.saved_step = state.step
        return self.result.checkpoint

    # -- log ----------------------------------------------------------------------------------------------------
    def log_due(self, step: int | None = None) -> bool:
        """Step 1, every log_every steps, and the last: the run summary's last train loss is a logged line too."""
        t, step = self.cfg.training, self.state.step if step is None else step
        return step % t.log_every == 0 or step in (1, t.max_steps)

    def log(self, rec: dict, evaluated: bool) -> None:
        """Record the step in metrics.jsonl when due, and always after an evaluation."""
        if rec.get("val_loss") is not None and self.dist.main and self.report:
            tqdm.write(f"step {rec['step']}: val_loss {rec['val_loss']:.4f}  ppl {rec['val_ppl']:.2f}", file=sys.stderr)
        if evaluated or self.log_due(rec["step"]):
            self.metrics.append(rec)
