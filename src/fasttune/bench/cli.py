"""`fasttune bench attention|train|generate`: the options of each benchmark, and the run that builds it, runs it and
writes CSV/JSON/Markdown/PNG (generate's run lives in fasttune.bench.generate). Torch is imported by the runs only."""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Annotated, Literal

import tyro

from fasttune.command import Command
from fasttune.errors import ConfigError

log = logging.getLogger("fasttune")


def _ints(option: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: write comma-separated whole numbers, e.g. 512,1024") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{option} {text!r}: write comma-separated numbers > 0, e.g. 512,1024")
    return values


def _strs(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _trained_share(trained: list[list[bool]] | None) -> float:
    """The share of the workload's tokens that have a label (1 for the synthetic mix: every token is trained)."""
    if trained is None:
        return 1.0
    return sum(map(sum, trained)) / max(1, sum(map(len, trained)))


def _positive(args: Command, names: tuple[str, ...], least: float = 1) -> None:
    """Options left out take their defaults; one given must be at least `least` (0 is not "the default")."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value}: must be >= {least} (leave it out for the default)")


def command_line(args: Command, name: str) -> list[str]:
    """The command line that reproduces `args` (the options that differ from their defaults), for the results."""
    out = [name]
    hints = typing.get_type_hints(type(args), include_extras=True)
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.name in ("debug", "given") or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(value, tuple) and tyro.conf.UseAppendAction not in getattr(hints[f.name], "__metadata__", ()):
            out += [flag, *map(str, value)]  # --data a b: the values after one flag
        else:
            out += [x for v in (value if isinstance(value, tuple) else (value,)) for x in (flag, str(v))]
    return out


def _finish(results, out: Path, md_columns, plot, extra: list[str]) -> int:
    results.notes += extra
    paths = results.write(out, md_columns, lambda p: plot(results, p))
    print(results.markdown(md_columns))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


@dataclasses.dataclass
class AttentionBench(Command):
    """Time every attention backend on this machine: forward and forward+backward time, TFLOP/s and the error
    against an fp32 reference, on padded and packed batches. Writes attention.csv/.json/.md/.png to --out."""

    backends: str | None = None
    """Comma-separated backends (default: all; the unusable ones are reported with the reason)."""
    seq_lens: str | None = None
    """Comma-separated row lengths in tokens (default 512,...,16384 on a GPU, 16,32 on a CPU)."""
    head_dims: str = "64,128"
    """Comma-separated head dimensions."""
    layouts: str = "padded,packed"
    """Comma-separated batch layouts: padded, packed, padded-left (left padding: times the unpadding path)."""
    tokens: int | None = None
    """Tokens per batch (default 16384 on a GPU, 64 on a CPU)."""
    heads: int | None = None
    """Query heads = key/value heads (default 16 on a GPU, 2 on a CPU)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    out: Path = Path("bench-results")
    """Folder for the results."""
    overwrite: bool = False
    """Replace the results of an earlier run in --out (without it, such a folder stops the run before it starts)."""

    def run(self) -> int:
        import torch
        from tqdm.auto import tqdm

        from fasttune.attention import BACKENDS
        from fasttune.bench import attention as bench
        from fasttune.bench.harness import Results, check_out, environment
        from fasttune.model.load import inference_device
        from fasttune.streams import printed_above

        backends = _strs(self.backends) if self.backends else list(BACKENDS)
        layouts = _strs(self.layouts)
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"--backends {unknown[0]!r} is not valid; choose from: {', '.join(BACKENDS)}")
        if bad := [x for x in layouts if x not in bench.ALL_LAYOUTS] or ([] if layouts else [self.layouts]):
            raise ConfigError(f"--layouts {bad[0]!r} is not valid; choose from: {', '.join(bench.ALL_LAYOUTS)}")
        head_dims = _ints("--head-dims", self.head_dims)
        _positive(self, ("tokens", "heads"))
        device = inference_device(self.device)  # one line when not valid or not here
        gpu = device.type == "cuda"
        dtype = torch.bfloat16 if gpu else torch.float32
        seq_lens = _ints("--seq-lens", self.seq_lens) or (list(bench.SEQ_LENS) if gpu else [16, 32])
        check_out(self.out, "attention", self.overwrite)  # last: --overwrite removes the earlier run's files
        results = Results("attention", environment(device, command_line(self, "attention")))
        total = len(layouts) * len(head_dims) * len(seq_lens)
        with tqdm(total=total, desc="attention shapes", dynamic_ncols=True) as bar, printed_above(bar):
            bench.run(device, dtype, backends=backends, seq_lens=seq_lens, head_dims=head_dims, layouts=layouts,
                      tokens=self.tokens or (16384 if gpu else 64), n_heads=self.heads or (16 if gpu else 2),
                      results=results, progress=bar,
                      after_shape=lambda: results.write(self.out, bench.MD_COLUMNS, None))  # fmt: skip
        return _finish(results, self.out, bench.MD_COLUMNS, bench.plot, bench.summary_lines(results))


