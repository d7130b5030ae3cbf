"""A/B of the loss on the trained tokens only (model/loss.py `trained_rows`) against the head on every token, in one
process: `fasttune bench train`'s fasttune row on a dataset's lengths and label masks, the two modes interleaved per
round, for Liger's fused loss and fasttune's chunked one, at each vocabulary. Rows go to OUT/ab_rows.json.

    python scripts/ab_trained_rows.py DATA.json --samples 3072 --vocabs 128256,32000 --losses liger,chunked --rounds 2

docs/BENCHMARKS.md ("Memory": the loss on the trained tokens only) has the results. `liger` rows need liger-kernel
and a CUDA GPU (elsewhere they run without it).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

import fasttune.model.loss as loss_module
from fasttune.bench import train as bench_train
from fasttune.bench.harness import reset_peak_memory
from fasttune.bench.workload import dataset_workload, synthetic_bundle
from fasttune.data.packing import IGNORE

KEYS = ("config", "tokens_per_s", "spread_pct", "peak_gib", "loss", "status")


def every_row(hidden_BSH, labels_BS, shift_labels):
    """The head on every token (before the selection): `trained_rows` without dropping the untrained rows."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels_BS, (0, 1), value=IGNORE)[..., 1:]
    hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
    return hidden_TH, shift_labels.reshape(-1).to(hidden_TH.device)


def run_row(bench, data, tmp: Path, loss: str, mode: str, name: str) -> dict:
    selected = loss_module.trained_rows
    loss_module.trained_rows = every_row if mode == "every row" else selected
    try:
        reset_peak_memory(bench.device)
        spec = {"stack": "fasttune", "attn": "auto", "packing": True, "name": name,
                "overrides": [] if loss == "liger" else ["model.liger=false"]}  # fmt: skip
        return bench_train._run_one(bench, spec, data, tmp)
    finally:
        loss_module.trained_rows = selected
        gc.collect()  # the run's model and optimizer, before the next row's peak is measured
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--samples", type=int, default=3072)
    p.add_argument("--vocabs", default="128256,32000")
    p.add_argument("--losses", default="liger,chunked")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="ab-trained-rows")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="1b")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths, trained = dataset_workload(args.data, None, 2048, args.samples)
    print(f"{len(lengths)} samples, {sum(map(sum, trained)) / sum(lengths):.1%} of the tokens with a label")
    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        bench = bench_train.TrainBench(
            device=torch.device(args.device), preset=args.preset, lengths=lengths, trained=trained, micro_batch=4,
            vocab=vocab, warmup_epochs=1, epochs=1,
        )  # fmt: skip
        data = synthetic_bundle(lengths, vocab, 0, trained)
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):
                for loss in args.losses.split(","):
                    for mode in ("every row", "trained rows"):
                        name = f"fasttune full {loss}, vocab {vocab}, {mode}, round {rnd}"
                        rows.append(run_row(bench, data, Path(tmp), loss, mode, name))
                        print({k: rows[-1].get(k) for k in KEYS}, flush=True)
        (out / "ab_rows.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
