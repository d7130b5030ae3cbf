"""Multi-GPU scaling and checkpoint checks in one call (docs/BENCHMARKS.md, "Scale"; issue #15 item 5).

    python scripts/multi_gpu.py              # on a 4-GPU machine: every run below, results under $OUT
    python scripts/multi_gpu.py --dry-run    # CPU: the same runs with gloo ranks and micro models (proves the logic)

Runs, each a fresh `torchrun` (or one process for 1 GPU) of fasttune's own loop (`loop.train` on a synthetic SFT
length mix, packed; the same samples and seed in every run), each under its own time limit, continuing past
failures:
  1B shape: 1 GPU, DDP and FSDP2 on 2 and 4 GPUs;  8B shape (llama-3.1-8b preset): 1 (if it fits), 2, 4 GPUs FSDP2;
  the 4-GPU FSDP2 1B run's checkpoint resumed on 1 GPU;  LoRA + FSDP2 on 2 GPUs, trained then resumed.
Per run: real tokens/s (median of the steps after the warm-up; all ranks together), peak GiB on rank 0, memory plan,
loss. FSDP2 scaling runs use the memory plan their shape's 1-GPU run chose (the same recomputation). Printed
last: one summary table with the scaling ratios against 1 GPU. Files in $OUT (4): summary.md, results.json,
logs.txt (each run's last lines), versions.txt.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

GPU = {"1b": "1b", "8b": "llama-3.1-8b", "steps": 10, "warm": 3, "max_length": 2048, "budget_s": 480}
DRY = {"1b": "micro", "8b": "micro", "steps": 2, "warm": 1, "max_length": 64, "budget_s": 900}
# (name, shape, ranks, mode, extra) in priority order; mode: single | ddp | fsdp. 8B packs: 8k tokens per GPU step
# (4 x 2048), 1B: 16k (8 x 2048), the sizes docs/BENCHMARKS.md measures one GPU with. 1b-fsdp-4 also writes the
# checkpoint that one GPU resumes (after its timed steps: the save is not in any step's time).
RUNS = [
    ("1b-1gpu", "1b", 1, "single", {}),
    ("1b-ddp-2", "1b", 2, "ddp", {}),
    ("1b-fsdp-2", "1b", 2, "fsdp", {}),
    ("1b-ddp-4", "1b", 4, "ddp", {}),
    ("1b-fsdp-4", "1b", 4, "fsdp", {"save": True}),
    ("8b-1gpu", "8b", 1, "fsdp", {"micro_batch": 4, "timeout": 150}),
    ("8b-fsdp-2", "8b", 2, "fsdp", {"micro_batch": 4, "timeout": 120}),
    ("8b-fsdp-4", "8b", 4, "fsdp", {"micro_batch": 4, "timeout": 120}),
    ("1b-fsdp-4-resumed-on-1", "1b", 1, "fsdp", {"steps": 13, "resume": "1b-fsdp-4"}),
    ("lora-fsdp-2", "1b", 2, "fsdp", {"lora": True, "steps": 4, "save": True}),
    ("lora-fsdp-2-resumed", "1b", 2, "fsdp", {"lora": True, "steps": 6, "resume": "lora-fsdp-2"}),
]
SCALING = [("1b", "1b-1gpu", ["1b-ddp-2", "1b-fsdp-2", "1b-ddp-4", "1b-fsdp-4"]),
           ("8b", "8b-1gpu", ["8b-fsdp-2", "8b-fsdp-4"])]  # fmt: skip
TARGET = {2: 1.85, 4: 3.6}  # issue #15: 8B FSDP2 tokens/s against one GPU


# -- one run (every rank) ----------------------------------------------------------------------------------------
class _LogCapture(logging.Handler):
    """Keeps what the run logged about its memory plan (train/memory.py) and the step it resumed from."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.plan, self.resumed_at = None, 0

    def emit(self, record: logging.LogRecord) -> None:
        if not (isinstance(record.msg, str) and record.args):
            return
        if record.msg.startswith("memory plan:"):
            self.plan = str(record.args[0])
        elif record.msg.startswith("resumed from"):
            self.resumed_at = int(record.args[-1])


