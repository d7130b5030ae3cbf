"""The one training loop. Full fine-tuning, LoRA, packing and padding are transforms of the model or the data,
never copies of this loop."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fasttune.config import BaseConfig
from fasttune.data.packing import IGNORE, collate, count_targets, plan_micro_batches, real_tokens
from fasttune.data.pipeline import DataBundle, build_data
from fasttune.errors import FasttuneError
from fasttune.model.build import attention_flops, flops_per_token
from fasttune.train import checkpoint as ckpt
from fasttune.train import distributed
from fasttune.train.distributed import Dist
from fasttune.train.metrics import MetricsLog, peak_flops, peak_memory_gib, perplexity, print_summary, save_plots
from fasttune.train.setup import (
    build_optimizer,
    check_disk,
    check_resume,
    prepare_model,
    prepare_run_dir,
    resolve_device,
    start_run,
)

log = logging.getLogger("fasttune")


class Interrupted(FasttuneError):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and stopped; exit code 130 (SIGINT) or 143 (SIGTERM)."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    cursor: int = 0
    """Index of the next micro-batch in this epoch's plan."""
    bad_steps: int = 0
    micro_split: int = 1
    """Each planned micro-batch runs as this many pieces (raised by the OOM retry; same global batch)."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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

    def __init__(self, data: DataBundle, cfg: BaseConfig, state: TrainState):
        self.data, self.cfg, self.state = data, cfg, state
        self.lengths = [len(s["input_ids"]) for s in data.train]
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[int]]:
        if self._plan_epoch != epoch:
            d = self.cfg.data
            self._plan = plan_micro_batches(
                self.lengths,
                packing=d.packing,
                micro_batch_size=d.micro_batch_size,
                max_length=d.max_length,
                seed=self.cfg.seed,
                epoch=epoch,
            )
            self._plan_epoch = epoch
        return self._plan

    def next(self) -> list[dict]:
        s = self.state
        if s.cursor >= len(self.plan(s.epoch)):
            s.epoch, s.cursor = s.epoch + 1, 0
        idx = self.plan(s.epoch)[s.cursor]
        s.cursor += 1
        return [self.data.train[i] for i in idx]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _split_samples(samples: list[dict], parts: int) -> list[list[dict]]:
    parts = min(parts, len(samples))
    return [samples[i::parts] for i in range(parts)]


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if self.signum is not None:  # SIGTERM again (torchrun forwards what a scheduler also sent): keep saving
            return
        self.signum = signum
        tqdm.write("stopping after this step (Ctrl-C again to abort without saving)...")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def forward_backward(
    model, batches: list[dict], n_targets: int, amp_dtype: torch.dtype | None, world: int = 1
) -> torch.Tensor:
    """Sum of the micro-batches' token-mean losses, each normalised by the targets of the whole step (all ranks), so
    the sum over ranks is the exact per-token mean whatever the split into micro-batches, ranks or padding. Under DDP
    (which averages gradients over `world` ranks) the backward pass scales by world, and gradients are synchronised
    once, on the last micro-batch."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()  # DDP
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(last)
        with sync:
            with torch.autocast(b["input_ids"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(**b, use_cache=False, num_items_in_batch=n_targets)
            (out.loss * world if world > 1 else out.loss).backward()
        total += out.loss.detach().float()
    return total


@torch.no_grad()
def evaluate(model, data: DataBundle, cfg: BaseConfig, device: torch.device, amp_dtype, d: Dist = distributed.SINGLE):
    """Mean validation loss per target token over the first eval_batches batches (shared out over ranks)."""
    if not data.val:
        return None
    dc = cfg.data
    lengths = [len(s["input_ids"]) for s in data.val]
    plan = plan_micro_batches(
        lengths, packing=dc.packing, micro_batch_size=dc.micro_batch_size, max_length=dc.max_length, seed=cfg.seed,
        epoch=0,
    )[: cfg.training.eval_batches]  # fmt: skip
    model.eval()
    loss_sum, n_sum = 0.0, 0
    # ranks share the batches out; under FSDP2 every rank must run every forward (they all-gather weights together)
    shard = d if not d.fsdp else distributed.SINGLE
    for idx in plan[shard.rank :: shard.world]:
        b = _to_device(
            collate([data.val[i] for i in idx], packing=dc.packing, pad_id=data.tokenizer.pad_token_id), device
        )
        n = count_targets(b)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(**b, use_cache=False, num_items_in_batch=1)  # loss = sum over target tokens
        loss_sum += float(out.loss)
        n_sum += n
    model.train()
    loss_sum, n_sum = shard.sum_([loss_sum, n_sum], device)
    return loss_sum / n_sum if n_sum else None


def _oom_message(cfg: BaseConfig, state: TrainState, device: torch.device) -> str:
    d = cfg.data
    free, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
    return (
        f"CUDA out of memory at step {state.step + 1}: micro-batch {d.micro_batch_size} samples / "
        f"{d.micro_batch_size * d.max_length} tokens, split {state.micro_split}x; peak "
        f"{peak_memory_gib(device) or 0:.1f} GiB, free {free / 2**30:.1f} of {total / 2**30:.1f} GiB. Lower "
        "--data.micro-batch-size (raise --training.grad-accum to keep the batch), turn on "
        "--model.gradient-checkpointing, or pass --training.oom-retry"
    )


def train(cfg: BaseConfig, data: DataBundle | None = None) -> RunResult:
    """Run (or resume) one training run as configured; returns where things went and the first/last losses.

    `data` replaces the configured dataset (benchmarks pass synthetic samples through the very same loop). Under
    torchrun every rank calls this; see fasttune.train.distributed."""
    cfg.validate()
    d = distributed.from_env(cfg.training.fsdp)
    if d.on and cfg.training.oom_retry:
        raise FasttuneError("--training.oom-retry is single-process only (ranks would split differently); drop it")
    if d.fsdp and cfg.lora.enabled:
        raise FasttuneError("--training.fsdp with LoRA is not supported (adapters are small: DDP, the default, fits)")
    device_name = distributed.init(d, cfg.training.device)
    try:
        return _train(cfg, data, d, device_name)
    finally:
        distributed.close(d)


def _train(cfg: BaseConfig, data: DataBundle | None, d: Dist, device_name: str) -> RunResult:
    if not d.main:
        logging.getLogger("fasttune").setLevel(logging.ERROR)  # rank 0 reports (warnings are the same on all ranks)
        d.barrier()  # rank 0 checks the run folder (and tokenizes, caching the tokenizer) first
    run_dir = prepare_run_dir(cfg) if d.main else cfg.run_dir
    latest = None
    if cfg.resume:
        check_resume(cfg, run_dir)
        found = ckpt.list_checkpoints(run_dir)
        if not found:
            raise FasttuneError(
                f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; start over with --overwrite"
            )
        latest = found[-1]
    torch.manual_seed(cfg.seed)
    device, amp_dtype, param_dtype = resolve_device(cfg, device_name)
    # A resumed run tokenizes with the tokenizer it was trained with, never a rebuilt one.
    data = data or build_data(cfg, tokenizer=AutoTokenizer.from_pretrained(latest) if latest else None)
    for line in data.summary.lines():
        log.info(line)
    model, attn = prepare_model(cfg, data, device, param_dtype)
    if latest is not None:
        ckpt.load_weights(model, latest, lora=cfg.lora.enabled)  # full weights on every rank, before sharding
    if d.main:
        check_disk(run_dir, model, cfg.training.keep_last)  # before start_run, which clears an --overwrite'd run
        if latest is None:
            start_run(cfg, run_dir)
        d.barrier()  # the other ranks start now; from here on every collective is reached by all ranks
    trained = d.wrap(model, device)  # DDP around the model, or the model sharded in place (FSDP2)
    optimizer, scheduler = build_optimizer(cfg, model, device)
    state = TrainState()
    metrics = MetricsLog(run_dir, cfg.training.tensorboard, write=d.main)
    if latest is not None:
        saved = ckpt.load_trainer_state(latest)
        d.load_optimizer(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["state"])
        ranks = saved.get("rng_ranks")
        ckpt.set_rng_state(ranks[d.rank] if ranks and len(ranks) == d.world else saved["rng"])
        if saved.get("world", 1) != d.world:
            log.warning("resuming on %d rank(s), the checkpoint trained on %d: the global batch (micro-batches x "
                        "grad_accum x ranks) changes from here on", d.world, saved.get("world", 1))  # fmt: skip
        metrics.truncate_after(state.step)
        if d.main:
            start_run(dataclasses.replace(cfg, overwrite=False), run_dir)  # the config now in force (e.g. max_steps)
        log.info("resumed from %s (step %d)", latest, state.step)
    stream = DataStream(data, cfg, state)
    result = _fit(
        cfg, model, trained, data, optimizer, scheduler, state, stream, metrics, device, amp_dtype, run_dir, d
    )
    metrics.close()
    if not d.main:  # rank 0 saves, plots and reports
        return result
    result.model_dir = result.checkpoint
    result.sample_prompt = _sample_prompt(cfg, data)
    if cfg.lora.enabled:
        from fasttune.model.lora import save_lora

        merged = run_dir / "merged" if cfg.lora.merge_on_save else None
        save_lora(model, run_dir / "adapter", merged)
        if merged is not None:
            data.tokenizer.save_pretrained(merged)
            result.model_dir = merged
    save_plots(metrics.records, run_dir)
    result.records = metrics.records
    _summarize(cfg, result, attn, device)
    return result


def _step(cfg, model, optimizer, params, micro, state, device, amp_dtype, pad_id, d: Dist = distributed.SINGLE):
    """One optimizer step over `micro` (grad_accum x world micro-batches; this rank trains every world-th one):
    forward+backward, clip, update. Returns (loss, grad norm, real tokens), all for the whole step over all ranks.
    A CUDA out-of-memory anywhere in it is explained, or retried with each micro-batch split in two when
    --training.oom-retry is on (the global batch and the loss normalisation stay the same)."""
    t = cfg.training
    while True:
        pieces = [p for mb in micro for p in _split_samples(mb, state.micro_split)]
        cpu_batches = [collate(p, packing=cfg.data.packing, pad_id=pad_id) for p in pieces]
        n_targets = sum(count_targets(b) for b in cpu_batches)  # counted before the copy: no device sync
        tokens = sum(real_tokens(b) for b in cpu_batches)
        batches = [_to_device(b, device) for b in cpu_batches[d.rank :: d.world]]
        oom = False
        try:
            loss = forward_backward(model, batches, n_targets, amp_dtype, d.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else 1e30)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: DTensor
            loss_f, gn = d.sum_([float(loss)], device)[0], float(grad_norm)  # gradients are already synchronised
            if math.isfinite(loss_f) and math.isfinite(gn):
                optimizer.step()
            return loss_f, gn, tokens
        except torch.OutOfMemoryError:
            oom = True  # handled below, outside the except block, so the traceback's tensors can be freed
        finally:
            optimizer.zero_grad(set_to_none=True)
        if oom:
            del batches, cpu_batches
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not t.oom_retry or state.micro_split >= max(len(mb) for mb in micro):
                raise FasttuneError(_oom_message(cfg, state, device))
            state.micro_split *= 2
            log.warning(
                "out of memory; retrying with each micro-batch split %dx (same global batch)", state.micro_split
            )


def _check_finite(cfg, state: TrainState, loss_f: float, gn: float, run_dir: Path) -> None:
    """Count a non-finite step (its update was skipped); stop with a diagnosis once there are too many."""
    if math.isfinite(loss_f) and math.isfinite(gn):
        return
    state.bad_steps += 1
    if state.bad_steps > cfg.training.max_bad_steps:
        last = ckpt.list_checkpoints(run_dir)
        raise FasttuneError(
            f"stopped at step {state.step + 1}: {state.bad_steps} steps with non-finite loss/gradients (loss {loss_f}, "
            f"grad norm {gn}); last good checkpoint: {last[-1] if last else 'none'}. Lower --training.lr, check the "
            "data, or use --model.dtype fp32"
        )
    log.warning("step %d: non-finite loss %s / grad norm %s, update skipped (%d of %d allowed)", state.step + 1,
                loss_f, gn, state.bad_steps, cfg.training.max_bad_steps)  # fmt: skip


def _fit(cfg, model, trained, data, optimizer, scheduler, state, stream, metrics, device, amp_dtype, run_dir, d):
    """`model`: the HF model (evaluation, saving); `trained`: what the steps run (DDP around it, or it sharded)."""
    t = cfg.training
    result = RunResult(run_dir=run_dir, steps=t.max_steps)
    fpt, peak = flops_per_token(model.config, lora=cfg.lora.enabled), peak_flops(device)
    params = [p for p in model.parameters() if p.requires_grad]
    saved_step = -1

    def save() -> Path | None:
        nonlocal saved_step
        if saved_step != state.step:  # a Ctrl-C right after a periodic save does not save the same step twice
            weights, optimizer_state = d.full_state(model, optimizer)  # every rank (FSDP2 gathers the shards)
            rng_ranks = d.gather_rng()  # every rank's random state (dropout), None in one process
            if d.main:
                trainer_state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                                 "state": state.as_dict()}  # fmt: skip
                if rng_ranks is not None:
                    trainer_state.update(rng_ranks=rng_ranks, world=d.world)
                result.checkpoint = ckpt.save_checkpoint(run_dir, state.step, model, data.tokenizer, trainer_state,
                                                         t.keep_last, weights)  # fmt: skip
            d.barrier()  # no rank runs ahead of (or exits before) the checkpoint
            saved_step = state.step
        return result.checkpoint

    with StopSignals() as stop:  # from here on, Ctrl-C / SIGTERM end with a saved checkpoint
        if state.step == 0:  # the untrained model's validation loss: the baseline the run must beat
            val = evaluate(model, data, cfg, device, amp_dtype, d)
            if val is not None:
                metrics.append({"step": 0, "loss": None, "val_loss": val, "val_ppl": perplexity(val)})
                log.info("step 0: val_loss %.4f  ppl %.2f", val, perplexity(val))
        vals = [r["val_loss"] for r in metrics.records if r.get("val_loss") is not None]
        result.first_val_loss = vals[0] if vals else None
        model.train()
        # In a terminal a live bar; in logs (CI, nohup) one line every log_every steps instead of a redraw per step.
        live = sys.stderr.isatty()
        bar = tqdm(total=t.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                   disable=not (live and d.main))  # fmt: skip
        while state.step < t.max_steps:
            t0 = time.perf_counter()
            micro = [stream.next() for _ in range(t.grad_accum * d.world)]
            samples = [s for mb in micro for s in mb]
            lr = optimizer.param_groups[0]["lr"]  # the rate this step trains with
            loss_f, gn, tokens = _step(cfg, trained, optimizer, params, micro, state, device, amp_dtype,
                                        data.tokenizer.pad_token_id, d)  # fmt: skip
            _check_finite(cfg, state, loss_f, gn, run_dir)
            scheduler.step()
            state.step += 1
            dt = time.perf_counter() - t0
            flops = fpt * tokens + attention_flops(model.config, [len(s["input_ids"]) for s in samples])
            rec = {"step": state.step, "loss": loss_f, "lr": lr, "grad_norm": gn, "tokens_per_s": tokens / dt,
                   "samples_per_s": len(samples) / dt, "tokens": tokens, "samples": len(samples), "step_s": dt,
                   "flops": flops, "mfu": flops / dt / (peak * d.world) if peak else None,
                   "peak_mem_gib": peak_memory_gib(device)}  # fmt: skip
            result.first_loss = result.first_loss if result.first_loss is not None else loss_f
            result.last_loss = loss_f
            is_eval = (t.eval_every and state.step % t.eval_every == 0) or state.step == t.max_steps
            if is_eval and (val := evaluate(model, data, cfg, device, amp_dtype, d)) is not None:
                rec.update(val_loss=val, val_ppl=perplexity(val))
                result.last_val_loss = val
                if d.main:
                    tqdm.write(f"step {state.step}: val_loss {val:.4f}  ppl {perplexity(val):.2f}", file=sys.stderr)
            if is_eval or state.step % t.log_every == 0 or state.step == 1:
                metrics.append(rec)
            mem = f"{rec['peak_mem_gib']:.1f}G" if rec["peak_mem_gib"] is not None else "-"
            status = (f"loss {loss_f:.3f} | {rec['tokens_per_s']:,.0f} tok/s | {rec['samples_per_s']:.1f} samp/s | "
                      f"lr {lr:.2e} | mem {mem}")  # fmt: skip
            bar.set_postfix_str(status)
            bar.update(1)
            if not live and (state.step % t.log_every == 0 or state.step == 1):
                log.info("step %d/%d: %s", state.step, t.max_steps, status)
            if (t.save_every and state.step % t.save_every == 0) or (state.step == t.max_steps and t.save_final):
                save()
            stopping = stop.signum is not None  # one snapshot: a signal arriving later counts at the next step
            if d.on:  # every rank stops after the same step when any rank was signalled
                stopping = d.sum_([float(stopping)], device)[0] > 0
            if stopping:
                bar.close()
                path = save()
                where = f"checkpoint saved to {path}" if d.main else f"rank {d.rank}; rank 0 saved the checkpoint"
                raise Interrupted(f"interrupted at step {state.step}; {where}. Resume with the "
                                  f"same command plus --resume (output dir {run_dir})",
                                  exit_code=130 if stop.signum == signal.SIGINT else 143)  # fmt: skip
    bar.close()
    return result


def _sample_prompt(cfg: BaseConfig, data: DataBundle) -> str:
    default = type(cfg.generation)().sample_prompt
    if cfg.generation.sample_prompt != default or data.summary.format == "text" or not data.val:
        return cfg.generation.sample_prompt
    ids, labels = data.val[0]["input_ids"], data.val[0]["labels"]
    start = next((i for i, t in enumerate(labels) if t != IGNORE), 0)  # the first trained token: the answer starts
    if ids[:1] == [data.tokenizer.bos_token_id]:
        ids, start = ids[1:], start - 1  # generation tokenizes the prompt again and adds BOS itself
    return data.tokenizer.decode(ids[:start]) if start > 0 else cfg.generation.sample_prompt


def _summarize(cfg: BaseConfig, result: RunResult, attn, device: torch.device) -> None:
    recs = [r for r in result.records if r.get("tokens_per_s")]
    tps = sorted(r["tokens_per_s"] for r in recs[1:] or recs)
    median = tps[len(tps) // 2] if tps else 0.0
    mfus = sorted(r["mfu"] for r in recs[1:] if r.get("mfu"))
    rows = [
        ("experiment", cfg.experiment),
        ("steps", str(result.steps)),
        (
            "train loss first -> last",
            f"{result.first_loss:.4f} -> {result.last_loss:.4f}" if result.first_loss is not None else "-",
        ),
        (
            "val loss first -> last",
            f"{result.first_val_loss:.4f} -> {result.last_val_loss:.4f}" if result.first_val_loss is not None else "-",
        ),
        ("real tokens/s (median)", f"{median:,.0f}"),
        ("MFU (median)", f"{100 * mfus[len(mfus) // 2]:.1f}%" if mfus else "n/a (no GPU peak known)"),
        ("peak memory", f"{peak_memory_gib(device):.2f} GiB" if device.type == "cuda" else "n/a (CPU)"),
        ("attention", attn.describe()),
        ("packing", "on (padding-free)" if cfg.data.packing else "off (padded)"),
        ("checkpoint", str(result.checkpoint)),
        ("model for from_pretrained", str(result.model_dir)),
        ("metrics", str(result.run_dir / "metrics.jsonl")),
    ]
    print_summary(rows)
