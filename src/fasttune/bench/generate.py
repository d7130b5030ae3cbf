"""Generation benchmark: HF `generate` (sdpa, DynamicCache) against fasttune's `Generator`, side by side in one run on
the same briefly trained model, with the greedy-agreement check of fasttune/bench/generate_check.py.

    python -m fasttune.bench.generate --out runs/bench-generate          # or: fasttune bench generate ...
    python -m fasttune.bench.generate --profile --out DIR                # + kernels per decode step (profile.json)

On CUDA the default model is the Llama-3.2-1B-like `1b` preset in bf16, trained for 200 steps on a synthetic
language first (fp32 weights, bf16 autocast, ~15 s on an H200) so greedy choices have real margins; on CPU the `tiny`
preset in float32. Batch sizes (default 1 and 32) use prompts of different lengths, left-padded, from that language.
tok/s counts new tokens of the whole batch, warm (median of 3 calls); `first call s` includes capturing the graph.
`--check-fp32` (default on CUDA) repeats the batch-1 agreement check with the float32 weights. Figures:
docs/BENCHMARKS.md, "Generation".
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fasttune.bench.generate_check import TOLERANCE, greedy_agreement, hf_greedy, synthetic_tokens, train_briefly
from fasttune.bench.harness import Results, environment, line_plot, sync

if TYPE_CHECKING:
    from fasttune.bench.cli import GenerateBench

log = logging.getLogger("fasttune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
SYMBOLS = 1024  # size of the synthetic language (ids 3..1026 of the 32k vocabulary)
VOCAB = 32000


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """Pin SDPA to one backend for HF and fasttune alike (the H100's default picks cuDNN for HF's decode steps)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return sdpa_kernel([getattr(SDPBackend, names[name])])