def _variant(text: str) -> tuple[str, list[str]]:
    """NAME:section.field=value[,...] -> (NAME, assignments); a list value is written section.field=[a,b]."""
    from fasttune.config.argcheck import split_assignments

    name, _, rest = text.partition(":")
    if not name.strip() or not rest:
        raise ConfigError(f"--variant {text!r}: write NAME:section.field=value[,section.field=value]")
    try:
        assignments = split_assignments(rest)
    except ConfigError as e:
        raise ConfigError(f"--variant {name!r}: {e}") from None
    _refuse_repeated(name, assignments)
    return name, assignments


def _refuse_repeated(name: str, assignments: list[str]) -> None:
    """An option set twice in one variant (its spellings one option, as on the command line: `a_b` and `a-b`, a
    switch's `no-`): refused, as `fasttune train` refuses one typed twice, where tyro would keep the last."""
    from fasttune.config.argcheck import options

    keys = {flag: key for key, _, flags in options() for flag in flags}
    seen: dict[str, tuple[str, str]] = {}
    for assignment in assignments:
        path, _, value = (part.strip() for part in assignment.partition("="))
        key = keys.get("--" + path.replace("_", "-"), path)
        if key in seen:
            first = seen[key]
            shown = f"{first[1]}, then {value}" if first[0] == path else f"{'='.join(first)}, then {path}={value}"
            raise ConfigError(f"--variant {name!r}: {key} is given twice ({shown}): keep one")
        seen[key] = (path, value)


BENCH_KEYS = {"data.max_length": ("--max-length",), "data.micro_batch_size": ("--micro-batch",),
              "training.device": ("--device",), "model.preset": ("--preset",), "lora.enabled": ("--lora",),
              "seed": ("--seed",)}  # fmt: skip
"""The keys of every row's training config that an option of bench train sets (bench/train.py fasttune_config)."""