def worker(spec: dict) -> None:
    """Train one configuration under torchrun (or alone); rank 0 writes its result to spec['result']."""
    import torch

    from fasttune.bench.workload import sft_lengths, synthetic_bundle
    from fasttune.config import get_experiment
    from fasttune.train import loop

    cfg = get_experiment("full")
    cfg.output_dir, cfg.force, cfg.resume, cfg.overwrite = spec["run_dir"], True, bool(spec.get("resume")), False
    cfg.model.preset, cfg.model.liger = spec["preset"], False
    cfg.data.max_length, cfg.data.micro_batch_size = spec["max_length"], spec["micro_batch"]
    t = cfg.training
    t.device, t.fsdp, t.max_steps, t.warmup_steps = spec["device"], spec["mode"] == "fsdp", spec["steps"], 2
    t.eval_every, t.log_every, t.tensorboard = 0, 1, False
    t.save_every, t.save_final = 0, bool(spec.get("save") or spec.get("resume"))
    cfg.lora.enabled = cfg.lora.merge_on_save = bool(spec.get("lora"))
    if cfg.lora.enabled:  # LoRA's own default: a bf16 frozen base, fp32 adapters under bf16 autocast
        cfg.model.dtype = "auto"
    if spec.get("memory"):
        cfg.model.memory = spec["memory"]
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One sample set for every run of a shape, its resumed runs included: enough for 16 steps of micro-batches on 4
    # ranks (a pack of max_length x micro_batch tokens holds ~max_length x micro_batch / 566 samples of this mix).
    per_pack = max(1, spec["max_length"] * spec["micro_batch"] // 566)
    lengths = sft_lengths(per_pack * 16 * 4 + 64, 400, 566, 32, spec["max_length"], seed=0)
    data = synthetic_bundle(lengths, spec["vocab"], seed=0)
    seen, logger = _LogCapture(), logging.getLogger("fasttune")
    logger.setLevel(logging.INFO)  # as the CLI does: the run's own lines go to the log; rank 0 alone keeps INFO
    logger.addHandler(logging.StreamHandler())
    logger.addHandler(seen)
    result = loop.train(cfg, data=data)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    steps = [r for r in result.records if r.get("tokens_per_s") and r["step"] > seen.resumed_at]  # this process's
    timed = [r["tokens_per_s"] for r in steps if r["step"] > seen.resumed_at + spec["warm"]]
    timed = timed or [r["tokens_per_s"] for r in steps]  # (a dry run's resumed run has a single step)
    mems = [r["peak_mem_gib"] for r in result.records if r.get("peak_mem_gib") is not None]
    out = {
        "ok": True,
        "world": world,
        "steps": [r["step"] for r in steps],
        "tok_s": statistics.median(timed) if timed else None,
        "tokens_per_step": statistics.median(r["tokens"] for r in steps) if steps else None,
        "peak_gib": max(mems) if mems else None,
        "plan": seen.plan,
        "resumed_at": seen.resumed_at,
        "loss": [round(r["loss"], 4) for r in steps],
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "merged": (Path(spec["run_dir"]) / "merged" / "config.json").is_file(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    Path(spec["result"]).write_text(json.dumps(out))


# -- the driver --------------------------------------------------------------------------------------------------
def _launch(spec: dict, nproc: int, timeout: float, log: Path) -> tuple[int, float]:
    """Run one spec (torchrun for several ranks) in its own process group, killed whole at the time limit."""
    me = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *me]
    # NVLink multicast stays off (the lending machine's rule); OMP threads: 1 per rank on CPU, as torchrun sets
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
    return rc, time.monotonic() - t0


def _last_error(log: Path) -> str:
    """The line that says why a run failed: the raising rank's exception (not torchrun's report of it, nor the other
    ranks' lost connections), fasttune's own error line, else the last line."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    noise = ("ChildFailedError", "Connection reset", "Connection closed", "error_file", "traceback :")
    picks = [
        x for x in lines if ("Error" in x or x.startswith(("error:", "fasttune:"))) and not any(n in x for n in noise)
    ]
    return (picks or lines or ["(no output)"])[0][:200]


def run_all(dry: bool, out: Path, work: Path, only: set[str] | None) -> list[dict]:
    import torch

    prof = DRY if dry else GPU
    gpus = 0 if dry else torch.cuda.device_count()
    deadline = time.monotonic() + prof["budget_s"]
    rows: list[dict] = []
    done: dict[str, dict] = {}
    logs = []
    for name, shape, nproc, mode, extra in RUNS:
        if only and name not in only:
            continue
        row = {"name": name, "shape": shape, "ranks": nproc, "mode": "single" if nproc == 1 else mode}
        rows.append(row)
        left = deadline - time.monotonic()
        parent = extra.get("resume")
        if not dry and nproc > gpus:
            row["status"] = f"skipped: {gpus} GPU(s) visible"
        elif parent and not (done.get(parent) or {}).get("ok"):
            row["status"] = f"skipped: {parent} did not finish"
        elif left < 20:
            row["status"] = "skipped: out of time"
        else:
            steps = extra.get("steps", prof["steps"])
            if dry:  # two steps, and a resumed run one more
                steps = prof["steps"] + (1 if parent else 0)
            # FSDP2 scaling runs recompute what one GPU's run chose to (its memory plan): the same work per GPU, so
            # the ratio is the parallel efficiency, and the memory sharding frees shows as less memory per GPU. (DDP
            # holds what one GPU holds, and its own plan: auto picks the same one unless one GPU was at the edge.)
            scaling = mode == "fsdp" and not parent
            base_run = next((ref for s, ref, others in SCALING if s == shape and name in others and scaling), None)
            plan = (done.get(base_run) or {}).get("plan") if base_run else None
            spec = {
                "memory": _valid_plan(plan), "preset": prof[shape], "mode": mode, "device": "cpu" if dry else "cuda",
                "steps": steps,
                "warm": prof["warm"], "max_length": prof["max_length"], "micro_batch": extra.get("micro_batch", 8),
                "vocab": 384 if dry else 32000, "lora": extra.get("lora", False), "save": extra.get("save", False),
                "run_dir": str(work / (parent or name)), "resume": parent, "result": str(work / f"{name}.json"),
            }  # fmt: skip
            log = work / f"{name}.log"
            print(f"=== {name}: {nproc} rank(s), {mode}, {spec['preset']}, {spec['steps']} steps", flush=True)
            rc, secs = _launch(spec, nproc, min(extra.get("timeout", 90) * (3 if dry else 1), left - 5), log)
            res = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else {}
            row.update(res, rc=rc, wall_s=round(secs, 1))
            failed = "timeout" if rc == 124 else f"failed: {_last_error(log)}"
            row["status"] = ("ok" if rc == 0 else f"ok, then exit {rc}") if res.get("ok") else failed
            if parent:
                row["status"] += _resume_check(row, done[parent])
            done[name] = {**row, "ok": row["status"].startswith("ok")}
            print(f"    {row['status']} in {secs:.0f} s", flush=True)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            logs.append(f"===== {name} (rc {rc}, {secs:.0f} s)\n{tail}")
    (out / "logs.txt").write_text("\n\n".join(logs) + "\n")
    return rows


def _valid_plan(plan: str | None) -> str | None:
    from fasttune.config.base_config import memory_plan
    from fasttune.errors import ConfigError

    try:
        return memory_plan(plan) if plan else None
    except ConfigError:
        return None  # a plan name the option does not take: that run plans for itself


def _resume_check(row: dict, parent: dict) -> str:
    """A resumed run continues right after its parent's last step, up to its own last step."""
    want = parent["steps"][-1] if parent.get("steps") else None
    if row.get("resumed_at") != want or not row.get("steps") or row["steps"][0] != want + 1:
        return f" (but resumed at step {row.get('resumed_at')}, expected {want})"
    return ""


def summary(rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    head = (
        "| run | ranks | mode | status | real tok/s | x 1 GPU | peak GiB/GPU (rank 0) | memory plan | steps | wall s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    base = {shape: by.get(ref, {}).get("tok_s") for shape, ref, _ in SCALING}
    for r in rows:
        tok, mem = r.get("tok_s"), r.get("peak_gib")
        scaling = not r["name"].startswith("lora") and "resumed" not in r["name"]  # those check that runs resume
        ratio = f"{tok / base[r['shape']]:.2f}x" if scaling and tok and base.get(r["shape"]) else "-"
        steps = f"{r['steps'][0]}-{r['steps'][-1]}" if r.get("steps") else "-"
        mem = f"{mem:.1f}" if mem is not None else "-"
        cells = [r["name"], r["ranks"], r["mode"], r["status"], f"{tok:,.0f}" if tok else "-", ratio, mem,
                 r.get("plan") or "-", steps, r.get("wall_s", "-")]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    notes = []
    for shape, ref, others in SCALING:
        for o in others:
            if base.get(shape) and by.get(o, {}).get("tok_s"):
                x = by[o]["tok_s"] / base[shape]
                target = TARGET.get(by[o]["ranks"]) if shape == "8b" else None
                verdict = "" if target is None else (f" (target >= {target}x: {'met' if x >= target else 'NOT met'})")
                notes.append(f"- {o}: {x:.2f}x {ref}{verdict}")
    return "\n".join(lines + [""] + notes)


def versions(dry: bool, rows: list[dict]) -> str:
    """The machine and versions; the GPU's name as a run reported it (this process keeps no CUDA context open)."""
    import importlib.metadata as md

    import torch

    def v(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "-"

    name = next((r["cuda"] for r in rows if r.get("cuda")), "GPU")
    dev = "CPU (dry run, gloo)" if dry else f"{torch.cuda.device_count()} x {name}"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
    return (f"{dev}; torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, transformers "
            f"{v('transformers')}, peft {v('peft')}, flash-attn-4 {v('flash-attn-4')}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo ranks, micro models: checks the logic only")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return
    out = Path(os.environ.get("OUT") or "multi-gpu-results")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("MULTI_GPU_WORK") or "/tmp/fasttune-multi-gpu")
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(versions(a.dry_run, []), flush=True)
    rows = run_all(a.dry_run, out, work, {x for x in a.only.split(",") if x} or None)
    head = versions(a.dry_run, rows)
    (out / "versions.txt").write_text(head + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = f"{head}\n\n{summary(rows)}\n"
    (out / "summary.md").write_text(table)
    print("\n" + table, flush=True)


if __name__ == "__main__":
    main()
