#!/usr/bin/env python3
"""`--model.memory full` against `offload` at the Llama-3.1-8B shape on one GPU, for long documents: tokens/s, peak
GPU memory and pinned host memory, each predicted (the plan's log line) and measured (the run's own records; the
offload hooks' counters). First a correctness check on the GPU: a small model's loss and gradients under `offload`
equal those under `full` (fp32), and backward's copies back ran ahead of their unpacks.

Each configuration is fasttune's real loop (`train`, the `full` experiment: pure bf16, Liger when installed, attn
auto) on synthetic documents of --tokens tokens, one per micro-batch, for --steps steps; the last step is measured
(the first compiles kernels). One JSON line per configuration.

    python scripts/offload_8b.py [--tokens 65536,131072] [--plans full,offload] [--steps 2]

About 5 minutes on one H200 (the 128k-token steps take most of it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from fasttune.bench.harness import reset_peak_memory
from fasttune.bench.workload import synthetic_bundle
from fasttune.config import get_experiment
from fasttune.train import offload

VOCAB = 128256


def check_gradients(device: torch.device) -> dict:
    """A small model's step under `offload` against `full`, every saved layer input moved."""
    from fasttune.data.packing import collate
    from fasttune.model.build import build_preset
    from fasttune.train.recompute import apply_plan
    from fasttune.train.run import forward_backward

    torch.manual_seed(0)
    ref = build_preset("tiny", 512, "sdpa", torch.float32).to(device).train()
    ours = copy.deepcopy(ref)
    apply_plan(ref, "full")
    apply_plan(ours, "offload")
    g = torch.Generator().manual_seed(1)
    samples = [{"input_ids": (ids := torch.randint(2, 512, (n,), generator=g).tolist()), "labels": ids}
               for n in (700, 300, 1024)]  # fmt: skip
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(samples, packing=True, pad_id=0).items()}
    old, offload.MIN_BYTES = offload.MIN_BYTES, 0
    offload.stats.reset()
    try:
        a, b = forward_backward(ref, [batch], 2000, None), forward_backward(ours, [batch], 2000, None)
    finally:
        offload.MIN_BYTES = old
    pairs = list(zip(ref.parameters(), ours.parameters(), strict=True))
    worst = max(float((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)) for p, q in pairs)
    ok = bool(torch.allclose(a, b, rtol=1e-6)) and worst <= 1e-5  # sdpa's backward may sum in another order
    layers = ref.config.num_hidden_layers
    ok = ok and offload.stats.tensors == layers and offload.stats.prefetched == layers - 1
    return {"check": "offload vs full, tiny fp32", "ok": ok, "loss": [float(a), float(b)], "max_rel_grad_diff": worst,
            "layers": layers, **stats_dict(offload.stats)}  # fmt: skip


def stats_dict(stats) -> dict:
    return {k: getattr(stats, k) for k in ("tensors", "bytes", "peak", "prefetched")}


class PlanLog(logging.Handler):
    """The plan line's predicted GPU peak and pinned host memory (train/memory.plan_memory)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.found: dict = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("memory plan:") and record.args:
            text = record.args[3]
            self.found = {"plan": record.args[0], "predicted_gib": float(text.split(" GiB")[0])}
            pinned = re.search(r"and ([\d.]+) GiB of pinned host memory", text)
            self.found["predicted_pinned_gib"] = float(pinned.group(1)) if pinned else 0.0
            self.found["estimate"] = text


def run(tokens: int, plan: str, steps: int, device: torch.device, root: Path) -> dict:
    from fasttune.train.loop import train

    cfg = get_experiment("full")
    cfg.model.preset, cfg.model.memory, cfg.model.dtype = "llama-3.1-8b", plan, "bf16"
    cfg.data.max_length, cfg.data.micro_batch_size, cfg.data.packing = tokens, 1, True
    cfg.output_dir, cfg.overwrite, cfg.force = str(root / f"{plan}-{tokens}"), True, True
    t = cfg.training
    t.device, t.max_steps, t.warmup_steps, t.grad_accum = str(device), steps, 1, 1
    t.log_every, t.eval_every, t.save_every, t.save_final, t.tensorboard = 1, 0, 0, False, False
    cfg.validate()
    data = synthetic_bundle([tokens] * steps, VOCAB)
    plans = PlanLog()
    logging.getLogger("fasttune").setLevel(logging.INFO)
    logging.getLogger("fasttune").addHandler(plans)
    reset_peak_memory(device)
    offload.stats.reset()
    start = time.perf_counter()
    try:
        result = train(cfg, data=data)
    finally:
        logging.getLogger("fasttune").removeHandler(plans)
    last = [r for r in result.records if r.get("step_s")][-1]
    mems = [r["peak_mem_gib"] for r in result.records if r.get("peak_mem_gib") is not None]
    out = {"tokens": tokens, "plan": plan, **plans.found, "measured_gib": max(mems) if mems else None,
           "tok_s": last["tokens"] / last["step_s"], "step_s": last["step_s"], "loss": last.get("loss"),
           "pinned_gib": offload.stats.peak / 2**30, "offloaded_tensors": offload.stats.tensors,
           "prefetched": offload.stats.prefetched, "wall_s": time.perf_counter() - start}  # fmt: skip
    try:  # the caching host allocator's own count (power-of-two blocks), where torch has it
        host = torch.cuda.host_memory_stats()
        out["host_allocator"] = {k: v / 2**30 for k, v in host.items() if "bytes" in k and "peak" in k}
    except Exception as e:  # noqa: BLE001 - an older torch: the hooks' count above stands
        out["host_allocator"] = f"unavailable ({type(e).__name__})"
    del result
    gc.collect()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="65536,131072", help="document lengths (one per micro-batch)")
    p.add_argument("--plans", default="full,offload")
    p.add_argument("--steps", type=int, default=2, help="steps per configuration; the last is measured")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check = check_gradients(device)
    print(json.dumps(check), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in (int(x) for x in args.tokens.split(",")):
            for plan in args.plans.split(","):
                try:
                    print(json.dumps(run(tokens, plan, args.steps, device, Path(tmp))), flush=True)
                except Exception as e:  # one configuration's failure (out of memory, a refusal) is a result too
                    print(json.dumps({"tokens": tokens, "plan": plan, "error": f"{type(e).__name__}: {e}"[:2000]}))
                    gc.collect()
                    torch.cuda.empty_cache()
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
