"""Is a model folder the model a run started from? Asked when a --resume gives the run's model at another path (the
project folder moved: the path its config.json records is gone), answered from what is cheap to read and reliable:

- its config (`config_shape`): the fields that make the architecture and what it computes (model type, sizes,
  vocabulary, context, RoPE, attention layout), as transformers reads them. A full fine-tune needs no more: its weights
  are the checkpoint's, whose config.json the run saved;
- for LoRA, whose adapters were trained on the frozen base, its weights too (`weights_digest`): a SHA-256 over every
  tensor's name, dtype, shape and the SAMPLE bytes at the middle of its data in the safetensors files from_pretrained
  loads, read by name (the same for a copy however it is sharded). A fine-tune of the same base changes its tensors,
  so their middles; hashing every byte would read the whole model (16 GB for an 8B one) at every resume. PyTorch
  .bin files (pickles) are not read (no digest). A LoRA run records both at its start (RunFolder.base_model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

from fasttune.config import ModelConfig
from fasttune.errors import ConfigError

log = logging.getLogger("fasttune")

CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                 "rope_parameters", "rope_scaling", "rope_theta", "sliding_window", "layer_types",
                 "tie_word_embeddings", "num_local_experts", "num_experts", "num_experts_per_tok",
                 "moe_intermediate_size")  # fmt: skip
"""The config fields compared, where both configs set them (another transformers may name a field otherwise)."""
SAMPLE = 256
"""Bytes read from the middle of each tensor for the weights digest."""
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
"""The weights from_pretrained loads: one file, else the shards its index names."""
MAX_HEADER = 100_000_000
"""The longest safetensors header, in bytes (the safetensors library's own limit)."""


def config_shape(config) -> dict:
    """The CONFIG_FIELDS a transformers config sets (not None), as JSON values."""
    values = config.to_dict()
    return json.loads(json.dumps({k: values[k] for k in CONFIG_FIELDS if values.get(k) is not None}))


def weights_digest(folder: str | Path) -> str | None:
    """The digest of the safetensors weights in `folder` (see the module's docstring); None without such files or
    when one cannot be read (loading the model names the problem)."""
    files = _loaded_files(Path(folder))
    if not files:
        return None
    pieces = []
    try:
        for path in files:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > min(MAX_HEADER, os.fstat(f.fileno()).st_size - 8):  # a git-lfs pointer's text: 2e18
                    return None
                header = json.loads(f.read(size))
                for name, meta in header.items():
                    if name == "__metadata__":
                        continue
                    begin, end = meta["data_offsets"]
                    f.seek(8 + size + max(begin, (begin + end - SAMPLE) // 2))
                    data = f.read(min(SAMPLE, end - begin))
                    pieces.append((name, f"{meta['dtype']} {meta['shape']}".encode() + data))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    digest = hashlib.sha256()
    for name, piece in sorted(pieces):
        digest.update(name.encode() + b"\0" + piece)
    return digest.hexdigest()


def _loaded_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained loads from `folder`, as transformers picks them: model.safetensors, else
    the shards model.safetensors.index.json names; none else (a consolidated.safetensors beside them, the original
    format Mistral's repositories ship too, is never loaded, and a copy without it is the same model)."""
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    try:
        shards = json.loads((folder / INDEX).read_text())["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [folder / name for name in sorted(set(shards))]


def identify(model: ModelConfig) -> dict:
    """What a run records of its --model at its start: {"config": config_shape, "weights": weights_digest}."""
    from fasttune.model.build import load_model_config

    return {"config": config_shape(load_model_config(model, 0)), "weights": weights_digest(model.path)}


def read_record(path: Path) -> dict | None:
    """`path` (a run's base-model.json) as identify wrote it, {"config": {...}, "weights": digest or null}; None where
    there is none or it is not such a record (torn, edited): nothing to check against."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("config"), dict)
    return record if ok and isinstance(record.get("weights"), str | None) else None


def check_moved_model(model: ModelConfig, was: str, lora: bool, record: dict | None, record_file: Path,
                      checkpoint: Path | None) -> None:  # fmt: skip
    """--model given on --resume for the run's `was`, gone: refused in one line when it is another model than the
    run's, else logged with what was checked (a warning when nothing could be). Full fine-tune: the config against
    the `checkpoint`'s, whose weights the run goes on from. LoRA: config and weights against the `record` the run
    wrote at its start (`record_file`, read_record; None: a run from before it did, or a record damaged since)."""
    from fasttune.model.build import load_model_config

    moved = f"--resume: --model moved ({was}, the run's, is gone -> {model.path})"
    sure = "make sure it is the base model the adapters were trained on" if lora else "make sure it is the run's model"
    if lora and not record:
        why = (f"its record {record_file} cannot be read, so nothing checks it" if record_file.exists() else
               "the run recorded nothing to check it against (it was started before fasttune recorded a LoRA run's "
               f"base model in {record_file.name})")  # fmt: skip
        log.warning("%s; %s: %s", moved, why, sure)
        return
    if not lora and checkpoint is None:
        log.warning("%s; no checkpoint to check it against: %s", moved, sure)
        return
    if lora:
        theirs, grown, where = record["config"], False, str(record_file)
    else:  # the checkpoint's embeddings may have grown to the tokenizer's (build_model)
        theirs = config_shape(load_model_config(dataclasses.replace(model, path=str(checkpoint)), 0))
        grown, where = True, f"the checkpoint {checkpoint}"
    if diffs := _differences(theirs, config_shape(load_model_config(model, 0)), grown):
        raise ConfigError(f"--resume: --model {model.path} is not the model this run was started with ({was}, gone): "
                          f"its config has {', '.join(diffs)}; pass that model where it is now, or start a new run "
                          "with another --output-dir")  # fmt: skip
    if not lora:
        log.info("%s; its config is that of %s, whose weights the run goes on from", moved, where)
        return
    if (recorded := record.get("weights")) is None or (digest := weights_digest(model.path)) is None:
        log.warning("%s; its config is the one in %s, its weights could not be checked (no safetensors files): %s",
                    moved, where, sure)  # fmt: skip
        return
    if digest != recorded:
        raise ConfigError(f"--resume: --model {model.path} is not the base model this LoRA run was started with "
                          f"({was}, gone): its weights differ from those recorded in {where}; pass that base model "
                          "where it is now (the adapters were trained on it), or start a new run with another "
                          "--output-dir")  # fmt: skip
    log.info("%s; its config and weights are those recorded in %s", moved, where)


def _differences(run: dict, now: dict, grown_vocab: bool) -> list[str]:
    """'field NOW (the run's: RUN)' for each of CONFIG_FIELDS that both set, to other values; `grown_vocab`: the run's
    vocab_size is a checkpoint's, the model's grown to its tokenizer (build_model): a smaller one may be the same."""
    out = []
    for key in CONFIG_FIELDS:
        if key not in run or key not in now or run[key] == now[key]:
            continue
        if key == "vocab_size" and grown_vocab and now[key] < run[key]:
            continue
        out.append(f"{key} {json.dumps(now[key])} (the run's: {json.dumps(run[key])})")
    return out
