"""The model a run trains: its attention backend, then the Liger / LoRA / memory-plan / compile
transforms, in that order."""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass

import torch

from fasttune.config import BaseConfig
from fasttune.config.base_config import memory_plan
from fasttune.data.packing import Batcher
from fasttune.data.pipeline import DataBundle
from fasttune.errors import ConfigError
from fasttune.model.build import base_model, build_model, check_weights, load_model_config, random_init
from fasttune.model.context import context_length, too_long, too_long_for_run
from fasttune.model.flops import head_dim
from fasttune.train.footprint import check_weights_fit
from fasttune.train.memory import LIGER_ROPE_IN_PLACE, plan_memory, selective
from fasttune.train.recompute import decoder_layers
from fasttune.train.run_dir import RunFolder

log = logging.getLogger("fasttune")


@dataclass
class AttentionChoice:
    requested: str
    name: str
    hf_name: str
    reason: str

    @property
    def native(self) -> bool:
        """The model computes attention in its own code (attention.select.native_attention): fasttune's backends,
        and the document boundaries of packed rows, do not reach it."""
        return self.name.startswith("transformers ")

    def describe(self) -> str:
        from fasttune import attention

        kernels = attention.kernel_report()
        kernel = f"; kernels: {', '.join(f'{k} -> {v}' for k, v in kernels.items())}" if kernels else ""
        return attention.describe(self.requested, self.name, self.reason) + kernel


def _choose_attention(cfg: BaseConfig, device, dtype, model_config, origin: str = "requested") -> AttentionChoice:
    """The backend of cfg.attn_implementation here; a named one that runs as asked is logged with `origin` (where
    the name came from: "--attn-implementation", a config file, "the sft preset's default"), so that a preset's
    choice does not read as the user's."""
    from fasttune import attention

    r = attention.resolve(
        cfg.attn_implementation,
        device=device,
        dtype=dtype,
        head_dim=head_dim(model_config),
        packed=cfg.data.packing,
        strict=cfg.strict_attention,
        model_config=model_config,
    )
    reason = origin if r.reason == "requested" else r.reason
    if r.reason == "requested":  # auto's choice is logged as it chooses, a fallback warned of as it falls back
        log.info("attention: %s (%s)", r.name, reason)
    return AttentionChoice(cfg.attn_implementation, r.name, r.hf_name, reason)


def model_class(model_config, trust_remote_code: bool = False) -> type | None:
    """The class transformers builds for `model_config`, known before building it; None for remote code (known once
    loaded): a config class of its own, or, trusted, an auto_map that transformers prefers to its own class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if trust_remote_code and "AutoModelForCausalLM" in (getattr(model_config, "auto_map", None) or {}):
        return None
    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)


def batcher_for(cfg: BaseConfig, attn: AttentionChoice, model, pad_id: int | None, say: bool = False) -> Batcher:
    """How the run batches: as data.packing says, unless the model computes attention in its own code (known from
    the config before loading, or for remote code from the loaded class). Its mask then spans the whole packed row
    (measured on CPU, transformers 5.24: Falcon, Bloom, GPT-Neo and MPT let a packed sample attend to the one before
    it), so such a run trains on padded rows of samples of similar length, within the same token budget
    (micro_batch_size x max_length tokens, padding included). `model`: the built model, or before building it its
    class (`model_class`)."""
    cls = model if isinstance(model, type) else type(base_model(model))
    packs = not attn.native and getattr(cls, "_supports_attention_backend", False)
    own = cfg.data.packing and not packs
    if own and say:
        log.warning("data.packing: off: this model (%s) computes attention in its own code, whose mask would let "
                    "packed samples attend to each other; training on padded rows of samples of similar length, up "
                    "to %d tokens a micro-batch (the data summary's packing figure does not apply)", cls.__name__,
                    cfg.data.micro_batch_size * cfg.data.max_length)  # fmt: skip
    return Batcher.from_config(cfg.data, cfg.seed, pad_id, packing=cfg.data.packing and packs, grouped=own)


def _apply_liger(model, device: torch.device, plan: str) -> None:
    from fasttune.attention.probe import import_status

    if device.type != "cuda":
        log.warning("model.liger: Liger kernels need a CUDA GPU; running without them")
        return
    if (why := import_status("liger_kernel")) is not None:
        log.warning("model.liger: %s (pip install 'fasttune[liger]'); running without Liger", why)
        return
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from fasttune.model import liger

    kind = getattr(model.config, "model_type", None)
    if kind not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.warning("model.liger: Liger has no kernels for model type %r; running without them", kind)
        return
    rope = not selective(plan)
    if not rope:
        log.info("model.liger: Liger's RoPE left out for model.memory=%s: %s", plan, LIGER_ROPE_IN_PLACE)
    liger.apply(model, rope=rope)
    if not rope:
        _rope_out_of_place(model)
    log.info("Liger kernels applied (fused linear cross-entropy, RMSNorm, SwiGLU%s)", ", RoPE" if rope else "")


def _rope_out_of_place(model) -> None:
    """For a selective memory plan: Liger's RoPE must not rotate saved matmul outputs in place (memory.
    LIGER_ROPE_IN_PLACE). Liger patches RoPE module-wide, so an earlier model in this process may have left it in the
    model's module: rotate copies there instead."""
    module = sys.modules[type(model).__module__]
    rope = getattr(module, "apply_rotary_pos_emb", None)
    if rope is None or getattr(rope, "on_copies", False) or not rope.__module__.startswith("liger_kernel"):
        return

    @functools.wraps(rope)
    def on_copies(q, k, *args, **kwargs):
        return rope(q.clone(), k.clone(), *args, **kwargs)

    on_copies.on_copies = True
    module.apply_rotary_pos_emb = on_copies


