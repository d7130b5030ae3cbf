"""Generation benchmark: HF `generate` (sdpa, DynamicCache) against fasttune's fast path, side by side in one run on the
same random-init model, with a token-for-token check of the greedy outputs.

    python -m fasttune.bench.generate --out runs/bench-generate          # or: fasttune bench generate ...
    python -m fasttune.bench.generate --diagnose --new-tokens 48         # where scores first differ, bit for bit

On CUDA the default model is the Llama-3.2-1B-like `1b` preset in bf16; on CPU the `tiny` preset in float32, so the
benchmark runs anywhere. tok/s counts new tokens of the whole batch; `first call` includes capturing the CUDA graphs.

Measured 2026-11-25, H100 80GB (nvidia-h100-x1), torch 2.11.0+cu130, transformers 5.17.0, default command, 1b shape:
HF generate 13.6 tok/s at batch 1 (this host ran HF's Python ~6x slower than the 81.5 of ANCHORS.md), fast path warm
338-363 tok/s at batch 1 and 2250-2290 tok/s (286/sequence) at batch 8. `--diagnose`: fast-path scores equal HF's
bit for bit at batch 1 over 48 steps, but at batch 8 HF generate does not reproduce its own scores (first differs at
step 1) and neither does the fast path: SDPA picks cuDNN (backend 3) for the decode steps there, the likely source.
So greedy tokens match HF up to where HF stops matching itself; `--sdpa flash` pins a backend for both (not yet run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fasttune.bench.harness import Results, environment, line_plot, sync
from fasttune.device import pick_device
from fasttune.model.build import head_dim as config_head_dim

log = logging.getLogger("fasttune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """Pin SDPA to one backend for HF and fasttune alike. On the H100 (torch 2.11) the default picks cuDNN for decode
    steps, and HF generate then does not reproduce its own tokens run to run (docs in the module docstring)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "math": "MATH",
    }
    return sdpa_kernel([getattr(SDPBackend, backend[name])])


def build_model(model_shape: str, device: str, dtype: torch.dtype, vocab_size: int = 32000):
    """Random-init Llama of a fasttune preset, built on `device` directly (a 1B init on the CPU takes a minute)."""
    from fasttune.model.build import build_preset

    torch.manual_seed(0)
    model = build_preset(model_shape, vocab_size, "sdpa", dtype, device).eval()
    model.generation_config.eos_token_id = None  # every call generates exactly `new_tokens`
    model.generation_config.pad_token_id = 0
    return model


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    # one whole generate call is a multi-second host loop, not a kernel for do_bench: a synchronized host clock
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def _hf_generate(model, input_ids_BP: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        input_ids_BP,
        attention_mask=torch.ones_like(input_ids_BP),
        max_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=0,
    )


def _match(ref_BS: torch.Tensor, out_BS: torch.Tensor, prompt_len: int) -> dict:
    ref, out = ref_BS[:, prompt_len:].cpu(), out_BS[:, prompt_len:].cpu()
    if ref.shape != out.shape:
        return {"tokens_match": False, "match_fraction": 0.0, "first_mismatch_step": 0}
    same = ref == out
    bad_steps = (~same).any(0).nonzero()
    return {
        "tokens_match": bool(same.all()),
        "match_fraction": round(same.float().mean().item(), 4),
        "first_mismatch_step": int(bad_steps[0]) if len(bad_steps) else None,
    }


def _row(impl: str, batch: int, new_tokens: int, seconds: float, **extra) -> dict:
    return {
        "impl": impl,
        "batch": batch,
        "seconds": round(seconds, 4),
        "tok_s": round(batch * new_tokens / seconds, 1),
        "tok_s_per_seq": round(new_tokens / seconds, 1),
        **extra,
    }


