#!/usr/bin/env python3
"""A torch.profiler trace of a few training steps of an experiment (default `full`), with how busy the GPU was:
where a step's time goes (docs/BENCHMARKS.md, "Memory", fourth run).

    python scripts/profile_steps.py [--steps 14] [--profile 8:11] [--set data.micro_batch_size=8 ...] [--out prof]

Trains --steps steps on the experiment's data through fasttune's own loop, profiles the steps in --profile (CPU and
CUDA, with Python stacks), and writes trace.json.gz (chrome://tracing, Perfetto), cuda.txt / cpu.txt (ops by time)
and steps.json (each step's time, tokens, peak memory), and prints the GPU's busy share over the profiled steps.
Profiling slows the host (Python stacks): busy shares read low where the step is close to host-bound.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loss_curves  # noqa: E402


def busy_share(trace: dict) -> tuple[float, float]:
    """(span, busy) milliseconds of the GPU over the trace: kernels, copies and memsets, overlaps merged."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))  # fmt: skip
    if not spans:
        return 0.0, 0.0
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy, start = busy + end - start, s
        end = max(end, e)
    return (spans[-1][1] - spans[0][0]) / 1e3, (busy + end - start) / 1e3


def main() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import fasttune.train.run as run
    from fasttune.data.pipeline import build_data
    from fasttune.train.loop import train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="full")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--profile", default="8:11", help="FIRST:END: profile steps FIRST+1 to END (8:11: 9, 10, 11)")
    p.add_argument("--set", action="append", default=[], help="section.field=value; repeat for more")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("prof"))
    args = p.parse_args()
    first, end = (int(x) for x in args.profile.split(":"))
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fasttune-prof-"))
    cfg = loss_curves.config(args, args.set, tmp / "run")
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    prof = profile(activities=activities, with_stack=True)
    step = run.Run.step

    def profiled_step(self):
        if self.state.step == first:
            if cuda:
                torch.cuda.synchronize()
            prof.__enter__()
        record = step(self)
        if self.state.step == end:
            if cuda:
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
        return record

    run.Run.step = profiled_step
    try:
        result = train(cfg, data=build_data(cfg))
    finally:
        run.Run.step = step
    prof.export_chrome_trace(str(tmp / "trace.json"))
    trace = json.loads((tmp / "trace.json").read_text())
    with open(tmp / "trace.json", "rb") as f, gzip.open(args.out / "trace.json.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    averages = prof.key_averages()
    (args.out / "cuda.txt").write_text(averages.table(sort_by="cuda_time_total", row_limit=40))
    (args.out / "cpu.txt").write_text(averages.table(sort_by="cpu_time_total", row_limit=40))
    keys = ("step", "step_s", "tokens", "tokens_per_s", "mfu", "peak_mem_gib", "loss")
    steps = [{k: r.get(k) for k in keys} for r in result.records if r.get("step_s")]
    (args.out / "steps.json").write_text(json.dumps(steps, indent=1))
    span, busy = busy_share(trace)
    share = 100 * busy / span if span else 0.0
    print(f"profiled steps {first + 1}-{end}: GPU busy {busy:.1f} of {span:.1f} ms ({share:.0f}%)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
