"""`fasttune bench train`: end-to-end training throughput of fasttune's real loop against plain HF baselines.

Every fasttune number comes from `fasttune.train.loop.train(cfg, data=DataBundle(...))`, read from the run's own
metrics records (per-step real tokens, samples, MFU, peak memory; warm-up steps skipped); the optimizer step is
part of every step on both sides. Warm-up and measurement are whole epochs of the sample set, so every
configuration sees every sample equally often whatever its micro-batch plan. Ratios are taken within one run.

`lora`: every row trains the same LoRA adapters (baselines.LORA): fasttune's through its `lora.*` options (the
override mechanism of variants, so variants apply on top), HF's through peft on the plain baselines.

The rows' ratios and the verdict on the targets are in fasttune.bench.train_verdict.
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttune.bench import baselines as hf
from fasttune.bench.harness import Results, line_plot, reset_peak_memory
from fasttune.bench.train_verdict import add_ratios, main_name
from fasttune.bench.workload import synthetic_bundle
from fasttune.config import get_experiment
from fasttune.config.argcheck import assignments_to_args, parse_overrides
from fasttune.config.base_config import refuse_unused_lora
from fasttune.data.packing import Batcher
from fasttune.errors import ConfigError, one_line
from fasttune.model import liger
from fasttune.train.cli import EPOCHS_FLAGS, STEPS_FLAGS
from fasttune.train.metrics import peak_flops, peak_memory_gib

LLAMA = "transformers.models.llama.modeling_llama"  # the presets' architecture

log = logging.getLogger("fasttune")


@dataclass
class TrainBench:
    device: torch.device
    lengths: list[int]
    preset: str = "1b"
    experiment: str = "full"
    attns: list[str] = field(default_factory=lambda: ["auto", "sdpa"])
    packings: list[bool] = field(default_factory=lambda: [True, False])
    max_length: int = 2048
    micro_batch: int = 8
    vocab: int = 32000
    warmup_epochs: int = 1
    epochs: int = 3
    baselines: bool = True
    variants: list[tuple[str, list[str]]] = field(default_factory=list)
    """Extra fasttune runs (name, ["section.field=value", ...]) on top of attn auto, packing on."""
    seed: int = 0
    hf_micro_batch: int | None = None
    """Samples per HF step (default micro_batch)."""
    hf_ckpt: bool = False
    """Also run every packed HF baseline with gradient checkpointing (what fits at 8B)."""
    hf_only: list[str] = field(default_factory=list)
    """Run only the HF baselines whose names contain one of these (empty: all)."""
    equal_tokens: bool = False
    """Also run fasttune auto packed at the HF baselines' tokens per step (the packing budget nearest to them)."""
    lora: bool = False
    """Every configuration trains LoRA adapters (baselines.LORA) on a frozen base instead of all weights."""
    trained: list[list[bool]] | None = None
    """Which tokens of each sample have a label (a dataset's prompt masks); None: every token."""
    rounds: int = 1
    """Every configuration runs this many times, the rounds one after the other (HF, fasttune, HF, fasttune, ...):
    a row's rates are the medians of its rounds, and the memory target's ratio is also given round by round (rows
    measured minutes apart on a drifting host compare better within a round)."""


def lora_overrides(bench: TrainBench) -> list[str]:
    """fasttune's side of --lora, as overrides ahead of a variant's own: the settings of the HF + peft rows."""
    if not bench.lora:
        return []
    c = hf.LORA  # its targets (a list) are set on the config directly (fasttune_config)
    return ["lora.enabled=true", f"lora.rank={c.rank}", f"lora.alpha={c.alpha}", f"lora.dropout={c.dropout}"]