def _apply_fused_mlp(model) -> None:
    from fasttune.model import mlp

    count = mlp.apply(model)
    if count:
        log.info("fused SwiGLU MLP on %d layers (silu(gate) * up recomputed in backward)", count)
    else:
        base = base_model(model)
        why = mlp.unsupported_reason(base) or "no plain transformers SwiGLU MLP (LoRA-wrapped projections, own class)"
        log.info("model.fused_mlp: not used: %s", why)


def _apply_lean_norm(model) -> None:
    from fasttune.model import norm

    count = norm.apply(model)
    if count:
        log.info("lean RMSNorm on %d norms (their input kept, their output recomputed in backward)", count)
    elif norm.has_liger_norms(model):
        log.info("model.lean_norm: Liger's RMSNorms run as they are; their outputs are recomputed only if the memory "
                 "plan needs it")  # fmt: skip
    else:
        log.info("model.lean_norm: not used: no Llama-style RMSNorm in %s", type(base_model(model)).__name__)


def _apply_experts_autocast(model) -> None:
    from fasttune.model import experts

    count = experts.apply(model)
    if count:
        log.info("MoE experts in %d layers run their matmuls in bf16 under autocast, as nn.Linear does (transformers' "
                 "grouped experts would run in the fp32 weights' dtype)", count)  # fmt: skip


def _say_router_loss(model) -> None:
    base = base_model(model)
    if not getattr(base.config, "output_router_logits", False):
        return
    coef = getattr(base, "router_aux_loss_coef", None)
    if coef is None:
        log.warning("output_router_logits: %s adds a router loss fasttune cannot tell apart from its loss: it "
                    "counts once per micro-batch (its weight grows with --training.grad-accum)",
                    type(base).__name__)  # fmt: skip
        return
    log.info("the training loss includes the router's auxiliary loss (%g x aux_loss, averaged over each step's "
             "micro-batches); val_loss is the cross-entropy alone", coef)  # fmt: skip


