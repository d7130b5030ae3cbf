"""`fasttune eval`: its options. The evaluation itself (torch, the model, the data) is fasttune.eval.run, imported
when the command runs, so that `fasttune --help` and a mistyped option answer without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro
from tyro.constructors import PrimitiveConstructorSpec

from fasttune.config.base_config import DATA_FORMATS, OVERLONG, as_paths, shown
from fasttune.data.formats import unknown_format
from fasttune.errors import ConfigError
from fasttune.generate.commands import SamplingArgs


def _on_off(args: list[str]) -> bool | None:
    word = args[0].lower() if len(args) == 1 else "on" if not args else ""
    if word in ("on", "off", "run", "true", "false"):
        return None if word == "run" else word in ("on", "true")
    raise ValueError(f"it takes on, off or run (or nothing: on), not {' '.join(args)!r}")


ON_OFF = PrimitiveConstructorSpec(nargs="*", metavar="[on|off|run]", instance_from_str=_on_off,
                                  is_instance=lambda x: x is None or isinstance(x, bool),
                                  str_from_instance=lambda x: ["run" if x is None else ("off", "on")[x]])  # fmt: skip
"""`--train-on-prompt` (on), `--train-on-prompt off`, or `run` (None, the default: the run's own setting)."""


@dataclass(kw_only=True)
class EvalArgs(SamplingArgs):
    """Evaluate a checkpoint on any data training reads: loss and perplexity on the responses (every token of plain
    text, split into --max-length pieces); with --generate, generated answers scored by exact match (and by the final
    number, for math data such as GSM8K). Without --data, a run's own validation split (its val_loss). Writes
    summary.json (and with --generate completions.jsonl) to --output-dir."""

    data: Annotated[tuple[str, ...] | None, tyro.conf.arg(metavar="PATH [PATH ...]")] = None
    """Evaluation data: a file or folder, or several read as one data set as training's --data reads them, in any
    format training reads (alpaca, prompt/completion, chat, text). None: the validation samples of the run
    --checkpoint is (or is a checkpoint, adapter/ or merged/ of), rebuilt from its config.json as training built them
    (its data files must be unchanged), so the loss is the run's val_loss at that checkpoint's step; a checkpoint
    that is no fasttune run needs --data."""
    whole_split: bool = False
    """Without --data: score every sample of the run's validation split, not only the first training.eval_batches
    micro-batches of it that its val_loss covers."""
    format: str = "auto"
    """Record format: auto (detect), text, alpaca, prompt_completion, chat (also named sharegpt, conversational,
    chat_template), as training's --data.format."""
    field: str | None = None
    """The key of a .json file's top-level object that holds the records ({"data": [...]}); None: the one key holding
    a list of records is read, and several are refused."""
    generate: bool = False
    """Also generate an answer per sample (greedy unless --temperature) and score it against the reference."""
    output_dir: str | None = None
    """Folder for summary.json and, with --generate, completions.jsonl (created; a file there that this eval would
    write stops it unless --overwrite). completions.jsonl's index (in --data's records joined) and file_index (in
    its file) count from 0, for programs; errors count a file's records from 1 (file_index 7: "record 8")."""
    overwrite: bool = False
    """Replace the results in --output-dir: summary.json and completions.jsonl together (an older completions.jsonl
    is removed when this eval writes none, without --generate)."""
    batch_size: int = 32
    """Samples per forward pass / generation batch."""
    limit: int | None = None
    """Evaluate only the first N samples."""
    max_length: int | None = None
    """Samples longer than this many tokens are handled per --overlong, as training handles them at data.max_length:
    plain text split into pieces of it, a supervised sample's first this many tokens scored. Default: the run's
    data.max_length when --checkpoint is a fasttune run (or in one), else for plain text the model's context (a model
    whose config names none needs it) and supervised samples scored whole. --generate answers whole samples."""
    overlong: str | None = None
    """What the loss does with a sample longer than --max-length, as training's data.overlong: truncate, split (plain
    text only; supervised samples are truncated), drop, auto (text split, supervised truncated). Default: the run's
    data.overlong when --checkpoint is a fasttune run, else auto."""
    stop: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Stop string (repeatable): an answer ends before the first one it writes, which is not part of it. Without it,
    Alpaca prompts end before a next '### Instruction:' (--no-default-stop: they do not). A newline in bash:
    --stop $'\\n'."""
    default_stop: bool = True
    """Without --stop, end the answers to Alpaca prompts before a next '### Instruction:' (the model learned that it
    opens another exchange)."""

    train_on_prompt: Annotated[bool | None, ON_OFF] = None
    """Supervised formats: the loss scores the prompt tokens too, as the val_loss of a run trained with
    --data.train-on-prompt (off: the responses only). run: the setting of the run whose folder (or checkpoint,
    adapter/, merged/) --checkpoint names, else off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size={self.batch_size} is not valid; it must be > 0")
        if self.field is not None and not self.field:
            raise ConfigError("--field='' is not valid; name the JSON key that holds the records or leave it out")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit={self.limit} is not valid; it must be > 0")
        if self.format not in DATA_FORMATS:  # checked with the data, it was "data format 'x'", no option named
            raise ConfigError(unknown_format("--format", self.format))
        if self.overlong is not None and self.overlong not in OVERLONG:
            raise ConfigError(f"--overlong={self.overlong!r} is not valid; choose one of {', '.join(OVERLONG)}")
        if self.max_length is not None and self.max_length <= 1:
            raise ConfigError(f"--max-length={self.max_length} is not valid; it must be > 1 (tokens per piece)")
        self.data = as_paths(self.data)
        if self.data == ():
            raise ConfigError("--data is empty (no path after it); pass the data files or folders to score, or leave "
                              "it out to score the run's validation split")  # fmt: skip
        if self.whole_split and self.data is not None:
            raise ConfigError(f"--whole-split is for a run's own validation split (eval without --data); --data "
                              f"{shown(self.data)} is scored whole already: leave one of them out")  # fmt: skip

    def run(self) -> int:
        from fasttune.eval.run import run_eval

        return run_eval(self)
