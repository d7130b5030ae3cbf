"""The config tree. Every field carries a one-line docstring that doubles as `--help` text (tyro reads them).

`__post_init__` validates each section; errors name the option and its valid values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from fasttune.attention import NAMES
from fasttune.data.formats import FORMAT_NAMES, unknown_format
from fasttune.errors import ConfigError

ATTN_CHOICES = ("auto", *NAMES)
MODEL_PRESETS = ("micro", "tiny", "small", "125m", "350m", "1b", "llama-3.1-8b", "qwen2.5-7b", "gemma-3-1b",
                 "phi-3-mini")  # fmt: skip
DATA_FORMATS = ("auto", *FORMAT_NAMES)
DTYPES = ("auto", "bf16", "fp32")
OVERLONG = ("auto", "truncate", "split", "drop")
MEMORY_PLANS = ("auto", "none", "ops", "attention", "mlp", "every:K", "full", "offload")
OPTIMIZERS = ("adamw", "adamw_8bit")


RESUMABLE = {"may_change_on_resume": True}
"""Field metadata (`field(default=..., metadata=RESUMABLE)`): the option may differ when a run is resumed. Every
other option must match the run's config.json, or the resumed run would silently train on other data, another
tokenizer or another schedule. On a section field it frees the whole section."""


def may_change_on_resume(cls: type | None = None, prefix: str = "") -> frozenset[str]:
    """Dotted names of every option marked RESUMABLE (e.g. "training.max_steps")."""
    out: set[str] = set()
    for f in dataclasses.fields(cls or BaseConfig):
        name = prefix + f.name
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            whole = f.metadata.get("may_change_on_resume")
            out |= (
                {f"{name}.{g.name}" for g in dataclasses.fields(sub)}
                if whole
                else may_change_on_resume(sub, name + ".")
            )
        elif f.metadata.get("may_change_on_resume"):
            out.add(name)
    return frozenset(out)


def _changed(section: object, default: object) -> list[tuple[str, object]]:
    """(field, value) of each field of the dataclass `section` that differs from `default`'s."""
    return [(f.name, getattr(section, f.name)) for f in dataclasses.fields(section)
            if getattr(section, f.name) != getattr(default, f.name)]  # fmt: skip


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _positive(option: str, value: float, allow_zero: bool = False, most: int | None = None) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        finite = "" if math.isfinite(value) else "a finite number "  # "inf ... must be > 0" read as a contradiction
        raise ConfigError(f"{option}={value!r} is not valid; it must be {finite}{bound}")
    if most is not None and value > most:
        raise ConfigError(f"{option}={value!r} is too large; it must be <= {most:,}")


# Upper bounds for sizes that set how much work one step, sample or call does: a typo such as 1e20 is named here
# instead of surfacing as a run that never finishes a step. Each is far beyond real use.
MAX_TOKENS = 1 << 20  # tokens in one sample or generation: beyond every model's context
MAX_COUNT = 1 << 16  # micro-batches per step, samples per micro-batch, LoRA rank


