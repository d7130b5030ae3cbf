"""Models: an HF causal LM built from a named shape preset (random init), or a local HF model folder: its pretrained
weights, or with --model.random-init its config.json alone (random init, said loudly; a folder without weight files
is refused otherwise). No downloads."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

from fasttune.config import ModelConfig
from fasttune.errors import ConfigError, one_line
from fasttune.model.text_part import (
    architecture,
    forget_renaming,
    is_vision_language,
    loading_kwargs,
    not_language,
    text_config,
)
from fasttune.quiet import debugging

log = logging.getLogger("fasttune")

# (hidden, layers, heads, kv_heads, intermediate, tie_embeddings). `1b` is the Llama-3.2-1B-like shape that the
# baselines in docs/BENCHMARKS.md use (untied embeddings, ~1.1B parameters at a 32k vocabulary).
PRESETS: dict[str, tuple[int, int, int, int, int, bool]] = {
    "micro": (64, 2, 4, 2, 128, True),  # smoke tests
    "tiny": (256, 4, 8, 4, 688, True),
    "small": (512, 8, 8, 4, 1376, True),
    "125m": (768, 12, 12, 4, 2048, True),
    "350m": (1024, 24, 16, 8, 2816, True),
    "1b": (2048, 16, 32, 8, 8192, False),
}

# Published shapes, random init (benchmarks, pre-training): each model's own config.json values, vocabulary included.
REAL_SHAPES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama-3.1-8b": (LlamaConfig, dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)),
    "qwen2.5-7b": (Qwen2Config, dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643)),
    # Gemma 3 1B's text model: 5 sliding layers (window 512, RoPE base 10k) to 1 full (base 1M), q/k norms, 1 kv head
    "gemma-3-1b": (Gemma3TextConfig, dict(
        hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=6912, vocab_size=262144, max_position_embeddings=32768, query_pre_attn_scalar=256,
        sliding_window=512, sliding_window_pattern=6, rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    # Phi-3-mini-4k: fused qkv_proj / gate_up_proj, head dim 96, sliding window 2047 on every layer
    "phi-3-mini": (Phi3Config, dict(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rope_theta=10000.0, sliding_window=2047, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000)),
}  # fmt: skip


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own lines at ERROR only (fasttune says what they say in its words); all of them with --debug."""
    from transformers.utils import logging as hf_logging

    if debugging():
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself: under peft's wrapper (LoRA) its base model, else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers as transformers marks them: its unsplittable blocks (`_no_split_modules`: Llama's
    model.layers, GPT-2's transformer.h, OPT's model.decoder.layers, ...), in order; under peft, its base model's."""
    base = base_model(model)
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in kinds]


def preset_config(preset: str, vocab_size: int, max_position_embeddings: int = 4096) -> PretrainedConfig:
    """The preset's config; a real shape keeps its own vocabulary unless the tokenizer's is larger."""
    if preset in REAL_SHAPES:
        cls, kwargs = REAL_SHAPES[preset]
        return cls(**{**kwargs, "vocab_size": max(kwargs["vocab_size"], vocab_size)})
    hidden, layers, heads, kv, inter, tie = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    )


def unreadable_files() -> tuple[type[BaseException], ...]:
    """What transformers raises when a model folder cannot be loaded: damaged files (see load_weights_error), and
    models it cannot build (ValueError: e.g. no causal LM class for the config, RuntimeError: weights of other
    shapes)."""
    return OSError, ValueError, RuntimeError, *_damaged_files()


def _damaged_files() -> tuple[type[BaseException], ...]:
    """Malformed or truncated files: config.json (OSError), safetensors (SafetensorError), PyTorch pickles
    (UnpicklingError, EOFError)."""
    import pickle

    from safetensors import SafetensorError

    return OSError, EOFError, pickle.UnpicklingError, SafetensorError


def load_weights_error(path, e: BaseException, option: str = "--model") -> ConfigError:
    """One line for a model folder that cannot be loaded: a damaged file (an interrupted copy or download), weights
    that do not match config.json, or a model transformers cannot build as a causal LM."""
    from fasttune.model.resolve import denied_file, unreadable_in

    if isinstance(e, _damaged_files()) and (denied := unreadable_in(Path(path))) not in (None, Path(path)):
        return ConfigError(denied_file(option, path, denied))  # safetensors says "No such file or directory"
    if isinstance(e, _damaged_files()):
        fix = ("a file there is incomplete or damaged (e.g. an interrupted copy): copy the folder again or save it "
               "with save_pretrained")  # fmt: skip
    elif "size mismatch" in str(e):
        fix = "the weights do not match its config.json: save model and config together with save_pretrained"
    else:
        fix = "fasttune trains and runs models that AutoModelForCausalLM loads"
    return ConfigError(f"{option} {path}: the model cannot be loaded ({one_line(e, line=0, typed=True)}); {fix}")


