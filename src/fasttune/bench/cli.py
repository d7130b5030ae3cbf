"""`fasttune bench attention|train|generate`: parse, build the benchmark, run it, write CSV/JSON/Markdown/PNG."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fasttune.bench.harness import Results, environment
from fasttune.device import pick_device
from fasttune.errors import FasttuneError

log = logging.getLogger("fasttune")

USAGE = """usage: fasttune bench {attention,train,generate} [options]
  attention  every attention backend: fwd / fwd+bwd time, TFLOP/s, error vs fp32 (padded and packed)
  train      end-to-end training tokens/s, samples/s, MFU, memory: fasttune's loop vs plain HF baselines
  generate   generation tokens/s (fasttune.bench.generate)"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _strs(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _finish(results: Results, out: Path, md_columns, plot, extra: list[str]) -> int:
    results.notes += extra
    paths = results.write(out, md_columns, lambda p: plot(results, p))
    print(results.markdown(md_columns))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def attention_main(argv: Sequence[str]) -> int:
    from fasttune.attention import BACKENDS
    from fasttune.bench import attention as bench

    p = argparse.ArgumentParser(prog="fasttune bench attention", description=__doc__)
    p.add_argument("--backends", type=_strs, default=list(BACKENDS), help="comma-separated (default: all usable)")
    p.add_argument("--seq-lens", type=_ints, default=None, help="default 512..16384 on GPU, 16,32 on CPU")
    p.add_argument("--head-dims", type=_ints, default=list(bench.HEAD_DIMS))
    p.add_argument(
        "--layouts",
        type=_strs,
        default=list(bench.LAYOUTS),
        help="padded,packed (default); padded-left times the unpadding path",
    )
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 16384 GPU, 64 CPU)")
    p.add_argument("--heads", type=int, default=None, help="query = kv heads (default 16 GPU, 2 CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args(argv)
    device = pick_device(a.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    seq_lens = a.seq_lens or (list(bench.SEQ_LENS) if gpu else [16, 32])
    unknown = [b for b in a.backends if b not in BACKENDS]
    if unknown or any(x not in bench.ALL_LAYOUTS for x in a.layouts):
        raise FasttuneError(f"--backends: choose from {', '.join(BACKENDS)}; --layouts: {', '.join(bench.ALL_LAYOUTS)}")
    results = Results("attention", environment(device, ["attention", *argv]))
    total = len(a.layouts) * len(a.head_dims) * len(seq_lens)
    with tqdm(total=total, desc="attention shapes", dynamic_ncols=True) as bar:
        bench.run(
            device,
            dtype,
            backends=a.backends,
            seq_lens=seq_lens,
            head_dims=a.head_dims,
            layouts=a.layouts,
            tokens=a.tokens or (16384 if gpu else 64),
            n_heads=a.heads or (16 if gpu else 2),
            results=results,
            progress=bar,
            after_shape=lambda: results.write(a.out, bench.MD_COLUMNS, None),
        )
    return _finish(results, a.out, bench.MD_COLUMNS, bench.plot, bench.summary_lines(results))


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    if not rest:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME:section.field=value[,section.field=value]")
    return name, _strs(rest)


def train_main(argv: Sequence[str]) -> int:
    from fasttune.bench import train as bench
    from fasttune.bench.workload import LengthStats, dataset_lengths, sft_lengths

    p = argparse.ArgumentParser(prog="fasttune bench train", description=__doc__)
    p.add_argument("--preset", default=None, help="model shape, random init (default 1b on GPU, micro on CPU)")
    p.add_argument("--experiment", default="full", help="fasttune experiment the runs derive from")
    p.add_argument("--attn", type=_strs, default=None, help="fasttune attn_implementations (default: all + auto)")
    p.add_argument("--packing", type=_strs, default=["on", "off"], help="on,off")
    p.add_argument("--samples", type=int, default=None, help="samples (default 64 GPU, 16 CPU)")
    p.add_argument("--median", type=float, default=None, help="lognormal median length (default 400 GPU, 48 CPU)")
    p.add_argument("--mean", type=float, default=None, help="lognormal mean length (default 566 GPU, 68 CPU)")
    p.add_argument("--min-length", type=int, default=None, help="clip (default 32 GPU, 8 CPU)")
    p.add_argument("--max-length", type=int, default=None, help="clip and packing row (default 2048 GPU, 256 CPU)")
    p.add_argument("--data", default=None, help="use the token lengths of this dataset instead of the lognormal mix")
    p.add_argument("--model", default=None, help="tokenizer folder for --data (default: fasttune's own BPE)")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per step (padded) / budget factor (packed)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32000 GPU, 512 CPU)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs of the sample set skipped as warm-up")
    p.add_argument("--epochs", type=int, default=3, help="epochs measured")
    p.add_argument("--no-baselines", action="store_true", help="skip the plain HF baselines")
    p.add_argument("--hf-micro-batch", type=int, default=None, help="samples per HF step (default --micro-batch)")
    p.add_argument("--hf-ckpt", action="store_true", help="also each packed HF baseline with gradient checkpointing")
    p.add_argument("--equal-tokens", action="store_true", help="also fasttune at the HF baselines' tokens per step")
    p.add_argument("--variant", type=_variant, action="append", default=[], help="NAME:field=value,... (auto packed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args(argv)
    device = pick_device(a.device)
    gpu = device.type == "cuda"
    max_length = a.max_length or (2048 if gpu else 256)
    if a.data:
        lengths = dataset_lengths(a.data, a.model, max_length, a.samples or 0)
    else:
        lengths = sft_lengths(
            a.samples or (64 if gpu else 16),
            a.median or (400 if gpu else 48),
            a.mean or (566 if gpu else 68),
            a.min_length or (32 if gpu else 8),
            max_length,
            a.seed,
        )
    default_attn = ["auto", "eager", "sdpa", "flex_attention", "varlen", "flash_attention_4"] if gpu else ["auto"]
    cfg = bench.TrainBench(
        device=device,
        lengths=lengths,
        preset=a.preset or ("1b" if gpu else "micro"),
        experiment=a.experiment,
        attns=a.attn or default_attn,
        packings=[x.lower() in ("on", "true", "1") for x in a.packing],
        max_length=max_length,
        micro_batch=a.micro_batch,
        vocab=a.vocab or (32000 if gpu else 512),
        warmup_epochs=a.warmup_epochs,
        epochs=a.epochs,
        baselines=not a.no_baselines,
        variants=a.variant,
        seed=a.seed,
        hf_micro_batch=a.hf_micro_batch,
        hf_ckpt=a.hf_ckpt,
        equal_tokens=a.equal_tokens,
    )
    results = Results("train", environment(device, ["train", *argv]))
    results.notes.append(f"- workload: {LengthStats.of(lengths).describe()}; preset {cfg.preset}, vocab {cfg.vocab}")
    runs, _ = bench.plan_runs(cfg)
    with tqdm(total=len(runs), desc="configurations", dynamic_ncols=True) as bar:
        bench.run_all(cfg, results, progress=bar)
    return _finish(results, a.out, bench.MD_COLUMNS, bench.plot, bench.target_lines(results.rows))


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "attention":
        return attention_main(rest)
    if command == "train":
        return train_main(rest)
    if command == "generate":
        try:
            from fasttune.bench.generate import main as generate_main
        except ImportError:
            raise FasttuneError("`fasttune bench generate` is not yet available in this version") from None
        return generate_main(rest)
    raise FasttuneError(f"unknown benchmark {command!r}; choose attention, train or generate")
