"""Checkpoints: HF `save_pretrained` (safetensors) + tokenizer + trainer state, written atomically.

A checkpoint is written into `checkpoints/.tmp-step-N-<pid>`, every file fsync'ed, then renamed to
`checkpoints/step-N` in one `os.rename`, so a crash, kill or full disk in the middle of a save leaves the
previous checkpoint as it was. Only folders named `step-N` count as checkpoints; old ones are pruned only after
a newer one is complete, and a pruned one is first renamed to `.pruned-step-N-<pid>`, so a kill during the delete
never leaves a half-deleted `step-N` (the run folder removes such temporaries at the next start, under its lock).
The last checkpoint saved while the loss was healthy is never pruned. Resume verifies the newest checkpoint
(safetensors headers and sizes, the trainer state, the JSON files) and falls back to the previous complete one; a
checkpoint the user may not read (a permission, not damage) stops the resume in one line instead.
States load with `torch.load(weights_only=True)`, weights only from safetensors, through transformers' weight
conversions as `from_pretrained` reads them (`save_pretrained` writes an MoE model's fused experts one per expert).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fasttune.durable import fsync_dir, fsync_tree, usual_permissions
from fasttune.errors import FasttuneError, one_line
from fasttune.train.run_dir import RunFolder

log = logging.getLogger("fasttune")

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def seed_rng(seed: int) -> None:
    """Seed every generator a run may draw from: Python's `random`, numpy's global one and torch's (CPU and every
    GPU). torch's alone was seeded: a draw from the other two (a tokenizer's or a collator's shuffle, a user's
    transform) differed from run to run, though a resume restores all three (rng_state). numpy takes seeds below
    2**32 only: a larger or negative --seed is folded into that range, the same way every run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state (seed_rng's three, each GPU's), for a checkpoint: a resume goes on drawing where the
    run it continues stopped."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: torch.load(weights_only=True) refuses numpy objects
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """A checkpoint's rng_state back in every generator (a GPU's only where there is one)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _folder(run: RunFolder | Path | str) -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder(Path(run))


def _step_dirs(run: RunFolder | Path | str) -> list[Path]:
    """Every `step-N` folder, complete or not, oldest first."""
    root = _folder(run).checkpoints
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run: RunFolder | Path | str) -> list[Path]:
    """Complete checkpoints of a run folder (with their trainer state), oldest first."""
    return [p for p in _step_dirs(run) if (p / STATE_FILE).is_file()]


def _reason(e: BaseException) -> str:
    """The cause of a failed write in a few words: 'No space left on device', not a traceback."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = one_line(e)
    for known in ("No space left on device", "Disk quota exceeded", "File too large", "unexpected pos"):
        if known.lower() in text.lower():
            return known if known != "unexpected pos" else "the file could not be written completely"
    return one_line(e, 160, typed=True)


