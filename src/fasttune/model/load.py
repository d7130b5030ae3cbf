"""Load what `model.resolve` found, for inference (generate, chat, eval): model + tokenizer, on a device, eval mode.

A LoRA adapter is applied with peft and merged into the in-memory copy of the base weights (peft's
merge_and_unload), so inference runs a plain HF model: the fast decode path and every attention backend apply, and
no adapter matmuls are paid per token. Nothing on disk changes.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from fasttune.data.tokenizer import pad_with_eos, without_length_warning
from fasttune.errors import FasttuneError, one_line
from fasttune.model.build import (
    _quiet_transformers,
    from_pretrained,
    load_weights_error,
    read_config,
    unreadable_files,
)
from fasttune.model.resolve import ModelSource, refuse_remote_code, resolve
from fasttune.quiet import PEFT_FUSED_PATTERNS, PEFT_READS_DEPRECATED, ignore_warning

log = logging.getLogger("fasttune")

TRUST_FLAG = "--trust-remote-code"


def inference_device(device: str = "auto") -> torch.device:
    from fasttune.device import pick_device

    if device == "auto":
        return pick_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FasttuneError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise FasttuneError(f"--device {device!r} is not valid; choose auto, cpu, cuda or cuda:N") from None


def _remote_code_error(e: Exception, where: Path) -> FasttuneError | None:
    if "trust_remote_code" in str(e):
        return FasttuneError(
            f"{where} needs its own Python code (a custom model or tokenizer class), which transformers runs only "
            f"when allowed; if you trust that folder's Python files, pass {TRUST_FLAG}"
        )
    return None


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.tokenizer_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        err = _remote_code_error(e, src.tokenizer_dir)
        raise err or FasttuneError(
            f"{src.tokenizer_dir}: the tokenizer there cannot be loaded ({one_line(e, line=0)}); save a working "
            "one with tokenizer.save_pretrained into that folder"
        ) from None
    return pad_with_eos(tok)


def load_model(src: ModelSource, device: torch.device, trust_remote_code: bool = False, option: str = "--checkpoint"):
    """The model of `src` (with its adapter merged in), bf16 on CUDA, fp32 on CPU; the caller has refused remote code
    it was not allowed to run."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # sdpa, or eager for the models without it (Bloom, ...); named, not left to the checkpoint's config, which may
    # name a fasttune backend that is not registered in this process
    for attn in ("sdpa", "eager"):
        try:
            model = from_pretrained(src.model_dir, option, dtype=dtype, attn_implementation=attn,
                                    trust_remote_code=trust_remote_code)  # fmt: skip
            break
        except unreadable_files() as e:
            if attn == "sdpa" and isinstance(e, ValueError) and "scaled_dot_product_attention" in str(e):
                continue
            raise _remote_code_error(e, src.model_dir) or load_weights_error(src.model_dir, e, option) from e
    if src.adapter_dir is not None:
        from fasttune.model.lora import _peft

        peft = _peft()
        if (rows := _adapter_vocab(model, src.adapter_dir)) and rows > model.get_input_embeddings().num_embeddings:
            with _quiet_transformers():  # training resized them to its tokenizer; the adapter holds them so
                model.resize_token_embeddings(rows)
        with warnings.catch_warnings():
            ignore_warning(*PEFT_READS_DEPRECATED)  # that one FutureWarning per load
            ignore_warning(*PEFT_FUSED_PATTERNS)  # and its MoE conversion's (model/lora.py _check_fused_ranks)
            model = peft.PeftModel.from_pretrained(model, src.adapter_dir).merge_and_unload()
    return model.to(device).eval()


def _adapter_vocab(model, adapter_dir: Path) -> int | None:
    """Rows of the input embeddings an adapter saved (peft saves them when training resized them to a tokenizer
    larger than the model), read from the file's header alone; None when it holds none."""
    from safetensors import safe_open

    file = Path(adapter_dir) / "adapter_model.safetensors"
    embeddings = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embeddings), None)
    if not file.is_file() or not name:
        return None
    with safe_open(file, "pt") as f:
        key = next((k for k in f.keys() if k.endswith(f"{name}.weight")), None)
        return f.get_slice(key).get_shape()[0] if key else None


def load_for_inference(path: str | Path | ModelSource, device: str = "auto", trust_remote_code: bool = False,
                       option: str = "--checkpoint", check=None):  # fmt: skip
    """(model, tokenizer) for any folder `resolve` accepts (or what it already resolved to); logs what a run folder
    or adapter resolved to. `check(tokenizer, config)` runs before the model loads (what the inputs need of the
    tokenizer and of the model's config: its context)."""
    src = path if isinstance(path, ModelSource) else resolve(path, option=option)
    if src.note:
        log.info("%s", src.note)
    refuse_remote_code(src.model_dir, trust_remote_code, TRUST_FLAG)  # before any transformers call could ask
    config = read_config(src.model_dir, trust_remote_code, option)  # a damaged one named as such, not as the tokenizer
    tokenizer = load_tokenizer(src, trust_remote_code)
    # generate and chat fit prompts to the context themselves (fit_context, chat's trimming): transformers' "longer
    # than the specified maximum sequence length" warning came before fasttune's own message
    without_length_warning(tokenizer)
    if check is not None:
        check(tokenizer, config)
    model = load_model(src, inference_device(device), trust_remote_code=trust_remote_code, option=option)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise FasttuneError(
            f"{src.tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings; pair the checkpoint with its own tokenizer"
        )
    return model, tokenizer