def bench_batch(model, batch: int, prompt_len: int, new_tokens: int, eager: bool = True) -> list[dict]:
    """HF generate twice after a warm-up (the second run shows whether HF reproduces itself), then per fast variant a
    first call (graph capture included) and a warm call. `tokens_match` compares with HF's first run, `self_match`
    a run with the one before it."""
    from fasttune.generate.fast import FastGenerator

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(batch)
    prompt_BP = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    _hf_generate(model, prompt_BP, 8)  # warm-up: kernel loads, cuBLAS handles
    ref_BS, hf_s = _timed(lambda: _hf_generate(model, prompt_BP, new_tokens), device)
    again_BS, again_s = _timed(lambda: _hf_generate(model, prompt_BP, new_tokens), device)
    hf_s = min(hf_s, again_s)
    self_match = _match(ref_BS, again_BS, prompt_len)
    rows = [
        _row(
            "hf_generate",
            batch,
            new_tokens,
            hf_s,
            speedup=1.0,
            tokens_match=True,
            self_match=self_match["tokens_match"],
        )
    ]
    if not self_match["tokens_match"]:
        rows[0]["note"] = f"HF's second run differs from its first at step {self_match['first_mismatch_step']}"

    variants = [("fasttune_eager", False)] if eager else []
    if device.type == "cuda":
        variants.append(("fasttune_graphs", True))
    for impl, use_graphs in variants:
        fast = FastGenerator(model, use_graphs=use_graphs)

        def call(fast=fast):
            return fast.generate(prompt_BP, max_new_tokens=new_tokens, pad_token_id=0)

        first_BS, first_s = _timed(call, device)
        out_BS, warm_s = _timed(call, device)
        extra = {
            "first_call_tok_s": round(batch * new_tokens / first_s, 1),
            "capture_s": round(fast.capture_seconds, 2),
            "self_match": torch.equal(first_BS, out_BS),
        }
        if use_graphs and not fast.use_graphs:
            extra["note"] = "graph capture failed: ran eagerly (see the log)"
        match = _match(ref_BS, out_BS, prompt_len)
        rows.append(_row(impl, batch, new_tokens, warm_s, speedup=round(hf_s / warm_s, 2), **match, **extra))
        del fast  # frees its KV cache and graphs before the next variant
    return rows


def run(
    model_shape: str = "1b",
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 256,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    eager: bool = True,
    sdpa: str = "default",
) -> list[dict]:
    """One row per (batch size, implementation); shared fields say what ran where. `sdpa` pins SDPA's backend."""
    import transformers

    dev = torch.device(device)
    model = build_model(model_shape, device, dtype)
    common = {
        "model_shape": model_shape,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sdpa_backend": sdpa,
    }
    rows = []
    for batch in batch_sizes:
        with sdpa_backend(sdpa):
            batch_rows = bench_batch(model, batch, prompt_len, new_tokens, eager=eager)
        for row in batch_rows:
            rows.append({**row, **common})
            log.info("%s", row)
    return rows


def _first_diff(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> dict:
    for step, (a, b) in enumerate(zip(ref, got, strict=True)):
        if not torch.equal(a, b):
            return {"first_diff_step": step, "max_abs_diff": float((a - b).abs().max())}
    return {"first_diff_step": None, "max_abs_diff": 0.0}


def _dynamic_loop(model, prompt_BP: torch.Tensor, new_tokens: int) -> list[torch.Tensor]:
    """Greedy scores from HF's DynamicCache driven by the fast path's forward arguments: tells a difference made by
    the fixed cache from one made by the loop."""
    from transformers import DynamicCache

    from fasttune.generate.fast import _cache_kwarg

    cache = DynamicCache(config=model.config)
    ids_BQ, pos_BQ = prompt_BP, torch.ones_like(prompt_BP).cumsum(-1) - 1
    scores = []
    for _ in range(new_tokens):
        out = model(
            input_ids=ids_BQ, position_ids=pos_BQ, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache}
        )
        scores.append(out.logits[:, -1, :].float())
        ids_BQ, pos_BQ = scores[-1].argmax(-1)[:, None], pos_BQ[:, -1:] + 1
    return scores


def _sdpa_choice(model, batch: int, kv_len: int) -> dict:
    """SDPA's backend for a decode step on packed keys (DynamicCache) and on a view of a longer buffer (fixed cache)."""
    cfg, dev, dtype = model.config, model.device, model.dtype
    head_dim = config_head_dim(cfg)
    q = torch.randn(batch, cfg.num_attention_heads, 1, head_dim, device=dev, dtype=dtype)
    packed = torch.randn(batch, cfg.num_key_value_heads, kv_len, head_dim, device=dev, dtype=dtype)
    view = torch.randn(batch, cfg.num_key_value_heads, kv_len + 128, head_dim, device=dev, dtype=dtype)[:, :, :kv_len]
    try:
        return {
            name: int(torch._fused_sdp_choice(q, k, k, enable_gqa=True))
            for name, k in (("packed", packed), ("view", view))
        }
    except (AttributeError, RuntimeError, TypeError) as e:
        return {"error": str(e)}


