"""Which folder to load when the user names one: a model folder, a checkpoint, a LoRA adapter or a whole run folder.

One resolver for every place that takes a model or checkpoint path (`train --model`, `generate`, `chat`, `eval`):

    model / checkpoint folder   config.json + weights: loaded as is
    LoRA adapter folder         adapter_config.json (+ adapter_model.safetensors): base model + adapter
    run folder                  a LoRA run with merged/: that; else the latest complete checkpoints/step-N (say so)

Nothing is loaded here (no torch): only paths are checked (and the files to be read opened, so that one the user may
not read is named as such), so every mistake is one line naming the folder and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fasttune.errors import FasttuneError, hub_cache_folder, hub_id_hint, looks_like_hub_id

log = logging.getLogger("fasttune")

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelSource:
    """What to load for a path the user gave."""

    model_dir: Path
    """A folder `AutoModelForCausalLM.from_pretrained` loads: the model itself, or an adapter's base model."""
    tokenizer_dir: Path
    """Where the tokenizer is (an adapter's own folder when it saved one, else the model folder)."""
    adapter_dir: Path | None = None
    """A peft LoRA adapter to apply on top of model_dir."""
    note: str | None = None
    """What was picked for a run folder or an adapter, as one line for the log."""

    def describe(self) -> str:
        return f"{self.model_dir} + adapter {self.adapter_dir}" if self.adapter_dir else str(self.model_dir)


def has_tokenizer(path: Path) -> bool:
    """Whether `path` holds a tokenizer's files (TOKENIZER_FILES)."""
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def is_run_folder(path: Path) -> bool:
    from fasttune.train.run_dir import RunFolder

    run = RunFolder(path)
    return run.is_run or run.checkpoints.is_dir()


MERGED_STEP = "fasttune_step.json"
"""Beside a LoRA run's merged model: the step it was merged at ({"step": N}), so that a run resumed past it (and
stopped before it merged again) is resolved to its newer checkpoint. Its adapter/ records its step too: --resume of a
run whose end wrote both ends at once (train/loop.py)."""


def merged_step(merged: Path) -> int | None:
    """The step a run's merged model (or adapter/) was made at; None when not recorded (runs before it was) or
    unreadable."""
    try:
        return int(json.loads((merged / MERGED_STEP).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run_dir: Path, option: str = "--checkpoint") -> Path | None:
    """The newest complete checkpoint of a run (the loop's own list) whose weights load, or None; a damaged newer
    one is skipped with a warning naming it (with none loadable, the newest: its load error names the file). One that
    cannot be read (a permission) stops with one line: an older checkpoint in its place would be another model."""
    from fasttune.train.checkpoint import STATE_FILE, list_checkpoints, weights_problem

    try:
        found = list_checkpoints(run_dir)
    except PermissionError as e:  # a step-N folder the user may not look into (its trainer state cannot be seen)
        denied = Path(e.filename) if e.filename else run_dir
        raise _denied(option, denied.parent if denied.name == STATE_FILE else denied) from None
    for ckpt in reversed(found):
        refuse_unreadable(ckpt, option)
        if (problem := weights_problem(ckpt)) is None:
            return ckpt
        log.warning("skipping a damaged checkpoint: %s", problem)
    return found[-1] if found else None


def resolve(path: str | Path, option: str = "--checkpoint", adapters: bool = True) -> ModelSource:
    """The ModelSource for `path` as given to `option`; `adapters=False` where only a full model will do (training).
    Raises FasttuneError naming the folder and the fix."""
    given = Path(path)
    if not str(path):
        raise FasttuneError(f"{option} is empty; pass a checkpoint, run or model folder")
    if not given.exists() and (cached := _hub_cached(str(path), option)) is not None:
        given = cached
    if not given.exists():
        raise FasttuneError(f"{option} {given}: no such folder; pass a checkpoint, run or model folder"
                            + hub_id_hint(str(path), option))  # fmt: skip
    if not given.is_dir():
        raise FasttuneError(f"{option} {given} is a file; pass the folder that holds config.json")
    check_readable(given, option)
    if given.name == "checkpoints" and is_run_folder(given.parent):
        given = given.parent  # runs/x/checkpoints: the run's latest checkpoint, as for runs/x
    if is_run_folder(given):  # before config.json: a run folder holds the run's config.json, not a model's
        return _run_folder(given, option, adapters)
    if (given / "config.json").is_file():
        return _checked(ModelSource(given, given), option)
    if (given / ADAPTER_CONFIG).is_file():
        return _adapter(given, option, adapters)
    raise FasttuneError(
        f"{option} {given}: not a model folder (no config.json), a LoRA adapter (no {ADAPTER_CONFIG}) or a fasttune "
        "run folder; pass e.g. runs/quick or runs/quick/checkpoints/step-000300"
    )


def _hub_cached(given: str, option: str) -> Path | None:
    """A Hub id (`Qwen/Qwen2.5-0.5B`, as TRL and peft take models) whose model or adapter the local Hugging Face cache
    holds whole (config and weights, from an earlier `from_pretrained` or `hf download`): that snapshot folder, read
    where it is (nothing is downloaded; logged). None otherwise: the caller says how to fetch it."""
    folder = hub_cache_folder(given)
    if folder is None or not any((folder / f).is_file() for f in ("config.json", ADAPTER_CONFIG)):
        return None
    if not any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir()):
        return None  # a config fetched alone (AutoConfig.from_pretrained): not a model to load
    if folder not in _SAID:  # once, though the CLI and training both resolve --model
        _SAID.add(folder)
        log.info("%s %s: the copy in the Hugging Face cache, %s (nothing is downloaded)", option, given, folder)
    return folder