def fasttune_config(bench: TrainBench, attn: str, packing: bool, overrides: list[str], run_dir: Path):
    """(config, warm-up steps): the experiment preset with the benchmark's shape, data layout and step count."""
    cfg = get_experiment(bench.experiment)
    cfg.attn_implementation, cfg.seed = attn, bench.seed
    cfg.output_dir, cfg.overwrite, cfg.force = str(run_dir), True, True
    cfg.model.preset, cfg.model.path = bench.preset, None
    cfg.data.packing, cfg.data.max_length, cfg.data.micro_batch_size = packing, bench.max_length, bench.micro_batch
    t = cfg.training
    t.device, t.log_every, t.eval_every, t.save_every, t.tensorboard = str(bench.device), 1, 0, 0, False
    if bench.lora:
        cfg.lora.targets = hf.LORA.targets
    overrides = lora_overrides(bench) + list(overrides)
    for key in (a.partition("=")[0].strip() for a in overrides):
        if "--" + key.replace("_", "-") in (*STEPS_FLAGS, *EPOCHS_FLAGS):
            raise ConfigError(f"{key}: every row's length is the benchmark's (--warmup-epochs + --epochs passes over "
                              "its samples); drop it from the variant and set bench train's --epochs")  # fmt: skip
    args = assignments_to_args(overrides)
    cfg = parse_overrides(cfg, args, prog="fasttune train")  # a variant's options are its
    refuse_unused_lora(cfg)  # a LoRA setting measured as a full fine-tune
    t = cfg.training
    plan = Batcher.from_config(cfg.data, bench.seed).plan(bench.lengths, epoch=0)
    per_epoch = -(-len(plan) // t.grad_accum)
    warm = bench.warmup_epochs * per_epoch
    t.max_steps = warm + bench.epochs * per_epoch
    # the schedule does not change a step's time; a warm-up as long as the run would only warn that it is
    t.warmup_steps = min(t.warmup_steps, max(1, t.max_steps // 10))
    t.save_final = False  # a 1B checkpoint is ~7 GB of writes outside the timed steps
    return cfg.validate(), warm


def run_fasttune(bench: TrainBench, attn: str, packing: bool, overrides: list[str], data, root: Path) -> dict:
    from fasttune.train.loop import train

    name = f"{attn}-{'packed' if packing else 'padded'}-{len(list(root.iterdir()))}"
    cfg, warm = fasttune_config(bench, attn, packing, overrides, root / name)
    with _PlanLog() as plans, liger.globals_restored(LLAMA):  # quiet: the table is bench's output, not each run's
        result = train(cfg, data=data, report=False)
    return {**from_records(result.records, warm, peak_flops(bench.device)), **plans.found,
            "grad_accum": cfg.training.grad_accum}  # fmt: skip


class _PlanLog(logging.Handler):
    """Keeps the memory plan the run logged (train/memory.plan_memory) and its predicted peak, and with LoRA the
    trainable parameter count (model/lora.apply_lora: what the optimizer holds), for the table. While it reads, the
    run's info lines (its data, model and step lines) stop here and only its warnings reach the command's output:
    one progress line per configuration, then the table, not a screenful of each run's own report (--debug: all)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.found: dict = {}
        self._propagate = True  # log.propagate before __enter__

    def __enter__(self) -> _PlanLog:
        self._propagate = log.propagate
        log.propagate = self._propagate and log.getEffectiveLevel() <= logging.DEBUG
        log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        log.removeHandler(self)
        log.propagate = self._propagate

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING and self._propagate and not log.propagate and log.parent is not None:
            log.parent.handle(record)  # where it would have gone
        if not isinstance(record.msg, str) or not record.args:
            return
        if record.msg.startswith("memory plan:"):
            self.found.update(plan=record.args[0], predicted=record.args[3].split(" GiB")[0])
        elif record.msg.startswith("trainable parameters:"):
            self.found["trained_params"] = int(record.args[0].replace(",", ""))


class _WarnedOnce(logging.Filter):
    """A warning every configuration's run gives alike (no Liger on a CPU) said once, not once per row."""

    def __init__(self):
        super().__init__()
        self.said: set[str] = set()

    def __enter__(self) -> _WarnedOnce:
        log.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        log.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.said:
            return False
        self.said.add(message)
        return True


def from_records(records: list[dict], warm: int, peak: float | None) -> dict:
    """Aggregate the loop's own per-step records (time, tokens, samples, FLOPs) after the warm-up."""
    measured = [r for r in records if r.get("step", 0) > warm and r.get("step_s")]
    per_step = [(r["step_s"], r["tokens"], r["samples"], r["flops"]) for r in measured]
    out = hf.aggregate(per_step, peak)
    losses = [r["loss"] for r in measured if r.get("loss") is not None]
    out["loss"] = sum(losses) / len(losses) if losses else None  # same data and seed: memory plans compare on it
    mems = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    out["peak_gib"] = max(mems) if mems else None
    return out


def plan_runs(bench: TrainBench) -> tuple[list[dict], list[str]]:
    """Every configuration to run, in order: HF baselines first, then fasttune's."""
    from fasttune.attention import available

    runs, notes = [], []
    if bench.baselines:
        found, notes = hf.baselines(bench.device, ckpt=bench.hf_ckpt, lora=bench.lora)
        _check_hf_only(bench.hf_only, found, notes)
        found = [b for b in found if not bench.hf_only or any(k in b.name for k in bench.hf_only)]
        runs += [{"stack": "HF", "baseline": b, "name": b.name} for b in found]
    why = available(bench.device, head_dim=128)
    stack = main_name(bench).removesuffix(" auto packed")
    for attn in bench.attns:
        if attn != "auto" and why.get(attn):
            notes.append(f"- fasttune {attn}: unavailable ({why[attn]})")
            continue
        for packing in bench.packings:
            if attn == "eager" and packing and bench.device.type == "cuda":
                notes.append("- fasttune eager packed: skipped (a T x T mask per layer over 8k-16k-token packs)")
                continue
            layout = "packed" if packing else "padded"
            runs.append({"stack": "fasttune", "attn": attn, "packing": packing, "name": f"{stack} {attn} {layout}"})
    for name, overrides in bench.variants:
        runs.append({"stack": "fasttune", "attn": "auto", "packing": True, "name": name, "overrides": overrides})
    if bench.equal_tokens and any(r["stack"] == "HF" for r in runs):  # HF's tokens per step: only beside HF rows
        mbs = max(1, round(hf_tokens_per_step(bench) / bench.max_length))
        name = f"{main_name(bench)} at HF's tokens per step ({mbs} x {bench.max_length})"
        runs.append({"stack": "fasttune", "attn": "auto", "packing": True, "name": name,
                     "overrides": [f"data.micro_batch_size={mbs}"]})  # fmt: skip
    return runs, notes


def _check_hf_only(keys: list[str], found: list[hf.Baseline], notes: list[str]) -> None:
    """Every --hf-only key must pick a baseline that runs here: one that picks none would leave the table without
    the baseline the user asked for, and every ratio against it silently missing."""
    for key in keys:
        if not any(key in b.name for b in found):
            why = "".join(f"; {n.removeprefix('- ')}" for n in notes)
            if "ckpt" in key and not any(b.ckpt for b in found):
                why += "; the '+ grad ckpt' baselines run with --hf-ckpt"
            names = ", ".join(repr(b.name) for b in found)
            raise ConfigError(f"--hf-only {key!r} matches none of the Hugging Face baselines that can run here "
                              f"({names}){why}; name one of them, or part of its name")  # fmt: skip


def hf_tokens_per_step(bench: TrainBench) -> float:
    """Mean tokens of an HF baseline step: hf_micro_batch samples of the workload."""
    return sum(bench.lengths) / len(bench.lengths) * (bench.hf_micro_batch or bench.micro_batch)


def run_all(bench: TrainBench, results: Results, progress=None, after_row=None) -> Results:
    """Every configuration of plan_runs, one row each (the median of its rounds); `after_row()` after each
    measurement, so the rows measured so far survive a run cut short (an 8B configuration takes ~20-40 s)."""
    data = synthetic_bundle(bench.lengths, bench.vocab, bench.seed, bench.trained)
    runs, notes = plan_runs(bench)
    results.notes += [precision_note(bench), *notes, *lora_notes(bench)]
    measured: list[list[dict]] = [[] for _ in runs]
    with tempfile.TemporaryDirectory(prefix="fasttune-bench-") as tmp, _WarnedOnce():
        for _ in range(bench.rounds):
            for spec, rounds in zip(runs, measured, strict=True):
                if progress is not None:
                    progress.set_description(spec["name"])
                reset_peak_memory(bench.device)
                rounds.append(_run_one(bench, spec, data, Path(tmp)))
                gc.collect()
                reset_peak_memory(bench.device)
                if progress is not None:
                    progress.update(1)
                results.rows = [merge_rounds(m) for m in measured if m]
                add_ratios(results.rows)
                if after_row is not None:
                    after_row()
    return results


def merge_rounds(rounds: list[dict]) -> dict:
    """One configuration's rounds -> its row: rates are the medians, the peak the highest; `round_tok_s` keeps each
    round's tokens/s and `rounds_pct` half their range (in % of the median). A failed round fails the row."""
    if len(rounds) == 1:
        return rounds[0]
    rates = [r.get("tokens_per_s") for r in rounds]
    if any(r.get("status") != "ok" for r in rounds):
        return {**next(r for r in rounds if r.get("status") != "ok"), "round_tok_s": rates}
    row = dict(rounds[0])
    for key in ("tokens_per_s", "samples_per_s", "mfu", "spread_pct", "loss"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["round_tok_s"] = rates
    row["rounds_pct"] = 50.0 * (max(rates) - min(rates)) / row["tokens_per_s"]
    peaks = [r["peak_gib"] for r in rounds if r.get("peak_gib") is not None]
    row["peak_gib"] = max(peaks) if peaks else None
    row["gib_per_1k"] = gib_per_1k(row)
    return row


def gib_per_1k(row: dict) -> float | None:
    """Peak GiB per 1k tokens held at once: per 1k tokens of one micro-batch (a step of `training.grad_accum` N runs
    N of them one after the other, and the peak is one micro-batch's activations, not the step's), so rows that
    accumulate compare with rows that do not."""
    if not row.get("peak_gib") or not row.get("tokens_per_step"):
        return None
    return row["peak_gib"] / (row["tokens_per_step"] / row.get("grad_accum", 1) / 1000)


def _run_one(bench: TrainBench, spec: dict, data, tmp: Path) -> dict:
    """One configuration -> one row; a failure (often OOM) is a row with its status, not a crash of the table."""
    row = {"config": spec["name"], "stack": spec["stack"]}
    try:
        if spec["stack"] == "HF":
            b = spec["baseline"]
            row.update(attn=b.attn, packing=b.packed, liger=b.liger, leak_err=hf.leak_error(b, bench.device))
            reset_peak_memory(bench.device)
            hf_mb = bench.hf_micro_batch or bench.micro_batch
            batcher = Batcher(packing=False, micro_batch_size=hf_mb, max_length=0, seed=bench.seed)
            per_epoch = len(batcher.plan(bench.lengths, epoch=0))
            with liger.globals_restored(LLAMA):
                row.update(
                    hf.run_baseline(
                        b, bench.preset, data, bench.device, micro_batch=hf_mb,
                        warmup_steps=bench.warmup_epochs * per_epoch, steps=bench.epochs * per_epoch, seed=bench.seed,
                        dtype=hf_dtype(bench),
                    )
                )  # fmt: skip
            row["peak_gib"] = peak_memory_gib(bench.device)
        else:
            overrides = spec.get("overrides", [])
            row.update(attn=spec["attn"], packing=spec["packing"], overrides=" ".join(overrides))
            row.update(run_fasttune(bench, spec["attn"], spec["packing"], overrides, data, tmp))
        row["status"] = "ok"
        row["gib_per_1k"] = gib_per_1k(row)
    except Exception as e:  # noqa: BLE001
        text = one_line(e, line=0)
        row["status"] = "OOM" if "out of memory" in text.lower() else f"error: {text[:160]}"
        log.warning("bench train %s: %s", spec["name"], row["status"])
    return row


def hf_dtype(bench: TrainBench) -> torch.dtype:
    """The baselines' dtype: pure bf16 on CUDA, and on a CPU when fasttune's experiment trains in pure bf16 (`full`),
    so that both sides compute alike; fp32 on a CPU otherwise."""
    pure_bf16 = get_experiment(bench.experiment).model.dtype == "bf16"
    return torch.bfloat16 if bench.device.type == "cuda" or pure_bf16 else torch.float32


def precision_note(bench: TrainBench) -> str:
    dtype = get_experiment(bench.experiment).model.dtype
    cuda = bench.device.type == "cuda"
    auto = "fp32 master weights + bf16 autocast (pure bf16 where that state would fill half the GPU)"
    ours = {"bf16": "pure bf16", "fp32": "fp32"}.get(dtype, auto if cuda else "fp32")
    hf_side = "bf16" if hf_dtype(bench) == torch.bfloat16 else "fp32"
    return (f"- precision: HF baselines pure {hf_side} (weights, gradients, AdamW state); fasttune rows: experiment "
            f"{bench.experiment}'s model.dtype {dtype}: {ours} (unless a variant changes it)")  # fmt: skip


def lora_notes(bench: TrainBench) -> list[str]:
    """How --lora rows train and how their MFU is counted."""
    if not bench.lora:
        return []
    c = hf.LORA
    return [
        f"- LoRA on every row: peft adapters r={c.rank}, alpha={c.alpha}, dropout {c.dropout} on "
        f"{', '.join(c.targets)} (lm_head, embeddings and norms frozen), frozen base in the benchmark's dtype (bf16 "
        "on CUDA), adapters in fp32 (peft's default) on both sides; HF + peft rows: `get_peft_model` on the plain "
        "baseline, AdamW over the trainable parameters only (trained params column); fasttune rows: --lora.* options.",
        "- MFU with LoRA: model FLOPs = the full forward + the input-gradient backward through the frozen base (2x "
        "forward for the weight matmuls instead of 3x: no base weight gradients; adapter FLOPs ignored; attention "
        "3x forward), the same count on both sides (src/fasttune/model/flops.py), so MFU ratios equal tokens/s "
        "ratios (whole epochs of the same documents). Full-training MFU and LoRA MFU are not comparable.",
    ]


MD_COLUMNS = (
    ("config", "configuration"),
    ("tokens_per_s", "real tok/s"),
    ("spread_pct", "± % (4 parts)"),
    ("rounds_pct", "± % (rounds)"),
    ("samples_per_s", "samples/s"),
    ("mfu", "MFU"),
    ("tokens_per_step", "tokens/step"),
    ("peak_gib", "peak GiB"),
    ("gib_per_1k", "peak GiB per 1k micro-batch tokens"),
    ("plan", "memory plan"),
    ("predicted", "predicted GiB"),
    ("loss", "mean loss"),
    ("trained_params", "trained params"),
    ("x_eager", "x eager"),
    ("x_hf_sdpa_padded", "x HF sdpa padded"),
    ("x_best_hf", "x best leak-free HF"),
    ("leak_err", "leak err"),
    ("status", "status"),
)


def plot(results: Results, path: Path) -> None:
    ok = [r for r in results.rows if r.get("status") == "ok"]
    panels = [
        {"title": "real tokens/s (optimizer step included)", "kind": "bar", "series": {}},
        {"title": "peak memory (GiB)", "kind": "bar", "series": {}},
    ]
    for r in ok:
        panels[0]["series"][r["config"]] = r["tokens_per_s"]
        if r.get("peak_gib") is not None:
            panels[1]["series"][r["config"]] = r["peak_gib"]
    line_plot(path, [p for p in panels if p["series"]] or panels[:1], f"training, {results.env.get('device')}")