@torch.no_grad()
def diagnose(model, batch: int, prompt_len: int, new_tokens: int) -> list[dict]:
    """Where fast-path scores first differ, bit for bit, from HF generate's: HF itself again, a DynamicCache loop,
    the fast path's loop (without graphs) twice."""
    from fasttune.generate.fast import FastGenerator

    device = next(model.parameters()).device
    prompt_BP = torch.randint(
        3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)
    )
    prompt_BP = prompt_BP.to(device)

    def hf():
        out = model.generate(
            prompt_BP,
            attention_mask=torch.ones_like(prompt_BP),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return list(out.logits)

    def fast():
        gen = FastGenerator(model, use_graphs=False)
        scores: list[torch.Tensor] = []
        select = gen._select
        gen._select = lambda logits_BV, *key: (scores.append(logits_BV.clone()), select(logits_BV, *key))[1]
        gen.generate(prompt_BP, max_new_tokens=new_tokens)
        return scores

    ref = hf()
    variants = {
        "hf_again": hf,
        "dynamic_loop": lambda: _dynamic_loop(model, prompt_BP, new_tokens),
        "fast_eager": fast,
        "fast_eager_again": fast,
    }
    rows = [{"batch": batch, "variant": name, **_first_diff(ref, fn())} for name, fn in variants.items()]
    rows.append({"batch": batch, "variant": "sdpa_backend", **_sdpa_choice(model, batch, prompt_len + 1)})
    return rows


MD_COLUMNS = [("impl", "implementation"), ("batch", "batch"), ("tok_s", "tok/s (batch)"),
              ("tok_s_per_seq", "tok/s per sequence"), ("speedup", "x HF generate"),
              ("first_call_tok_s", "first call tok/s"), ("capture_s", "graph capture s"),
              ("tokens_match", "greedy tokens = HF"), ("first_mismatch_step", "first mismatch step"),
              ("self_match", "HF = HF rerun")]  # fmt: skip


def _plot(rows: list[dict]):
    def plot(path: Path) -> None:
        series = {f"{r['impl']} b{r['batch']}": r["tok_s"] for r in rows if r.get("tok_s")}
        line_plot(path, [{"title": "generation throughput", "ylabel": "", "xlabel": "tokens/s (whole batch)",
                          "series": series, "kind": "bar"}], "fasttune bench generate")  # fmt: skip

    return plot


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="fasttune bench generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, help="model preset (default: 1b on CUDA, tiny on CPU)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-eager", action="store_true", help="skip the fast path without graphs")
    p.add_argument("--out", type=Path, default=None, help="folder for generate.csv/.json/.md/.png")
    p.add_argument("--sdpa", default="default", choices=SDPA_BACKENDS, help="pin SDPA's backend for all runs")
    p.add_argument("--diagnose", action="store_true", help="find where fast-path scores first differ from HF's")
    p.add_argument("--verbose", action="store_true", help="debug logging of fasttune (e.g. graph capture failures)")
    return p.parse_args(argv)


def run_diagnose(shape: str, batch_sizes: Sequence[int], prompt_len: int, new_tokens: int, device: str, dtype) -> list:
    model = build_model(shape, device, dtype)
    return [r for b in batch_sizes for r in diagnose(model, b, prompt_len, new_tokens)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:  # run as a module; the `fasttune` CLI configures logging itself
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    device = str(pick_device(args.device))
    on_cuda = device.startswith("cuda")
    shape = args.shape or ("1b" if on_cuda else "tiny")
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.diagnose:
        with sdpa_backend(args.sdpa):
            rows = run_diagnose(shape, batch_sizes, args.prompt_len, args.new_tokens, device, dtype)
        print("\n".join(str(r) for r in rows))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "diagnose.json").write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    rows = run(
        shape, batch_sizes, args.prompt_len, args.new_tokens, device, dtype, eager=not args.no_eager, sdpa=args.sdpa
    )
    res = Results("generate", environment(torch.device(device), ["generate", *(argv or [])]), rows=rows)
    print(res.markdown(MD_COLUMNS))
    if args.out is not None:
        paths = res.write(args.out, MD_COLUMNS, _plot(rows))
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