def save_checkpoint(
    run: RunFolder | Path,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    keep_last: int,
    state_dict=None,
    keep: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep_last` (never `keep`: the last healthy
    one). `state_dict`: the weights to save when not the model's own (FSDP2)."""
    final = _folder(run).checkpoints / f"step-{step:06d}"

    def write(tmp: Path) -> None:
        from fasttune.model.lora import resized_embeddings_quiet

        with resized_embeddings_quiet():
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)

    write_folder(final, write, f"could not write checkpoint {final}", "the previous checkpoint is intact; free disk "
                 "space or pick another --output-dir, then --resume")  # fmt: skip
    root = final.parent
    for old in list_checkpoints(run)[:-keep_last]:
        if keep is not None and old == keep:
            continue
        doomed = root / f".pruned-{old.name}-{os.getpid()}"
        os.rename(old, doomed)  # one rename: a kill in the delete below never leaves a half-deleted step-N
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def write_folder(final: Path, write, what: str, fix: str) -> None:
    """Write the folder `final` with `write(tmp)` into a temporary sibling (.tmp-NAME-PID), then rename it into place:
    a kill, a crash or a full disk leaves the previous `final` (or none), never a part of one. A `final` that exists
    is moved aside (.old-NAME-PID) before the rename, never deleted first: a failure or Ctrl-C in between puts it back
    here (RunFolder.clean_stale does after a kill). Any failure to write (full disk, quota, I/O error: OSError from us,
    SafetensorError from safetensors, RuntimeError from torch.save) ends in one line: `what` (reason); `fix`."""
    root = final.parent
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    old = root / f".old-{final.name}-{os.getpid()}"
    moved = False  # `final` is at `old`
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        usual_permissions(tmp)
        fsync_tree(tmp)
        if final.exists():
            os.rename(final, old)
            moved = True
        os.rename(tmp, final)
        fsync_dir(root)
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # not KeyboardInterrupt / SystemExit: those stay what they are
        _undo(tmp, old if moved else None, final)
        raise FasttuneError(f"{what} ({_reason(e)}); {fix}") from None
    except BaseException:
        _undo(tmp, old if moved else None, final)
        raise


def _undo(tmp: Path, old: Path | None, final: Path) -> None:
    """After a failed or interrupted write_folder: the temporary goes, and the previous `final`, when it was moved
    aside and the new one did not take its place, comes back (`generate --checkpoint RUN` reads it at once)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and old.exists() and not final.exists():
        with contextlib.suppress(OSError):  # left for RunFolder.clean_stale to put back at the next start
            os.rename(old, final)


def verify(ckpt: Path) -> tuple[dict | None, str | None]:
    """(trainer state, None) when `ckpt` can be resumed from, else (None, what is wrong, naming the file). Reads
    the safetensors headers (safetensors checks them against the file size: a truncated file fails), the JSON
    files and the trainer state (weights_only); never loads the weights themselves."""
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        return None, f"{state_file} is missing (the checkpoint is incomplete)"
    if problem := weights_problem(ckpt):
        return None, problem
    try:
        return load_trainer_state(ckpt), None
    except Exception as e:  # torch's own message would suggest weights_only=False: unsafe advice, never shown
        return None, f"{state_file} is damaged (not a readable trainer state: {type(e).__name__})"


def weights_problem(ckpt: Path) -> str | None:
    """What makes `ckpt` unloadable as a model (naming the file), or None: the safetensors headers (checked against
    the file sizes: a truncated file fails), the JSON files and the shards a weights index lists; never the weights
    themselves."""
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return f"{ckpt} has no .safetensors weights"
    for f in weights:
        try:
            with safe_open(f, "pt") as opened:
                opened.keys()
        except Exception as e:
            return f"{f} is truncated or damaged ({one_line(e, 120)})"
    for f in sorted(ckpt.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            return f"{f} is damaged ({type(e).__name__})"
        if f.name.endswith(".safetensors.index.json") and (problem := _missing_shard(f, data)):
            return problem
    return None


def _missing_shard(index: Path, data: object) -> str | None:
    """A shard that a sharded checkpoint's index (model.safetensors.index.json) lists but the folder lacks."""
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return f"{index} is damaged (no weight_map)"
    missing = sorted({str(v) for v in weight_map.values()} - {p.name for p in index.parent.iterdir()})
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"{index.parent / missing[0]}{more} is missing (listed in {index.name}; the checkpoint is incomplete)"
    return None


def newest_usable(run: RunFolder) -> tuple[Path, dict]:
    """The newest checkpoint that verifies and its trainer state. A damaged newer one is skipped with a warning
    naming it (and left on disk for the user to inspect); with none usable, one line naming the bad file. One the
    user may not read (a permission, not damage) stops with one line: resuming from an older one would train its
    steps again and replace it."""
    from fasttune.model.resolve import refuse_unreadable

    problems: list[str] = []
    for ckpt in reversed(_step_dirs(run)):
        refuse_unreadable(ckpt, "--resume", also=(STATE_FILE,), fix="and resume again (resuming from an older "
                          "checkpoint instead would train its steps again and replace this one)")  # fmt: skip
        state, problem = verify(ckpt)
        if problem is None:
            for p in problems:
                log.warning("--resume: skipping a damaged checkpoint: %s; resuming from %s", p, ckpt)
            return ckpt, state
        problems.append(problem)
    if problems:
        raise FasttuneError(
            f"--resume: no usable checkpoint in {run.checkpoints}: {problems[0]}; start over with --overwrite"
        )
    raise FasttuneError(f"--resume: no complete checkpoint in {run.checkpoints}; start over with --overwrite")


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def check_disk(
    run: RunFolder,
    model: torch.nn.Module,
    keep_last: int,
    saves: int,
    overwrite: bool = False,
    optimizer: str = "adamw",
    max_bad_steps: int = 0,
    merge: bool = True,
) -> None:
    """Refuse to start when the checkpoints this run will write (`saves` of them) could not fit: better now than
    after an hour of training. At the fullest moment max(on disk, held) complete checkpoints plus the one being
    written exist (pruning runs after a save completes), never more new ones than the run writes: `held` is
    keep_last, and one more when the run may save keep_last times after unhealthy steps (max_bad_steps allows it):
    pruning then keeps the last healthy checkpoint besides the keep_last newest. Checkpoints on disk count as already
    written (as freed, for --overwrite), and their measured size replaces the estimate of
    train/footprint.checkpoint_bytes (weights in the dtype they are held in, and the optimizer state). A LoRA run
    that `merge`s at the end writes the merged model beside them."""
    from fasttune.train.footprint import bytes_needed, checkpoint_bytes

    on_disk = [] if overwrite else list_checkpoints(run)
    per_ckpt, merged = checkpoint_bytes(model, optimizer)
    merged *= merge
    per_ckpt = max((_bytes(p) for p in on_disk), default=per_ckpt)
    healthy = int(max_bad_steps >= keep_last)  # the last healthy one, kept behind keep_last unhealthy saves
    new = min(max(len(on_disk), keep_last + healthy) + 1 - len(on_disk), saves)
    need = bytes_needed(per_ckpt, merged, new)
    free = shutil.disk_usage(run.path).free + (sum(_bytes(p) for p in run.artifacts) if overwrite else 0)
    if free < need:
        why = f", with the last healthy one kept past --training.keep-last {keep_last}" if healthy else ""
        fix = f", --training.max-bad-steps below {keep_last}" if healthy else ""
        merged_note = f" + the merged model, {merged / 1e9:.2f} GB" if merged else ""
        merge_fix = "pass --lora.no-merge-on-save (keep the adapter only), " if merged else ""
        raise FasttuneError(
            f"--output-dir {run.path}: {free / 1e9:.2f} GB free, the checkpoints of this run need about "
            f"{need / 1e9:.2f} GB more ({new} x {per_ckpt / 1e9:.2f} GB{why}{merged_note}); free some space, lower "
            f"--training.keep-last{fix}, {merge_fix}or choose another --output-dir"
        )


def load_trainer_state(ckpt: Path) -> dict:
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    return state


def load_weights(model, ckpt: Path, lora: bool) -> None:
    """Load checkpoint weights into an already built model (safetensors only)."""
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FasttuneError(f"{ckpt}: no .safetensors weights; the checkpoint is incomplete, delete it and --resume")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, tensors)
        return
    try:
        missing, unexpected = model.load_state_dict(in_model_layout(model, tensors), strict=False)
    except Exception as e:  # another model shape than the one that wrote the checkpoint (a size, an expert count)
        raise FasttuneError(
            f"{ckpt}: weights do not fit the model ({one_line(e, line=-1)}); resume with the same --model / "
            "model.preset as the original run"
        ) from None
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise FasttuneError(
            f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); resume with the same --model / model.preset as the original run"
        )


def in_model_layout(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the model's own names and shapes, converted as `from_pretrained` converts them
    (transformers' weight conversions for the model's class): `save_pretrained` writes an MoE model's experts, which
    transformers 5 holds fused (`mlp.experts.gate_up_proj`, 3-D), one per expert (`mlp.experts.0.gate_proj.weight`,
    ...). Tensors no conversion applies to keep their names (unexpected ones are reported under the checkpoint's).
    Takes the tensors out of `tensors` as it goes: a layer's experts are held twice at most, never the model."""
    own = model.state_dict()
    if tensors.keys() <= own.keys():  # a dense model's checkpoint: already the model's names, nothing to convert
        return tensors
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, WeightConverter] = {}
    for key in sorted(tensors, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if name not in own:  # the model's own name already, or a tensor the model does not have
            out[key] = tensors.pop(key)
        elif pattern is None:
            out[name] = tensors.pop(key)
        else:  # one of several tensors (the experts') that make one of the model's
            converter = pending.setdefault(name, copy.deepcopy(by_pattern[pattern]))
            converter.add_tensor(name, key, pattern, tensors.pop(key))
    while pending:
        name, converter = pending.popitem()
        for target, value in converter.convert(name, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out
