"""LoRA adapters through peft (an optional dependency, imported only when LoRA is used).

`apply_lora` wraps a Hugging Face causal LM so that only the adapters train; `save_lora` writes the adapter
(adapter_model.safetensors + adapter_config.json, loadable with `peft.PeftModel.from_pretrained`) and, when asked,
a full model with the adapters merged into the base weights (loadable with `AutoModelForCausalLM.from_pretrained`).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from fasttune.config.base_config import LoraConfig
from fasttune.errors import FasttuneError

log = logging.getLogger(__name__)
_ADAPTER = "default"  # peft's name for the single adapter get_peft_model creates


def _peft():
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise FasttuneError("LoRA needs the peft package: pip install 'fasttune[lora]'") from e


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last-component names of the model's linear layers (what LoRA `targets` match), lm_head excluded."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style models use Conv1D for their projections

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and name and not name.endswith("lm_head")
    }
    return sorted(names)


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters on the `lora_cfg.targets` it has; everything else is frozen."""
    peft = _peft()
    available = linear_module_names(model)
    targets = [t for t in lora_cfg.targets if t in available]
    if not targets:
        raise FasttuneError(
            f"lora.targets ({', '.join(lora_cfg.targets)}) match no linear layer of this model; "
            f"its linear layers are named: {', '.join(available) or 'none'}"
        )
    missing = [t for t in lora_cfg.targets if t not in available]
    if missing:
        log.info("LoRA targets %s; not in this model, skipped: %s", ", ".join(targets), ", ".join(missing))
    peft_cfg = peft.LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, peft_cfg)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # With frozen embeddings, reentrant checkpointing sees no input that needs grad and drops the adapters' grads.
        model.enable_input_require_grads()
    return model


def save_lora(model: nn.Module, out_dir: str | Path, merged_dir: str | Path | None = None) -> None:
    """Save the adapter to `out_dir`; with `merged_dir`, also the base model with the adapters merged in.
    The live model is not changed (training can continue after a save)."""
    model.save_pretrained(str(out_dir))
    if merged_dir is not None:
        base = model.get_base_model()
        base.save_pretrained(str(merged_dir), state_dict=merged_state_dict(model))


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with each LoRA delta added to its weight, under the plain (unwrapped) names.
    Computed out of place in fp32 and kept on CPU, instead of peft's in-place merge_and_unload, so the training
    model keeps its adapters and exact base weights, and no second copy of the weights lands on the GPU."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {
        f"{name}.weight": module
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and _ADAPTER in module.lora_A
    }
    merged: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        module = deltas.get(key)
        if module is not None:
            weight = module.get_base_layer().weight
            value = (weight.float() + module.get_delta_weight(_ADAPTER).float()).to(weight.dtype)
        merged[key] = value.detach().to("cpu").contiguous()
    return merged
