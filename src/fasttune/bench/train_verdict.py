"""`fasttune bench train`'s verdict: every row's tokens/s as ratios against the HF baselines, and the closing lines
that judge the training targets (docs/BENCHMARKS.md, "Against the targets") on the default configuration. Reads
the rows alone (and the benchmark's settings), so it is tested without running anything."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from fasttune.bench import baselines as hf

if TYPE_CHECKING:
    from fasttune.bench.train import TrainBench


def main_name(bench: TrainBench) -> str:
    """The row the targets are judged on: fasttune's default (attn auto, packed)."""
    return f"fasttune{' LoRA' if bench.lora else ''} auto packed"


def add_ratios(rows: list[dict]) -> None:
    """Every row as a ratio of tokens/s against HF sdpa padded, the best leak-free HF stack (the fastest HF row,
    packed or padded, whose batches leak no attention across documents; `best_hf` names it), and eager."""

    def ok(r):
        return r.get("status") == "ok" and r.get("tokens_per_s")

    hf_rows = [r for r in rows if r["stack"] == "HF" and ok(r)]
    for r in hf_rows:
        r["leak_free"] = (r.get("leak_err") or 0.0) < hf.LEAK_TOLERANCE
    padded = next((r for r in hf_rows if r["attn"] == "sdpa" and not r["packing"]), None)
    best = max((r for r in hf_rows if r["leak_free"]), key=lambda r: r["tokens_per_s"], default=None)  # padded too
    eagers = [r for r in rows if ok(r) and r.get("attn") == "eager"]
    eager = next((r for r in eagers if not r["packing"]), eagers[0] if eagers else None)  # padded: the classic
    for r in rows:
        if not ok(r):
            continue
        for key, ref in (("x_hf_sdpa_padded", padded), ("x_best_hf", best), ("x_eager", eager)):
            r[key] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        r["best_hf"] = best["config"] if best is not None else None  # None: not an earlier round's reference


def target_lines(bench: TrainBench, rows: list[dict]) -> list[str]:
    """The training targets (docs/BENCHMARKS.md, "Against the targets"; with --lora issue #15's "8B LoRA >= 1.8x HF +
    peft at its best leak-free setting"), judged on the default configuration (attn auto, packed)."""
    name = main_name(bench)
    main = next((r for r in rows if r.get("config") == name and r.get("status") == "ok"), None)
    best = next((r for r in rows if r.get("config") == (main or {}).get("best_hf")), None)
    lines = []
    if main is not None and main.get("x_hf_sdpa_padded") is not None and not bench.lora:
        lines.append(f"- target >= 3.2x HF sdpa padded: {main['x_hf_sdpa_padded']:.2f}x")
    if main is not None and best is not None:
        goal = "1.8x best leak-free HF + peft stack" if bench.lora else "1.4x best leak-free HF stack"
        lines.append(f"- target >= {goal} ({best['config']}): {name} {main['x_best_hf']:.2f}x")
        mem = main.get("peak_gib"), best.get("peak_gib")
        if None not in mem:
            lines.append(f"- peak memory {mem[0]:.1f} GiB vs {mem[1]:.1f} GiB for that stack (target: no higher)")
    if not bench.lora and (line := memory_target_line(rows)) is not None:
        lines.append(line)
    lines = lines or [f"- targets: not judged ({name} or a leak-free HF baseline did not run)"]
    return [*best_hf_legend(rows), *lines]


CPU_SMOKE_TEST = (
    "bench train without a GPU (device cpu): its targets and ratios are meant for a GPU; the CPU numbers are only a "
    "smoke test (every configuration runs), and the targets are not judged"
)


def verdict_lines(bench: TrainBench, rows: list[dict]) -> list[str]:
    """The results' closing lines: on a GPU, the targets judged (target_lines); on a CPU, which measures nothing the
    targets are about (a micro model, fp32 or bf16 CPU kernels), the legend and a line saying they are not judged."""
    if bench.device.type == "cuda":
        return target_lines(bench, rows)
    return [*best_hf_legend(rows), f"- {CPU_SMOKE_TEST}"]


def best_hf_legend(rows: list[dict]) -> list[str]:
    """The table's legend for its `x best leak-free HF` column: which row that is."""
    best = next((r["best_hf"] for r in rows if r.get("best_hf")), None)
    if best is None:
        return []
    return [f"- x best leak-free HF: tokens/s against {best}, the fastest Hugging Face row (packed or padded) whose "
            "batches let no document attend to another"]  # fmt: skip


def memory_target_line(rows: list[dict]) -> str | None:
    """Issue #14's target: the fastest fasttune row (any tokens per step) in no more memory than the leanest
    leak-free packed HF stack, against the fastest one. None without HF rows that report memory (CPU)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s") and r.get("peak_gib")]
    hf_rows = [r for r in ok if r["stack"] == "HF" and r.get("packing") and r.get("leak_free")]
    if not hf_rows:
        return None
    fastest = max(hf_rows, key=lambda r: r["tokens_per_s"])
    leanest = min(hf_rows, key=lambda r: r["peak_gib"])
    head = (f"- target >= 1.6x the fastest HF stack ({fastest['config']}) in no more memory than the leanest "
            f"({leanest['config']}, {leanest['peak_gib']:.1f} GiB): ")  # fmt: skip
    fits = [r for r in ok if r["stack"] == "fasttune" and r["peak_gib"] <= leanest["peak_gib"]]
    if not fits:
        return head + "no fasttune row fits that memory"
    best = max(fits, key=lambda r: r["tokens_per_s"])
    ratio = best["tokens_per_s"] / fastest["tokens_per_s"]
    line = head + f"{best['config']} {ratio:.2f}x in {best['peak_gib']:.1f} GiB"
    per_round = [r.get("round_tok_s") for r in (*hf_rows, *fits)]
    if any(not rates or len(rates) != len(per_round[0]) for rates in per_round):
        return line
    ratios = [max(r["round_tok_s"][i] for r in fits) / max(r["round_tok_s"][i] for r in hf_rows)
              for i in range(len(per_round[0]))]  # fmt: skip
    return (
        line + f" (round by round: {', '.join(f'{x:.2f}x' for x in ratios)}; median {statistics.median(ratios):.2f}x)"
    )