_SAID: set[Path] = set()


def _run_folder(run: Path, option: str, adapters: bool) -> ModelSource:
    from fasttune.train.run_dir import RunFolder

    merged, latest = RunFolder(run).merged, latest_checkpoint(run, option)
    at, newest = merged_step(merged), int(latest.name.rpartition("-")[2]) if latest else 0
    if _usable_merged(merged, option) and (at is None or at >= newest):  # not one a resumed run went past
        src = _checked(ModelSource(merged, merged), option)
        src.note = f"{run} is a LoRA run folder: using its merged model {merged}" + (f" (step {at})" if at else "")
        return src
    if latest is None:
        adapter = RunFolder(run).adapter
        if (adapter / ADAPTER_CONFIG).is_file():
            return _adapter(adapter, option, adapters, why=f"{run} is a LoRA run folder: using {adapter}")
        raise FasttuneError(
            f"{option} {run}: this run folder has no complete checkpoint yet; let the run save one "
            "(--training.save-every) or resume it with --resume"
        )
    why = f"{run} is a run folder: using its latest complete checkpoint {latest}"
    if at is not None:
        why += f" (its merged model {merged} is of step {at}: the run was resumed and went on)"
    if (latest / ADAPTER_CONFIG).is_file():
        return _adapter(latest, option, adapters, why=why)
    src = _checked(ModelSource(latest, latest), option)
    src.note = why
    return src


def _usable_merged(merged: Path, option: str) -> bool:
    """A merged model whose weights load (fasttune writes it whole; an older one cut by a full disk is skipped); one
    that cannot be read (a permission) stops with one line, never passed over for the adapter without a word."""
    from fasttune.train.checkpoint import weights_problem

    if not merged.is_dir():
        return False
    refuse_unreadable(merged, option)
    if not (merged / "config.json").is_file():
        return False
    if problem := weights_problem(merged):
        log.warning("skipping the run's merged model: %s", problem)
        return False
    return True