def read_config(path: str | Path, trust_remote_code: bool = False, option: str = "--model") -> PretrainedConfig:
    """The config.json of a local model folder, or one line naming what is wrong with it."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except StrictDataclassError as e:  # a field of the wrong type ("max_position_embeddings": null): no ValueError
        why = one_line(e)  # all of it: "Validation error for field 'x':\n    TypeError: ..." names the cause below
        raise ConfigError(f"{option} {path}: config.json cannot be used ({why}); fix that field (or remove it to get "
                          "the architecture's default)") from None  # fmt: skip
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise ConfigError(f"{option} {path}: config.json cannot be used ({one_line(e, line=0)})") from e
        raise ConfigError(
            f"{option} {path}: {one_line(e, line=0)} (model code from the folder runs only "
            "with --model.trust-remote-code)"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{option} {path}: config.json cannot be read ({one_line(e, line=0)}); fix or replace it (save the "
            "model with save_pretrained)"
        ) from e


def load_model_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    if cfg.path is None:
        return preset_config(cfg.preset, vocab_size)
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model {cfg.path}: no config.json there; pass a local Hugging Face model folder "
            "(saved with save_pretrained) or leave --model out to build model.preset"
        )
    config = read_config(path, cfg.trust_remote_code)
    config = text_config(config) or config  # a vision-language checkpoint: its language model (model/text_part.py)
    if not hasattr(config, "num_attention_heads") and is_vision_language(config):  # Qwen2.5-VL: M-RoPE positions
        raise ConfigError(
            f"--model {cfg.path} is a vision-language model ({architecture(config)}) whose language model transformers "
            "has no causal-LM class for, so fasttune cannot train it alone; fine-tune it with its own code (TRL), or "
            "pass a text model"
        )
    if not hasattr(config, "num_attention_heads"):  # Mamba, RWKV, xLSTM: the memory plan and FLOPs count attention
        raise ConfigError(
            f"--model {cfg.path}: {type(config).__name__} has no attention layers (no num_attention_heads in its "
            "config.json); fasttune trains transformer models (attention + MLP), so train this one with its own code"
        )
    if quant := getattr(config, "quantization_config", None):
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        kind = f"{method}-quantized" if method else "quantized"
        raise ConfigError(
            f"--model {cfg.path} holds {kind} weights (config.json quantization_config): fasttune trains "
            "full-precision weights (LoRA on a bf16 base, not a quantized one); pass the unquantized model's folder"
        )
    return config


def build_preset(preset: str, vocab_size: int, attn_implementation: str, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> PreTrainedModel:  # fmt: skip
    """A randomly initialised preset model, initialised on `device` itself (a 1B init on the CPU plus the copy took
    ~40 s on the H100 machine)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            preset_config(preset, vocab_size), attn_implementation=attn_implementation, dtype=dtype
        )
    return model.to(device)  # a no-op unless this transformers ignored the device context


