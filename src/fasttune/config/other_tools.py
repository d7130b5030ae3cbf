"""Other tools' option names (HF Trainer, TRL, Axolotl, peft, Unsloth; vLLM, lm-evaluation-harness, HF generate)
and what fasttune answers when one is typed: the fasttune option that does the same, or what it does instead where it
has none. Tables only: the command line's unknown-option errors (argcheck) and config files' unknown keys (files.py)
read them, the documentation tests check that every name is listed."""

OTHER_NAMES = {
    # HF Trainer / TRL
    "learning-rate": "--training.lr",
    "num-train-epochs": "--training.epochs",
    "max-steps": "--max-steps",
    "per-device-train-batch-size": "--data.micro-batch-size",
    "gradient-accumulation-steps": "--training.grad-accum",
    "max-seq-length": "--data.max-length",
    "warmup-steps": "--training.warmup-steps",
    "weight-decay": "--training.weight-decay",
    "max-grad-norm": "--training.max-grad-norm",
    "optim": "--training.optimizer",
    "adam-beta1": "--training.adam-beta1",
    "adam-beta2": "--training.adam-beta2",
    "adam-epsilon": "--training.adam-epsilon",
    "output-dir": "--output-dir",
    "model-name-or-path": "--model",
    "dataset-name": "--data",
    "eval-dataset": "--data.val-path",
    "save-steps": "--save-every",
    "save-total-limit": "--training.keep-last",
    "logging-steps": "--training.log-every",
    "eval-steps": "--training.eval-every",
    "resume-from-checkpoint": "--resume",
    "gradient-checkpointing": "--model.gradient-checkpointing",
    "completion-only-loss": "--data.no-train-on-prompt",
    "torch-dtype": "--model.dtype",
    # Axolotl, peft, LLaMA-Factory
    "lr": "--training.lr",
    "num-epochs": "--training.epochs",
    "epochs": "--training.epochs",
    "base-model": "--model",
    "datasets": "--data",
    "dataset": "--data",
    "micro-batch-size": "--data.micro-batch-size",
    "batch-size": "--data.micro-batch-size",
    "sequence-len": "--data.max-length",
    "max-length": "--data.max-length",
    "cutoff-len": "--data.max-length",
    "sample-packing": "--data.packing",
    "val-set-size": "--data.val-fraction",
    "test-datasets": "--data.val-path",
    "train-on-inputs": "--data.train-on-prompt",
    "lora-r": "--lora.rank",
    "lora-alpha": "--lora.alpha",
    "lora-dropout": "--lora.dropout",
    "lora-target-modules": "--lora.targets",
    "target-modules": "--lora.targets",
    "adapter": "--lora.enabled",
    "use-peft": "--lora.enabled",  # TRL's switch for LoRA (the lora experiment turns it on)
    "flash-attention": "--attn-implementation",  # Axolotl's flash_attention: true / sdp_attention: true
    "sdp-attention": "--attn-implementation",
    "use-liger-kernel": "--model.liger",  # TRL / HF Trainer
    # Unsloth
    "use-gradient-checkpointing": "--model.gradient-checkpointing",
}
"""Option names HF Trainer, TRL, Axolotl and peft users type (the leaf of the flag, dashes for underscores) -> the
fasttune option that does that."""
_NO_MODULES_TO_SAVE = (
    "fasttune has no such option: LoRA trains adapters on --lora.targets and freezes every other "
    "weight; to train embeddings or the head too, fine-tune in full (--experiment sft)"
)
_NO_QUANTIZED = (
    "fasttune has no such option: it loads no quantized base (QLoRA); LoRA trains on a bf16 or fp32 "
    "frozen base (--model.dtype bf16: an 8B model's takes ~16 GB)"
)
_NO_SCHEDULER = (
    "fasttune has no such option: its one schedule is a linear warmup over --training.warmup-steps, then a cosine "
    "down to --training.min-lr-ratio x --training.lr (HF's cosine_with_min_lr; --training.min-lr-ratio 0 is HF's "
    "cosine); HF's default, linear decay to 0, has no counterpart"
)
_NO_CHAT_TEMPLATE = (
    "fasttune has no such option: chat data is rendered with the model's own chat template; to use another, save it "
    "in the model folder (tokenizer.chat_template = TEMPLATE; tokenizer.save_pretrained(MODEL) writes "
    "chat_template.jinja)"
)
_PRECISION = (
    "fasttune has no such option: on a GPU it trains in bf16 by default, never fp16 (--model.dtype auto: bf16 "
    "autocast over fp32 weights, as HF's --bf16; --model.dtype bf16: pure bf16 weights and optimizer state)"
)
NO_SUCH_OPTION = {
    "dataset-text-field": "fasttune has no such option: text data is read from each record's `text` field (TRL's "
    "default; a .txt file is read whole); rename your field to text, e.g. jq -c '{text: .content}' in.jsonl > "
    "out.jsonl, or datasets' rename_column('content', 'text')",
    "modules-to-save": _NO_MODULES_TO_SAVE,
    "lora-modules-to-save": _NO_MODULES_TO_SAVE,
    "use-dora": "fasttune has no such option: its LoRA is plain LoRA (no DoRA)",
    "use-rslora": "fasttune has no such option: LoRA's scaling is --lora.alpha / --lora.rank; rsLoRA's alpha / "
    "sqrt(rank) is --lora.alpha set to alpha x sqrt(rank)",
    "load-in-4bit": _NO_QUANTIZED,
    "load-in-8bit": _NO_QUANTIZED,
    "assistant-only-loss": "fasttune has no such option: chat data trains the assistant turns only, as "
    "supervised formats train their responses (--data.train-on-prompt trains every token)",
    "eval-strategy": "fasttune has no such option: val_loss is computed every --training.eval-every N steps (0: "
    "only at the end) on the --data.val-fraction of --data held out",
    "dataset-test-split": "fasttune has no such option: it reads no Hub splits by name; pass the test split's own "
    "file or folder (a save_to_disk DatasetDict's DATA/test) as --data.val-path",
    "lr-scheduler-type": _NO_SCHEDULER,
    "lr-scheduler": _NO_SCHEDULER,  # Axolotl's
    # HF's precision switches: --model.dtype has no fp16, and its bf16 is pure bf16, not HF's --bf16 (autocast)
    "bf16": _PRECISION,
    "fp16": _PRECISION,
    "warmup-ratio": "fasttune has no such option: warmup is counted in steps, --training.warmup-steps N (HF's "
    "warmup_ratio R is N = ceil(R x the run's steps))",
    "evals-per-epoch": "fasttune has no such option: val_loss is computed every --training.eval-every N steps (the "
    "log's 'E epochs = S steps (P per epoch)' line says an epoch's steps)",
    "saves-per-epoch": "fasttune has no such option: a checkpoint is saved every --save-every N steps (the log's 'E "
    "epochs = S steps (P per epoch)' line says an epoch's steps) and at the end",
    "chat-template": _NO_CHAT_TEMPLATE,  # Axolotl's (chatml, llama3, ...)
    "chat-template-path": _NO_CHAT_TEMPLATE,  # TRL's
    "dataset-prepared-path": "fasttune has no such option: it keeps no prepared copy of the data; each run reads and "
    "tokenizes --data at its start",
    "dataset-num-proc": "fasttune has no such option: the data is tokenized in the training process",
    "report-to": "fasttune has no such option: it logs to metrics.jsonl in the run folder, and with "
    "--training.tensorboard also to its tensorboard/ folder; for W&B, `wandb sync --sync-tensorboard "
    "OUTPUT_DIR/tensorboard` uploads that",
}
"""Other tools' options fasttune has no counterpart for (the leaf of the flag, dashes for underscores) -> what it does
instead, for `fasttune train` and config files."""


