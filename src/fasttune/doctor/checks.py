"""`fasttune doctor` (also `python main.py --doctor`): which fast paths work on this machine, and how to fix the rest.

Prints a table of checks (ok / warn / fail / skip, the reason, a fix command), advice that fits this GPU, and the
attention backend `auto` would pick here. `--json` prints the same as JSON. Every check is isolated: an exception
in one becomes a `fail` row, never a crash (traceback only with --debug). Exit code 1 when any check fails.
"""

from __future__ import annotations

import sys
import traceback

from rich.console import Console

from fasttune.doctor import attn, packages, system, tools
from fasttune.doctor.cli import DoctorArgs
from fasttune.doctor.machine import Machine, detect
from fasttune.doctor.report import FAIL, Report, Row, render, run_check, to_json
from fasttune.errors import one_line

# (section, check) in table order.
CHECKS = (
    ("Python", system.check_python),
    ("Python", system.check_torch),
    ("Python", system.check_transformers),
    ("Python", system.check_pip),
    ("CUDA", system.check_cuda),
    ("CUDA", system.check_gpu),
    ("CUDA", system.check_driver),
    ("CUDA", system.check_distributed),
    ("Build tools", tools.check_nvcc),
    ("Build tools", tools.check_gcc),
    ("Build tools", tools.check_cxx),
    ("Build tools", tools.check_ninja),
    ("Attention", attn.check_sdpa_kernels),
    ("Attention", attn.check_sdpa_default),
    ("Attention", attn.check_flex_varlen),
    ("Attention", attn.check_flash_attn),
    ("Attention", attn.check_backends),
    ("Packages", packages.check_triton),
    ("Packages", packages.check_liger),
    ("Packages", packages.check_peft),
    ("Packages", packages.check_torchao),
    ("Resources", tools.check_alloc_conf),
    ("Resources", tools.check_disk),
    ("Resources", tools.check_ram),
)


def diagnose(debug: bool = False, quick: bool = False, machine: Machine | None = None) -> Report:
    """Run every check on `machine` (default: this one, detected and probed) and build the report; never raises."""
    report = Report()
    try:
        machine = machine or attn.gather(detect(), run=not quick, debug=debug)
    except Exception as exc:  # noqa: BLE001 - without machine facts no other check can run
        if debug:
            traceback.print_exc()
        reason = f"cannot inspect torch/CUDA: {type(exc).__name__}: {exc}"
        report.rows.append(
            Row("machine", "Python", "torch / CUDA", FAIL, reason, "pip install --force-reinstall torch")
        )
        return report
    for section, check in CHECKS:
        report.rows += run_check(check, machine, section=section, debug=debug)
    _finish(report, machine, debug)
    return report


def _finish(report: Report, machine, debug: bool) -> None:
    """Advice and the closing `auto` line, each isolated like a check."""
    from fasttune.doctor.advice import advise

    try:
        report.advice = advise(machine, report.rows)
    except Exception as exc:  # noqa: BLE001
        if debug:
            traceback.print_exc()
        report.advice = [f"(advice unavailable: {one_line(exc, 300, typed=True)})"]
    try:
        report.closing = attn.closing_line(machine)
        report.auto = machine.auto
    except Exception as exc:  # noqa: BLE001
        if debug:
            traceback.print_exc()
        reason = f"the auto resolver failed: {one_line(exc, 300, typed=True)}"
        report.rows.append(Row("auto", "Attention", "auto resolver", FAIL, reason, "rerun with --debug and report it"))
        report.closing = "attn_implementation='auto' could not be resolved here (see the 'auto resolver' row)."


def main(args: DoctorArgs | list[str], machine: Machine | None = None) -> int:
    """Run the checks and print the report (--debug: tracebacks of crashing checks); `machine` replaces detection
    (tests: simulated machines). `args` may also be the command line after `fasttune doctor`."""
    if not isinstance(args, DoctorArgs):
        from fasttune.cli import parse

        args = parse(["doctor", *args])
    debug = args.debug
    if sys.stderr.isatty() and not args.json:
        with Console(stderr=True).status("fasttune doctor: running checks and tiny kernel probes (--quick skips them)"):
            report = diagnose(debug=debug, quick=args.quick, machine=machine)
    else:
        report = diagnose(debug=debug, quick=args.quick, machine=machine)
    if args.json:
        sys.stdout.write(to_json(report) + "\n")
    else:
        render(report)
    return report.exit_code
