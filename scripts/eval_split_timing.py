#!/usr/bin/env python3
"""How long `fasttune eval --checkpoint RUN` (no --data) takes to rebuild a run's validation split: every record
tokenized (build_data, what it did before, and still does when the input files changed) against the held-out ones
alone (build_validation, while the files are the run's: their digest), on generated short Alpaca records
(docs/GENERATE.md, "eval of a run").

    python scripts/eval_split_timing.py [--records 200000] [--repeat 2] [--out /tmp/split-timing]

Writes --records records to --out/alpaca.jsonl, trains fasttune's own tokenizer on them (as a run without --model
does; cached in --out), then times input_digest, build_data and build_validation --repeat times each, checks that both
give the same validation samples, and prints the times with the versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def write_records(path: Path, n: int) -> None:
    """`n` short Alpaca records (an arithmetic question and its answer, ~90 bytes each), seed 0."""
    rng = random.Random(0)
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    with path.open("w") as f:
        for _ in range(n):
            a, b, name = rng.randint(0, 999), rng.randint(0, 999), rng.choice(list(ops))
            record = {"instruction": f"What is {a} {name} {b}?", "input": "", "output": f"{a} {name} {b} is "
                      f"{ops[name](a, b)}."}  # fmt: skip
            f.write(json.dumps(record) + "\n")


def timed(fn, repeat: int) -> tuple[float, object]:
    """(the fastest of `repeat` calls of fn, in seconds; its result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="/tmp/split-timing")
    args = p.parse_args(argv)

    import transformers

    from fasttune.config.experiments import get_experiment
    from fasttune.data.pipeline import build_data, build_validation, input_digest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "alpaca.jsonl"
    write_records(data, args.records)
    cfg = get_experiment("sft")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data), max_documents=None,
                                                            cache_dir=str(out / "tok-cache")))  # fmt: skip
    tokenizer = build_data(cfg).tokenizer  # trained once (and cached), as a run without --model trains it
    digest, _ = timed(lambda: input_digest(cfg.data), args.repeat)
    whole, full = timed(lambda: build_data(cfg, tokenizer=tokenizer), args.repeat)
    alone, (val, _) = timed(lambda: build_validation(cfg, tokenizer), args.repeat)
    assert list(val) == list(full.val), "build_validation gave other samples than build_data"
    size = data.stat().st_size / 1e6
    print(f"{args.records:,} records ({size:.0f} MB), {len(full.val):,} held out; python {platform.python_version()}, "
          f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}")  # fmt: skip
    print(
        f"input_digest {digest:.2f} s, build_data {whole:.2f} s, build_validation {alone:.2f} s ({whole / alone:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
