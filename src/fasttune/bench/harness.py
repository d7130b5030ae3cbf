"""The one timing/memory harness every benchmark shares, and the writers for its results.

Timing: `triton.testing.do_bench` (CUDA events, median, L2 flushed between calls) on a GPU when triton is there,
plain CUDA events otherwise; `time.perf_counter` medians on the CPU, where calls spread far apart (other work on the
same cores) are called noisy, and no verdict is drawn from them. Results: one list of flat dicts (rows) written
as CSV, JSON (rows + environment), a Markdown table and a PNG plot, all with the same stem.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttune.errors import ConfigError


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


NOISY_SPREAD = 0.5
"""CPU calls are noisy when their quartiles lie more than this fraction of the median apart..."""
NOISY_MIN = 2.0
"""...or their median is more than this many times the fastest call (a loaded CPU only ever slows a call down)."""


@dataclass(frozen=True)
class Timing:
    """The median milliseconds of one call, and why its calls' times were too spread to trust it (None: steady, or
    not judged: on a GPU, whose timing is do_bench's / CUDA events' as it was)."""

    ms: float
    noise: str | None = None


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 100.0,  # 25 ms left the first shape of a run up to 2x slow (clocks, plan caches)
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds of one `fn()` call, after warm-up (first call: compile, plan building, autotune)."""
    return timing(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none).ms


def timing(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 100.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> Timing:
    """time_ms's median, and on the CPU whether its calls were noisy (`noise`)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return Timing(_cuda_events_ms(fn, device, rep_ms, grad_to_none))
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []), return_mode="median")
        return Timing(float(ms))
    fn()  # warm-up
    times: list[float] = []
    budget_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < budget_end and len(times) < 100):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), noise(times))


def noise(times_ms: Sequence[float]) -> str | None:
    """Why the times of one function's calls are too spread for their median to be its time (for the table), or
    None when they are steady."""
    median, fastest = statistics.median(times_ms), min(times_ms)
    q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    if median > 0 and (q3 - q1) / median > NOISY_SPREAD:
        return f"quartiles {q1:.3g}-{q3:.3g} ms around a median of {median:.3g} ms"
    if fastest > 0 and median / fastest > NOISY_MIN:
        return f"median {median:.3g} ms, {median / fastest:.2g}x its fastest call ({fastest:.3g} ms)"
    return None


def cpu_load() -> str:
    """The CPU's 1-minute load average beside its core count ("3.1 (2 CPUs)"): other work on the same cores slows
    the timings of a CPU benchmark down and spreads them."""
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:  # not on this platform
        load = "unknown"
    return f"{load} ({os.cpu_count()} CPUs)"


def _cuda_events_ms(fn, device, rep_ms: float, grad_to_none) -> float:
    fn()
    sync(device)
    times: list[float] = []
    while len(times) < 5 or (sum(times) < rep_ms and len(times) < 200):
        for t in grad_to_none or []:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, argv: Sequence[str] | None = None) -> dict:
    """Everything a reader needs to reproduce a figure: command, date, device and library versions."""
    env = {
        "command": "fasttune bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = str(torch.backends.cudnn.version())
    else:
        env["load average"] = cpu_load() + " at the start"
    for dist in ("transformers", "triton", "flash-attn-4", "liger-kernel", "peft", "fasttune"):
        env[dist] = _version(dist)
    return env


def check_out(out: Path, name: str, overwrite: bool) -> None:
    """Before anything runs: --out must be a folder that can be written (created if missing), and one holding an
    earlier run's <name>.* results is replaced only with --overwrite (a run of minutes to hours is not lost)."""
    from fasttune.generate.prompts import make_folder

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; name a folder (it is created if missing)")
    make_folder(out, "--out")  # writable; made only for this run: removed again if the command fails while empty
    earlier = [p for p in sorted(out.glob(f"{name}.*")) if p.suffix in (".csv", ".json", ".md", ".png")]
    if earlier and not overwrite:
        raise ConfigError(
            f"--out {out} already holds an earlier run's {', '.join(p.name for p in earlier)}; name another folder, "
            "or pass --overwrite to replace them"
        )
    for path in earlier:  # now: a run cut short must not leave the earlier plot beside its own rows
        path.unlink()


@dataclass
class Results:
    """Rows of one benchmark plus the environment they were measured in."""

    name: str
    env: dict
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        return row

    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols.extend(k for k in r if k not in cols)
        return cols

    def write(self, out_dir: Path, md_columns: Sequence[tuple[str, str]], plot: Callable[[Path], None] | None) -> dict:
        """Write <name>.csv, .json, .md (and .png when `plot` is given); returns {suffix: path}."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {s: out_dir / f"{self.name}.{s}" for s in ("csv", "json", "md")}
        with paths["csv"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self.rows)
        paths["json"].write_text(json.dumps({"env": self.env, "notes": self.notes, "rows": self.rows}, indent=1))
        paths["md"].write_text(self.markdown(md_columns))
        if plot is not None:
            paths["png"] = out_dir / f"{self.name}.png"
            plot(paths["png"])
        return paths

    def markdown(self, md_columns: Sequence[tuple[str, str]]) -> str:
        env = ", ".join(f"{k} {v}" for k, v in self.env.items() if k not in ("command", "date") and v)
        head = [f"`{self.env.get('command', '')}` ({self.env.get('date', '')}; {env})", ""]
        return "\n".join([*head, markdown_table(self.rows, md_columns), "", *self.notes, ""])


def fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01 or value == 0:
            return f"{value:.2f}"
        return f"{value:.1e}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """columns: (row key, header). Missing keys print as '-'."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def line_plot(path: Path, panels: Sequence[dict], title: str) -> None:
    """panels: [{"title", "xlabel", "ylabel", "series": {label: ([x], [y])}, "logx": bool, "kind": "line"|"bar"}]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        series = panel["series"]
        if panel.get("kind") == "bar":
            labels = list(series)
            ax.barh(labels, [series[k] for k in labels])
            ax.invert_yaxis()
        else:
            for label, (xs, ys) in series.items():
                ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, label=label)
            if panel.get("logx"):
                ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
