"""Command line: `fasttune train|generate|doctor|bench|experiments`. Thin: parse, build a config, call one function.

Bad input ends with one line `error: ...` and exit code 2 (no traceback unless --debug)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from fasttune.errors import ConfigError, FasttuneError

log = logging.getLogger("fasttune")

# Stable short flags: alias -> full tyro option.
SHORT_FLAGS = {
    "--model": "--model.path",
    "--data": "--data.path",
    "--max-steps": "--training.max-steps",
    "--save-every": "--training.save-every",
}


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", force=True)
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars drown the training output


def _pop_flag(args: list[str], flag: str, takes_value: bool = False) -> str | bool | None:
    for i, a in enumerate(args):
        if a == flag:
            args.pop(i)
            return args.pop(i) if takes_value and i < len(args) else (None if takes_value else True)
        if takes_value and a.startswith(flag + "="):
            args.pop(i)
            return a.split("=", 1)[1]
    return None if takes_value else False


def _expand(arg: str) -> str:
    flag, eq, value = arg.partition("=")
    return SHORT_FLAGS.get(flag, flag) + eq + value


def parse_train_args(argv: Sequence[str]):
    """`--experiment NAME` picks the preset; every config field can then be overridden (tyro)."""
    from fasttune.config import EXPERIMENTS, get_experiment
    from fasttune.config.argcheck import parse_overrides

    args = list(argv)
    name = _pop_flag(args, "--experiment", takes_value=True)
    if name == "" or (name is None and "--experiment" in argv):
        raise ConfigError("--experiment needs a value; choose one of: " + ", ".join(EXPERIMENTS))
    name = name or "quick"
    base = get_experiment(name)
    args = [_expand(a) for a in args]
    short = ", ".join(f"{k} = {v}" for k, v in SHORT_FLAGS.items())
    cfg = parse_overrides(
        base,
        args,
        prog=f"fasttune train --experiment {name}",
        description=f"Train or fine-tune a causal LM; options override the preset. Short flags: {short}.",
    )
    return cfg.validate()


def cmd_train(argv: Sequence[str]) -> int:
    from fasttune.train.loop import train

    cfg = parse_train_args(argv)
    result = train(cfg)
    if result.first_val_loss is not None:
        log.info("validation loss %.4f -> %.4f", result.first_val_loss, result.last_val_loss)
    prompt = result.sample_prompt
    if prompt and result.model_dir is not None:
        from fasttune.generate.generate import generate, load_for_generation

        model, tok = load_for_generation(result.model_dir, cfg.training.device)
        g = generate(model, tok, prompt, max_new_tokens=cfg.generation.max_new_tokens,
                     temperature=cfg.generation.temperature, top_p=cfg.generation.top_p)  # fmt: skip
        print(f"sample ({g.tokens_per_s:.0f} tok/s):\n{prompt}{g.text}")
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    from fasttune.generate.commands import run_generate

    return run_generate(argv)


def cmd_chat(argv: Sequence[str]) -> int:
    from fasttune.generate.commands import run_chat

    return run_chat(argv)


def cmd_eval(argv: Sequence[str]) -> int:
    from fasttune.eval.run import run_eval

    return run_eval(argv)


def cmd_experiments(argv: Sequence[str]) -> int:
    from fasttune.config.experiments import describe

    for name, line in describe():
        print(f"{name:8s} {line}")
    return 0


def cmd_doctor(argv: Sequence[str]) -> int:
    from fasttune.doctor.checks import main as doctor_main

    return doctor_main(argv)


def cmd_bench(argv: Sequence[str]) -> int:
    from fasttune.bench.cli import main as bench_main

    return bench_main(argv)


COMMANDS = {
    "train": cmd_train,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "doctor": cmd_doctor,
    "bench": cmd_bench,
    "experiments": cmd_experiments,
}


def run(command: str, argv: Sequence[str]) -> int:
    """Run one subcommand; user errors become one line on stderr and exit code 2 (traceback with --debug)."""
    args = list(argv)
    debug = bool(_pop_flag(args, "--debug"))
    _setup_logging(debug)
    if debug and command == "doctor":
        args.append("--debug")  # doctor shows the tracebacks of crashing checks itself
    try:
        return COMMANDS[command](args)
    except FasttuneError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: fasttune {train,generate,chat,eval,doctor,bench,experiments} [options]\n"
            "  train        train / fine-tune (--experiment quick|full|sft|lora, see `fasttune train --help`)\n"
            "  generate     generate text from a checkpoint, a run folder or a LoRA adapter (--prompts FILE: batched)\n"
            "  chat         chat with a fine-tuned model in the terminal\n"
            "  eval         response loss / perplexity and scored generated answers on held-out data\n"
            "  doctor       diagnose which fast paths work here and how to fix the rest\n"
            "  bench        measure attention backends and training throughput on this machine\n"
            "  experiments  list the experiment presets",
            file=sys.stderr if argv else sys.stdout,
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
