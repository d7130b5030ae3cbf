"""`fasttune train` (and `python main.py`): its options are the whole config tree, on top of an experiment preset."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import tyro

from fasttune.command import Command
from fasttune.config import BaseConfig, get_experiment
from fasttune.config.argcheck import SHORT_FLAGS
from fasttune.config.base_config import refuse_unused_lora
from fasttune.errors import ConfigError, FasttuneError

log = logging.getLogger("fasttune")


@dataclasses.dataclass
class TrainArgs(Command):
    """Train or fine-tune a causal LM. `--experiment NAME` picks a preset (quick, full, sft, lora: see
    `fasttune experiments`), `--config FILE` changes it from a file; every option below overrides both.

    {short}"""

    config_file: Annotated[str | None, tyro.conf.arg(name="config", metavar="FILE")] = None
    """Options from a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file, nested as below (training: {lr: 1e-4}); a
    run's config.json trains that run again. Its `experiment:` is the preset it changes (a --experiment must agree);
    options given here override the file. --resume and --overwrite count only here, never from the file."""
    config: Annotated[BaseConfig, tyro.conf.arg(name="")] = dataclasses.field(default_factory=BaseConfig)
    given: Annotated[tuple[str, ...], tyro.conf.Suppress] = ()
    """The options the user typed or set in --config (not a command-line option): a default may adapt, a value the
    user gave may not."""
    from_file: Annotated[tuple[str, ...], tyro.conf.Suppress] = ()
    """The dotted keys whose value comes from --config (not overridden on the command line)."""
    run_config: Annotated[str | None, tyro.conf.Suppress] = None
    from_run: Annotated[tuple[str, ...], tyro.conf.Suppress] = ()
    """--resume --config FILE: the dotted keys whose value comes from the run's own config.json (`run_config`): set
    there, neither in FILE nor on the command line."""
    unnamed_preset: Annotated[str | None, tyro.conf.Suppress] = None
    """Why a --model to fine-tune may not take the default preset (see `unnamed_preset_error`), refused once parsed."""

    @classmethod
    def default_for(cls, args: Sequence[str], quiet: bool = False) -> TrainArgs:
        """The preset named by `--experiment` in `args` (default quick), changed by `--config FILE`: the defaults
        every other option overrides. `quiet`: no notice of what the file sets (said when it was first read)."""
        from fasttune.config import EXPERIMENTS

        name, path = _last_value(args, "--experiment"), _last_value(args, "--config")
        if name is not None and (not name or name.startswith("-")):
            raise ConfigError("--experiment needs a value; choose one of: " + ", ".join(EXPERIMENTS))
        if path is not None and (not path or path.startswith("-")):
            raise ConfigError("--config needs a file (.yaml, .toml or .json)")
        typed = tuple(a.partition("=")[0].replace("_", "-") for a in args if a.startswith("--"))
        from fasttune.config.files import ConfigFile, leaves

        file = ConfigFile.load(path, quiet=quiet, typed=typed) if path is not None else None
        own = "--resume" in typed and _resumed_config(args, name, file)
        unnamed = unnamed_preset_error(typed, file) if name is None and not own else None
        length = run_length_flag(typed, file)
        if file is None and not own:
            return cls(config=get_experiment(name or "quick"), given=typed, unnamed_preset=unnamed)
        run = ConfigFile.load(own, quiet=True) if own else None
        file = file or run
        # --resume: the run's config.json is the base, so what a --config FILE leaves out is the run's, not the preset's
        base = run.apply(get_experiment(run.base(name))) if run is not None else get_experiment(file.base(name))
        file.base(name)  # a --experiment that disagrees with the file is refused
        if run is not None and file.experiment and file.experiment != run.experiment:
            raise ConfigError(f"--resume: {file.path} changes the {file.experiment} preset, but the run was started "
                              f"with {run.experiment}; resume with the run's preset (or start a new run with another "
                              "--output-dir)")  # fmt: skip
        cfg = file.apply(base)
        if length == "max_steps" and cfg.training.epochs is not None:  # typed --max-steps decides over a file's epochs
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=None))
        path = file.path
        table = leaves()
        from_file = tuple(k for k in file.keys() if not set(table[k].flags) & set(typed))
        flags = tuple(table[k].flags[0] for k in from_file)
        from_run = () if run in (None, file) else tuple(k for k in run.keys() if k not in file.keys()
                                                        and not set(table[k].flags) & set(typed))  # fmt: skip
        return cls(config_file=path, config=cfg, given=typed + flags, from_file=from_file,
                   run_config=run.path if from_run else None, from_run=from_run, unnamed_preset=unnamed)  # fmt: skip

    def _refuse_new_or_resumed(self, cfg: BaseConfig) -> None:
        """A new run: a --model with no preset named, or lora options with LoRA off; a resumed one (the run's options,
        resume refuses a changed one): its inputs that are gone."""
        if self.unnamed_preset:
            raise ConfigError(self.unnamed_preset)
        if cfg.resume:
            self._refuse_gone_inputs(cfg)
        else:
            refuse_unused_lora(cfg)

    def check(self) -> None:
        cfg = self.config.validate()
        self._refuse_new_or_resumed(cfg)
        require_inputs(cfg)
        from fasttune.train.device import refuse_offload_on_cpu  # torch: after the checks of the command line alone
        from fasttune.train.loop import check_launch

        refuse_offload_on_cpu(cfg.model.memory, cfg.training.device)
        check_launch(cfg)
        self._fit_max_length(cfg, say=False)
        if cfg.resume and self.config_file:
            check_resume_of_file(cfg, self.config_file, self.from_file)

    def _refuse_gone_inputs(self, cfg) -> None:
        """--resume taking the model or data path from the run's config.json (recorded absolute) when it is gone (the
        project folder moved), or from a --config FILE that repeats it (a copy of that file): one line naming the file
        and the fix, not a --model or --data the user never typed. A finished run reads no data and loads no model:
        they may be gone (the resume says it is complete)."""
        from fasttune.config.naming import value_of
        from fasttune.train.resume import INPUTS, input_paths
        from fasttune.train.run_dir import RunFolder

        own = self._own_config(cfg)
        recorded = RunFolder(cfg.run_dir).recorded_inputs() if self.config_file and not own else {}
        gone, files, options = [], [], []  # every one at once: a moved folder takes model and data along
        notes = ["the run goes on from its checkpoint"]
        for key, option in INPUTS.items():
            paths = input_paths(value_of(cfg, key))
            runs = key in self.from_file and (own or recorded.get(key) == paths)
            file = self.run_config if key in self.from_run else self.config_file if runs else None
            if file and (missing := [p for p in paths if not Path(p).exists()]):
                gone, options = [*gone, f"{key} {' '.join(missing)}"], [*options, option]
                files += [file] if file not in files else []
                if len(paths) > 1:  # given again, it replaces them all
                    notes.insert(-1, f"{option} takes all {len(paths)} of its paths again")
        if gone:
            from fasttune.train.finished import is_finished  # torch: only when an input is gone

            if is_finished(cfg):
                return
            are, them = ("is", "it is") if len(gone) == 1 else ("are", "they are")
            raise ConfigError(f"--resume: the run's {' and '.join(gone)} (in {', '.join(files)}) {are} gone: moved "
                              f"or renamed? pass {' and '.join(options)} with where {them} now "
                              f"({'; '.join(notes)})")  # fmt: skip

    def _own_config(self, cfg: BaseConfig) -> str | None:
        """--config FILE when it is the run's own config.json (as `train --output-dir RUN --resume` reads it)."""
        from fasttune.train.run_dir import RunFolder

        run_file = RunFolder(cfg.run_dir).config.resolve()
        return self.config_file if self.config_file and Path(self.config_file).resolve() == run_file else None

    def _fit_max_length(self, cfg: BaseConfig, say: bool) -> BaseConfig:
        """fit_max_length, told where data.max_length came from: typed or set in --config, the user's; on --resume
        from the run's config.json (with --config FILE or without), what the run trained with: never shrunk."""
        run = _run_config(cfg) if cfg.resume else None  # however it was given, the run's own holds on resume
        return fit_max_length(cfg, explicit="--data.max-length" in self.given or run is not None, say=say,
                              file=self.file_of("data.max_length"), run=run)  # fmt: skip

    def file_of(self, key: str) -> str | None:
        """The --config file that set option `key` (dotted), None when the command line or the preset did."""
        return self.config_file if key in self.from_file else None

    def origin(self, key: str, flag: str) -> str:
        """Where the value of option `key` (dotted, as in config.json) came from, for the log: the config file
        (a --resume's own config.json too), its `flag` on the command line, or the preset."""
        if key in self.from_file:
            return f"set in {self.config_file}"
        if key in self.from_run:
            return f"set in {self.run_config}"
        return flag if flag in self.given else f"the {self.config.experiment} preset's default"

    @classmethod
    def option_names(cls, args: Sequence[str], parsed: TrainArgs | None = None):
        """Each option as typed, else as its --config file (a --resume's own config.json too) or the preset set it
        (config/naming.py). Before the options were parsed: the defaults of `args` (a file or preset that cannot
        be read named itself)."""
        from fasttune.config.files import leaves
        from fasttune.config.naming import OptionNames, preset_keys, value_of

        own = parsed if parsed is not None else cls.default_for(args, quiet=True)
        table = {key: leaf.flags for key, leaf in leaves().items()}
        values = {key: value_of(own.config, key) for key in own.from_file + own.from_run}
        by_preset = preset_keys(own.config.experiment) - set(own.from_file) - set(own.from_run)
        return OptionNames(args, table, own.config_file, frozenset(own.from_file), values, own.config.experiment,
                           by_preset, own.run_config, frozenset(own.from_run))  # fmt: skip

    def run(self) -> int:
        from fasttune.train.loop import train

        cfg = self.config.validate()
        self._refuse_new_or_resumed(cfg)
        require_inputs(cfg)
        cfg = self._fit_max_length(cfg, say=os.environ.get("RANK", "0") == "0")
        result = train(cfg, attn_origin=self.origin("attn_implementation", "--attn-implementation"))
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
            return 0
        if result.first_val_loss is not None:
            log.info("validation loss %.4f -> %.4f", result.first_val_loss, result.last_val_loss)
        prompt = result.sample_prompt
        if prompt and result.model_dir is not None:
            from fasttune.generate.generate import generate
            from fasttune.model.load import load_for_inference

            try:  # the run is done and saved: a sample that cannot be made is a warning, not a failed run
                model, tok = load_for_inference(result.model_dir, cfg.training.device, option="the trained model")
                g = generate(model, tok, prompt, max_new_tokens=cfg.generation.max_new_tokens,
                             temperature=cfg.generation.temperature, top_p=cfg.generation.top_p)  # fmt: skip
            except FasttuneError as e:
                log.warning("no sample generated: %s", e)
                return 0
            print(f"sample ({g.speed()}):\n{prompt}{g.text}")
        return 0


