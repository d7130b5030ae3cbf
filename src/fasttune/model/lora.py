"""LoRA adapters through peft (an optional dependency, imported only when LoRA is used).

`apply_lora` wraps a Hugging Face causal LM so that only the adapters train; `save_lora` writes the adapter
(adapter_model.safetensors + adapter_config.json, loadable with `peft.PeftModel.from_pretrained`) and, when asked,
a full model with the adapters merged into the base weights (loadable with `AutoModelForCausalLM.from_pretrained`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import types
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fasttune.config.base_config import LoraConfig
from fasttune.errors import FasttuneError
from fasttune.quiet import PEFT_FUSED_PATTERNS, PEFT_READS_DEPRECATED, ignore_warning

log = logging.getLogger(__name__)
_ADAPTER = "default"  # peft's name for the single adapter get_peft_model creates


def _peft():
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise FasttuneError("LoRA needs the peft package: pip install 'fasttune[lora]'") from e


ALL_LINEAR = "all-linear"
"""peft's name for every linear layer but the output head, accepted in lora.targets."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last-component names of the model's linear layers (what LoRA `targets` match), lm_head excluded."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style models use Conv1D for their projections

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and name and not name.endswith("lm_head")
    }
    return sorted(names)


class _Targets(NamedTuple):
    """What `apply_lora` adapts: `targets` (linear layers by name) of the model's `available` ones, the fused MoE
    experts parameters `experts` (how many linear layers each holds), the `by_weight` targets adapted through their
    weights beside fused experts, and what the user's `wanted` names miss (`fused`, `partly`: for the messages)."""

    wanted: list[str] | tuple[str, ...]
    available: list[str]
    targets: list[str]
    fused: dict[str, tuple[str, ...]]
    experts: dict[str, int]
    partly: dict[str, list[str]]
    by_weight: list[str]


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters on the `lora_cfg.targets` it has; everything else is frozen."""
    peft = _peft()
    t = _choose_targets(model, peft, lora_cfg)
    _check_dropout(lora_cfg, t)
    _say_missing(t.wanted, t.targets, t.available, t.fused)
    with warnings.catch_warnings():
        ignore_warning(*PEFT_READS_DEPRECATED)  # printed on every LoRA run otherwise
        ignore_warning(*PEFT_FUSED_PATTERNS)  # peft's own keys, applied: _check_fused_ranks
        model = peft.get_peft_model(model, _peft_config(peft, lora_cfg, t))
    _check_fused_ranks(model)
    _say_moe_targets(model, t.targets, t.by_weight, t.partly)
    _resolve_base_path(model)
    fast = set_fast_forward(model)
    log.debug("fast LoRA forward on %d of the adapted linear layers", fast)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    _keep_adapter_grads(model)
    return model


def _choose_targets(model: nn.Module, peft, lora_cfg: LoraConfig) -> _Targets:
    """The linear layers and fused MoE experts parameters `lora_cfg.targets` name in `model` (the default names,
    Llama's, matching none: all its linear layers); FasttuneError when they name nothing it has."""
    available = linear_module_names(model)
    wanted = available if ALL_LINEAR in lora_cfg.targets else lora_cfg.targets  # peft's keyword: all but the head
    named = _EXPERT_LINEARS if ALL_LINEAR in lora_cfg.targets else wanted  # the experts' layers the targets name
    fused = _fused_params(model, peft, named)
    experts = _fused_expert_targets(fused, named)
    targets = [t for t in wanted if t in available]
    if not targets and not experts and available and lora_cfg.targets == LoraConfig.targets:
        # the default names are Llama's; a model that names none of its layers so (GPT-NeoX, Falcon, GPT-2) gets
        # adapters on all of them, as all-linear would, instead of an error for options the user never gave
        log.info("LoRA targets: the default names (Llama's) match no layer of this model; adapting all its linear "
                 "layers: %s (--lora.targets chooses)", ", ".join(available))  # fmt: skip
        wanted = targets = available
    partly = _partly_named(fused, experts, wanted)
    if not targets and not experts:
        both = [f"its MoE experts' fused {p} holds {' and '.join(_FUSED[p])}: name both to adapt it" for p in partly]
        raise FasttuneError(
            f"lora.targets ({', '.join(lora_cfg.targets)}) match no linear layer of this model; "
            f"its linear layers are named: {', '.join(available) or 'none'}; pass some of them, or all-linear"
            + "".join(f"; {hint}" for hint in both)
        )
    # beside fused experts, the linear layers named like them (shared experts, dense MLPs) are adapted through their
    # weights: named in target_modules, peft (0.21) moves them onto the fused experts (see _say_moe_targets)
    by_weight = [t for t in targets if t in _EXPERT_LINEARS] if fused else []
    return _Targets(wanted, available, targets, fused, experts, partly, by_weight)


def _check_dropout(lora_cfg: LoraConfig, t: _Targets) -> None:
    """peft's adapters on parameters (fused experts, weights adapted beside them) take no dropout: refuse one."""
    if not ((t.experts or t.by_weight) and lora_cfg.dropout):
        return
    adapted = [f"the MoE experts' fused {', '.join(sorted(t.experts))}"] if t.experts else []
    adapted += [f"the weights of the linear layers named {', '.join(t.by_weight)}"] if t.by_weight else []
    raise FasttuneError(f"lora.dropout={lora_cfg.dropout}: peft's adapters on parameters ({'; '.join(adapted)}) "
                        "take no dropout; pass --lora.dropout 0, or leave gate_proj, up_proj and down_proj out of "
                        "--lora.targets")  # fmt: skip


def _peft_config(peft, lora_cfg: LoraConfig, t: _Targets):
    """peft's LoraConfig for the chosen targets: fused experts and weights as target_parameters, a fused parameter
    holding n linear layers (gate_up_proj: gate + up) at n times the rank and alpha (the same scaling)."""
    patterns = {f".*\\.{re.escape(name)}": n for name, n in t.experts.items() if n > 1}
    on_params = (
        dict(
            target_parameters=sorted(t.experts) + [f"{name}.weight" for name in t.by_weight],
            rank_pattern={k: lora_cfg.rank * n for k, n in patterns.items()},
            alpha_pattern={k: lora_cfg.alpha * n for k, n in patterns.items()},
        )
        if t.experts or t.by_weight
        else {}
    )
    return peft.LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=[name for name in t.targets if name not in t.by_weight],
        bias="none",
        task_type="CAUSAL_LM",
        **on_params,
    )