def from_pretrained(path, option: str = "--model", **kwargs) -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained, its loading report turned into one line: parameters the config describes
    that the weight files lack or hold in another shape would run with random values (transformers reports them in a
    table and, for a shape, an error pointing at it) -> ConfigError naming them; tensors the model does not use -> a
    warning."""
    text = loading_kwargs(read_config(path, kwargs.get("trust_remote_code", False), option), option, path)
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(path, ignore_mismatched_sizes=True,
                                                               output_loading_info=True, **text, **kwargs)  # fmt: skip
    except ImportError as e:  # e.g. quantized weights without bitsandbytes/optimum installed
        raise ConfigError(
            f"{option} {path}: loading it needs a package that is not installed: {one_line(e, line=0)}"
        ) from e
    if text:
        forget_renaming(model)
    fix = "config.json does not match the weight files; fix it, or copy the model folder again"
    if shapes := sorted(info.get("mismatched_keys") or ()):
        name, theirs, ours = shapes[0]
        raise ConfigError(
            f"{option} {path}: {name} is {list(theirs)} in the weight files but {list(ours)} by its config.json "
            f"({len(shapes)} such tensor(s); e.g. vocab_size, hidden_size): {fix}"
        )
    if missing := sorted(info.get("missing_keys") or ()):
        raise ConfigError(
            f"{option} {path}: the weight files have no tensor for {len(missing)} parameter(s) its config.json "
            f"describes ({_some(missing)}; e.g. num_hidden_layers): {fix}"
        )
    if unused := sorted(k for k in info.get("unexpected_keys") or () if not (text and not_language(k))):
        log.warning("%s %s: %d tensor(s) in the weight files are not used by %s (%s)", option, path, len(unused),
                    type(model).__name__, _some(unused))  # fmt: skip
    return model


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
"""The weight files from_pretrained reads: safetensors or PyTorch, single or sharded (their index)."""


def has_weights(path: str | Path) -> bool:
    """Whether a model folder holds weights (safetensors or PyTorch files, sharded or not), not just a config."""
    return any(next(Path(path).glob(p), None) for p in WEIGHT_FILES)


def random_init(cfg: ModelConfig) -> bool:
    """Whether the model starts from random weights: a preset, or --model with --model.random-init."""
    return cfg.path is None or cfg.random_init


def check_weights(cfg: ModelConfig, lora: bool = False) -> None:
    """--model's folder holds weight files, or the run asked for a random init: a config.json without weights (a
    download or copy that stopped early) would otherwise train a random model. LoRA on a random base: never."""
    if cfg.path is None or not (Path(cfg.path) / "config.json").is_file():
        return  # a preset; a folder without config.json is load_model_config's one line
    if lora and cfg.random_init:
        raise ConfigError(
            "model.random_init with lora.enabled would train adapters on a frozen random base; drop "
            f"--model.random-init and pass the folder with the model's weights, or train {cfg.path}'s architecture "
            "in full (--experiment sft)"
        )
    if cfg.random_init or has_weights(cfg.path):
        return
    if lora:
        raise ConfigError(
            f"--model {cfg.path} holds a config.json but no weights: LoRA would train adapters on a frozen random "
            "base; pass the folder with the model's *.safetensors"
        )
    raise ConfigError(
        f"--model {cfg.path} holds a config.json but no weight files (no {', '.join(WEIGHT_FILES)}): an incomplete "
        "download or copy; copy the model's weight files into it (or save it with save_pretrained), or pass "
        "--model.random-init to train this architecture from random weights"
    )


def _from_config(cfg: ModelConfig, vocab_size: int, attn_implementation: str, dtype: torch.dtype,
                 device: torch.device | str) -> PreTrainedModel:  # fmt: skip
    """The model of `cfg.path`'s config.json, initialised on `device` (on the meta device: its shape alone), with
    the embeddings a resize to the tokenizer's `vocab_size` would give it."""
    config = load_model_config(cfg, vocab_size)
    config.vocab_size = max(config.vocab_size, vocab_size)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype,
                                                 trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    return model.to(device)


def build_model(cfg: ModelConfig, vocab_size: int, attn_implementation: str, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> PreTrainedModel:  # fmt: skip
    """A fresh model from a preset, the pretrained weights of a local folder, or (--model.random-init) a random init
    in the shape of its config.json, in `dtype` on `device`."""
    if cfg.path is None:
        model = build_preset(cfg.preset, vocab_size, attn_implementation, dtype, device)
    elif cfg.random_init:
        log.warning(
            "model.random_init: RANDOMLY INITIALISED %s in the shape of %s/config.json (its weight files, if any, "
            "are not loaded)", type(load_model_config(cfg, vocab_size)).__name__.removesuffix("Config"), cfg.path,
        )  # fmt: skip
        model = _from_config(cfg, vocab_size, attn_implementation, dtype, device)
    elif torch.device(device).type == "meta":  # an FSDP2 rank but the first: its shards come from rank 0's weights
        model = _from_config(cfg, vocab_size, attn_implementation, dtype, device)
    else:
        load_model_config(cfg, vocab_size)  # clear error before transformers' own
        check_weights(cfg)
        try:
            model = from_pretrained(cfg.path, attn_implementation=attn_implementation, dtype=dtype,
                                    trust_remote_code=cfg.trust_remote_code)  # fmt: skip
        except unreadable_files() as e:
            raise load_weights_error(cfg.path, e) from e
        if model.config.vocab_size < vocab_size:
            log.warning("--model %s: its tokenizer has %d tokens, its embeddings %d rows: resizing them to %d (new "
                        "rows start at the mean of the others; the saved model has vocab_size %d)", cfg.path,
                        vocab_size, model.config.vocab_size, vocab_size, vocab_size)  # fmt: skip
            with _quiet_transformers():  # its two lines about the initialisation say the same
                model.resize_token_embeddings(vocab_size)
        model = model.to(device)
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s, %.1fM parameters, attention %s", cfg.path or f"preset {cfg.preset}", n / 1e6, attn_implementation
    )
    return model
