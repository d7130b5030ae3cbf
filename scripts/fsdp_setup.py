"""FSDP2 start-up on GPUs: a pretrained model folder trained with LoRA + --training.fsdp on two ranks, where each GPU is
capped below the model's size (torch.cuda.set_per_process_memory_fraction), and once uncapped. What it shows: rank 0
alone reads the weights and no rank holds the whole model on its GPU (fasttune.train.distributed, build_device and
wrap). Runs the fasttune on PYTHONPATH and, with --old DIR, also the fasttune source at DIR (an earlier commit's
`src`), side by side.

    python scripts/fsdp_setup.py [--old DIR]   # a 2-GPU machine; results in $OUT/results.json
    python scripts/fsdp_setup.py --dry         # CPU: the same runs with gloo ranks and a micro model

Then a full fine-tune of the 1B shape from a saved folder, FSDP2 against DDP (the same losses, within the GPU's
non-determinism). Per run: ok or the error line, each rank's peak GPU memory (torch's max allocated) and peak host
memory (ru_maxrss), the losses, tokens/s (median of the steps after the first two).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE, VOCAB, STEPS = "llama-3.1-8b", 128256, 6  # Llama-3.1-8B: 14.96 GiB of bf16 weights
DRY = {"shape": "micro", "vocab": 384, "device": "cpu"}


def make_model(folder: Path, dry: bool, shape: str = SHAPE) -> None:
    import torch

    from fasttune.model.build import build_preset

    if (folder / "config.json").is_file():
        return
    shape, vocab, device = (DRY["shape"], DRY["vocab"], "cpu") if dry else (shape, VOCAB, "cuda")
    model = build_preset(shape, vocab, "sdpa", torch.bfloat16, device)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()  # the driver keeps no GPU memory through the runs (it held 15.7 GiB of GPU 0 before)


def worker(spec: dict) -> None:
    import logging

    import torch

    from fasttune.bench.workload import sft_lengths, synthetic_bundle
    from fasttune.config import get_experiment
    from fasttune.train import loop

    rank = int(os.environ["RANK"])
    logging.getLogger("fasttune").setLevel(logging.INFO)  # the run's own lines (as the CLI logs them) in the log
    logging.getLogger("fasttune").addHandler(logging.StreamHandler())
    if spec["cap"]:
        torch.cuda.set_per_process_memory_fraction(spec["cap"], int(os.environ["LOCAL_RANK"]))
    cfg = get_experiment(spec.get("experiment", "lora"))
    cfg.output_dir, cfg.force = spec["run_dir"], True
    cfg.model.path, cfg.model.memory = spec["model"], "full"
    cfg.data.max_length, cfg.data.micro_batch_size = 2048, 1
    t = cfg.training
    t.device, t.fsdp, t.max_steps, t.warmup_steps = spec["device"], spec.get("fsdp", True), STEPS, 2
    t.eval_every, t.log_every, t.tensorboard, t.save_every, t.save_final = 0, 1, False, 0, False
    cfg.validate()
    data = synthetic_bundle(sft_lengths(256, 400, 566, 32, 2048, seed=0), spec["vocab"], seed=0)
    result = loop.train(cfg, data=data)
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    mine = {"gpu_gib": gpu, "host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if rank == 0:
        speed = [r["tokens_per_s"] for r in result.records if r.get("tokens_per_s") and r["step"] > 2]
        mine["loss"] = [round(r["loss"], 4) for r in result.records if "loss" in r]
        mine["tok_s"] = statistics.median(speed) if speed else None
    Path(f"{spec['result']}.{rank}").write_text(json.dumps(mine))


def launch(name: str, src: str, spec: dict, work: Path, timeout: float = 240) -> dict:
    spec = {**spec, "run_dir": str(work / name), "result": str(work / f"{name}.json")}
    env = {**os.environ, "PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}", "NCCL_NVLS_ENABLE": "0",
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", json.dumps(spec)]  # fmt: skip
    t0, log = time.monotonic(), work / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the ranks too: none may hold its GPU into the next run
            rc = proc.wait()
    row = {"name": name, "rc": rc, "seconds": round(time.monotonic() - t0)}
    ranks = [json.loads(f.read_text()) for f in sorted(work.glob(f"{name}.json.*"))]
    if ranks:
        row.update(ranks[0], ranks=[{k: r[k] for k in ("gpu_gib", "host_gib")} for r in ranks])
    if rc != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if "Error" in x or x.startswith("error")]
        row["error"] = (lines or ["(no error line)"])[0][:300]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--old", help="an earlier fasttune's src folder, run with the same specs")
    p.add_argument("--dry", action="store_true", help="CPU: gloo ranks, a micro model, no cap")
    p.add_argument("--only", default="new-capped,old-capped,new,full-fsdp,full-ddp", help="runs, comma-separated")
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    out, work = Path(os.environ.get("OUT", "out")), Path("/tmp/fsdp-setup")
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "model"
    if any(name in args.only for name in ("new", "old")):
        make_model(folder, args.dry)
    new = str(Path(__file__).resolve().parents[1] / "src")
    torch = __import__("torch")
    cap = 0 if args.dry else 14 * 2**30 / torch.cuda.get_device_properties(0).total_memory  # below the 14.96 GiB
    where = DRY if args.dry else {"vocab": VOCAB, "device": "cuda"}
    runs = [("new-capped", new, cap, {}), ("old-capped", args.old, cap, {}), ("new", new, 0, {})]
    # a full fine-tune of the 1B shape from its folder: FSDP2 (rank 0 reads the weights) against DDP (every rank)
    full = {"experiment": "sft", "model": str(work / "model-1b")}
    runs += [("full-fsdp", new, 0, full), ("full-ddp", new, 0, {**full, "fsdp": False})]
    rows = []
    for name, src, capped, extra in runs:
        if src and name in args.only.split(","):
            if extra.get("model"):
                make_model(Path(extra["model"]), args.dry, "1b")
            rows.append(launch(name, src, {"model": str(folder), "cap": capped, **where, **extra}, work))
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
