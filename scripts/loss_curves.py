#!/usr/bin/env python3
"""Loss curves of one experiment under several settings, same data and seed: do the memory plans (and the precision
and optimizer choices) train the same model as the plain run? (docs/BENCHMARKS.md, "Memory"; issue #14.)

    python scripts/loss_curves.py --steps 200 --variant "ops:model.memory=ops" --variant "full:model.memory=full"

Every variant is the experiment (default `full`: the 1B shape on the embedded corpus) with its changes, trained
--steps steps by fasttune's own loop on one data bundle built once (same tokenizer, samples and order). The first
row is the reference (`plain`, the experiment with `model.memory=none` unless --reference says otherwise); it runs
twice, so the table shows how far two identical runs drift on this machine (non-deterministic GPU kernels) next to
how far each variant is from the reference. Writes curves.csv (step x variant losses), curves.json (rows and
curves), curves.md (the table) and curves.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fasttune.bench.cli import _variant  # noqa: E402
from fasttune.bench.harness import line_plot, reset_peak_memory  # noqa: E402
from fasttune.config import get_experiment  # noqa: E402
from fasttune.config.argcheck import assignments_to_args, parse_overrides  # noqa: E402
from fasttune.data.pipeline import build_data  # noqa: E402

TAIL = 20  # steps averaged for the "final loss" column (one step's loss is one small batch: noisy)


def config(args, overrides: list[str], run_dir: Path):
    cfg = get_experiment(args.experiment)
    cfg.output_dir, cfg.overwrite, cfg.force = str(run_dir), True, True
    t = cfg.training
    t.max_steps, t.log_every, t.eval_every, t.save_every, t.device = args.steps, 1, 0, 0, args.device
    t.save_final, t.tensorboard = False, False
    return parse_overrides(cfg, assignments_to_args(overrides), prog="loss_curves.py --variant").validate()


def run_variant(args, name: str, overrides: list[str], data, tmp: Path) -> dict:
    import torch

    from fasttune.train.loop import train

    cfg = config(args, overrides, tmp / f"run{len(list(tmp.iterdir()))}")
    gc.collect()  # the previous row's model and optimizer, held by reference cycles, would count in this row's peak
    if torch.cuda.is_available():
        reset_peak_memory(torch.device("cuda"))
    result = train(cfg, data=data)
    steps = [r for r in result.records if r.get("loss") is not None and r.get("step")]
    timed = [r for r in steps if r.get("step_s") and r["step"] > 3]  # the first steps compile/warm up
    mems = [r["peak_mem_gib"] for r in result.records if r.get("peak_mem_gib") is not None]
    return {
        "variant": name,
        "overrides": " ".join(overrides),
        "losses": [r["loss"] for r in steps],
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed) if timed else None,
        "peak_gib": max(mems) if mems else None,
    }


def compare(rows: list[dict]) -> None:
    """Each row's distance from the reference (row 0) over the steps both ran."""
    ref = rows[0]["losses"]
    for r in rows:
        n = min(len(ref), len(r["losses"]))
        diffs = [abs(a - b) for a, b in zip(ref[:n], r["losses"][:n], strict=True)]
        r["mean_abs_diff"] = sum(diffs) / n if n else None
        r["max_abs_diff"] = max(diffs) if n else None
        tail = r["losses"][-TAIL:]
        r["final_loss"] = sum(tail) / len(tail) if tail else None


def markdown(rows: list[dict], header: str) -> str:
    cols = ("variant", "overrides", "final_loss", "mean_abs_diff", "max_abs_diff", "tokens_per_s", "peak_gib")
    names = ("variant", "changes", f"loss (mean of last {TAIL} steps)", "mean abs diff vs reference",
             "max abs diff vs reference", "tok/s", "peak GiB")  # fmt: skip

    def cell(v):
        if v is None or v == "":
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if v < 100 else f"{v:,.0f}"
        return str(v)

    lines = [header, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    steps = max(len(r["losses"]) for r in rows)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [r["variant"] for r in rows])
        for i in range(steps):
            w.writerow([i + 1] + [f"{r['losses'][i]:.5f}" if i < len(r["losses"]) else "" for r in rows])
    (out / "curves.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (out / "curves.md").write_text(markdown(rows, header))
    series = {r["variant"]: (list(range(1, len(r["losses"]) + 1)), r["losses"]) for r in rows if r["losses"]}
    line_plot(out / "curves.png", [{"title": "training loss per step", "kind": "line", "series": series}], header)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="full")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reference", default="model.memory=none", help="changes of the reference run (comma-separated)")
    p.add_argument("--variant", action="append", default=[], help="NAME:section.field=value[,...]; repeat for more")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("curves"))
    args = p.parse_args(argv)
    reference = [x for x in args.reference.split(",") if x]
    variants = [("plain", reference), ("plain, again", reference)] + [_variant(v) for v in args.variant]
    cfg = config(args, variants[0][1], Path(tempfile.gettempdir()) / "loss-curves-probe")
    data = build_data(cfg)
    header = f"`{args.experiment}`, {args.steps} steps, seed {cfg.seed}, {data.summary.source}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="fasttune-curves-") as tmp:
        for name, overrides in variants:
            try:
                rows.append(run_variant(args, name, overrides, data, Path(tmp)))
            except Exception as e:  # noqa: BLE001 (one failing variant, an OOM, is a row, not the end of the table)
                rows.append({"variant": name, "overrides": " ".join(overrides), "losses": [], "error": str(e)[:200]})
            compare([r for r in rows if r["losses"]] or rows)
            write(rows, args.out, header)  # after every variant: a time limit keeps what finished
    print((args.out / "curves.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