@dataclasses.dataclass
class TrainBench(Command):
    """Measure end-to-end training on this machine (tokens/s, samples/s, MFU, peak memory) for fasttune's loop
    against plain Hugging Face baselines, on one synthetic SFT length mix or a dataset's lengths. Writes
    train.csv/.json/.md/.png to --out."""

    preset: str | None = None
    """Model shape, randomly initialised (default 1b on a GPU, micro on a CPU)."""
    experiment: str = "full"
    """fasttune experiment the runs derive from."""
    attn: str | None = None
    """Comma-separated fasttune attention backends (default: all and auto on a GPU, auto on a CPU)."""
    packing: str = "on,off"
    """Comma-separated: on, off."""
    samples: int | None = None
    """Samples in the length mix (default 64 on a GPU, 16 on a CPU)."""
    median: float | None = None
    """Median sample length of the lognormal mix (default 400 on a GPU, 48 on a CPU)."""
    mean: float | None = None
    """Mean sample length of the lognormal mix (default 566 on a GPU, 68 on a CPU)."""
    min_length: int | None = None
    """Shortest sample (default 32 on a GPU, 8 on a CPU)."""
    max_length: int | None = None
    """Longest sample and packed row length (default 2048 on a GPU, 256 on a CPU)."""
    data: Annotated[tuple[str, ...] | None, tyro.conf.arg(metavar="PATH [PATH ...]")] = None
    """Use the token lengths and label masks (prompts untrained, as `fasttune train --data` trains) of this dataset
    (one path or several, as --data takes them) instead of the lognormal mix, every token trained."""
    model: str | None = None
    """Tokenizer folder for --data (default: fasttune's own BPE)."""
    micro_batch: int | None = None
    """Samples per step when padded; token budget factor when packed (default: the experiment's, 4 for full: 8k-token
    packs at --max-length 2048; and 8 samples per Hugging Face step)."""
    vocab: int | None = None
    """Vocabulary size (default 32000 on a GPU, 512 on a CPU)."""
    warmup_epochs: int = 1
    """Epochs of the sample set run first and not measured."""
    epochs: int = 3
    """Epochs measured."""
    rounds: int = 1
    """Run the whole list of configurations this many times in turn; each row reports the median of its rounds and
    their spread (a host that drifts between rows shows there)."""
    baselines: bool = True
    """Also run the plain Hugging Face baselines (--no-baselines skips them)."""
    hf_micro_batch: int | None = None
    """Samples per Hugging Face baseline step (default: --micro-batch, else 8)."""
    hf_ckpt: bool = False
    """Also run each packed Hugging Face baseline with gradient checkpointing."""
    hf_only: str | None = None
    """Comma-separated: run only the Hugging Face baselines whose names contain one of these."""
    equal_tokens: bool = True
    """Also run fasttune at the Hugging Face baselines' tokens per step (memory and speed at equal work per step,
    beside each stack at its best; --no-equal-tokens skips it)."""
    lora: bool = False
    """Every configuration trains LoRA adapters (r 16, alpha 32, all linear layers of the decoder) on a frozen base:
    fasttune's --lora.* against the Hugging Face baselines wrapped with peft. Needs peft. On with --experiment lora
    (which refuses --no-lora)."""
    variant: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """An extra auto packed run with config changes, NAME:section.field=value[,...] (a list value in brackets:
    lora.targets=[q_proj,v_proj]); repeat for more."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    seed: int = 0
    """Seed of the length mix and the models."""
    out: Path = Path("bench-results")
    """Folder for the results."""
    overwrite: bool = False
    """Replace the results of an earlier run in --out (without it, such a folder stops the run before it starts)."""
    given: Annotated[tuple[str, ...], tyro.conf.Suppress] = ()
    """The options the user typed (not a command-line option): --no-lora is refused with a LoRA preset."""

    @classmethod
    def default_for(cls, args: list[str]) -> TrainBench:
        return cls(given=tuple(a.partition("=")[0].replace("_", "-") for a in args if a.startswith("--")))

    @classmethod
    def option_names(cls, args, parsed=None):
        """The options of the rows' training config that bench train's own set, named as typed (config/naming.py);
        a --variant's keys are named with the variant (_check_variants)."""
        from fasttune.config.naming import OptionNames

        return OptionNames(args, BENCH_KEYS)

    def run(self) -> int:
        from tqdm.auto import tqdm

        from fasttune.bench import train as bench
        from fasttune.bench import train_verdict as verdict
        from fasttune.bench.harness import Results, check_out, environment
        from fasttune.bench.workload import LengthStats
        from fasttune.model.load import inference_device
        from fasttune.streams import printed_above

        variants = [_variant(v) for v in self.variant]
        self._check_lora()
        self._check()
        device = inference_device(self.device)  # one line when not valid or not here
        cfg = self._bench_config(device, variants)
        results = Results("train", environment(device, command_line(self, "train")))
        results.notes.append(
            f"- workload: {LengthStats.of(cfg.lengths).describe()}; preset {cfg.preset}, vocab {cfg.vocab}; "
            f"{_trained_share(cfg.trained):.0%} of the tokens have a label"
        )
        runs = _plan(cfg, self.device)
        check_out(self.out, "train", self.overwrite)
        if device.type != "cuda":  # once the options are checked, before the first row: its closing lines repeat it
            log.warning(verdict.CPU_SMOKE_TEST)
        bar = tqdm(total=len(runs) * self.rounds, desc="configurations", dynamic_ncols=True)
        with bar, printed_above(bar):  # a row's warning (out of memory, a failed run) goes above the bar
            bench.run_all(cfg, results, progress=bar, after_row=lambda: results.write(self.out, bench.MD_COLUMNS, None))
        return _finish(results, self.out, bench.MD_COLUMNS, bench.plot, verdict.verdict_lines(cfg, results.rows))

    def _bench_config(self, device, variants: list[tuple[str, list[str]]]):
        """The benchmark's settings: the options given, else their defaults on `device` (a GPU or a CPU)."""
        from fasttune.bench import train as bench
        from fasttune.config import get_experiment

        gpu = device.type == "cuda"
        max_length = self.max_length or (2048 if gpu else 256)
        lengths, trained = self._lengths(gpu, max_length)
        default_attn = ["auto", "eager", "sdpa", "flex_attention", "varlen", "flash_attention_4"] if gpu else ["auto"]
        return bench.TrainBench(
            device=device,
            lengths=lengths,
            preset=self.preset or ("1b" if gpu else "micro"),
            experiment=self.experiment,
            attns=_strs(self.attn) if self.attn else default_attn,
            packings=[x.lower() == "on" for x in _strs(self.packing)],
            max_length=max_length,
            micro_batch=self.micro_batch or get_experiment(self.experiment).data.micro_batch_size,
            vocab=self.vocab or (32000 if gpu else 512),
            warmup_epochs=self.warmup_epochs,
            epochs=self.epochs,
            rounds=self.rounds,
            baselines=self.baselines,
            variants=variants,
            seed=self.seed,
            hf_micro_batch=self.hf_micro_batch or self.micro_batch or 8,  # 8: ~4.3k tokens at the default mix
            hf_ckpt=self.hf_ckpt,
            hf_only=_strs(self.hf_only or ""),
            equal_tokens=self.equal_tokens,
            lora=self.lora,
            trained=trained,
        )

    def _lengths(self, gpu: bool, max_length: int) -> tuple[list[int], list[list[bool]] | None]:
        """(sample lengths, label masks or None: every token trained): --data's, else the lognormal mix's."""
        from fasttune.bench.workload import dataset_workload, sft_lengths

        if self.data:
            return dataset_workload(self.data, self.model, max_length, self.samples or 0)
        median, mean = self.median or (400 if gpu else 48), self.mean or (566 if gpu else 68)
        min_length = self.min_length or (32 if gpu else 8)
        _check_mix(median, mean, min_length, max_length)
        return sft_lengths(self.samples or (64 if gpu else 16), median, mean, min_length, max_length, self.seed), None

    def _check_lora(self) -> None:
        """A LoRA preset trains the same adapters on every row (--lora, implied); --no-lora contradicts it. LoRA needs
        peft: the refusal names what asked for LoRA, the preset or --lora."""
        from fasttune.attention.probe import import_status
        from fasttune.config import get_experiment

        preset = get_experiment(self.experiment).lora.enabled
        switches = [f for f in self.given if f in ("--lora", "--no-lora")]
        if preset and switches[-1:] == ["--no-lora"]:  # the last one typed counts, as tyro reads them
            raise ConfigError(f"--no-lora: --experiment {self.experiment} benchmarks LoRA (every row trains adapters); "
                              "drop --no-lora, or benchmark full fine-tuning with --experiment sft")  # fmt: skip
        self.lora = self.lora or preset
        asked = "--lora" if "--lora" in self.given or not preset else f"--experiment {self.experiment} (LoRA)"
        if self.lora and (why := import_status("peft")) is not None:
            raise ConfigError(f"{asked} needs the peft package ({why}): pip install 'fasttune[lora]'")

    def _check(self) -> None:
        """The options, before anything runs (each row would otherwise fail on its own, after the others ran)."""
        from fasttune.attention import BACKENDS
        from fasttune.config.base_config import MODEL_PRESETS

        _positive(
            self, ("samples", "micro_batch", "hf_micro_batch", "vocab", "min_length", "max_length", "epochs", "rounds")
        )
        _positive(self, ("warmup_epochs",), least=0)
        _positive(self, ("median", "mean"), least=1.0)
        packings = _strs(self.packing)
        if not packings or any(x.lower() not in ("on", "off") for x in packings):
            raise ConfigError(f"--packing {self.packing!r} is not valid; write on, off or on,off")
        if self.preset is not None and self.preset not in MODEL_PRESETS:
            raise ConfigError(f"--preset {self.preset!r} is not valid; choose one of: {', '.join(MODEL_PRESETS)}")
        if self.attn is not None and not _strs(self.attn):
            raise ConfigError(f"--attn {self.attn!r} names no backend; choose from: auto, {', '.join(BACKENDS)}")
        if bad := [a for a in _strs(self.attn or "") if a not in ("auto", *BACKENDS)]:
            raise ConfigError(f"--attn {bad[0]!r} is not valid; choose from: auto, {', '.join(BACKENDS)}")
        if self.data and (mix := [n for n in ("median", "mean", "min_length") if getattr(self, n) is not None]):
            flag = "--" + mix[0].replace("_", "-")
            raise ConfigError(f"{flag} shapes the synthetic length mix, which --data replaces with the dataset's own "
                              f"lengths: leave {flag} out, or --data")  # fmt: skip
        if not self.baselines and (hf := [n for n in ("hf_only", "hf_micro_batch", "hf_ckpt") if getattr(self, n)]):
            flag = "--" + hf[0].replace("_", "-")
            raise ConfigError(f"{flag} sets the Hugging Face baselines, which --no-baselines skips; leave one out")
        if self.model and not self.data:
            raise ConfigError("--model is the tokenizer for --data's texts; without --data it has nothing to do")