def align_special_tokens(model, tokenizer, fresh: bool) -> None:
    """The model's special-token ids as training uses them, so that generation (fasttune's, and plain HF's from the
    saved checkpoint) stops where the training samples end. A fresh model (a preset, a config without weights) takes
    the tokenizer's bos/eos ids, and its generation config the pad id too (transformers' config defaults name other
    tokens: the embedded corpus tokenizer's id 2 is '!'). A pretrained model keeps its ids; when its generation
    config does not stop at the tokenizer's EOS, which every training sample ends with, that id is added to its
    eos_token_id, and so is a chat run's end-of-turn token (Llama 3's <|eot_id|> on a base model whose EOS is
    <|end_of_text|>): plain HF generate from the checkpoint then stops where the trained replies end."""
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    ids = {name: getattr(tokenizer, name, None) for name in names}  # benchmarks' synthetic tokenizer has few
    gen = getattr(model, "generation_config", None)
    if fresh:
        for name, value in ids.items():
            if name != "pad_token_id":  # the model config's pad id becomes the embedding's padding_idx (no gradient
                setattr(model.config, name, value)  # for that row) when the checkpoint is loaded: pad is often EOS
            if gen is not None:
                setattr(gen, name, value)
        _add_turn_end(gen, tokenizer)
        return
    eos = ids["eos_token_id"]
    if gen is None or eos is None:
        return
    _add_stop(gen, eos, f"the tokenizer's EOS {getattr(tokenizer, 'eos_token', eos)!r} ends every training sample")
    _add_turn_end(gen, tokenizer)
    if gen.pad_token_id is None and ids["pad_token_id"] is not None:
        gen.pad_token_id = ids["pad_token_id"]


def _add_turn_end(gen, tokenizer) -> None:
    from fasttune.generate.template import end_of_turn_id, prompt_format

    turn_end = end_of_turn_id(tokenizer) if gen is not None and prompt_format(tokenizer) == "chat" else None
    if turn_end is not None:
        name = tokenizer.convert_ids_to_tokens(turn_end)
        _add_stop(gen, turn_end, f"the chat template's end-of-turn {name!r} ends every trained assistant turn")


def _add_stop(gen, stop: int, why: str) -> None:
    have = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    have = [i for i in have if i is not None]
    if stop not in have:
        gen.eos_token_id = [*have, stop] if have else stop
        log.info("generation config: eos_token_id %s -> %s (%s)", have or None, gen.eos_token_id, why)


def cover_context(config, max_length: int, preset: str) -> None:
    """A preset is a fresh model made for this run: its context (max_position_embeddings, 4096 for the small presets)
    is raised to data.max_length where that is longer, so that its checkpoints name a context that covers what they
    trained on (fine-tuning, eval and generate from them refuse lengths beyond the context)."""
    context = context_length(config)
    if context and max_length > context:
        log.info("the %s preset: max_position_embeddings %d -> %d (data.max_length)", preset, context, max_length)
        config.max_position_embeddings = max_length


