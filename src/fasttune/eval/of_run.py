"""`fasttune eval` of a fasttune run (--checkpoint a run folder, or a checkpoint, adapter/ or merged/ in it): the
settings its val_loss was computed with (data.max_length, data.overlong, data.train_on_prompt) are eval's defaults,
and without --data its own validation samples are scored, rebuilt from its config.json exactly as training built them
(the same records held out, tokenized and cut) and checked against what its checkpoints record, the first
training.eval_batches micro-batches of them scored (the count the checkpoint records), so the loss is the val_loss the
run logged at that checkpoint's step: while its input files are unchanged (their digest), the held-out
records alone are tokenized (build_validation) and checked against the validation samples' fingerprint; else every
record (build_data), against the data fingerprint."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from fasttune.config import BaseConfig
from fasttune.config.base_config import shown
from fasttune.data.sample import Sample
from fasttune.errors import ConfigError, DataError, FasttuneError

log = logging.getLogger("fasttune")

SETTINGS = ("max_length", "overlong", "train_on_prompt")
"""The run's data settings eval takes as its own options' defaults."""


def run_of(checkpoint: str) -> Path | None:
    """The fasttune run folder `checkpoint` is, or is a checkpoint (or checkpoints/, adapter/, merged/) of; else
    None (a plain model folder)."""
    from fasttune.model.resolve import is_run_folder

    for given in (Path(checkpoint), Path(os.path.abspath(checkpoint))):  # step-N typed in checkpoints/: its parents
        run = (given.parent.parent if given.parent.name == "checkpoints"  # runs/x/checkpoints/step-N
               else given.parent if given.name in ("checkpoints", "adapter", "merged") else given)  # fmt: skip
        if is_run_folder(run):
            return run
    return None


def run_config(run: Path | None, needed: bool) -> BaseConfig | None:
    """The run's config.json, or None (no run; one that cannot be read, warned of). `needed`: no --data, so the run's
    data is what eval scores: a config.json that cannot be read stops it."""
    if run is None:
        return None
    from fasttune.config.base_config import from_dict

    try:
        return from_dict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, FasttuneError) as e:
        why = f"cannot read {run / 'config.json'} ({type(e).__name__})"
        if needed:
            raise ConfigError(f"--checkpoint {run}: {why}, so the run's validation split cannot be rebuilt; pass "
                              "--data with the records to score") from None  # fmt: skip
        log.warning("eval: %s: the run's data.max_length, data.overlong and data.train_on_prompt are not known; pass "
                    "--max-length, --overlong and --train-on-prompt as it trained", why)  # fmt: skip
        return None


def with_run_defaults(a, run: Path | None, cfg: BaseConfig | None) -> tuple:
    """(EvalArgs `a` with the run's data.max_length, data.overlong and data.train_on_prompt where its options are not
    given, so the loss scores the tokens the run's val_loss scores; the line that says so, for the log once the data
    is read, or None)."""
    taken = {k: getattr(cfg.data, k) for k in SETTINGS if getattr(a, k) is None} if cfg is not None else {}
    if not taken:
        return a, None
    said = ", ".join(f"data.{k} {'on' if v is True else 'off' if v is False else v}" for k, v in taken.items())
    flags = ", ".join("--" + k.replace("_", "-") for k in taken)
    verb = "override them" if len(taken) > 1 else "overrides it"
    line = f"eval: the settings of the run {run} apply, as its val_loss: {said} ({flags} {verb})"
    return dataclasses.replace(a, **taken), line


def check_files(run: Path, cfg: BaseConfig) -> None:
    """The run's data file and validation file are still there (else one line: pass --data)."""
    d = cfg.data
    for option, paths in (("data.path", d.path), ("data.val_path", d.val_path)):
        for path in paths or ():
            if Path(path).exists():
                continue
            raise DataError(f"--checkpoint {run}: the run's data file {path} ({option} in its config.json) is gone, "
                            "so its validation split cannot be rebuilt; pass --data with the records to score (or "
                            "restore the file)")  # fmt: skip


def validation_split(a, run: Path, cfg: BaseConfig, src, tokenizer) -> tuple:
    """(the run's validation samples as training built them, with eval's options where they differ from the run's;
    the config they were built with, its training.eval_batches the checkpoint's (a resume may have changed it since:
    config.json's then, for a checkpoint that records none); their format; one line saying what they are; the
    micro-batch layout the checkpoint records, or None). The run's data must be the one it trained on, as a
    checkpoint records it (_recorded): its input files and validation samples unchanged, else every sample's
    fingerprint."""
    from fasttune.data.pipeline import build_validation

    check_files(run, cfg)
    state = _recorded(run, src, cfg)
    val, summary, alone = _rebuilt(run, cfg, tokenizer, state)
    if not len(val):
        raise DataError(f"--checkpoint {run}: the run has no validation samples (data.val_fraction "
                        f"{cfg.data.val_fraction}), so it logged no val_loss; pass --data with records to "
                        "score")  # fmt: skip
    changes = {k: getattr(a, k) for k in SETTINGS if getattr(a, k) != getattr(cfg.data, k)}
    used = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes)) if changes else cfg
    if changes:  # the same records, cut or masked as eval's options say
        val, summary = (alone and build_validation(used, tokenizer)) or _whole(used, tokenizer)
    d = cfg.data
    where = (f"--data.val-path {shown(d.val_path)}" if d.val_path else
             f"{summary.source}, held out at data.val_fraction {d.val_fraction}")  # fmt: skip
    state = state or {}
    if (most := state.get("eval_batches")) is not None:  # its step's val_loss scored these; config.json: the newest
        used = dataclasses.replace(used, training=dataclasses.replace(used.training, eval_batches=int(most)))
    step = int(state.get("state", {}).get("step", 0)) or None
    at = "" if step is None else f"; checked against the data fingerprint of step {step}"
    if alone and step is not None:
        at = (f"; as at step {step}: the input files' digest and these samples' fingerprint (the training samples "
              "not tokenized)")  # fmt: skip
    return list(val), used, summary.format, f"{len(val)} samples of {where}{at}", state.get("batching")