def memory_plan(value: str, option: str = "model.memory") -> str:
    """A model.memory value, validated and normalised (every:1 is full)."""
    if value.startswith("every:"):
        k = value.split(":", 1)[1]
        # ASCII digits only: str.isdigit also takes '²' (which int() then refuses: a traceback) and other scripts'
        if not (k.isascii() and k.isdigit()) or int(k) < 1:
            raise ConfigError(f"{option}={value!r} is not valid; every:K needs an integer K >= 1 (e.g. every:2)")
        return "full" if int(k) == 1 else f"every:{int(k)}"
    if value not in MEMORY_PLANS or value == "every:K":
        raise ConfigError(f"{option}={value!r} is not valid; choose one of: {', '.join(MEMORY_PLANS)}")
    return value


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Model shape built from a config when --model is not given (random init): micro (tests), tiny (~4M), small,
    125m, 350m, 1b, llama-3.1-8b, qwen2.5-7b, gemma-3-1b, phi-3-mini (the published shapes, their own vocabularies)."""
    path: Annotated[str | None, tyro.conf.arg(aliases=("--model",), metavar="PATH")] = None
    """Local Hugging Face model folder to fine-tune (config.json + safetensors), or a Hub id your Hugging Face cache
    holds (read there, never downloaded); overrides preset."""
    random_init: bool = field(default=False, metadata=RESUMABLE)
    """Train --model's architecture from random weights: its config.json only, its weight files (if any) not loaded
    (pre-training that shape, benchmarks). Without it, a folder with no weight files is refused. Not with LoRA. A
    resumed run loads its checkpoint's weights either way."""
    dtype: str = "auto"
    """auto: fp32 weights + bf16 autocast on CUDA (pure bf16 when that state would take over half the GPU, e.g. an 8B
    model), fp32 on CPU; bf16: pure bf16 weights and optimizer; fp32."""
    gradient_checkpointing: bool = field(default=False, metadata=RESUMABLE)
    """Recompute every decoder layer in backward (the same as --model.memory full)."""
    trust_remote_code: bool = False
    """Allow a local model folder to run its own Python code. Off: only transformers' own models load."""
    liger: bool = field(default=False, metadata=RESUMABLE)
    """Patch in Liger kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) when liger-kernel is installed."""
    memory: str = field(default="auto", metadata=RESUMABLE)
    """Activation memory plan: auto (least recomputation that fits the GPU), none, ops (recompute elementwise ops
    only), attention, mlp (recompute that block), every:K (recompute every K-th layer), full, offload (full, with each
    layer's saved input in pinned host memory: for long documents that full does not fit)."""
    chunked_loss: bool = field(default=True, metadata=RESUMABLE)
    """Compute the loss in token chunks, never holding the full logits (when Liger's fused loss is not on)."""
    fused_mlp: bool = field(default=True, metadata=RESUMABLE)
    """Run SwiGLU MLPs (Llama, Mistral, Qwen, ...) as one function that recomputes silu(gate) * up in backward
    instead of keeping it: 2 to 4 bytes less per token and MLP unit, one elementwise kernel more (not with
    --training.compile, which fuses the MLP itself)."""
    lean_norm: bool = field(default=True, metadata=RESUMABLE)
    """Llama-style RMSNorms run as fasttune's fused function (Triton on CUDA), keep only their input for backward,
    and their outputs, which the next matmuls would keep, are recomputed in backward: 12 x hidden bytes less per
    token and layer, and faster than HF's norm. Liger's RMSNorms get the recompute only when the memory plan needs
    it (4 x hidden bytes less, ~4% of the step). Not with --training.compile."""

    def __post_init__(self) -> None:
        _choice("model.preset", self.preset, MODEL_PRESETS)
        _choice("model.dtype", self.dtype, DTYPES)
        self.memory = memory_plan(self.memory)
        if self.gradient_checkpointing and self.memory not in ("auto", "full", "offload"):
            raise ConfigError(
                f"model.gradient_checkpointing means --model.memory full, but model.memory={self.memory!r} asks for "
                "another plan; drop one of the two"
            )


