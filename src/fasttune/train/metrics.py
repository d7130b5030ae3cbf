"""Honest per-step numbers: real (non-padding) tokens/s, samples/s, MFU, peak memory; metrics.jsonl, PNG curves,
optional TensorBoard, and the end-of-run summary table."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fasttune.generate.prompts import write_atomic
from fasttune.train.run_dir import RunFolder

if TYPE_CHECKING:  # run.py imports this module
    from fasttune.config import BaseConfig
    from fasttune.train.run import RunResult

log = logging.getLogger("fasttune")

# Dense bf16 tensor-core peak (FLOP/s) by device-name substring, from vendor datasheets; used for MFU only.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl; mirrors to TensorBoard when asked. write=False
    (the other ranks of a distributed run) keeps the records in memory and writes nothing."""

    def __init__(self, folder: RunFolder, tensorboard: bool, write: bool = True):
        self.path = folder.metrics
        self.write = write
        self.records: list[dict] = []
        if (
            write and self.path.exists()
        ):  # a resumed run keeps its history; a line torn by a kill or a full disk is dropped
            for line in self.path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    log.warning("%s: skipping an incomplete line (the run was killed while writing it)", self.path)
        self.tb = None
        if tensorboard and write:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning(
                    "training.tensorboard is on but tensorboard is not installed "
                    "(pip install 'fasttune[tensorboard]'); logging to metrics.jsonl only"
                )
            else:
                self.tb = SummaryWriter(str(folder.tensorboard))

    def truncate_after(self, step: int) -> None:
        """On resume, forget steps logged after the checkpoint (they will be run again), in TensorBoard too. The file
        is replaced atomically: a kill while it is rewritten leaves the old history, never half of it."""
        self.records = [r for r in self.records if r["step"] <= step]
        if self.write:
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        if self.tb is not None:  # TensorBoard drops the killed run's events past the checkpoint (else shown twice)
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(self.tb.log_dir, purge_step=step + 1)

    def append(self, record: dict) -> None:
        # NaN/inf are not JSON: a non-finite loss is written as null (the warning in the log says which step)
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.records.append(record)
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_plots(records: list[dict], folder: RunFolder) -> list[Path]:
    """loss.png (train and validation loss) and throughput.png (real tokens/s) in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(folder.loss_plot)
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    tps = [(r["step"], r["tokens_per_s"]) for r in records if r.get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tps:
        ax.plot(*zip(*tps, strict=True))
    ax.set(xlabel="step", ylabel="real tokens / s", title="throughput (padding excluded)")
    ax.grid(alpha=0.3)
    paths.append(folder.throughput_plot)
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def print_summary(rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fasttune run summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _packing(batcher) -> str:
    if batcher.packing:
        return "on (padding-free)"
    if batcher.grouped:
        return "off (padded rows of similar length: the model's own attention would let packed samples see each other)"
    return "off (padded)"


def summarize(cfg: BaseConfig, result: RunResult, attn, peak: float | None, folder: RunFolder, world: int,
              training: str, batcher) -> None:  # fmt: skip
    """The end-of-run table: losses, real tokens/s and MFU (medians past the first step), peak memory, precision,
    attention, packing and where the checkpoint, model and metrics went."""
    recs = [r for r in result.records if r.get("tokens_per_s")]
    tps = sorted(r["tokens_per_s"] for r in recs[1:] or recs)
    median = tps[len(tps) // 2] if tps else 0.0
    mfus = sorted(r["mfu"] for r in recs[1:] if r.get("mfu"))
    rows = [
        ("experiment", cfg.experiment),
        ("steps", str(result.steps)),
        (
            "train loss first -> last",
            f"{result.first_loss:.4f} -> {result.last_loss:.4f}" if result.first_loss is not None else "-",
        ),
        (
            "val loss first -> last",
            f"{result.first_val_loss:.4f} -> {result.last_val_loss:.4f}" if result.first_val_loss is not None else "-",
        ),
        ("real tokens/s (median)", f"{median:,.0f}"),
        ("MFU (median)", f"{100 * mfus[len(mfus) // 2]:.1f}%" if mfus else "n/a (no GPU peak known)"),
        (
            "peak memory" + (f" (fullest of {world} GPUs)" if world > 1 and peak is not None else ""),
            f"{peak:.2f} GiB" if peak is not None else "n/a (CPU)",
        ),
        ("training", training),
        ("attention", attn.describe()),
        ("packing", _packing(batcher)),
        ("checkpoint", str(result.checkpoint or "none saved (no --save-every step reached, save_final off)")),
        ("model for from_pretrained", str(result.model_dir or "-")),
        ("metrics", str(folder.metrics)),
    ]
    print_summary(rows)