def _whole(cfg: BaseConfig, tokenizer) -> tuple:
    """(validation samples, data summary) of build_data: every sample tokenized."""
    from fasttune.data.pipeline import build_data

    data = build_data(cfg, tokenizer=tokenizer)
    return data.val, data.summary


def _rebuilt(run: Path, cfg: BaseConfig, tokenizer, state: dict | None) -> tuple:
    """(the run's validation samples, their data summary, whether they were built alone). Alone, the training records
    left untokenized, when the checkpoint (`state`) records the digest its input files have now, and the samples so
    built are its validation samples (its val_data: the tokenizer and the rules that built them are the run's);
    else (a file edited, even in a way that leaves its records as they were; a checkpoint of an older fasttune) from
    every sample, checked against its data fingerprint as training checks a resumed run's."""
    from fasttune.data.pipeline import build_validation, input_digest
    from fasttune.data.sft import MASKING_RULES

    if (state and state.get("inputs") and state.get("masking_rules") == MASKING_RULES
            and state["inputs"] == input_digest(cfg.data)):  # fmt: skip
        built = build_validation(cfg, tokenizer)
        if built is not None and built[1].val_fingerprint == state.get("val_data"):
            return *built, True
    val, summary = _whole(cfg, tokenizer)
    if state is not None:
        _check_fingerprint(run, cfg, state, summary.fingerprint)
    return val, summary, False


def _recorded(run: Path, src, cfg: BaseConfig) -> dict | None:
    """The trainer state of the checkpoint that records the run's data (--checkpoint's own, else the run's newest that
    does); None when none does (warned: the rebuilt split cannot be checked)."""
    from fasttune.train.checkpoint import STATE_FILE, list_checkpoints, load_trainer_state

    own = src.adapter_dir or src.model_dir
    ckpts = [own] if (own / STATE_FILE).is_file() else list(reversed(list_checkpoints(run)))
    states = (_state(c, load_trainer_state) for c in ckpts)
    state = next((s for s in states if s and s.get("data")), None)
    if state is None:
        log.warning("eval: no checkpoint of %s records its data fingerprint: the validation split rebuilt from %s "
                    "cannot be checked to be the run's", run,
                    shown(cfg.data.path or ["the embedded corpus"]))  # fmt: skip
    return state


def _check_fingerprint(run: Path, cfg: BaseConfig, state: dict, fingerprint: str) -> None:
    """The rebuilt data's `fingerprint` is the one the checkpoint's `state` records; else eval stops in one line (a
    checkpoint of older masking rules whose data has nothing a later rule changed has the same fingerprint: scored)."""
    from fasttune.data.sft import MASKING_RULES

    if state["data"] == fingerprint:
        return
    files = " or ".join(shown(p) for p in (cfg.data.path or ["the embedded corpus"], cfg.data.val_path) if p)
    if state.get("masking_rules", 1) != MASKING_RULES:
        why = "the run was trained by an earlier fasttune that trained other tokens of the same data"
    else:
        why = f"its data ({files}) is not what it trained on: records added, removed or edited since"
    raise DataError(f"--checkpoint {run}: {why}, so its validation split cannot be rebuilt; pass --data with the "
                    "records to score")  # fmt: skip


def _state(ckpt: Path, load) -> dict | None:
    try:
        return load(ckpt)
    except Exception:  # a damaged trainer state: an older checkpoint's fingerprint is the same run's
        return None


def validated(samples: list[Sample], cfg: BaseConfig, model, layout: str | None = None) -> list[Sample]:
    """The samples the run's val_loss covers: the first training.eval_batches micro-batches of the split (`cfg`'s:
    validation_split gives the checkpoint's count), batched as the run batched them: `layout`, what its checkpoint
    records (train/model_prep.py batcher_for decided it from the attention chosen and the class: packed, or padded
    rows by length for a model that computes attention in its own code); without one (a checkpoint older than the
    record), decided from the model's class."""
    from fasttune.data.packing import Batcher
    from fasttune.model.build import base_model

    if layout is None:
        packs = getattr(type(base_model(model)), "_supports_attention_backend", False)
        layout = "padded" if not cfg.data.packing else "packed" if packs else "grouped"
    batcher = Batcher.from_config(cfg.data, cfg.seed, packing=layout == "packed", grouped=layout == "grouped")
    plan, most = batcher.plan([len(s) for s in samples], epoch=0), cfg.training.eval_batches
    if len(plan) <= most:
        return samples
    kept = sorted(i for b in plan[:most] for i in b)
    log.info("eval: the run's val_loss covers the first %d of %d micro-batches (training.eval_batches): %d of %d "
             "samples scored, as it scored them (--whole-split scores all)", most, len(plan), len(kept),
             len(samples))  # fmt: skip
    return [samples[i] for i in kept]
