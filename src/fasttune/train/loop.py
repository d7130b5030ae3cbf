"""The one training loop. Full fine-tuning, LoRA, packing and padding are transforms of the model or the data,
never copies of this loop. `train` opens a Run (fasttune.train.run) and the loop reads as its phases: step,
evaluate, log, save."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fasttune.config import BaseConfig, TrainingConfig
from fasttune.config.base_config import shown
from fasttune.data.pipeline import DataBundle, build_data, check_paths
from fasttune.data.tokenizer import fit_model_max_length
from fasttune.errors import ConfigError
from fasttune.generate.template import record_prompt_format
from fasttune.model.build import check_weights, has_weights, random_init
from fasttune.model.resolve import resolve_for_training
from fasttune.quiet import quiet_output
from fasttune.streams import printed_above
from fasttune.train import checkpoint as ckpt
from fasttune.train import distributed
from fasttune.train.device import (
    refuse_cpu_compile_without_compiler,
    refuse_gpu_scale,
    refuse_offload_on_cpu,
    resolve_device,
)
from fasttune.train.distributed import Dist
from fasttune.train.finished import nothing_to_train, own_model_gone, say_nothing_to_train
from fasttune.train.footprint import planned_saves
from fasttune.train.length import length_option, run_length
from fasttune.train.memory import refuse_every_beyond_layers
from fasttune.train.metrics import MetricsLog, perplexity
from fasttune.train.model_prep import batcher_for, choose_batching, prepare_model
from fasttune.train.optim import DECAY_RULE, build_optimizer, require_optimizer, sync_lr
from fasttune.train.resume import check_given_data, check_moved_data, check_same_data
from fasttune.train.run import DataStream, Run, RunResult, TrainState
from fasttune.train.run_dir import RunFolder
from fasttune.train.signals import Interrupted, StopSignals
from fasttune.train.wrap_up import describe_training, finish
from fasttune.words import count

log = logging.getLogger("fasttune")


@quiet_output()  # a script's call prints what the command line prints: no third-party noise, no progress bars
def train(cfg: BaseConfig, data: DataBundle | None = None, attn_origin: str = "requested",
          report: bool = True) -> RunResult:  # fmt: skip
    """Run (or resume) one training run as configured; returns where things went and the first/last losses.

    `data` replaces the configured dataset (benchmarks pass synthetic samples through the very same loop);
    `attn_origin` says where cfg.attn_implementation came from, for the log (the command line knows: a flag, a
    file, the preset); `report` False: the caller reports the run (bench train's table), so it prints no progress
    bar, validation line or summary table (its log lines still go to the logger). Under torchrun every rank calls
    this; see fasttune.train.distributed."""
    cfg.validate()
    d = check_launch(cfg)
    gone = own_model_gone(cfg)  # a finished run loads no model: resolved once the run has steps left
    if cfg.training.fsdp and not d.on:  # here, not in check_launch, which the CLI runs too: said once
        log.warning("training.fsdp shards the model over the processes of a torchrun launch; this run is one process, "
                    "so it trains unsharded (start it with torchrun --nproc_per_node N)")  # fmt: skip
    if d.fsdp and d.on and d.main and cfg.training.eval_generate_every:
        log.warning("training.eval_generate_every: skipped under FSDP2 (the weights are sharded; generation needs "
                    "them whole): score a checkpoint with `fasttune eval --generate` instead")  # fmt: skip
    device_name = distributed.init(d, cfg.training.device)
    logger, level = logging.getLogger("fasttune"), logging.getLogger("fasttune").level
    lock, gate, run = None, distributed.StartGate(d), None
    try:
        if not d.main:
            logger.setLevel(logging.ERROR)  # rank 0 reports (warnings are the same on all ranks)
            # rank 0 checks and locks the run folder (and tokenizes, caching the tokenizer) first
            if (done := gate.wait()) is not None:  # a resumed run with nothing to train: rank 0's result
                return done
        cfg = _checked_inputs(cfg, data, gone)  # rank 0 first: a missing --data is its one line, the others quiet
        if d.main:
            lock = RunFolder(cfg.run_dir).prepare(cfg)  # held until this run ends, however it ends
        start = _to_resume(cfg, RunFolder(cfg.run_dir))
        if d.main and (done := nothing_to_train(*start[:4])) is not None:  # before the data is read, the model built
            gate.open(done=done)
            return done
        if data is None and cfg.resume:  # once it has steps to train: a finished run reads no data
            check_paths(cfg.data)
        if gone:  # nor its model: refused now in resolve's one line
            resolve_for_training(cfg.model.path)
        run = _open(start, data, d, device_name, gate, attn_origin)
        run.report = report
        if run.state.step >= run.cfg.training.max_steps:  # run.cfg: with --epochs, their steps (changed on resume)
            say_nothing_to_train(run.cfg, run.folder, run.state.step, run.result.checkpoint, main=d.main)
        _fit(run)
        result = finish(run)
        d.barrier()  # the ranks tear the process group down together (not while rank 0 still saves and reports)
        return result
    except BaseException as e:
        gate.open(e)  # rank 0 failed before the others started: they stop quietly
        gate.agree(e)  # a rank failed after the gate opened, before training: every rank stops, none waits
        raise
    finally:
        if lock is not None:
            lock.release(tidy=not RunFolder(cfg.run_dir).is_run)  # a failed start leaves no lock file behind
        logger.setLevel(level)  # the process (a test, a notebook) gets its logger back as it was
        run = None  # its DDP model goes before the process group (distributed.close)
        distributed.close(d)


def _checked_inputs(cfg: BaseConfig, data: DataBundle | None, gone: bool) -> BaseConfig:
    """--model resolved (a run folder: its checkpoint) and --data checked readable, before the run folder, tokenizer
    or model is touched. Under torchrun rank 0 checks them before the other ranks start (StartGate): its error is the
    launch's one line; a rank that checks them after it passed and fails (a file missing on its node alone) says so
    itself, as `[rank N] error: ...`."""
    if not gone and (model_path := resolve_for_training(cfg.model.path)) != cfg.model.path:  # a run: its checkpoint
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_path))
    if data is None and not cfg.resume:
        check_paths(cfg.data)  # on --resume once the run has steps left (a finished run reads no data)
    return cfg


def check_launch(cfg: BaseConfig) -> Dist:
    """The checks of the options against the launch (one process or torchrun's ranks), the same on every rank: the
    CLI runs them while parsing too, so that rank 0 alone reports them (cli._quiet_parsing)."""
    d = distributed.from_env(cfg.training.fsdp)
    require_optimizer(cfg, d.on, d.fsdp)  # one line before anything starts; torchao's state loads on resume
    if d.on and cfg.training.oom_retry:
        raise ConfigError("--training.oom-retry is single-process only (ranks would split differently); drop it")
    distributed.check_device(d, cfg.training.device)
    refuse_offload_on_cpu(cfg.model.memory, cfg.training.device)  # the CLI's check names the option as typed first
    refuse_cpu_compile_without_compiler(cfg, cfg.training.device)
    return d


def _open(start: tuple, data: DataBundle | None, d: Dist, device_name: str, gate: distributed.StartGate,
          attn_origin: str = "requested") -> Run:  # fmt: skip
    """Everything before the first step, from `start` (_to_resume's: the config, the run folder, and on resume its
    newest checkpoint): the device, data, the run's length (refused here when it cannot be, before the model is
    built), model, optimizer and schedule, and on resume their saved state restored."""
    cfg, folder, latest, saved, moved = start
    check_weights(cfg.model, lora=cfg.lora.enabled)  # before the data is tokenized
    refuse_every_beyond_layers(cfg)
    ckpt.seed_rng(cfg.seed)  # random, numpy and torch; a resume restores the checkpoint's states (_restore)
    device, amp_dtype, param_dtype = resolve_device(cfg, device_name)
    data = _data(cfg, data, d, latest, saved, moved)
    attn, batcher = choose_batching(cfg, data, device, param_dtype, attn_origin)
    if batcher is not None:  # None: a class known only once loaded (remote code), counted once it is
        cfg = _length(cfg, data, batcher, d, device, folder, latest)
    build_on = d.build_device(device, reads_weights=not random_init(cfg.model))
    model, attn, plan, built = prepare_model(cfg, data, device, param_dtype, build_on, attn_origin, attn)
    if batcher is None or built.layout != batcher.layout:
        batcher_for(cfg, attn, model, data.tokenizer.pad_token_id, say=True)  # says why it does not pack
        cfg, batcher = _length(cfg, data, built, d, device, folder, latest), built
    fit_model_max_length(data.tokenizer, model.config)  # saved tokenizers truncate at the model's context
    if latest is not None and build_on.type != "meta":
        ckpt.load_weights(model, latest, lora=cfg.lora.enabled)  # full weights, before sharding (FSDP2: rank 0's)
    if d.main:
        _start(cfg, folder, model, latest, saved)
        gate.open()  # the other ranks start now
    gate.agree()  # every rank's start-up done; from here on every collective is reached by all ranks
    trained = d.wrap(model, device, amp_dtype)  # DDP around the model, or the model sharded in place (FSDP2)
    optimizer, scheduler, state, metrics = _training_state(cfg, d, folder, model, device, latest, saved, batcher)
    log.info("training: %s", describe_training(cfg, model, amp_dtype, optimizer, plan, d.strategy()))
    result = RunResult(run_dir=folder.path, steps=max(state.step, cfg.training.max_steps), checkpoint=latest)
    return Run(cfg=cfg, data=data, batcher=batcher, folder=folder, dist=d, device=device, amp_dtype=amp_dtype,
               model=model, trained=trained, attn=attn, optimizer=optimizer, scheduler=scheduler, state=state,
               stream=DataStream(data.train, batcher, state), metrics=metrics, result=result,
               memory_plan=plan)  # fmt: skip


def _to_resume(cfg: BaseConfig, folder: RunFolder) -> tuple[BaseConfig, RunFolder, Path | None, dict | None,
                                                              dict[str, str]]:  # fmt: skip
    """(the config, the run folder, on --resume the run's: its newest usable checkpoint, that checkpoint's trainer
    state, and the data paths the run was started with that moved (RunFolder.moved_data); else None, None, {})."""
    latest = saved = None
    moved: dict[str, str] = {}
    if cfg.resume:
        folder.check_resume(cfg)
        check_given_data(cfg, moved := folder.moved_data(cfg))  # a typo: refused, finished run or not
        cfg = folder.resumed(cfg)
        latest, saved = ckpt.newest_usable(folder)
        folder.check_moved_model(cfg, latest)
    if latest is not None and cfg.model.path and not cfg.lora.enabled and not has_weights(cfg.model.path):
        # a run begun from a config.json alone (before --model.random-init existed): its weights are latest's
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, random_init=True))
    return cfg, folder, latest, saved, moved


def _data(cfg: BaseConfig, data: DataBundle | None, d: Dist, latest, saved: dict | None,
          moved: dict[str, str]) -> DataBundle:  # fmt: skip
    """The run's data (`data`, else the configured dataset), summarised; a resumed run's checked to be the data it
    trained on."""
    # A resumed run tokenizes with the tokenizer it was trained with, never a rebuilt one; the input files' digest is
    # for the checkpoints, which rank 0 alone writes.
    data = data or build_data(cfg, tokenizer=AutoTokenizer.from_pretrained(latest) if latest else None, digest=d.main)
    for line in data.summary.lines():
        log.info(line)
    _say_no_validation(cfg, data)
    if cfg.training.eval_generate_every:
        from fasttune.eval.in_training import say_nothing_to_answer

        say_nothing_to_answer(cfg, data, d.fsdp)
    check_moved_data(cfg, moved, saved, data)
    check_same_data(saved, data, latest, cfg.data.val_path)
    record_prompt_format(data.tokenizer, data.summary.format)  # checkpoints' tokenizers carry the prompt format
    return data


def _length(cfg: BaseConfig, data: DataBundle, batcher, d: Dist, device: torch.device, folder: RunFolder,
            latest) -> BaseConfig:  # fmt: skip
    """`cfg` with the steps of its --epochs (run_length: a resume whose total they would change is refused), an
    --epochs run too long for this CPU refused (resolve_device judged the others): before the model is built."""
    cfg = run_length(cfg, data.train, batcher, d.world, folder.saved_config() if latest is not None else None)
    if cfg.training.epochs is not None:
        refuse_gpu_scale(cfg, device)
    return cfg


def _start(cfg: BaseConfig, folder: RunFolder, model, latest, saved: dict | None) -> None:
    """Rank 0, before the first step: room on disk for the checkpoints to come checked, and a new run's folder
    started (which clears an --overwrite'd run: after the check)."""
    t = cfg.training
    saves = planned_saves(t.max_steps, t.save_every, t.save_final, saved["state"]["step"] if saved else 0)
    merge = cfg.lora.enabled and cfg.lora.merge_on_save
    ckpt.check_disk(folder, model, t.keep_last, saves, cfg.overwrite, t.optimizer, t.max_bad_steps, merge)
    if latest is None:
        folder.start(cfg)


def _training_state(cfg: BaseConfig, d: Dist, folder: RunFolder, model, device: torch.device, latest,
                    saved: dict | None, batcher) -> tuple:  # fmt: skip
    """(optimizer, scheduler, train state, metrics log): new, or on resume restored from `latest`."""
    rule = saved["state"].get("decay_rule", 1) if saved else DECAY_RULE  # a run keeps the grouping it started with
    optimizer, scheduler = build_optimizer(cfg, model, device, rule)
    state = TrainState(decay_rule=rule)
    metrics = MetricsLog(folder, cfg.training.tensorboard, write=d.main)
    if latest is None:
        return optimizer, scheduler, state, metrics
    if "grad_accum" not in saved:  # a checkpoint from before it was recorded: the run's config says
        saved["grad_accum"] = folder.saved_config().get("training", {}).get("grad_accum", 1)
    state = _restore(d, latest, saved, model, optimizer, scheduler, metrics, cfg.training)
    _check_batching(saved, batcher, state, "packed" if cfg.data.packing else "padded")
    if d.main and state.step < cfg.training.max_steps:  # a resume refused as past its --max-steps keeps the record
        folder.write_config(cfg)  # the config now in force (e.g. a larger max_steps)
    return optimizer, scheduler, state, metrics


def _say_no_validation(cfg: BaseConfig, data: DataBundle) -> None:
    """Once, before training: --training.eval-every asks for a validation loss that nothing held out can give."""
    every, fraction = cfg.training.eval_every, cfg.data.val_fraction
    if data.val or not every:
        return
    left_out = data.summary.val_left_out
    why, fix = f"data.val_fraction={fraction:g}", "set --data.val-fraction (e.g. 0.05) to hold some data out"
    if cfg.data.val_path is not None:  # read, and not empty: every sample of it was left out
        why = (f"every sample of --data.val-path {shown(cfg.data.val_path)} was left out (too long for "
               f"--data.max-length {cfg.data.max_length}, or no trained token left: see the data summary)")  # fmt: skip
        fix = "raise --data.max-length or fix the validation file"
    elif fraction and left_out:  # held out, then left out by max_length: "too small" would send the user astray
        held = "the held-out sample was" if left_out == 1 else f"the {left_out} held-out samples were all"
        why = (f"{held} left out (too long for --data.max-length {cfg.data.max_length}, or no trained token left: see "
               "the data summary)")  # fmt: skip
        fix = "raise --data.max-length or --data.val-fraction"
    elif fraction:
        why = "no sample is held out (the data is too small to hold one out)"
    log.warning("no validation: %s, so training.eval_every=%d computes no val_loss; %s, or --training.eval-every 0 "
                "to drop evaluation", why, every, fix)  # fmt: skip


def _restore(d: Dist, latest, saved: dict, model, optimizer, scheduler, metrics: MetricsLog,
             t: TrainingConfig) -> TrainState:  # fmt: skip
    d.load_optimizer(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainState(**saved["state"])
    was = float(optimizer.param_groups[0]["lr"])  # the next step's rate on the checkpoint's schedule
    sync_lr(optimizer, scheduler)  # this run's schedule (--max-steps or --epochs may have changed)
    if not math.isclose(now := float(optimizer.param_groups[0]["lr"]), was, rel_tol=1e-4):
        log.warning("%s is not the checkpoint's run's: the learning-rate schedule now spans %s, and step %d "
                    "trains at lr %.3g instead of %.3g", length_option(t), count(t.max_steps, "step"), state.step + 1,
                    now, was)  # fmt: skip
    ranks = saved.get("rng_ranks")
    ckpt.set_rng_state(ranks[d.rank] if ranks and len(ranks) == d.world else saved["rng"])
    world, accum, grad_accum = saved.get("world", 1), saved["grad_accum"], t.grad_accum
    if world * accum != d.world * grad_accum:
        log.warning("resuming with %s per step (%s x grad_accum %d), the checkpoint trained with %d (%d x %d): "
                    "the global batch changes from here on; keep ranks x --training.grad-accum to continue the same "
                    "run", count(d.world * grad_accum, "micro-batch", "micro-batches"), count(d.world, "rank"),
                    grad_accum, world * accum, world, accum)  # fmt: skip
    elif world != d.world:
        log.info("resuming on %s x grad_accum %d, the checkpoint trained on %d x %d: the same global batch",
                 count(d.world, "rank"), grad_accum, world, accum)  # fmt: skip
    threads = saved.get("threads", torch.get_num_threads())
    if threads != torch.get_num_threads():  # CPU sums split their work by thread: the last bits depend on the count
        log.warning("resuming with %s, the checkpoint trained with %d: losses may differ from an uninterrupted "
                    "run in the last bits (set OMP_NUM_THREADS=%d to repeat it exactly)",
                    count(torch.get_num_threads(), "CPU thread"), threads, threads)  # fmt: skip
    metrics.truncate_after(state.step)
    log.info("resumed from %s (step %d)", latest, state.step)
    return state


def _check_batching(saved: dict, batcher, state: TrainState, before: str) -> None:
    """A checkpoint's position in its epoch indexes the plan it was batched by; batched otherwise now (a fasttune that
    packed models with their own attention, or a transformers that runs a model's attention differently), the rest
    of that epoch is another plan: the run goes on from the next epoch. `before`: what checkpoints written before
    the layout was kept used."""
    was = saved.get("batching", before)
    if was != batcher.layout and state.cursor:
        log.warning("--resume: the checkpoint's micro-batches were %s and are %s now; going on from epoch %d (the "
                    "rest of epoch %d would repeat or skip samples)", was, batcher.layout, state.epoch + 1,
                    state.epoch)  # fmt: skip
        state.epoch, state.cursor = state.epoch + 1, 0


def _fit(run: Run) -> None:
    """The loop: step, evaluate, log, save, until max_steps or a signal (which saves, then stops); a second Ctrl-C
    aborts at once, naming the checkpoint a --resume starts from."""
    with StopSignals(say=run.dist.main) as stop:  # from here on, Ctrl-C / SIGTERM end with a saved checkpoint
        try:
            _steps(run, stop)
        except KeyboardInterrupt:
            if stop.signum is None:  # not a second Ctrl-C (StopSignals turns the first into the flag)
                raise
            raise Interrupted(_aborted(run) if run.dist.main else "", exit_code=130) from None


def _aborted(run: Run) -> str:
    """What a second Ctrl-C says: the step it cut short, the newest complete checkpoint and how to resume from it."""
    saved = ckpt.list_checkpoints(run.folder)  # a save it cut short left no step-N folder (write_folder)
    said = f"interrupted again after step {run.state.step} (aborted at once)"
    if not saved:
        again = "again" if run.cfg.overwrite else "with --overwrite"
        return f"{said}; no checkpoint was saved, nothing to resume: run the same command {again} to start over"
    return f"{said}; the newest complete checkpoint is {saved[-1]}. Resume from it with the same command " \
           f"{_resume_how(run)} (output dir {run.folder})"  # fmt: skip


def _resume_how(run: Run) -> str:
    return "with --resume instead of --overwrite" if run.cfg.overwrite else "plus --resume"


def _steps(run: Run, stop: StopSignals) -> None:
    t, state, d = run.cfg.training, run.state, run.dist
    if state.step == 0:  # the untrained model's validation loss: the baseline the run must beat
        val = run.evaluate()
        if val is not None:
            run.metrics.append({"step": 0, "loss": None, "val_loss": val, "val_ppl": perplexity(val)})
            log.info("step 0: val_loss %.4f  ppl %.2f", val, perplexity(val))
    run.model.train()
    # In a terminal a live bar; in logs (CI, nohup) one line every log_every steps instead of a redraw per step.
    live = sys.stderr.isatty()
    bar = tqdm(total=t.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not (live and d.main and run.report))  # fmt: skip
    with printed_above(bar):  # a warning or log line meanwhile goes above the bar, not into it
        queued = None  # a step whose numbers are read after the next one is queued (nothing else was due after it)
        while state.step < t.max_steps or queued is not None:
            if queued is not None and (stop.signum is not None or state.step >= t.max_steps):
                _after_step(run, run.settle(queued), bar, stop, live)  # stops here, checkpoint at this step
                queued = None
                continue
            # one process only: under DDP/FSDP2 every step already meets the other ranks
            defer = not d.on and stop.signum is None and not run.due(state.step + 1)
            try:
                rec = run.step()
            except BaseException:  # the queued step still gets its record (and its health read) first
                if queued is not None:
                    with contextlib.suppress(Exception):
                        _show(run, run.settle(queued), bar, live, evaluated=False)
                raise
            if queued is not None:
                _show(run, run.settle(queued), bar, live, evaluated=False)
            queued = rec if defer else None
            if not defer:
                _after_step(run, run.settle(rec), bar, stop, live)
    bar.close()


def _show(run: Run, rec: dict, bar, live: bool, evaluated: bool) -> None:
    """Record the step (metrics.jsonl when due) and show it: the live bar, or one log line every log_every steps."""
    run.log(rec, evaluated)
    status = _status(rec)
    bar.set_postfix_str(status)
    bar.update(1)
    if not live and run.log_due(rec["step"]):
        log.info("step %d/%d: %s", rec["step"], run.cfg.training.max_steps, status)


def _after_step(run: Run, rec: dict, bar, stop: StopSignals, live: bool) -> None:
    """What follows the newest step: evaluation and generation scores when due, its record, a checkpoint when due,
    and on a signal a checkpoint and the stop."""
    t, state, d = run.cfg.training, run.state, run.dist
    evaluated = run.eval_due()
    if evaluated and (val := run.evaluate()) is not None:
        rec.update(val_loss=val, val_ppl=perplexity(val))
    if (every := t.eval_generate_every) and state.step % every == 0:  # generated answers, scored
        from fasttune.eval.in_training import training_scores

        rec.update(scores := training_scores(run))
        evaluated = evaluated or bool(scores)
    _show(run, rec, bar, live, evaluated)
    saving = run.save_due()
    if saving:
        run.save()
    if evaluated or saving:
        run.clock = None  # evaluation and saving are not step time: the next step starts a new stretch
    stopping = stop.signum is not None  # one snapshot: a signal arriving later counts at the next step
    if d.on:  # every rank stops after the same step when any rank was signalled
        stopping = d.sum_([float(stopping)], run.device)[0] > 0
    if stopping:
        bar.close()
        path = run.save()
        msg = f"interrupted at step {state.step}; checkpoint saved to {path}. Resume with the same command " \
              f"{_resume_how(run)} (output dir {run.folder})"  # fmt: skip
        code = 130 if stop.signum == signal.SIGINT else 143
        raise Interrupted(msg if d.main else "", exit_code=code)  # rank 0 says it; the others exit with its code


def _status(rec: dict) -> str:
    mem = f"{rec['peak_mem_gib']:.1f}G" if rec["peak_mem_gib"] is not None else "-"
    mfu = f" | MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
    return (f"loss {rec['loss']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | {rec['samples_per_s']:.1f} samp/s{mfu} | "
            f"lr {rec['lr']:.2e} | mem {mem}")  # fmt: skip