def _keep_adapter_grads(model) -> None:
    """With frozen embeddings, reentrant checkpointing sees no input that needs grad and drops the adapters' grads:
    make the inputs require grad where the model checkpoints."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()


def _say_missing(wanted, targets: list[str], available: list[str], fused: dict) -> None:
    """Name the targets the model lacks (a fused experts parameter's names are not lacking: it holds them) and, when
    some are, the linear layers left frozen."""
    missing = [t for t in wanted if t not in available and not any(t in held for held in fused.values())]
    frozen = [t for t in available if t not in targets]
    if missing and frozen:  # names of another model family (Phi-3 fuses q/k/v into qkv_proj): say what stays frozen
        log.warning("LoRA targets %s; not in this model: %s; its other linear layers stay frozen: %s (add them with "
                    "--lora.targets, or pass --lora.targets %s)", ", ".join(targets), ", ".join(missing),
                    ", ".join(frozen), ALL_LINEAR)  # fmt: skip
    elif missing:
        log.info("LoRA targets %s; not in this model, skipped: %s", ", ".join(targets), ", ".join(missing))


_FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "gate_proj": ("gate_proj",), "up_proj": ("up_proj",),
          "down_proj": ("down_proj",)}  # fmt: skip
"""A 3-D MoE experts parameter (transformers 5 fuses each expert's linear layers into one) -> the linear layers
(LoRA targets) it holds."""
_EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _fused_params(model: nn.Module, peft, named) -> dict[str, tuple[str, ...]]:
    """{name of a fused MoE experts parameter of `model`: the linear layers (LoRA targets) it holds}; {} when peft
    cannot adapt parameters (`target_parameters`, peft >= 0.17): said when the targets `named` name their layers."""
    fused = {}
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.dim() == 3 and leaf in _FUSED:
            fused[leaf] = _FUSED[leaf]
    if fused and "target_parameters" not in getattr(peft.LoraConfig, "__dataclass_fields__", {}):
        if held := _fused_expert_targets(fused, named):
            log.warning("LoRA: peft %s cannot adapt parameters (target_parameters, peft >= 0.17): the MoE experts' "
                        "fused %s stay frozen", peft.__version__, ", ".join(sorted(held)))  # fmt: skip
        return {}
    return fused


def _fused_expert_targets(fused: dict[str, tuple[str, ...]], wanted) -> dict[str, int]:
    """{name of a fused experts parameter (`_fused_params`) the targets `wanted` name: how many of them it holds},
    for peft's `target_parameters` (one adapter per expert, rank r per linear layer held). transformers 4 kept MoE
    experts as linear layers named gate_proj/up_proj/down_proj, which the targets adapted; peft converts them onto
    the fused parameters for some families only (Qwen3-Next, DeepSeek-V3): this does it for every family. A
    parameter of which only some layers are named (gate_proj without up_proj) stays frozen (`_partly_named`)."""
    return {p: len(held) for p, held in fused.items() if all(t in wanted for t in held)}


def _partly_named(fused: dict[str, tuple[str, ...]], experts: dict[str, int], wanted) -> dict[str, list[str]]:
    """{fused experts parameter of which `wanted` names some linear layers but not all (gate_proj alone of
    gate_up_proj): the ones named}."""
    return {p: named for p, held in fused.items() if p not in experts and (named := [t for t in held if t in wanted])}


def _say_moe_targets(model, targets: list[str], by_weight: list[str], partly: dict) -> None:
    """Say which fused MoE experts parameters get adapters (`_fused_expert_targets`), which stay frozen because the
    targets name only some of their layers (`_partly_named`), and that the linear layers named like their targets
    (shared experts, dense MLPs) are adapted through their weights. Why through their weights: peft (0.21) moves
    target_modules named gate_proj, up_proj or down_proj onto the fused experts of Qwen3-Next and DeepSeek-V3 (one
    of gate_proj, up_proj alone: a ValueError) and then adapts no linear layer of those names, also when loading the
    adapter; a weight named in target_parameters it leaves alone. Should a linear layer that `targets` names still be
    left without an adapter, say so."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    fused = sorted(p for p in model.peft_config[_ADAPTER].target_parameters or () if p in _FUSED)
    layers = f"the linear layers named {', '.join(by_weight)} (shared experts, dense MLPs) through their weights"
    if fused:
        tensors = sum(getattr(m, "parameter_name", None) in _FUSED for m in base.modules())  # a ParamWrapper each
        doubled = "; gate_up_proj at twice the rank and alpha" if "gate_up_proj" in fused else ""
        also = f"; and {layers}" if by_weight else ""
        log.info("LoRA: adapting the MoE experts' fused %s in place (%d tensors: the gate_proj/up_proj/down_proj "
                 "targets%s)%s", ", ".join(fused), tensors, doubled, also)  # fmt: skip
    for param, named in partly.items():
        log.info("LoRA: the MoE experts' fused %s holds %s; --lora.targets names %s alone, so it stays frozen (name "
                 "both to adapt it)%s", param, " and ".join(_FUSED[param]), ", ".join(named),
                 f"; adapting {layers}" if by_weight and not fused else "")  # fmt: skip
    adapted = {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    frozen = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                     if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and n not in adapted})  # fmt: skip
    if frozen:
        log.warning("LoRA: peft %s gave no adapter to some linear layers named %s: they stay frozen",
                    _peft().__version__, ", ".join(frozen))  # fmt: skip


def _check_fused_ranks(model) -> None:
    """peft adapts the experts that transformers 5 fuses (Qwen3-Next, DeepSeek-V3: gate_proj and up_proj into
    gate_up_proj) in place, with the rank and alpha its MoE conversion puts in rank_pattern / alpha_pattern (twice
    the rank and alpha: the same scaling), and warns, wrongly, that those patterns matched nothing (hidden:
    PEFT_FUSED_PATTERNS). Should a peft version really leave them unapplied, say so."""
    config = model.peft_config[_ADAPTER]
    for name, module in model.named_modules():
        fused = getattr(module, "parameter_name", None)  # peft's ParamWrapper: the parameter it adapts
        key = rf".*\.{re.escape(fused)}" if isinstance(fused, str) else None
        if key not in (config.rank_pattern or {}) or _ADAPTER not in module.r:
            continue
        want = config.rank_pattern[key], (config.alpha_pattern or {}).get(key, config.lora_alpha)
        got = module.r[_ADAPTER], module.lora_alpha[_ADAPTER]
        if got != want:
            log.warning("lora: peft gave the fused experts %s rank %s and alpha %s, not the %s and %s of its own MoE "
                        "conversion: their scaling differs from the other adapters'", name, *got, *want)  # fmt: skip
            return


def warn_new_tokens_frozen(tokenizer, rows: int, path: str | None) -> None:
    """The tokens a tokenizer adds beyond the `rows` embeddings of the model at `path` get rows of their own (resized
    by the model's build), which LoRA leaves frozen at their start: say so, and how plain peft loads the adapter."""
    if path is None or len(tokenizer) <= rows:
        return
    new = tokenizer.convert_ids_to_tokens(list(range(rows, len(tokenizer))))
    shown = ", ".join(map(str, new[:5])) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
    log.warning("lora: the %d token(s) the tokenizer adds beyond the %d embeddings of --model %s (%s) stay at their "
                "initial rows, frozen (LoRA trains no embeddings or head): the run cannot learn them; to train them, "
                "fine-tune in full (--experiment sft). adapter/ holds the resized embeddings: plain peft loads it "
                "after base.resize_token_embeddings(%d); merged/ loads as it is", len(new), rows, path, shown,
                len(tokenizer))  # fmt: skip


# Why not peft's own forward (peft 0.21, tuners/lora/layer.py Linear.forward): with fp32 adapters on a bf16 base it
# casts every adapted input to fp32 (`_cast_input_dtype`: a [T, 4096] or [T, 14336] fp32 copy per module, 7 modules
# x 32 layers at 8B). Without autocast (`--model.dtype bf16`) that copy is kept for lora_A's weight gradient, the
# rank-r matmuls run in fp32 and an fp32 [T, out] result is added to the bf16 base output (the sum promoted to fp32,
# then cast back); under bf16 autocast (the GPU default) autocast casts the copy back to bf16, a second copy kept
# per module (q, k and v each keep their own), and scaling multiplies a [T, out] tensor. Measured on an H200 at 8B
# before this change: 1.21x HF + peft, where skipping the base weight-gradient GEMMs (a third of the FLOPs) should
# put LoRA near 1.4x our full fine-tune. The fast forward casts the tiny A and B (the scaling folded into B) to the
# input's dtype per call (differentiable: the fp32 parameters stay the master copies and get fp32 gradients) and
# adds the rank-r product into the base output inside one addmm: no fp32 activation, no copy of the input, no
# [T, out] elementwise pass. peft's `disable_input_dtype_casting` + autocast was not chosen: without autocast it
# fails on the dtype mismatch, and under autocast it still multiplies and adds a [T, out] tensor per module.
# Patched per instance (not peft's class): a plain peft model in the same process (the bench's HF + peft
# baseline) keeps peft's forward. A linear layer adapted through its weight (`lora.ParamWrapper`: MoE shared experts
# and dense MLPs, see _say_moe_targets) computes the same sum by the same forward: peft's would build the whole
# weight plus its delta in every forward and its full weight gradient in backward, as for the fused experts.
def set_fast_forward(model: nn.Module, enabled: bool = True) -> int:
    """Install (or with enabled=False remove) the fast forward on each plain peft `lora.Linear` of `model`, and on
    each `lora.ParamWrapper` of a plain linear layer's weight, and on each adapted MoE experts module
    (model/expert_lora.py: no adapted weight kept for backward); returns how many layers have it. Each call still
    checks the layer's state and falls back to peft's forward."""
    from peft.tuners.lora.layer import Linear, ParamWrapper

    from fasttune.model import expert_lora

    count = expert_lora.set_forward(model, enabled)
    for module in model.modules():
        by_weight = type(module) is ParamWrapper and module.parameter_name == "weight"
        if type(module) is not Linear and not (by_weight and type(module.base_layer) is nn.Linear):
            continue  # subclasses (bitsandbytes, ...) keep their own forward; so do the fused experts
        module.__dict__.pop("forward", None)  # peft's class forward again
        if enabled:
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count


def _plain(layer, args: tuple, kwargs: dict) -> str | None:
    """The one adapter the fast forward may compute, or None where peft's own forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None  # extra arguments (adapter_names, variant kwargs), disabled, merged, several adapters
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.use_dora.get(name):
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
        return None
    if not isinstance(dropout, nn.Dropout | nn.Identity) or layer.lora_B[name].bias is not None:
        return None
    return name


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + scaling * x @ A^T @ B^T, in x's dtype; peft's forward where the layer is not plain (see _plain)."""
    name = _plain(self, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    a = self.lora_A[name].weight.to(x.dtype)
    b = (self.lora_B[name].weight * self.scaling[name]).to(result.dtype)  # [out, r]: the scaling costs nothing here
    xa = nn.functional.linear(x, a).to(result.dtype)  # [..., r]
    flat = result.reshape(-1, result.shape[-1])
    return torch.addmm(flat, xa.reshape(-1, xa.shape[-1]), b.t()).view(result.shape)


_fast_forward.__name__ = "forward"  # pickle (torch.save of the model) stores the bound method by this name


def _resolve_base_path(model) -> None:
    """Record the base model in adapter_config.json as an absolute path: peft stores it as given (relative to the
    working directory), so the adapter would not load from anywhere else. Hub ids and presets (no path) stay."""
    config = model.peft_config[_ADAPTER]
    base = config.base_model_name_or_path
    if base and Path(base).is_dir():
        config.base_model_name_or_path = str(Path(base).resolve())
        from fasttune.train.run_dir import RunFolder

        folder = Path(config.base_model_name_or_path).parent
        if folder.name == "checkpoints" and RunFolder(folder.parent).is_run:
            log.warning("lora: the adapter's base is %s, a checkpoint of the run %s, which that run prunes "
                        "(--training.keep-last) if it is resumed; the merged model does not need it, the adapter "
                        "does: copy the checkpoint elsewhere and train from the copy to keep the adapter loadable",
                        config.base_model_name_or_path, folder.parent)  # fmt: skip


@contextlib.contextmanager
def resized_embeddings_quiet():
    """Around a peft model's save_pretrained: peft warns, with its own file path, on every save that it saves the
    embeddings a resize changed; the run said so once before training (warn_new_tokens_frozen)."""
    with warnings.catch_warnings():
        ignore_warning("Setting `save_embedding_layers` to `True`", UserWarning)
        yield


def save_lora(
    model: nn.Module, out_dir: str | Path, merged_dir: str | Path | None = None, state: dict | None = None
) -> None:
    """Save the adapter to `out_dir`; with `merged_dir`, also the base model with the adapters merged in.
    `state`: the model's full state dict (PeftModel names) when the live model is sharded (FSDP2 gathers it onto
    rank 0, which alone calls this); None: the model's own. The live model is not changed (training can continue)."""
    with resized_embeddings_quiet():
        model.save_pretrained(str(out_dir), state_dict=state)  # peft keeps the adapters' entries of `state`
    if merged_dir is not None:
        save_merged(model, merged_dir, state)


def save_merged(model: nn.Module, out_dir: str | Path, state: dict | None = None) -> None:
    """The base model with the adapters merged in, as a plain HF model folder (`state`: see save_lora)."""
    model.get_base_model().save_pretrained(str(out_dir), state_dict=merged_state_dict(model, state))


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with each LoRA delta added to its weight, under the plain (unwrapped) names.
    Computed out of place in fp32 and kept on CPU, instead of peft's in-place merge_and_unload, so the training
    model keeps its adapters and exact base weights, and no second copy of the weights lands on the GPU; and from
    `state` (see save_lora) where the modules hold only shards."""
    base = model.get_base_model()
    adapted = _adapted_weights(base)
    if state is None:
        state = base.state_dict()
    else:  # PeftModel names -> the base model's
        prefix = "base_model.model."
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    first: dict[int, str] = {}  # a tied weight (lm_head = embeddings) is saved once, as save_pretrained does
    tied = {n for n, p in base.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key or key in tied:
            continue
        if key in adapted:
            name, layer = adapted[key]
            a, b = state[f"{name}.lora_A.{_ADAPTER}.weight"], state[f"{name}.lora_B.{_ADAPTER}.weight"]
            value = _merge(layer, value, a, b)
        merged[_unwrapped(key)] = value.detach().to("cpu").contiguous()
    return merged


def _adapted_weights(base: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """{state dict key of an adapted weight: (its LoRA layer's name, the layer)}. A linear layer's weight is
    `NAME.base_layer.weight`; an MoE experts parameter that peft adapts in place (`lora.ParamWrapper`, nested one
    per parameter: `experts` adapts down_proj, `experts.base_layer` gate_up_proj) lies under every wrapper's
    base_layer: `experts.base_layer.base_layer.gate_up_proj`."""
    from peft.tuners.lora import LoraLayer

    adapted = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or _ADAPTER not in module.lora_A:
            continue
        owner, inner = f"{name}.base_layer", module.base_layer
        while isinstance(inner, LoraLayer):
            owner, inner = f"{owner}.base_layer", inner.base_layer
        adapted[f"{owner}.{getattr(module, 'parameter_name', 'weight')}"] = name, module
    return adapted


def _unwrapped(key: str) -> str:
    """The base model's own name of a key of the peft-wrapped model: every peft `base_layer` level dropped."""
    return ".".join(part for part in key.split(".") if part != "base_layer")


def _merge(layer, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """weight + scaling * delta in fp32, back in the weight's dtype: peft's `get_delta_weight` for what apply_lora
    creates (a plain LoRA linear layer, no DoRA; an experts parameter peft adapts in place), on tensors rather than
    on the (possibly sharded) module."""
    experts = getattr(layer, "num_experts", 1) if hasattr(layer, "parameter_name") else 1
    if weight.dim() == 3 and experts > 1:  # peft's ParamWrapper: A [experts * r, in], B [out, r * experts]
        a = a.float().reshape(experts, -1, a.shape[-1])  # [experts, r, in]
        b = b.float().reshape(b.shape[0], -1, experts)  # [out, r, experts]
        # transformers stores most experts as [experts, out, in]: peft swapped its in and out features for them
        swapped = getattr(layer, "_did_swap_in_out_features", weight.shape[1:] == (b.shape[0], a.shape[-1]))
        delta = torch.einsum("ore,eri->eoi" if swapped else "ore,eri->eio", b, a)
    else:
        delta = b.float() @ a.float()
        if layer.fan_in_fan_out:  # GPT-2 style Conv1D stores its weight transposed
            delta = delta.T
    return (weight.float() + layer.scaling[_ADAPTER] * delta.to(weight.device)).to(weight.dtype)