@dataclasses.dataclass
class GenerateBench(Command):
    """Measure generation speed on this machine: Hugging Face `generate` against fasttune's generator on the same
    briefly trained model, with a check that both choose the same greedy tokens. Writes generate.csv/.json/.md/.png
    to --out."""

    shape: str | None = None
    """Model preset (default: 1b on a GPU, tiny on a CPU)."""
    batch_sizes: str = "1,32"
    """Comma-separated batch sizes."""
    prompt_len: int = 128
    """Longest prompt, in tokens."""
    new_tokens: int = 256
    """Tokens generated per sequence."""
    train_steps: int | None = None
    """Training steps before measuring, so greedy choices have real margins (default: 200 on a GPU, 30 on a CPU)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    """Weights dtype (default: bf16 on a GPU, fp32 on a CPU)."""
    eager: bool = False
    """Also time the fused decoder without CUDA graphs at every batch size."""
    check_fp32: bool = True
    """On a GPU, repeat the batch-1 agreement check with float32 weights (--no-check-fp32 skips it)."""
    profile: bool = False
    """Kernels per decode step (profile.json in --out)."""
    out: Path | None = None
    """Folder for generate.csv/.json/.md/.png."""
    overwrite: bool = False
    """Replace the results of an earlier run in --out (without it, such a folder stops the run before it starts)."""
    sdpa: Literal["default", "flash", "efficient", "cudnn", "math"] = "default"
    """Pin SDPA's kernel for every run."""
    verbose: bool = False
    """Debug logging of fasttune (e.g. CUDA graph capture failures)."""

    def run(self) -> int:
        from fasttune.bench.generate import run_bench

        return run_bench(self)