def _adapter(adapter: Path, option: str, adapters: bool, why: str | None = None) -> ModelSource:
    where = adapter / ADAPTER_CONFIG
    if not adapters:
        run = adapter.parent.parent if adapter.parent.name == "checkpoints" else adapter.parent
        raise FasttuneError(
            f"{option} {adapter} is a LoRA adapter, not a full model; pass its run's merged model "
            f"({run / 'merged'}, written with --lora.merge-on-save) or the base model"
        )
    refuse_unreadable(adapter, option)  # safetensors would say "No such file", the config read "damaged"
    try:
        base_name = json.loads(where.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise FasttuneError(f"{where}: unreadable ({e}); the adapter folder is damaged") from None
    if not base_name:
        raise FasttuneError(f"{where} names no base model (base_model_name_or_path); set it to the base model folder")
    # The base as written: absolute, else relative to the working directory (peft's convention), else to the adapter's
    # run (older fasttune runs stored the path relative to where training was started).
    candidates = [Path(base_name)] + [p / base_name for p in (adapter.parent, *adapter.parents) if p != Path(".")]
    base = next((c for c in candidates if (c / "config.json").is_file()), None)
    base = base or _hub_cached(base_name, f"{where}: base model")  # peft records a Hub model by its id
    if base is None:
        raise FasttuneError(_no_base(adapter, base_name))
    tokenizer = adapter if has_tokenizer(adapter) else base
    src = _checked(ModelSource(base, tokenizer, adapter_dir=adapter), option)
    src.note = (why + "; " if why else "") + f"LoRA adapter {adapter} on base model {base}"
    return src


def _no_base(adapter: Path, base_name: str) -> str:
    """The error for an adapter whose base model is not where its adapter_config.json says: an absolute path is gone
    (no working directory finds it), a relative one may be found from another; the run's merged model needs none."""
    where = adapter / ADAPTER_CONFIG
    if Path(base_name).is_absolute():
        message = (f"{where}: base model {base_name} is gone (moved or deleted); put it back, or set "
                   "base_model_name_or_path in that file to where it is now")  # fmt: skip
    elif looks_like_hub_id(base_name):  # an adapter trained with peft on a Hub model, not in the cache here
        message = (f"{where}: base model {base_name!r} is neither a folder here nor in the Hugging Face cache; "
                   f"fasttune downloads nothing: fetch it (`hf download {base_name}`), or set base_model_name_or_path "
                   "in that file to the base model folder")  # fmt: skip
    else:
        message = (f"{where}: base model {base_name!r} not found from here; set base_model_name_or_path in that file "
                   "to the base model folder (an absolute path), or run from the folder training ran in")  # fmt: skip
    merged = (adapter.parent.parent if adapter.parent.name == "checkpoints" else adapter.parent) / "merged"
    if (merged / "config.json").is_file():
        message += f"; or pass the run's merged model {merged}, which needs no base model"
    return message


def _checked(src: ModelSource, option: str) -> ModelSource:
    for folder in dict.fromkeys(f for f in (src.model_dir, src.adapter_dir, src.tokenizer_dir) if f is not None):
        refuse_unreadable(folder, option)
    if not has_tokenizer(src.tokenizer_dir):
        raise FasttuneError(
            f"{option} {src.tokenizer_dir}: no tokenizer in this folder; save one there with "
            f"tokenizer.save_pretrained('{src.tokenizer_dir}') (e.g. the base model's)"
        )
    return src


def needs_remote_code(model_dir: Path) -> str | None:
    """The auto_map class name when the folder's config asks for its own Python code that transformers lacks."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # transformers reports an unreadable config itself
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        return None
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return None  # transformers has its own class for it: loads without the folder's code
    return auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()))


def refuse_remote_code(model_dir: Path, trust: bool, flag: str) -> None:
    """Stop before transformers would ask on the terminal (or fail) when a folder needs its own code."""
    if trust:
        return
    code = needs_remote_code(model_dir)
    if code:
        raise FasttuneError(
            f"{model_dir} needs its own model code ({code} in config.json's auto_map), which transformers runs only "
            f"when allowed; if you trust that folder's Python files, pass {flag}"
        )


def resolve_for_training(path: str | None, say: bool = True) -> str | None:
    """`train --model PATH`: a run folder becomes the full-model folder to start from (logged when `say`); a model
    folder stays as given (its remote-code check is model/build.py's)."""
    if path is None:
        return path
    check_readable(Path(path), "--model")
    if (Path(path) / "config.json").is_file() and not is_run_folder(Path(path)):
        refuse_unreadable(Path(path), "--model")  # its tokenizer's load error would say to save another one
        return path
    src = resolve(path, option="--model", adapters=False)
    if src.note and say:
        log.info("--model: %s", src.note)
    return str(src.model_dir)


def check_readable(folder: Path, option: str) -> None:
    """A folder the user may not list or look into (chmod 000) is one line naming it: Python 3.11's Path.is_file and
    .exists raise PermissionError on the files in it."""
    try:
        if folder.is_dir():
            os.scandir(folder).close()
            (folder / "config.json").exists()  # a folder that may be listed but not looked into
    except PermissionError as e:
        raise FasttuneError(
            f"{option} {e.filename or folder}: permission denied; make the folder readable (chmod -R u+rX {folder}) "
            "or pass another"
        ) from None


READ_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken")
"""The files of a model, adapter or tokenizer folder that transformers, peft and the tokenizer read (a README.md is
never read, so may be anything)."""


def unreadable_in(folder: Path, also: tuple[str, ...] = ()) -> Path | None:
    """`folder` itself when the user may not list or look into it, else the first file of it that would be read (see
    READ_SUFFIXES, or named in `also`) that the user may not read (chmod 000); None when everything can be read."""
    try:
        files = [f for f in sorted(folder.iterdir()) if (f.suffix in READ_SUFFIXES or f.name in also) and f.is_file()]
    except PermissionError:  # Python 3.11's Path.is_file raises it in a folder that may be listed, not looked into
        return folder
    except OSError:
        return None  # gone, or not a folder: the caller's own checks say so
    for f in files:
        try:
            f.open("rb").close()  # never a FIFO (is_file above): opening one would block
        except PermissionError:
            return f
        except OSError:
            continue
    return None


def refuse_unreadable(folder: Path, option: str, fix: str = "or pass another folder", also: tuple[str, ...] = ()):
    """One line naming what in `folder` the user may not read, before safetensors reports it as "No such file or
    directory" (a traceback) or a check takes it for a damaged file."""
    denied = unreadable_in(folder, also)
    if denied == folder:
        raise _denied(option, folder, fix)
    if denied is not None:
        raise FasttuneError(denied_file(option, folder, denied, fix))


def denied_file(option: str, folder: Path | str, denied: Path, fix: str = "or pass another folder") -> str:
    """The one line for a file `denied` of `folder` that the user may not read (unreadable_in found it)."""
    return (
        f"{option} {folder}: {denied.name} cannot be read (permission denied); make it readable (chmod u+r {denied}) "
        f"{fix}"
    )


def _denied(option: str, folder: Path, fix: str = "or pass another folder") -> FasttuneError:
    return FasttuneError(f"{option} {folder}: permission denied, the folder cannot be read; make it readable "
                         f"(chmod -R u+rX {folder}) {fix}")  # fmt: skip