def as_paths(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """data.path / data.val_path as the paths they name: one given as a string (a config.json of an older fasttune,
    a Python caller) is a path of its own."""
    return value if value is None or isinstance(value, tuple) else (value,) if isinstance(value, str) else tuple(value)


def shown(paths: Sequence[str]) -> str:
    """Paths as messages name them: as typed after their option."""
    return " ".join(paths)


@dataclass
class DataConfig:
    path: Annotated[tuple[str, ...] | None, tyro.conf.arg(aliases=("--data",), metavar="PATH [PATH ...]")] = None
    """Dataset: a text file or folder, .jsonl/.json/.parquet/.csv, or a save_to_disk folder; several (`--data
    a.jsonl b.parquet`, a list in --config) are one data set of their records in that order, each file's format
    detected on its own (they must train as one format). None: the embedded corpus (this Python's standard library
    source)."""
    field: str | None = dataclasses.field(default=None, metadata=RESUMABLE)
    """The key of a .json file's top-level object that holds the records ({"data": [...]}, as load_dataset("json",
    field=...) reads). None: the one key holding a list of records is read, and several are refused. May be given
    or changed on --resume: the run goes on only if the records it picks tokenize to the data the run trained on."""
    format: str = "auto"
    """Record format: auto (detect), text, alpaca, prompt_completion, chat (role/content messages; ShareGPT's
    conversations of from/value turns; TRL's conversational prompt/completion, lists of messages, trained on the
    completion's assistant turns). sharegpt, conversational (TRL) and chat_template (Axolotl) are chat's other names:
    they read the same records."""
    train_on_prompt: bool = False
    """Supervised formats: also train on prompt tokens (default: loss on the response only)."""
    max_length: int = 256
    """Longest sample in tokens; longer ones are handled per `overlong`. Default: the preset's (quick 256, full 2048,
    sft and lora 1024; the value shown is the --experiment given's, quick's without one), lowered to the context of a
    --model that has less: sft and lora train at the smaller of 1024 and the model's context."""
    overlong: str = "auto"
    """What to do with samples longer than max_length: truncate, split (into max_length pieces), drop; auto: split
    plain text (nothing of it is lost), truncate supervised samples (a split would cut answers from their prompts)."""
    packing: bool = True
    """Padding-free packing: samples share a micro-batch row with restarting positions and no cross-attention. A
    model that computes attention in its own code (Falcon, Bloom, GPT-Neo, MPT) trains on padded rows of samples of
    similar length within the same token budget instead: its mask would let packed samples see each other."""
    micro_batch_size: int = 8
    """Samples per micro-batch when padded; when packed (or padded by length, see `packing`), the token budget is
    micro_batch_size * max_length."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (deterministic split); plain text of too few documents for
    that (one .txt file) holds out that fraction of its max_length pieces instead, the last ones. Not used with
    `val_path` (nothing is held out then)."""
    val_path: Annotated[tuple[str, ...] | None, tyro.conf.arg(metavar="PATH [PATH ...]")] = None
    """A separate validation file or folder, or several (any paths `path` takes; TRL's eval_dataset, Axolotl's
    test_datasets): its records are the validation samples, read in the training data's format and tokenized,
    templated and cut to max_length as held-out records are; all of `path` is trained on and val_fraction is not used.
    Needs `path`."""
    tokenizer_vocab_size: int = 4096
    """Vocabulary size of the byte-level BPE tokenizer trained when no --model gives one (on the embedded corpus, or
    on --data's records)."""
    max_documents: int | None = None
    """Use at most this many documents (None: all)."""
    cache_dir: str = dataclasses.field(default=".cache/fasttune", metadata=RESUMABLE)  # `field` is an option here
    """Where a tokenizer trained when no --model gives one (on the embedded corpus, or on --data's records) is cached
    (tokenizer-<fingerprint of its texts>-<vocab>/)."""

    def __post_init__(self) -> None:
        self.path, self.val_path = as_paths(self.path), as_paths(self.val_path)
        for key, paths in (("data.path", self.path), ("data.val_path", self.val_path)):
            if paths == ():
                raise ConfigError(f"{key} is empty (no path after it); pass one or more data files or folders, or "
                                  "leave it out")  # fmt: skip
        if self.format not in DATA_FORMATS:
            raise ConfigError(unknown_format("data.format", self.format))
        _choice("data.overlong", self.overlong, OVERLONG)
        if self.field is not None and not self.field:
            raise ConfigError("data.field='' is not valid; name the JSON key that holds the records (e.g. data) or "
                              "leave the option out")  # fmt: skip
        _positive("data.max_length", self.max_length, most=MAX_TOKENS)
        _positive("data.micro_batch_size", self.micro_batch_size, most=MAX_COUNT)
        if self.max_documents is not None:
            _positive("data.max_documents", self.max_documents)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction!r} is not valid; it must be in [0, 1)")
        if self.tokenizer_vocab_size < 260:
            raise ConfigError(f"data.tokenizer_vocab_size={self.tokenizer_vocab_size} is too small; use >= 260")
        _positive("data.tokenizer_vocab_size", self.tokenizer_vocab_size, most=MAX_TOKENS)


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights (the lora experiment turns it on); the other lora options
    need it on."""
    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA alpha (scaling = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA path."""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Module names that get adapters (the last part of the name, e.g. q_proj; several: `q_proj v_proj` or
    `q_proj,v_proj`), or all-linear: every linear layer but the output head. Names the model lacks are skipped, and
    the log names its linear layers left frozen. On MoE models whose experts transformers fuses into 3-D parameters
    (Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, gpt-oss, Qwen3-Next, DeepSeek-V3), gate_proj/up_proj/down_proj (and
    all-linear) also adapt the fused experts, one adapter per expert (gate_up_proj at twice the rank and alpha; no
    lora.dropout), and the linear layers so named beside them (shared experts, dense MLPs) through their weights;
    gate_proj or up_proj alone leaves gate_up_proj frozen (the log says so)."""
    merge_on_save: bool = field(default=True, metadata=RESUMABLE)
    """At the end of training, also save the adapters merged into the base weights (the run's merged/ folder); may
    change on resume: `--resume --lora.merge-on-save` of a complete run writes merged/."""

    def __post_init__(self) -> None:
        _positive("lora.rank", self.rank, most=MAX_COUNT)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r} is not valid; it must be in [0, 1)")
        # --lora.targets q_proj,v_proj (peft's and Axolotl's comma-separated habit) names two layers, not one
        typed, self.targets = self.targets, tuple(name for t in self.targets for name in t.replace(",", " ").split())
        if self.enabled and not self.targets:
            raise ConfigError(f"lora.targets={typed!r} names no layer; pass the layers to adapt (e.g. --lora.targets "
                              "q_proj v_proj) or all-linear")  # fmt: skip


@dataclass
class TrainingConfig:
    max_steps: Annotated[int, tyro.conf.arg(aliases=("--max-steps",))] = field(default=200, metadata=RESUMABLE)
    """Optimizer steps to run (with `epochs` set: the steps those epochs take, computed when the data is batched)."""
    epochs: Annotated[float | None, tyro.conf.arg(aliases=("--epochs",))] = field(default=None, metadata=RESUMABLE)
    """Passes over the training data (HF's num_train_epochs; 0.5 or 3), instead of --max-steps: the run trains
    ceil(epochs x optimizer steps per epoch), as the data is batched (packing, micro-batch, grad_accum, ranks). It
    overrides the preset's max_steps; given with --max-steps in the same place (the command line, one file) it is an
    error. None: --max-steps decides. May change on resume (like max_steps: more epochs train further)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps (a warning when not below --max-steps: the LR would never reach --training.lr)."""
    weight_decay: float = 0.1
    """AdamW weight decay, not applied to norms and biases (HF Trainer's rule: norm layers and parameters named like a
    norm or a bias; also a norm layer whose name HF's patterns miss, e.g. Mamba's norm_f, which HF decays); every
    other parameter decays, 1-D ones too (e.g. Qwen3-Next's A_log). A resumed run keeps the
    grouping it started with (checkpoints written before this rule: every 1-D parameter undecayed)."""
    adam_beta1: float = 0.9
    """AdamW's beta1 (HF's adam_beta1; the same default)."""
    adam_beta2: float = 0.95
    """AdamW's beta2. Not HF Trainer's default (0.999): 0.95, the usual value for LLM training, forgets old squared
    gradients faster, which keeps a spike of one step from dwarfing the updates after it; --training.adam-beta2
    0.999 trains as HF Trainer does by default."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon (HF's adam_epsilon; the same default)."""
    optimizer: str = "adamw"
    """adamw (torch's, moments in the weights' dtype) or adamw_8bit (torchao's: 8-bit moments, pip install
    'fasttune[adam8bit]')."""
    grad_accum: int = field(default=1, metadata=RESUMABLE)
    """Micro-batches per optimizer step (per rank). On --resume it may change with the number of ranks: keep ranks x
    grad_accum to continue the same run."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    eval_every: int = field(default=50, metadata=RESUMABLE)
    """Compute val_loss on the held-out data every N steps. The untrained model (step 0; not again on --resume) and
    the last step are always validated: 0 validates at those two only. Each preset sets its own N; the default shown
    is that of the --experiment given (quick's without one)."""
    eval_batches: int = field(default=8, metadata=RESUMABLE)
    """Micro-batches per validation."""
    eval_generate_every: int = field(default=0, metadata=RESUMABLE)
    """Every N steps generate answers for held-out samples and log their exact/numeric match (gen_* in
    metrics.jsonl); supervised data only (0: off)."""
    eval_generate_samples: int = field(default=32, metadata=RESUMABLE)
    """Held-out samples answered by eval_generate_every (greedy, generation.max_new_tokens each)."""
    log_every: int = field(default=10, metadata=RESUMABLE)
    """Append to metrics.jsonl (and, outside a terminal, print a line) every N steps, and at step 1 and the last."""
    save_every: Annotated[int, tyro.conf.arg(aliases=("--save-every",))] = field(default=100, metadata=RESUMABLE)
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = field(default=2, metadata=RESUMABLE)
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    save_final: bool = True
    """Save a checkpoint after the last step (benchmarks turn it off: a 1B checkpoint is ~7 GB of writes)."""
    max_bad_steps: int = field(default=3, metadata=RESUMABLE)
    """Unhealthy steps allowed (each with a warning) before training stops naming the last healthy checkpoint: a
    non-finite loss or gradient (its update skipped) or an exploding loss (over 3x and 2 nats above the recent
    median)."""
    oom_retry: bool = field(default=False, metadata=RESUMABLE)
    """On CUDA out-of-memory, halve the micro-batch and double grad_accum (same global batch) and retry."""
    tensorboard: bool = field(default=False, metadata=RESUMABLE)
    """Also log to TensorBoard under the run directory."""
    device: str = field(default="auto", metadata=RESUMABLE)
    """Device: auto (cuda if available), cpu, cuda, cuda:N."""
    compile: bool = field(default=False, metadata=RESUMABLE)
    """torch.compile each decoder layer (about a minute at the start; needs a C++ compiler, g++, on a CPU and a C
    compiler for Triton on a GPU). Without flash-attn-4 and Liger it fuses the elementwise work (`full` on an H200:
    1.27x); with them it gains nothing."""
    fsdp: bool = field(default=False, metadata=RESUMABLE)
    """Under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2) instead of replicating
    them (DDP): for models whose training state does not fit one GPU. Ignored in a single process. Checkpoints are
    the same files either way: a run may resume with or without it."""

    def __post_init__(self) -> None:
        _positive("training.max_steps", self.max_steps)
        if self.epochs is not None:
            _positive("training.epochs", self.epochs)
        _positive("training.lr", self.lr)
        _positive("training.grad_accum", self.grad_accum, most=MAX_COUNT)
        _positive("training.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("training.max_grad_norm", self.max_grad_norm, allow_zero=True)
        _positive("training.eval_every", self.eval_every, allow_zero=True)
        _positive("training.save_every", self.save_every, allow_zero=True)
        _positive("training.log_every", self.log_every)
        _positive("training.keep_last", self.keep_last)
        _positive("training.eval_batches", self.eval_batches, most=MAX_TOKENS)
        _positive("training.eval_generate_every", self.eval_generate_every, allow_zero=True)
        _positive("training.eval_generate_samples", self.eval_generate_samples)
        _positive("training.max_bad_steps", self.max_bad_steps, allow_zero=True)
        _positive("training.weight_decay", self.weight_decay, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"training.{name}={getattr(self, name)!r} is not valid; it must be in [0, 1)")
        _positive("training.adam_epsilon", self.adam_epsilon)
        _choice("training.optimizer", self.optimizer, OPTIMIZERS)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio={self.min_lr_ratio!r} is not valid; it must be in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"training.device={self.device!r} is not valid; choose auto, cpu, cuda or cuda:N")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    """Tokens to generate."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    sample_prompt: str = "def "
    """Prompt for the sample printed at the end of training ('' to skip)."""

    def __post_init__(self) -> None:
        _positive("generation.max_new_tokens", self.max_new_tokens, most=MAX_TOKENS)
        _positive("generation.temperature", self.temperature, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generation.top_p={self.top_p!r} is not valid; it must be in (0, 1]")


@dataclass
class BaseConfig:
    attn_implementation: str = field(default="sdpa", metadata=RESUMABLE)
    """Attention backend: auto, eager, sdpa, flex_attention, varlen, flash_attention_2/3/4."""
    strict_attention: bool = field(default=False, metadata=RESUMABLE)
    """Fail instead of falling back when the requested attention backend is unavailable."""
    experiment: str = field(default="quick", metadata=RESUMABLE)
    """Experiment preset (quick, full, sft, lora), applied first; the other options override it."""
    output_dir: str = field(default="runs/quick", metadata=RESUMABLE)
    """Run directory: config, metrics, plots and checkpoints go here."""
    resume: bool = field(default=False, metadata=RESUMABLE)
    """Continue from the last complete checkpoint in output_dir."""
    overwrite: bool = field(default=False, metadata=RESUMABLE)
    """Delete an existing run in output_dir and start over."""
    seed: int = 0
    """Random seed (model init, data order, sampling)."""
    force: bool = field(default=False, metadata=RESUMABLE)
    """Run a GPU-scale experiment on a machine without a GPU anyway."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata=RESUMABLE)

    def __post_init__(self) -> None:
        _choice("attn_implementation", self.attn_implementation, ATTN_CHOICES)
        if not -(2**63) <= self.seed < 2**64:  # torch.manual_seed's range
            raise ConfigError(f"seed={self.seed} is not valid; choose one from {-(2**63)} to {2**64 - 1} (e.g. 0)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
        if self.model.memory == "offload" and self.training.compile:
            raise ConfigError(
                "model.memory=offload does not run under training.compile (torch.compile would trace its "
                "offload hooks with each layer, which fasttune does not support); drop one of the two, or use "
                "--model.memory full"
            )

    def validate(self) -> BaseConfig:
        """Re-run every section's checks (after fields were changed in place)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.__post_init__()
        self.__post_init__()
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def refuse_unused_lora(cfg: BaseConfig) -> None:
    """A lora option set while LoRA is off: a full fine-tune where LoRA was asked for, the option unused and unsaid.
    Checked for a new run's options (train/cli.py), never in __post_init__: a config.json that an older fasttune wrote
    with one (read back on --resume, by eval) is the run's, and loads."""
    if not cfg.lora.enabled and (set_ := _changed(cfg.lora, LoraConfig())):
        key, value = set_[0]
        value = list(value) if isinstance(value, tuple) else value  # targets: as a list is written
        raise ConfigError(
            f"lora.{key}={value!r} is set but LoRA is off, so this run would train every weight; pass "
            f"--experiment lora (or --lora.enabled) to train LoRA adapters, or drop lora.{key}"
        )


def to_dict(cfg: BaseConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> BaseConfig:
    """Rebuild a config from `to_dict` output (e.g. the config.json in a run directory)."""
    sections = {f.name: f.type for f in dataclasses.fields(BaseConfig)}
    kwargs = {}
    classes = {
        "model": ModelConfig,
        "data": DataConfig,
        "training": TrainingConfig,
        "lora": LoraConfig,
        "generation": GenerationConfig,
    }
    for key, value in data.items():
        if key not in sections:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sections)}")
        if key in classes:
            known = {f.name for f in dataclasses.fields(classes[key])}
            unknown = set(value) - known
            if unknown:
                raise ConfigError(f"unknown option {key}.{sorted(unknown)[0]}; valid: {', '.join(sorted(known))}")
            if key == "lora" and "targets" in value:
                value = {**value, "targets": tuple(value["targets"])}
            kwargs[key] = classes[key](**value)
        else:
            kwargs[key] = value
    return BaseConfig(**kwargs)
