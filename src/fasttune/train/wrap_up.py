"""The end of a run, after its last step: LoRA adapters (and the merged model), plots, the sample prompt and the
summary, written by rank 0."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fasttune.config import BaseConfig
from fasttune.data.formats import FORMATS
from fasttune.data.pipeline import DataBundle
from fasttune.model.resolve import MERGED_STEP
from fasttune.train import checkpoint as ckpt
from fasttune.train.metrics import peak_memory_gib, save_plots, summarize
from fasttune.train.run import Run, RunResult
from fasttune.train.signals import Interrupted, Terminated, sigterm_raises

log = logging.getLogger("fasttune")


def finish(run: Run) -> RunResult:
    """After the last step: LoRA adapters (and the merged model), plots and the summary, on rank 0."""
    cfg, result, data = run.cfg, run.result, run.data
    run.metrics.close()
    # the whole run's first and last losses (a resumed run included), from its metrics
    losses = [r["loss"] for r in run.metrics.records if r.get("loss") is not None]
    vals = [r["val_loss"] for r in run.metrics.records if r.get("val_loss") is not None]
    result.first_loss, result.last_loss = (losses[0], losses[-1]) if losses else (None, None)
    result.first_val_loss, result.last_val_loss = (vals[0], vals[-1]) if vals else (None, None)
    # FSDP2: every rank helps gather the adapters (and, to merge, the base) for rank 0 to save
    weights = run.dist.full_weights(run.model, frozen=cfg.lora.merge_on_save) if cfg.lora.enabled else None
    # the peak of the fullest GPU (a collective): ranks differ (FSDP2's root shards, rank 0's checkpoint gathers)
    peak = run.dist.max_(peak_memory_gib(run.device) or 0.0, run.device) if run.device.type == "cuda" else None
    if not run.dist.main:  # rank 0 saves, plots and reports
        return result
    result.model_dir = result.checkpoint
    result.sample_prompt = sample_prompt(cfg, data)
    if cfg.lora.enabled:
        result.model_dir = _save_lora(run, weights) or result.model_dir
    save_plots(run.metrics.records, run.folder)
    result.records = run.metrics.records
    training = describe_training(cfg, run.model, run.amp_dtype, run.optimizer, run.memory_plan, run.dist.strategy())
    if run.report:
        summarize(cfg, result, run.attn, peak, run.folder, run.dist.world, training, run.batcher)
    return result


def _save_lora(run: Run, weights: dict | None) -> Path | None:
    """adapter/ and (--lora.merge-on-save) merged/, each written whole or not at all, each with the tokenizer (its
    prompt format) and its step (merged/'s: a run resumed past it and stopped is resolved to its newer checkpoint;
    both: the resume of a run whose end wrote them ends before its data is read, train/finished.py).
    Returns merged/ when written. A failed write ends in one line; --resume of the complete run writes them again."""
    from fasttune.model.lora import save_lora, save_merged

    folder, tokenizer, step = run.folder, run.data.tokenizer, run.state.step
    fix = "the checkpoints are intact; free disk space, then run the same command with --resume to write it again"

    def adapter(tmp: Path) -> None:
        save_lora(run.model, tmp, state=weights)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGED_STEP).write_text(json.dumps({"step": step}) + "\n")  # a finished run's resume ends at once

    def merged(tmp: Path) -> None:
        save_merged(run.model, tmp, weights)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGED_STEP).write_text(json.dumps({"step": step}) + "\n")

    writes = [(folder.adapter, adapter, "the LoRA adapter"), (folder.merged, merged, "the merged model")]
    with sigterm_raises():  # after the last step, SIGTERM stops the write at once, as Ctrl-C does
        for final, write, what in writes[: 1 + run.cfg.lora.merge_on_save]:
            try:
                ckpt.write_folder(final, write, f"could not write {what} {final}", fix)
            except (KeyboardInterrupt, Terminated) as e:  # after the last checkpoint: nothing is lost, --resume ends
                msg = f"interrupted while writing {what} {final} (not written); the checkpoints are intact: run the " \
                      "same command with --resume to write it"  # fmt: skip
                raise Interrupted(msg, exit_code=143 if isinstance(e, Terminated) else 130) from None
    return folder.merged if run.cfg.lora.merge_on_save else None


def sample_prompt(cfg: BaseConfig, data: DataBundle) -> str:
    """generation.sample_prompt when set; else from the user's data (a held-out sample, a trained one when none is
    held out): a supervised sample's prompt, the first words of a text; the default ("def ") suits the embedded
    corpus only."""
    default = type(cfg.generation)().sample_prompt
    samples = data.val or data.train
    fmt = data.summary.format
    if (
        cfg.generation.sample_prompt != default
        or not samples
        or fmt not in FORMATS
        or (fmt == "text" and not cfg.data.path)
    ):
        return cfg.generation.sample_prompt  # (a benchmark's synthetic tokens have no text)
    ids, spans = samples[0].ids.tolist(), samples[0].spans
    start = int(spans[0]) if len(spans) else 0  # the first trained token: the answer starts
    if fmt == "text":
        start = min(8, len(ids) - 1)  # a few words of it to continue
    if ids[:1] == [getattr(data.tokenizer, "bos_token_id", None)]:
        ids, start = ids[1:], start - 1  # generation tokenizes the prompt again and adds BOS itself
    return data.tokenizer.decode(ids[:start]) if start > 0 else cfg.generation.sample_prompt


def describe_training(
    cfg: BaseConfig, model: torch.nn.Module, amp_dtype, optimizer, plan: str, strategy: str = ""
) -> str:
    """Precision, optimizer and memory plan in one line, e.g. 'pure bf16 weights and optimizer state; adamw (fused);
    memory plan none', after the `strategy` under torchrun (Dist.strategy: 'DDP over 2 ranks (gloo); ...')."""
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    trained = {short.get(p.dtype, str(p.dtype)) for p in model.parameters() if p.requires_grad}
    frozen = {short.get(p.dtype, str(p.dtype)) for p in model.parameters() if not p.requires_grad}
    autocast = f" under {short[amp_dtype]} autocast" if amp_dtype is not None else ""
    if frozen:
        precision = f"{'/'.join(sorted(trained))} adapters on a {'/'.join(sorted(frozen))} frozen base{autocast}"
    elif autocast:
        precision = f"{'/'.join(sorted(trained))} master weights{autocast}"
    else:
        state = " and optimizer state" if cfg.training.optimizer == "adamw" else ""  # 8-bit moments: their own
        precision = f"pure {'/'.join(sorted(trained))} weights{state}"
    fused = all(g.get("fused") for g in optimizer.param_groups)
    said = f"{precision}; {cfg.training.optimizer}{' (fused)' if fused else ''}; memory plan {plan}"
    return f"{strategy}; {said}" if strategy else said