# The --help text is the docstring (tyro reads it): its short flags come from the one table the parser uses.
_short = textwrap.fill(
    "Short flags: " + ", ".join(SHORT_FLAGS) + ".", 100, subsequent_indent="    ", break_on_hyphens=False
)
TrainArgs.__doc__ = (TrainArgs.__doc__ or "").replace("{short}", _short)


STEPS_FLAGS, EPOCHS_FLAGS = ("--max-steps", "--training.max-steps"), ("--epochs", "--training.epochs")


def run_length_flag(typed: Sequence[str], file=None) -> str | None:
    """Which option sets the run's length on the command line ("max_steps", "epochs" or None: the file's, else the
    preset's max_steps). Exactly one decides: both typed, or both set in one --config file, is an error. A typed one
    beats the file's other one (flags override files); epochs anywhere beats a preset's max_steps. A run's own
    config.json records both (epochs, and the steps they came to): its epochs decide."""
    steps, epochs = any(f in typed for f in STEPS_FLAGS), any(f in typed for f in EPOCHS_FLAGS)
    if steps and epochs:
        from fasttune.config.argcheck import typed_flag

        both = f"{typed_flag(typed, STEPS_FLAGS)} and {typed_flag(typed, EPOCHS_FLAGS)}"  # as typed: --epochs
        raise ConfigError(f"{both} both set the run's length; pass one of them")
    training = file.values.get("training", {}) if file is not None else {}
    if not (steps or epochs) and training.get("epochs") is not None and "max_steps" in training:
        from fasttune.train.run_dir import RunFolder

        if not (Path(file.path).name == "config.json" and RunFolder(Path(file.path).parent).is_run):
            raise ConfigError(f"{file.path}: training.max_steps and training.epochs both set the run's length; keep "
                              "one of them")  # fmt: skip
    return "max_steps" if steps else "epochs" if epochs else None