def _compute_dtype(cfg: BaseConfig, device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if (device.type == "cuda" and cfg.model.dtype != "fp32") else param_dtype


def choose_batching(cfg: BaseConfig, data: DataBundle, device: torch.device, param_dtype: torch.dtype,
                    attn_origin: str = "requested") -> tuple[AttentionChoice, Batcher | None]:  # fmt: skip
    """(attention choice, batcher) of a run, before its model is built: the run's steps are counted (and a run too
    long for a CPU refused) before the weights load. The batcher is None for a class known only once loaded (remote
    code), which may batch otherwise: prepare_model's batcher decides, and the steps are counted then."""
    model_config = load_model_config(cfg.model, len(data.tokenizer))
    attn = _choose_attention(cfg, device, _compute_dtype(cfg, device, param_dtype), model_config, attn_origin)
    cls = model_class(model_config, cfg.model.trust_remote_code)
    return attn, None if cls is None else batcher_for(cfg, attn, cls, data.tokenizer.pad_token_id, say=True)


def prepare_model(cfg: BaseConfig, data: DataBundle, device: torch.device, param_dtype: torch.dtype,
                  build_on: torch.device | None = None, attn_origin: str = "requested",
                  attn: AttentionChoice | None = None):  # fmt: skip
    """(model, attention choice, memory plan, batcher) of a run on `device`, the model built `build_on` (default
    `device`; under FSDP2 the CPU or the meta device: distributed.Dist.build_device); `attn_origin`: where
    cfg.attn_implementation came from (train's); `attn`: the choice choose_batching made (then its batching is not
    said again)."""
    model_config = load_model_config(cfg.model, len(data.tokenizer))
    compute_dtype = _compute_dtype(cfg, device, param_dtype)
    # LoRA: the frozen base is held in the compute dtype (bf16 on CUDA: half the memory of fp32; it has no gradients
    # or optimizer state), the adapters in fp32 (peft upcasts them when the base is bf16)
    dtype = compute_dtype if cfg.lora.enabled else param_dtype
    if (build_on or device) == device:  # under FSDP2 each GPU gets its shards: the plan counts them
        check_weights_fit(model_config, device, dtype, f"--model {cfg.model.path}" if cfg.model.path else
                          f"the {cfg.model.preset} preset", lora=cfg.lora.enabled)  # fmt: skip
    chosen = attn is not None
    attn = attn or _choose_attention(cfg, device, compute_dtype, model_config, attn_origin)
    model = _build(cfg, data, model_config, attn, dtype, build_on or device)
    model = _transform(cfg, model, data, model_config, device, autocast=param_dtype != compute_dtype)
    batcher = batcher_for(cfg, attn, model, data.tokenizer.pad_token_id, say=not chosen)
    bounds = batcher.bounds(max(len(s) for s in (*data.train, *data.val)))
    est = plan_memory(cfg, model, device, attention=attn.name, bounds=bounds)  # chunked loss + activation plan, or
    # a clear stop when the step cannot fit
    _say_router_loss(model)
    if cfg.training.compile:
        for layer in decoder_layers(model):
            layer.compile()
    from fasttune import attention

    attention.clear_report()  # the summary's kernels are those of the run's calls, not of the probes above
    return model, attn, est.plan, batcher


def _build(cfg: BaseConfig, data: DataBundle, model_config, attn: AttentionChoice, dtype: torch.dtype,
           build_on: torch.device):  # fmt: skip
    """The model of cfg.model with `attn`'s backend, its context and special tokens as the run trains them. A
    max_length beyond the context is the CLI's line (cli.fit_max_length), unless it could not read the model's config
    (or train() was called without the CLI): on --resume the length is the run's and stays, so the line says so."""
    context = context_length(model_config)
    if cfg.model.path and context and cfg.data.max_length > context:
        length, source = cfg.data.max_length, cfg.model.path
        run = str(RunFolder(cfg.run_dir).config)
        raise ConfigError(too_long_for_run(model_config, length, source, run) if cfg.resume else
                          too_long(model_config, length, source))  # fmt: skip
    check_weights(cfg.model, lora=cfg.lora.enabled)
    model = build_model(cfg.model, len(data.tokenizer), attn.hf_name, dtype, build_on)
    if cfg.model.path is None:
        cover_context(model.config, cfg.data.max_length, cfg.model.preset)
    align_special_tokens(model, data.tokenizer, fresh=random_init(cfg.model))
    if type(model).__module__.startswith("transformers.") and getattr(model.config, "auto_map", None):
        # transformers' own class was built: an input model's auto_map would make the saved checkpoint point at
        # custom code it does not use (and ask for trust_remote_code when loaded)
        del model.config.auto_map
    return model


def _transform(cfg: BaseConfig, model, data: DataBundle, model_config, device: torch.device, autocast: bool):
    """The Liger / LoRA / fused MLP / lean norm / MoE autocast transforms cfg asks for, in that order; `autocast`:
    the weights are of another dtype than the compute's."""
    if cfg.model.liger:
        _apply_liger(model, device, memory_plan(cfg.model.memory))
    if cfg.lora.enabled:
        from fasttune.model.lora import apply_lora, warn_new_tokens_frozen

        warn_new_tokens_frozen(data.tokenizer, model_config.vocab_size, cfg.model.path)
        model = apply_lora(model, cfg.lora)
    if cfg.model.fused_mlp and not cfg.training.compile:
        _apply_fused_mlp(model)
    if cfg.model.lean_norm and not cfg.training.compile:
        _apply_lean_norm(model)
    if autocast and not cfg.lora.enabled:  # fp32 weights under bf16 autocast
        _apply_experts_autocast(model)
    return model
