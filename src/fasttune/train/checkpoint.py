"""Checkpoints: HF `save_pretrained` (safetensors) + tokenizer + trainer state, written atomically.

A checkpoint is written into `checkpoints/.tmp-step-N-<pid>`, every file fsync'ed, then renamed to
`checkpoints/step-N` in one `os.rename`, so a crash, kill or full disk in the middle of a save leaves the
previous checkpoint as it was. Only folders named `step-N` count as checkpoints; old ones are pruned only after
a newer one is complete. States load with `torch.load(weights_only=True)`, weights only from safetensors.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fasttune.errors import FasttuneError
from fasttune.train.run_dir import RunFolder

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: torch.load(weights_only=True) refuses numpy objects
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _folder(run: RunFolder | Path | str) -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder(Path(run))


def list_checkpoints(run: RunFolder | Path | str) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = _folder(run).checkpoints
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def save_checkpoint(
    run: RunFolder | Path, step: int, model, tokenizer, trainer_state: dict, keep_last: int, state_dict=None
) -> Path:
    """Write checkpoint `step` atomically; `state_dict`: the weights to save when not the model's own (FSDP2)."""
    root = _folder(run).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        old = None
        if final.exists():  # the same step saved again: move the complete one aside first, never delete it first
            old = root / f".old-step-{step:06d}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise FasttuneError(
                f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint "
                "is intact; free disk space or pick another --output-dir, then --resume"
            ) from None
        raise
    for old in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_disk(run: RunFolder, model: torch.nn.Module, keep_last: int, saves: int | None = None) -> None:
    """Refuse to start when the checkpoints this run will write (`saves`; None: as many as are kept) could not fit:
    better now than after an hour of training. The estimate is train/memory.disk_needed."""
    from fasttune.train.memory import disk_needed

    need = disk_needed(model, keep_last, keep_last + 1 if saves is None else saves)
    free = shutil.disk_usage(run.path).free
    if free < need:
        raise FasttuneError(
            f"--output-dir {run.path}: {free / 1e9:.2f} GB free, a checkpoint needs about "
            f"{need / 1e9:.2f} GB; free some space or choose another --output-dir"
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
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatch: another model shape than the one that wrote the checkpoint
        first = str(e).strip().splitlines()[-1].strip()
        raise FasttuneError(
            f"{ckpt}: weights do not fit the model ({first}); resume with the same --model / "
            "model.preset as the original run"
        ) from None
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise FasttuneError(
            f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); resume with the same --model / model.preset as the original run"
        )