GENERATION_NAMES = {
    "model": "--checkpoint",  # vLLM, lm-evaluation-harness, TRL
    "model-name-or-path": "--checkpoint",
    "do-sample": "--temperature",  # HF generate: sampling is on when the temperature is above 0
    "max-steps": "--limit",  # eval: how many records, not steps
    "max-samples": "--limit",
    "num-samples": "--limit",
    "max-tokens": "--max-new-tokens",  # vLLM, OpenAI
    "max-length": "--max-new-tokens",  # HF generate (eval has its own --max-length; its max_length counts the prompt)
    "repetition-penalty": None,
    "top-k": None,
    "min-p": None,
    "num-beams": None,
    "num-return-sequences": None,
    "dtype": None,  # vLLM, lm-evaluation-harness: it suggested --stop
    "torch-dtype": None,
}
"""Other tools' names for what generate, chat and eval do (the options without --max-steps) -> fasttune's; None: no
such option (GENERATION_MISSING says what happens instead, where something does)."""
_FROM_GENERATION_CONFIG = (
    "fasttune has no such option: the model's generation_config.json {name} applies, as in HF generate{default}; set "
    "it there"
)
GENERATION_MISSING = {
    "top-k": _FROM_GENERATION_CONFIG.format(name="top_k", default=" (50 when it sets none; 0: off)"),
    "repetition-penalty": _FROM_GENERATION_CONFIG.format(name="repetition_penalty", default=""),
    "num-beams": "fasttune has no such option: it decodes greedily (--temperature 0) or samples, no beam search",
    "num-return-sequences": "fasttune has no such option: one answer per prompt; to sample several, repeat the "
    "prompt in --prompts FILE (each line draws its own)",
    "dtype": "fasttune has no such option: the model runs in bf16 on a GPU, fp32 on a CPU",
    "torch-dtype": "fasttune has no such option: the model runs in bf16 on a GPU, fp32 on a CPU",
}
GENERATION_NOTES = {
    "do-sample": "(sampling is on when it is above 0) ",
    "max-length": "(it counts the answer's tokens alone, not the prompt's) ",
}
"""How a GENERATION_NAMES name differs from the fasttune option it is, said after "did you mean ...?"."""
