"""Where `fasttune eval`'s results go: --output-dir checked before any work (output_files), completions.jsonl and
summary.json written there and the summary printed as a table (report)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fasttune.errors import FasttuneError
from fasttune.eval.cli import EvalArgs

log = logging.getLogger("fasttune")


SAMPLING = ("top_p", "top_k", "seed")
"""Settings of summary.json that only sampling (--temperature above 0) reads: the printed table leaves them out of a
greedy run (summary.json keeps them all, with top_k null)."""


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fasttune eval", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    greedy = summary.get("temperature") == 0
    for key, value in summary.items():
        if key in SAMPLING and (greedy or value is None):
            continue  # greedy decoding reads none of them; top_k None: no top-k filter
        if key == "temperature" and greedy:
            value = "0 (greedy)"
        elif isinstance(value, float) and key not in ("temperature", "top_p"):
            value = (f"{value:.2%}" if key.endswith("_match") else f"{value:,.0f}" if key.endswith("_per_s")
                     else f"{value:,.2f}" if key == "perplexity" else f"{value:.4f}")  # fmt: skip
        table.add_row(key, str(value))
    Console(file=sys.stdout).print(table)


def output_files(a: EvalArgs, sources: Sequence[str] | None) -> tuple[Path, Path] | None:
    """(completions.jsonl, summary.json) in --output-dir, checked before any work: a file this eval writes
    (summary.json, completions.jsonl with --generate) is replaced with --overwrite only; one it does not write does
    not stop it (report removes it under --overwrite, as no longer this folder's result). `sources`: the data paths
    read (never written over)."""
    if a.output_dir is None:
        return None
    out = Path(a.output_dir)
    if out.exists() and not out.is_dir():
        raise FasttuneError(f"--output-dir {out} is a file; choose a folder")
    files = (out / "completions.jsonl", out / "summary.json")
    from fasttune.generate.prompts import make_folder, refuse_writing_over

    for source in sources or ():
        what = "--data file" if Path(source).is_file() else "--data folder"
        for f in (out, *files):  # the folder first: inside the --data folder, the message names the folder given
            refuse_writing_over(f, source, "--output-dir", what)
    from fasttune.train.run_dir import refuse_writing_into_run

    refuse_writing_into_run(out, "--output-dir", "choose a folder outside checkpoints/, adapter/ and merged/, e.g. "
                            "an eval/ folder beside them")  # fmt: skip
    taken = [f.name for f in files[0 if a.generate else 1 :] if f.exists()]
    if taken and not a.overwrite:
        raise FasttuneError(f"--output-dir {out} already holds {', '.join(taken)}; choose another folder or pass "
                            "--overwrite to replace them")  # fmt: skip
    make_folder(out, "--output-dir")  # now, not after minutes of work
    return files


def report(files: tuple[Path, Path] | None, rows: list[dict], summary: dict, overwrite: bool = False) -> None:
    """completions.jsonl (when --generate) and summary.json written to --output-dir, the summary printed. Without
    --generate an older completions.jsonl there is not this eval's: removed under --overwrite, else kept and said."""
    from fasttune.generate.prompts import write_atomic, write_jsonl

    if files is not None:
        if rows:
            write_jsonl(files[0], rows)
        elif files[0].exists() and overwrite:
            files[0].unlink()
            log.info("--overwrite: removed the older %s (this eval generated no answers: no --generate), so that it is "
                     "not read as this eval's", files[0])  # fmt: skip
        elif files[0].exists():
            log.warning("%s is of an earlier eval (this one generated no answers: no --generate); kept (--overwrite "
                        "removes it)", files[0])  # fmt: skip
        write_atomic(files[1], json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    if files is not None:
        print(f"written: {files[1]}" + (f", {files[0]}" if rows else ""), file=sys.stderr)
