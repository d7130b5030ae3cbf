"""`fasttune bench attention`: every attention backend, causal, forward and forward+backward time, TFLOP/s and
max error against an fp32 reference, over sequence lengths, head dims and two layouts:

  padded: B = tokens // seq rows of `seq` keys, right padding of 0/6/12/19% on rows 1, 2, 3 (mod 4), 2D mask
          (what transformers hands an attention function for a padded batch; None when nothing is padded);
          every backend runs right-padded rows dense (no real query sees a right pad under causality);
  padded-left (on request): the same rows padded on the left, which every backend unpads;
  packed: one row of `tokens` tokens, documents of `seq` tokens end to end, boundaries as cu_seq_lens kwargs.

The backends are called through transformers' attention registry exactly as a model calls them, so the numbers
are those of the training path. `auto` is fasttune's registered auto function, which routes each call (auto_plan).
On a CPU a row whose calls were noisy (harness.noise: other work on the same cores) says so, and no ratio to the
best kernel, nor the summary's verdict, is drawn from a shape with one; the load average is printed beside them.

Shape legend: B rows, H heads, S sequence (keys per row), D head dim, T tokens.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fasttune.bench.harness import Results, cpu_load, line_plot, reset_peak_memory, sync, timing
from fasttune.errors import one_line
from fasttune.model.flops import attention_flops

log = logging.getLogger("fasttune")

SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
LAYOUTS = ("padded", "packed")
ALL_LAYOUTS = (*LAYOUTS, "padded-left")  # left padding: the unpadding path (right-padded rows run dense)
# Eager materialises B*H*S*S scores (bf16) plus an fp32 softmax: above this many score elements it takes tens of
# GB and seconds per call, and only confirms that it is the slowest.
EAGER_MAX_SCORES = 2**31


@dataclass
class Case:
    """One input: tensors, what the attention function receives, and the documents for FLOPs and the reference."""

    q_BHSD: torch.Tensor
    k_BHSD: torch.Tensor
    v_BHSD: torch.Tensor
    mask_BS: torch.Tensor | None
    kwargs: dict
    docs: list[tuple[int, int, int]]  # (row, start, length) of every real document

    @property
    def doc_lens(self) -> list[int]:
        return [n for _, _, n in self.docs]


def make_case(layout: str, seq: int, tokens: int, n_heads: int, head_dim: int, device, dtype, seed: int = 0) -> Case:
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows, width = (1, tokens) if layout == "packed" else (max(1, tokens // seq), seq)

    def rand():
        x = torch.randn(rows, n_heads, width, head_dim, generator=g).to(device=device, dtype=dtype)
        return x.requires_grad_()

    q, k, v = rand(), rand(), rand()
    if layout == "packed":
        starts = list(range(0, tokens, seq))
        docs = [(0, s, min(seq, tokens - s)) for s in starts]
        cu = torch.tensor([*starts, tokens], dtype=torch.int32, device=device)
        longest = max(n for _, _, n in docs)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return Case(q, k, v, None, kwargs, docs)
    lens = [seq - (r % 4) * (seq // 16) for r in range(rows)]
    mask_BS = torch.arange(seq, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    docs = [(r, 0, n) for r, n in enumerate(lens)]
    if layout == "padded-left":
        mask_BS, docs = mask_BS.flip(1), [(r, seq - n, n) for r, n in enumerate(lens)]
    return Case(q, k, v, None if bool(mask_BS.all()) else mask_BS, {}, docs)


def reference(case: Case) -> list[torch.Tensor]:
    """fp32 causal attention of each real document on its own: [out_HND per document]."""
    outs = []
    with torch.no_grad():
        for r, s, n in case.docs:
            q, k, v = (x[r : r + 1, :, s : s + n].float() for x in (case.q_BHSD, case.k_BHSD, case.v_BHSD))
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True)[0])
    return outs


def max_error(out_BSHD: torch.Tensor, case: Case, ref: list[torch.Tensor]) -> float:
    err = 0.0
    for (r, s, n), ref_HND in zip(case.docs, ref, strict=True):
        got_HND = out_BSHD[r, s : s + n].transpose(0, 1).float()
        err = max(err, float((got_HND - ref_HND).abs().max()))
    return err


def attention_fn(hf_name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[hf_name]


def measure(backend: str, hf_name: str, case: Case, ref, device, head_dim: int) -> dict:
    """Forward (no grad) and forward+backward times of one backend on one case, and its max error."""
    fn = attention_fn(hf_name)  # through transformers' registry, exactly as a model calls it
    q, k, v = case.q_BHSD, case.k_BHSD, case.v_BHSD
    scale = head_dim**-0.5

    def fwd():
        return fn(None, q, k, v, case.mask_BS, scaling=scale, dropout=0.0, **case.kwargs)[0]

    with torch.no_grad():
        err = max_error(fwd(), case, ref)
        fwd_t = timing(fwd, device)
    dout_BSHD = torch.randn_like(q.transpose(1, 2))

    def fwd_bwd():
        fwd().backward(dout_BSHD)

    fwd_bwd_t = timing(fwd_bwd, device, grad_to_none=[q, k, v])
    n_heads = q.shape[1]
    row = {
        "fwd_ms": fwd_t.ms,
        "fwd_bwd_ms": fwd_bwd_t.ms,
        "fwd_tflops": attention_flops(case.doc_lens, n_heads, head_dim, backward=False) / fwd_t.ms / 1e9,
        "fwd_bwd_tflops": attention_flops(case.doc_lens, n_heads, head_dim, backward=True) / fwd_bwd_t.ms / 1e9,
        "max_err": err,
    }
    noisy = [f"{what}: {t.noise}" for what, t in (("fwd", fwd_t), ("fwd+bwd", fwd_bwd_t)) if t.noise]
    return {**row, "noisy": "; ".join(noisy)} if noisy else row


def _skip_reason(backend: str, case: Case, seq: int, layout: str) -> str | None:
    width = case.q_BHSD.shape[2]
    if backend == "eager" and case.q_BHSD.shape[0] * case.q_BHSD.shape[1] * width * width > EAGER_MAX_SCORES:
        return f"skipped: eager would materialise {case.q_BHSD.shape[1]}x{width}x{width} scores per row"
    return None


def run(
    device: torch.device,
    dtype: torch.dtype,
    *,
    backends: Sequence[str],
    seq_lens: Sequence[int] = SEQ_LENS,
    head_dims: Sequence[int] = HEAD_DIMS,
    layouts: Sequence[str] = LAYOUTS,
    tokens: int = 16384,
    n_heads: int = 16,
    results: Results,
    progress=None,
    after_shape=None,
) -> Results:
    """Fill `results` with one row per (layout, head dim, seq, backend) plus one `auto` row per shape."""
    from fasttune.attention import available, register

    hf_names = register()
    usable = {}
    for d in head_dims:
        why = available(device, dtype, head_dim=d)
        usable[d] = [b for b in backends if why.get(b) is None]
        for b in backends:
            note = f"- {b}: unavailable: {why[b]}" if why.get(b) is not None else None
            if note and note not in results.notes:
                results.notes.append(note)
    for layout in layouts:
        for d in head_dims:
            for seq in seq_lens:
                _run_shape(results, device, dtype, layout, d, seq, tokens, n_heads, usable[d], hf_names)
                if progress is not None:
                    progress.update(1)
                if after_shape is not None:  # partial results survive a run cut short
                    after_shape()
    return results


def _error_status(e: Exception) -> str:
    return f"error: {one_line(e, 120, line=0, typed=True)}"


def _run_shape(results, device, dtype, layout, d, seq, tokens, n_heads, backends, hf_names) -> None:
    from fasttune.attention.select import auto_route

    case = make_case(layout, seq, tokens, n_heads, d, device, dtype)
    # the padded case is right-padded, which a training call runs as dense rows (dispatch.py)
    opts = dict(scale=d**-0.5, window=None, softcap=None, dropout=0.0)
    auto = auto_route(case.q_BHSD, {"packed": "packed", "padded": "right"}.get(layout, "padded"), opts)
    ref = reference(case)
    shape = {"layout": layout, "head_dim": d, "seq": seq, "tokens": tokens, "heads": n_heads}
    measured = {}
    for b in backends:
        row = {**shape, "backend": b}
        skip = _skip_reason(b, case, seq, layout)
        if skip:
            results.add({**row, "status": skip})
            continue
        try:
            row.update(measure(b, hf_names[b], case, ref, device, d))
            row["status"] = "ok"
            measured[b] = row
        except Exception as e:  # an unusable kernel at one shape is a result, not a crash of the whole table
            row["status"] = _error_status(e)
            log.warning("attention bench %s %s D%d S%d: %s", b, layout, d, seq, row["status"])
        results.add(row)
        for x in (case.q_BHSD, case.k_BHSD, case.v_BHSD):
            x.grad = None
        gc.collect()
        reset_peak_memory(device)
    best = max(measured.values(), key=lambda r: r["fwd_bwd_tflops"], default=None)
    # `auto` is measured as its own registered function (it routes per call), not copied from the row it picks
    auto_row = {**shape, "backend": f"auto -> {auto}"}
    try:
        auto_row.update(measure("auto", hf_names["auto"], case, ref, device, d), status="ok")
    except Exception as e:
        auto_row["status"] = _error_status(e)
    if best and "fwd_bwd_tflops" in auto_row:
        auto_row["best"] = best["backend"]
        # no verdict from a noisy row: its median is not its kernel's time, and a noisy kernel may be the best one
        if not any(r.get("noisy") for r in (auto_row, *measured.values())):
            auto_row["auto_vs_best"] = auto_row["fwd_bwd_tflops"] / best["fwd_bwd_tflops"]
            # the kernel auto routes to, from the same measurements as `best`: separates a wrong route from timing
            # noise (auto and its route run the same kernel, so their own two timings differ only by noise)
            if auto in measured:
                auto_row["route_vs_best"] = measured[auto]["fwd_bwd_tflops"] / best["fwd_bwd_tflops"]
    results.add(auto_row)
    del case, ref
    sync(device)


MD_COLUMNS = (
    ("layout", "layout"),
    ("head_dim", "D"),
    ("seq", "seq"),
    ("backend", "backend"),
    ("fwd_ms", "fwd ms"),
    ("fwd_bwd_ms", "fwd+bwd ms"),
    ("fwd_tflops", "fwd TFLOP/s"),
    ("fwd_bwd_tflops", "fwd+bwd TFLOP/s"),
    ("max_err", "max err vs fp32"),
    ("auto_vs_best", "auto / best"),
    ("route_vs_best", "route / best"),
    ("status", "status"),
    ("noisy", "noisy timing"),
)


def plot(results: Results, path: Path) -> None:
    panels = []
    for layout in dict.fromkeys(r["layout"] for r in results.rows):
        for d in dict.fromkeys(r["head_dim"] for r in results.rows):
            series: dict[str, tuple[list, list]] = {}
            for r in results.rows:
                if (r["layout"], r["head_dim"]) != (layout, d) or not r.get("fwd_bwd_tflops") or "auto" in r["backend"]:
                    continue
                xs, ys = series.setdefault(r["backend"], ([], []))
                xs.append(r["seq"])
                ys.append(r["fwd_bwd_tflops"])
            panels.append(
                {
                    "title": f"{layout}, D{d}",
                    "xlabel": "sequence length",
                    "ylabel": "fwd+bwd TFLOP/s",
                    "series": series,
                    "logx": True,
                }
            )
    line_plot(path, panels, f"causal attention, {results.env.get('device')}")


def summary_lines(results: Results) -> list[str]:
    """One line per layout/head dim: the worst ratio of auto to the best kernel over the sequence lengths whose
    timings were steady (those left out as noisy named); on a CPU, the load average at the end."""
    lines = []
    autos = [r for r in results.rows if r["backend"].startswith("auto") and "best" in r]
    for key in dict.fromkeys((r["layout"], r["head_dim"]) for r in autos):
        shapes = [r for r in autos if (r["layout"], r["head_dim"]) == key]
        rows = [r for r in shapes if "auto_vs_best" in r]
        routes = ", ".join(dict.fromkeys(r["backend"].removeprefix("auto -> ") for r in shapes))
        line = f"- auto ({key[0]}, D{key[1]}): runs {routes}; "
        if not rows:
            line += "no verdict: the timings of every sequence length were noisy; run it again on an idle machine"
        else:
            worst = min(rows, key=lambda r: r["auto_vs_best"])
            line += (
                f"worst {100 * worst['auto_vs_best']:.0f}% of the best kernel ({worst['best']}) at seq {worst['seq']}"
            )
            routed = [r for r in rows if "route_vs_best" in r]
            if routed:
                bad = min(routed, key=lambda r: r["route_vs_best"])
                line += f"; its routed kernel: worst {100 * bad['route_vs_best']:.0f}% (seq {bad['seq']})"
            if noisy := [str(r["seq"]) for r in shapes if "auto_vs_best" not in r]:
                line += f"; seq {', '.join(noisy)} left out: noisy timings"
        lines.append(line)
    if "load average" in results.env:  # a CPU run: its timings are only as good as the machine was idle
        lines.append(f"- load average {cpu_load()} at the end, {results.env['load average']}")
    return lines