def build_model(model_shape: str, device: str, vocab_size: int = VOCAB):
    """Random-init float32 Llama of a fasttune preset, built on `device` directly (a 1B init on the CPU takes a
    minute)."""
    from fasttune.model.build import build_preset

    torch.manual_seed(0)
    model = build_preset(model_shape, vocab_size, "sdpa", torch.float32, device).eval()
    model.generation_config.eos_token_id = None  # every call generates exactly `new_tokens`
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(batch: int, prompt_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts from the synthetic language; beyond batch 1 of lengths prompt_len/2..prompt_len, left-padded."""
    ids_BP = synthetic_tokens(batch, prompt_len, symbols=SYMBOLS, seed=10_000 + batch)
    mask_BP = torch.ones_like(ids_BP)
    if batch > 1:
        lengths_B = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=torch.Generator().manual_seed(0))
        for row, length in enumerate(lengths_B.tolist()):
            mask_BP[row, : prompt_len - length] = 0
    return (ids_BP * mask_BP).to(device), mask_BP.to(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    # one whole generate call is a host loop, not a kernel for do_bench: a synchronized host clock
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def _row(impl: str, batch: int, new_tokens: int, seconds: float, **extra) -> dict:
    return {"impl": impl, "batch": batch, "seconds": round(seconds, 4), "tok_s": round(batch * new_tokens / seconds, 1),
            "tok_s_per_seq": round(new_tokens / seconds, 1), **extra}  # fmt: skip


def _recorded_scores(model, ids_BP, mask_BP, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fasttune's float32 scores per step (no graphs: a graph's outputs are overwritten by the next replay)."""
    from fasttune.generate.fast import Generator

    gen = Generator(model, use_graphs=False)
    seen: list[torch.Tensor] = []
    select = gen._select
    gen._select = lambda logits_BV, *key: (seen.append(logits_BV.clone()), select(logits_BV, *key))[1]
    return gen.generate(ids_BP, mask_BP, max_new_tokens=new_tokens), seen


def bench_batch(model, batch: int, prompt_len: int, new_tokens: int, eager: bool = False) -> list[dict]:
    """HF generate once after a warm-up (its scores are the reference), then fasttune: a first call (graph capture
    included) and three warm calls; with `eager` (and always at batch 1) the fused decoder without graphs too,
    whose recorded scores give the largest logit difference to HF before the first differing token."""
    from fasttune.generate.fast import Generator

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids_BP, mask_BP = make_prompts(batch, prompt_len, device)
    hf_greedy(model, ids_BP, mask_BP, 4)  # warm-up: kernel loads, cuBLAS handles
    (ref_BS, ref_scores), hf_s = _timed(lambda: hf_greedy(model, ids_BP, mask_BP, new_tokens), device)
    common = {"dtype": str(dtype).removeprefix("torch.")}
    rows = [_row("hf_generate", batch, new_tokens, hf_s, speedup=1.0, **common)]

    def agreement(out_BS: torch.Tensor) -> dict:
        result = greedy_agreement(ref_scores, ref_BS[:, prompt_len:], out_BS[:, prompt_len:], TOLERANCE[dtype])
        return {k: v for k, v in result.items() if k != "per_row"}

    gen = Generator(model)

    def call():
        return gen.generate(ids_BP, mask_BP, max_new_tokens=new_tokens, pad_token_id=0)

    first_BS, first_s = _timed(call, device)
    warm = [_timed(call, device) for _ in range(3)]
    warm_s = statistics.median(s for _, s in warm)
    extra = {"first_call_s": round(first_s, 3), "capture_s": round(gen.capture_seconds, 3),
             "graphs": gen.use_graphs, "repeatable": all(torch.equal(first_BS, o) for o, _ in warm)}  # fmt: skip
    fast_rows = [_row("fasttune", batch, new_tokens, warm_s, speedup=round(hf_s / warm_s, 2), **agreement(warm[0][0]),
                      **extra, **common)]  # fmt: skip
    if device.type == "cuda" and batch == 1 and gen.decoder is not None and gen.decoder.use_kernels:
        plain = Generator(model)  # the same graphs over torch ops only: what the Triton kernels buy
        plain.decoder.use_kernels = False
        _timed(lambda: plain.generate(ids_BP, mask_BP, max_new_tokens=new_tokens), device)
        plain_BS, plain_s = _timed(lambda: plain.generate(ids_BP, mask_BP, max_new_tokens=new_tokens), device)
        fast_rows.append(_row("fasttune_torch_ops", batch, new_tokens, plain_s, speedup=round(hf_s / plain_s, 2),
                              **agreement(plain_BS), **common))  # fmt: skip
    if device.type == "cuda" and gen.decoder is not None:
        with sdpa_backend("efficient"):  # the graph keeps the backend chosen at capture: is cuDNN's the faster?
            other = Generator(model)
            _timed(lambda: other.generate(ids_BP, mask_BP, max_new_tokens=new_tokens), device)
            other_BS, other_s = _timed(lambda: other.generate(ids_BP, mask_BP, max_new_tokens=new_tokens), device)
        fast_rows.append(_row("fasttune_sdpa_efficient", batch, new_tokens, other_s, speedup=round(hf_s / other_s, 2),
                              **agreement(other_BS), **common))  # fmt: skip
    if device.type == "cuda" and (eager or batch == 1):
        (out_BS, scores), eager_s = _timed(lambda: _recorded_scores(model, ids_BP, mask_BP, new_tokens), device)
        match = agreement(out_BS)
        same = match["first_mismatch_step"] or len(scores)
        diff = max(float((a - b).abs().max()) for a, b in zip(ref_scores[:same], scores[:same], strict=False))
        fast_rows.append(_row("fasttune_no_graphs", batch, new_tokens, eager_s, speedup=round(hf_s / eager_s, 2),
                              **match, max_logit_diff=float(f"{diff:.3g}"), **common))  # fmt: skip
    return rows + fast_rows


def profile_step(model, batch: int, prompt_len: int, steps: int = 8) -> dict:
    """Kernels and summed kernel time per decode step of the fused decoder without graphs (torch.profiler, a call of
    1 + `steps` new tokens minus one of 1): with the graph's time per step, how much of a step is launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    from fasttune.generate.fast import Generator

    device = next(model.parameters()).device
    gen = Generator(model, use_graphs=False)
    ids_BP, mask_BP = make_prompts(batch, prompt_len, device)
    gen.generate(ids_BP, mask_BP, max_new_tokens=steps)  # warm-up

    def kernels(new_tokens: int) -> dict[str, list[float]]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen.generate(ids_BP, mask_BP, max_new_tokens=new_tokens)
            sync(device)
        by_name: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                by_name.setdefault(e.name[:90], []).append(e.device_time)
        return by_name

    prefill, full = kernels(1), kernels(1 + steps)
    per_step = {k: (len(v) - len(prefill.get(k, [])), sum(v) - sum(prefill.get(k, []))) for k, v in full.items()}
    top = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:14]
    return {"batch": batch, "kernels_per_step": sum(n for n, _ in per_step.values()) / steps,
            "kernel_us_per_step": round(sum(us for _, us in per_step.values()) / steps, 1),
            "top_kernels_count_us": [(k, n / steps, round(us / steps, 1)) for k, (n, us) in top]}  # fmt: skip


def run(model_shape: str = "1b", batch_sizes: Sequence[int] = (1, 32), prompt_len: int = 128, new_tokens: int = 256,
        device: str = "cuda", dtype: torch.dtype = torch.bfloat16, train_steps: int = 200, eager: bool = False,
        check_fp32: bool = True, sdpa: str = "default",
        after_batch: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Rows per (dtype, batch size, implementation), and facts about the run (training losses). A batch size that
    fails (often out of memory) is one row with its status, and `after_batch(rows)` gets the rows so far after each
    batch size, so a run cut short keeps what it measured."""
    import transformers

    dev = torch.device(device)
    model = build_model(model_shape, device)
    start = time.perf_counter()
    on_cuda = dev.type == "cuda"
    # a minute and more on a CPU before the first row: said, not silent
    log.info("training the %s model for %d steps on a synthetic language first (--train-steps), so that greedy "
             "answers are compared on a model that predicts something", model_shape, train_steps)  # fmt: skip
    losses = train_briefly(model, train_steps, batch=8 if on_cuda else 4, seq_len=256 if on_cuda else 32,
                           lr=3e-4 if on_cuda else 3e-3, symbols=SYMBOLS if on_cuda else 64)  # fmt: skip
    facts = {"train_steps": train_steps, "train_s": round(time.perf_counter() - start, 1), "losses": losses}
    common = {"model_shape": model_shape, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "torch": torch.__version__, "transformers": transformers.__version__, "sdpa_backend": sdpa}  # fmt: skip
    runs = [(copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model, batch_sizes)]
    if check_fp32 and dtype != torch.float32:
        runs.append((model, (1,)))
    rows = []
    for bench_model, sizes in runs:
        for batch in sizes:
            for row in _batch_rows(bench_model, batch, prompt_len, new_tokens, eager, sdpa):
                rows.append({**row, **common})
                log.info("%s", row_line(row))
            if after_batch is not None:
                after_batch(rows)
    return rows, facts


def row_line(row: dict) -> str:
    """One row as the line logged while the bench runs (the table at the end has every column)."""
    head = f"batch {row['batch']} {row['impl']} {row.get('dtype', '')}".rstrip()
    if row.get("status", "ok") != "ok":
        return f"{head}: {row['status']}"
    text = f"{head}: {row['tok_s']:,.0f} tok/s"
    if row.get("speedup") is not None and row["impl"] != "hf_generate":
        text += f" ({row['speedup']:.2f}x HF generate)"
    if row.get("agree") is not None:
        text += ", greedy = HF" if row["agree"] else f", greedy differs from HF ({row.get('rows_agree')} rows agree)"
    return text


def _batch_rows(model, batch: int, prompt_len: int, new_tokens: int, eager: bool, sdpa: str) -> list[dict]:
    """bench_batch's rows (status ok), or one row saying why the batch size failed: never a number it lacks."""
    from fasttune.errors import one_line

    try:
        with sdpa_backend(sdpa):
            return [{**row, "status": "ok"} for row in bench_batch(model, batch, prompt_len, new_tokens, eager=eager)]
    except Exception as e:  # noqa: BLE001  (an OOM at batch 32 must not lose batch 1's rows)
        text = one_line(e, 160)
        status = "OOM" if "out of memory" in text.lower() else f"error: {text}"
        log.warning("bench generate batch %d: %s", batch, status)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [{"impl": "hf_generate, fasttune", "batch": batch, "dtype": dtype, "status": status}]


MD_COLUMNS = [("impl", "implementation"), ("dtype", "dtype"), ("batch", "batch"), ("tok_s", "tok/s (batch)"),
              ("tok_s_per_seq", "tok/s per sequence"), ("speedup", "x HF generate"),
              ("first_call_s", "first call s"), ("capture_s", "capture s"), ("agree", "greedy = HF to near-tie"),
              ("rows_agree", "rows"), ("first_mismatch_step", "first mismatch step"),
              ("first_near_tie_step", "HF first near-tie step"), ("tolerance", "near-tie tol"),
              ("max_logit_diff", "max logit diff"), ("status", "status")]  # fmt: skip


def _plot(rows: list[dict]):
    def plot(path: Path) -> None:
        series = {f"{r['impl']} {r['dtype']} b{r['batch']}": r["tok_s"] for r in rows if r.get("tok_s")}
        line_plot(path, [{"title": "generation throughput", "ylabel": "", "xlabel": "tokens/s (whole batch)",
                          "series": series, "kind": "bar"}], "fasttune bench generate")  # fmt: skip

    return plot


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fasttune.bench.generate ...` = `fasttune bench generate ...`."""
    import sys

    from fasttune.cli import main as cli_main

    return cli_main(["bench", "generate", *(sys.argv[1:] if argv is None else argv)])


def _check(args: GenerateBench) -> tuple[list[int], str]:
    """The options, before the model is built and trained: (batch sizes, device), or one line naming the bad
    option."""
    from fasttune.bench.cli import _ints, _positive
    from fasttune.bench.fit import check_generate
    from fasttune.bench.harness import check_out
    from fasttune.config.base_config import MODEL_PRESETS
    from fasttune.errors import ConfigError
    from fasttune.model.load import inference_device

    _positive(args, ("prompt_len", "new_tokens"))
    _positive(args, ("train_steps",), least=0)
    if args.shape is not None and args.shape not in MODEL_PRESETS:
        raise ConfigError(f"--shape {args.shape!r} is not valid; choose one of: {', '.join(MODEL_PRESETS)}")
    batch_sizes = _ints("--batch-sizes", args.batch_sizes)
    if args.prompt_len < 2 and max(batch_sizes) > 1:
        raise ConfigError(f"--prompt-len {args.prompt_len}: a batch above 1 takes prompts of --prompt-len/2 to "
                          "--prompt-len tokens, none empty; use --prompt-len 2 or more")  # fmt: skip
    device = inference_device(args.device)  # one line when not valid or not here
    if args.profile and device.type != "cuda":
        raise ConfigError(f"--profile counts CUDA kernels per decode step: it needs a GPU (the device is {device}); "
                          "leave it out here")  # fmt: skip
    if args.eager and device.type != "cuda":
        raise ConfigError(f"--eager adds rows without CUDA graphs beside the graphed ones: on {device} the fasttune "
                          "rows run without graphs already; leave it out here")  # fmt: skip
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    check_generate(args.shape or ("1b" if cuda else "tiny"), device, dtype, batch_sizes, args.prompt_len,
                   args.new_tokens, VOCAB)  # fmt: skip
    if args.out is not None:  # last: --overwrite removes the earlier run's files
        check_out(args.out, "generate", args.overwrite)
    return batch_sizes, str(device)


def run_bench(args: GenerateBench) -> int:
    from fasttune.bench.cli import command_line

    batch_sizes, device = _check(args)
    if not logging.getLogger().handlers:  # run as a module; the `fasttune` CLI configures logging itself
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    on_cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    train_steps = args.train_steps if args.train_steps is not None else (200 if on_cuda else 30)
    res = Results("generate", environment(torch.device(device), command_line(args, "generate")))

    def after_batch(rows: list[dict]) -> None:
        res.rows = rows
        if args.out is not None:
            res.write(args.out, MD_COLUMNS, None)

    rows, facts = run(args.shape or ("1b" if on_cuda else "tiny"), batch_sizes,
                      args.prompt_len, args.new_tokens, device, dtype, train_steps, args.eager,
                      on_cuda and args.check_fp32, args.sdpa, after_batch)  # fmt: skip
    res.rows = rows
    losses = " -> ".join(f"{x:.4f}" for x in facts["losses"][:1] + facts["losses"][-1:])
    res.notes.append(f"trained {facts['train_steps']} steps in {facts['train_s']} s, loss {losses or '-'}")
    print(res.markdown(MD_COLUMNS))
    if args.out is not None:
        paths = res.write(args.out, MD_COLUMNS, _plot(rows))
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    if args.profile and on_cuda:
        model = build_model(args.shape or "1b", device).to(dtype)
        profiles = [profile_step(model, b, args.prompt_len) for b in (1, 32)]
        print(json.dumps(profiles, indent=1))
        if args.out is not None:
            (args.out / "profile.json").write_text(json.dumps(profiles, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