def _check_mix(median: float, mean: float, min_length: int, max_length: int) -> None:
    """The lognormal mix's settings (given or defaulted) agree with each other."""
    if median > mean:
        raise ConfigError(f"--median {median:g} is above --mean {mean:g}: a lognormal mix's mean is at least its "
                          "median; raise --mean or lower --median")  # fmt: skip
    if min_length > max_length:
        raise ConfigError(f"--min-length {min_length} is above --max-length {max_length}: every sample would be "
                          f"{max_length} tokens; lower --min-length or raise --max-length")  # fmt: skip


def _plan(cfg, device: str) -> list[dict]:
    """The rows to measure, each checked before a model is built (`device`: --device as typed)."""
    from fasttune.bench import train as bench
    from fasttune.bench.fit import check_train

    runs, notes = bench.plan_runs(cfg)
    if not runs:
        why = "; ".join(n.removeprefix("- ") for n in notes) or "no configuration given"
        raise ConfigError(f"nothing to measure here ({why}): name an --attn that runs here, or drop --no-baselines")
    _check_variants(cfg, runs, device)
    check_train(cfg, runs)  # one line, before a model is built, where a row cannot fit this machine
    return runs


def _check_variants(cfg, runs: list[dict], device: str) -> None:
    """Every --variant's settings parsed and validated now, naming the variant, rather than at its row (the offload
    plan on a CPU too: a row's training would refuse it, after the rows before it ran; `device`: --device as typed,
    which the rows' training.device resolves)."""
    import tempfile

    from fasttune.bench.train import fasttune_config
    from fasttune.train.device import refuse_offload_on_cpu

    names, variants = [spec["name"] for spec in runs], {name for name, _ in cfg.variants}
    for spec in runs:
        if spec.get("overrides") is not None and names.count(spec["name"]) > 1:
            raise ConfigError(f"--variant {spec['name']!r}: another row has that name; give each variant its own")
    with tempfile.TemporaryDirectory(prefix="fasttune-bench-check-") as tmp:
        for spec in runs:
            if spec.get("overrides") is None:
                continue
            try:
                row, _ = fasttune_config(cfg, spec["attn"], spec["packing"], spec["overrides"], Path(tmp) / "run")
                own = any(o.startswith("training.device=") for o in spec["overrides"])  # the variant's device
                why = None if own else "--device cpu" if device == "cpu" else \
                    f"--device {device}: no CUDA GPU is visible to torch"  # fmt: skip
                fix = "model.memory=full in that variant"  # as `fasttune train` refuses it, in a variant's spelling
                refuse_offload_on_cpu(row.model.memory, row.training.device, why, fix=fix)
            except ConfigError as e:
                if spec["name"] not in variants:  # a row of bench train's own (--equal-tokens): its options' error
                    raise
                raise ConfigError(f"--variant {spec['name']!r}: {e}") from None


def main(argv: list[str]) -> int:
    """`fasttune bench ARGV` (for scripts that called this module's main before the one parser)."""
    from fasttune.cli import main as cli_main

    return cli_main(["bench", *argv])