def _last_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` / `flag=VALUE` in `args` ("" when it has none), None when absent."""
    value = None
    for i, a in enumerate(args):
        if a == flag or a.startswith(flag + "="):
            value = a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
    return value


def _resumed_config(args: Sequence[str], name: str | None, file=None) -> str | None:
    """--resume: the run's own config.json, so that the options neither typed again nor set in a --config `file` are
    the run's (the preset's would differ from any that the run changed, and resume refuses a change); None when there
    is no run. The run folder: --output-dir, else the file's output_dir, else the preset's."""
    from fasttune.train.run_dir import RunFolder

    run_dir = _last_value(args, "--output-dir") or _last_value(args, "--output_dir")
    if not run_dir and file is not None:
        run_dir = file.values.get("output_dir")
    if not run_dir:
        run_dir = get_experiment((file.experiment if file else None) or name or "quick").output_dir
    folder = RunFolder(Path(run_dir))
    if not (folder.is_run and folder.config.is_file()):
        return None
    try:
        json.loads(folder.config.read_text())
    except (OSError, ValueError):  # garbled or unreadable: resume says so, with a way on (RunFolder.saved_config)
        return None
    return str(folder.config)


def check_resume_of_file(cfg: BaseConfig, path: str, from_file: Sequence[str]) -> None:
    """--resume --config FILE: what the file sets is held to the run's config.json like the same flags, and a
    refusal names the file (training checks it again, for the command line's own options)."""
    from fasttune.train.run_dir import RunFolder

    folder = RunFolder(cfg.run_dir)
    if folder.is_run and folder.config.is_file():
        folder.check_resume(cfg, origin={key: path for key in from_file})


def unnamed_preset_error(typed: Sequence[str], file=None) -> str | None:
    """The error for a --model to fine-tune with no preset named (no --experiment, no `experiment:` in the --config
    file): the default, quick, would train it at a from-scratch learning rate (3e-3, 150x sft's) on 256-token
    samples, unsaid. None when a preset is named or no --model given."""
    if file is not None and file.experiment is not None:
        return None
    preset = get_experiment("quick")
    how = (f"--experiment sft (every weight) or --experiment lora (adapters); --experiment quick keeps the quick "
           f"preset (lr {preset.training.lr:g}, data.max_length {preset.data.max_length}, made to train a tiny model "
           "from scratch)")  # fmt: skip
    model = file.values.get("model") if file is not None else None
    if isinstance(model, dict) and "path" in model:
        return (
            f"{file.path} sets model.path but names no experiment: add `experiment: sft` (or lora) to it, or pass {how}"
        )
    if any(f in typed for f in ("--model", "--model.path")):
        return f"--model without --experiment: to fine-tune it, pass {how}"
    return None


def require_inputs(cfg: BaseConfig) -> None:
    """Fine-tuning presets need the user's model and data: never fall back to a random model or the stdlib corpus."""
    if cfg.experiment not in ("sft", "lora"):
        return
    inputs = (
        ("--model PATH", "a Hugging Face model folder or a fasttune run", cfg.model.path),
        ("--data FILE", "a .jsonl/.json/.csv/.parquet file or folder", cfg.data.path),
    )
    missing = [f"{flag} ({what})" for flag, what, value in inputs if not value]
    if missing:
        raise ConfigError(
            f"--experiment {cfg.experiment} fine-tunes your model on your data: pass {' and '.join(missing)}. To "
            "train a small model from scratch on the embedded corpus, use --experiment quick"
        )


def model_config(cfg: BaseConfig):
    """The config of --model, or None when it cannot be read here (training then reports the problem with the model
    folder itself)."""
    from fasttune.model.resolve import resolve_for_training

    try:
        from transformers import AutoConfig

        path = resolve_for_training(cfg.model.path, say=False)  # training says it once
        from fasttune.model.text_part import text_config

        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        return text_config(config) or config  # a vision-language checkpoint: its language model's
    except Exception:  # noqa: BLE001 - only a hint here; loading the model names the real problem
        return None


def fit_max_length(cfg: BaseConfig, explicit: bool, say: bool = True, file: str | None = None,
                   run: str | None = None) -> BaseConfig:  # fmt: skip
    """data.max_length within the model's context (RoPE scaling counted: model/context.py): a preset's default
    shrinks to the context (logged when `say`); a value the user gave that exceeds it is an error (naming the
    --config `file` that set it, if one did), and so is a resumed run's, recorded in its config.json `run`: the run
    trained with it, a model of less context is the mistake."""
    from fasttune.model.context import context_length, describe_context, too_long, too_long_for_run

    conf = model_config(cfg) if cfg.model.path is not None else None
    context = context_length(conf) if conf is not None else None
    if context is None or cfg.data.max_length <= context:
        return cfg
    own = _runs_max_length(run) if run is not None else None
    if own is not None and own != cfg.data.max_length:  # typed (or set in --config FILE) anew: resume refuses it
        option = f"{file}: data.max_length" if file else "--data.max-length"
        fix = f"drop it from {file}" if file else f"drop {option}"
        fix += "" if own <= context else f" and give a model of {own} positions or more"
        raise ConfigError(f"--resume: {option} {cfg.data.max_length} exceeds the context of {cfg.model.path} "
                          f"({describe_context(conf)}), and a resumed run keeps the data.max_length it trained with, "
                          f"{own} (in {run}); {fix}, or start a new run with another --output-dir")  # fmt: skip
    if run is not None:
        raise ConfigError(too_long_for_run(conf, cfg.data.max_length, cfg.model.path, run))
    if explicit:
        raise ConfigError(too_long(conf, cfg.data.max_length, cfg.model.path, file=file))
    if say:
        log.info("data.max_length: %d, the context of %s (the %s preset's default is %d)", context, cfg.model.path,
                 cfg.experiment, cfg.data.max_length)  # fmt: skip
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=context))


def _run_config(cfg: BaseConfig) -> str | None:
    """--resume: the run's config.json when it records data.max_length, else None (the run's checks say what is
    missing or unreadable)."""
    from fasttune.train.run_dir import RunFolder

    folder = RunFolder(cfg.run_dir)
    run = str(folder.config) if folder.is_run and folder.config.is_file() else None
    return run if run and _runs_max_length(run) is not None else None


def _runs_max_length(run: str) -> int | None:
    """The data.max_length recorded in the run's config.json `run`; None when it cannot be read (resume says why)."""
    try:
        value = json.loads(Path(run).read_text()).get("data", {}).get("max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
