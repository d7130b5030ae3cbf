"""Doctor rows, isolation of each check, and output as a rich table or JSON.

A check is a function `check(machine) -> list[Row]`. `run_check` turns any exception it raises into one `fail`
row carrying the error, so one broken probe never hides the others (or crashes doctor).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fasttune.errors import one_line

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"  # skip: does not apply to this machine, never a failure
STYLES = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


@dataclass
class Row:
    """One line of the doctor table."""

    id: str  # stable key for --json consumers and tests, e.g. "nvcc" or "sdpa.CUDNN_ATTENTION"
    section: str  # table group, e.g. "CUDA"
    name: str  # what was checked, as shown in the table
    status: str  # ok | warn | fail | skip
    reason: str  # what was found and why it matters
    fix: str = ""  # a concrete command or setting; empty when nothing needs doing


@dataclass
class Report:
    """All rows plus the machine-specific advice and the closing `auto` line."""

    rows: list[Row] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    closing: str = ""
    auto: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if any(r.status == FAIL for r in self.rows) else 0

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in (OK, WARN, FAIL, SKIP)}


Check = Callable[..., list[Row]]


def run_check(check: Check, machine, *, section: str, debug: bool = False) -> list[Row]:
    """Run one check; an exception becomes a `fail` row naming the check and the error (traceback with debug)."""
    try:
        return list(check(machine))
    except Exception as exc:  # noqa: BLE001 - doctor must report, never crash
        if debug:
            traceback.print_exc()
        name = check.__name__.removeprefix("check_")
        reason = f"the check itself crashed: {one_line(exc, 300, typed=True)}"
        fix = "rerun with --debug for the traceback and report it at the fasttune issue tracker"
        return [Row(name, section, name.replace("_", " "), FAIL, reason, fix)]


def to_json(report: Report) -> str:
    """Every row with status, reason and fix, plus counts, advice and the `auto` choice."""
    payload = {
        "checks": [asdict(r) for r in report.rows],
        "counts": report.counts(),
        "exit_code": report.exit_code,
        "advice": report.advice,
        "auto": report.auto,
        "closing": report.closing,
    }
    return json.dumps(payload, indent=2)


def console() -> Console:
    """Colors only on a terminal (rich drops them when piped); piped output gets a width that keeps rows readable."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=140)


def render(report: Report, out: Console | None = None) -> None:
    out = out or console()
    table = Table(title="fasttune doctor", show_lines=False, expand=False)
    # fold, not ellipsis: a long wheel tag or path must stay complete in the table.
    wrap = {"overflow": "fold"}
    for col, kwargs in (("check", {"no_wrap": True}), ("status", {"no_wrap": True}), ("details", wrap), ("fix", wrap)):
        table.add_column(col, **kwargs)
    groups = _by_section(report.rows)
    for i, (section, rows) in enumerate(groups):
        table.add_row(f"[bold]{section}[/bold]", "", "", "")
        for r in rows:
            table.add_row(f"  {r.name}", f"[{STYLES[r.status]}]{r.status}[/]", _esc(r.reason), _esc(r.fix))
        if i < len(groups) - 1:
            table.add_section()
    out.print(table)
    if report.advice:
        out.print("[bold]Recommended for this machine[/bold]")
        for line in report.advice:
            out.print(f"  - {_esc(line)}", soft_wrap=False)
    counts = report.counts()
    out.print(", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
    if report.closing:
        out.print(_esc(report.closing))


def _by_section(rows: Iterable[Row]) -> list[tuple[str, list[Row]]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.section, []).append(r)
    return list(groups.items())


def _esc(text: str) -> str:
    """Literal text: pip extras like fasttune[fa4] must not be read as rich markup."""
    return escape(text)
