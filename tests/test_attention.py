"""Attention backends against a per-document reference at tiny shapes, CPU.

Shape legend: B batch, H query heads, K kv heads, S query length, L key length, D head dim, T packed tokens.
The reference runs every document alone with a plain loop (no fasttune code), so packed, padded and dense
layouts of every backend are checked against the same numbers, forward and backward.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fasttune.attention import available, function, kernel_report, resolve
from fasttune.attention.probe import explain_import_error, import_status, probe
from fasttune.errors import FasttuneError

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
LENS = (5, 11, 1, 8)  # odd lengths, a one-token document
CPU_FWD_BWD = ("eager", "sdpa")  # flex runs on CPU forward only (no CPU backward in torch)


def reference(q_HTD, k_KTD, v_KTD, lens, *, scale, window=None, softcap=None):
    """Each document alone, causal, in fp64: the ground truth. (H, T, D) in, (T, H, D) out."""
    outs, start = [], 0
    n_rep = q_HTD.shape[0] // k_KTD.shape[0]
    for n in lens:
        q, k, v = (x[:, start : start + n].double() for x in (q_HTD, k_KTD, v_KTD))
        k, v = k.repeat_interleave(n_rep, 0), v.repeat_interleave(n_rep, 0)
        s = q @ k.transpose(-1, -2) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        i, j = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None, :]
        allow = (j <= i) & ((i - j) < window if window else True)
        outs.append(torch.softmax(s.masked_fill(~allow, float("-inf")), -1) @ v)
        start += n
    return torch.cat(outs, 1).transpose(0, 1)


def attention_forward(backend, *args, **kwargs):
    """Call the attention function registered for `backend` (or "auto"), as a model's layer does."""
    return function(backend)(*args, **kwargs)


def make_qkv(dtype, n_heads=4, n_kv=2, head_dim=16, total=None, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    total = total or sum(LENS)
    return [torch.randn(h, total, head_dim, generator=gen).to(device, dtype) for h in (n_heads, n_kv, n_kv)]


def packed_call(backend, q_HTD, k_KTD, v_KTD, lens, how, **kw):
    """One row (1, H, T, D), documents given by cu_seq_lens kwargs or by restarting position_ids."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=q_HTD.device)
    if how == "cu":
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    else:
        extra = dict(position_ids=torch.cat([torch.arange(n) for n in lens])[None].to(q_HTD.device))
    out_1THD, _ = attention_forward(backend, None, q_HTD[None], k_KTD[None], v_KTD[None], None, **extra, **kw)
    return out_1THD[0]


def padded_call(backend, q_HTD, k_KTD, v_KTD, lens, left=False, **kw):
    """Documents as rows of a padded batch (B, H, Lmax, D) with a 2D padding mask; returns real tokens (T, H, D)."""
    width, starts = max(lens), torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])

    def rows(x_HTD):
        out = x_HTD.new_zeros(len(lens), x_HTD.shape[0], width, x_HTD.shape[2])
        for b, n in enumerate(lens):
            at = width - n if left else 0
            out[b, :, at : at + n] = x_HTD[:, starts[b] : starts[b] + n]
        return out

    mask_BL = torch.zeros(len(lens), width, dtype=torch.bool, device=q_HTD.device)
    for b, n in enumerate(lens):
        mask_BL[b, width - n if left else 0 : width if left else n] = True
    out_BSHD, _ = attention_forward(backend, None, rows(q_HTD), rows(k_KTD), rows(v_KTD), mask_BL, **kw)
    return torch.cat([out_BSHD[b, width - n :] if left else out_BSHD[b, :n] for b, n in enumerate(lens)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [*CPU_FWD_BWD, "auto"])
@pytest.mark.parametrize("layout", ["cu", "position_ids", "padded-right", "padded-left"])
def test_forward_backward_matches_reference(backend, layout, dtype):
    q, k, v = (x.requires_grad_() for x in make_qkv(dtype))
    scale = 16**-0.5
    if layout.startswith("padded"):
        out = padded_call(backend, q, k, v, LENS, left=layout.endswith("left"), scaling=scale)
    else:
        out = packed_call(backend, q, k, v, LENS, layout, scaling=scale)
    ref = reference(q, k, v, LENS, scale=scale)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out.double(), (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), **TOL[dtype])


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
def test_mask_with_a_hole_is_honoured(backend):
    """Right-padded rows skip the mask (no real query can see a right pad under causality); any other mask, here
    a row with padding in the middle, must still hide its pad keys: the row equals its real tokens alone."""
    q, k, v = make_qkv(torch.float32, total=6)
    keep = torch.tensor([True, True, False, False, True, True])
    mask_BL = torch.stack([keep, torch.tensor([True] * 4 + [False] * 2)])
    rows = [torch.stack([x, x]) for x in (q, k, v)]
    out_BSHD, _ = attention_forward(backend, None, *rows, mask_BL, scaling=0.3)
    ref = reference(q[:, keep], k[:, keep], v[:, keep], [4], scale=0.3)
    torch.testing.assert_close(out_BSHD[0, keep].double(), ref, **TOL[torch.float32])
    ref_right = reference(q[:, :4], k[:, :4], v[:, :4], [4], scale=0.3)
    torch.testing.assert_close(out_BSHD[1, :4].double(), ref_right, **TOL[torch.float32])
    assert torch.isfinite(out_BSHD).all()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "mha"])
def test_features_forward(backend, feature):
    """Sliding window and softcap on packed and padded layouts; flex is forward-only on CPU."""
    n_kv = 4 if feature == "mha" else 2
    q, k, v = make_qkv(torch.float32, n_kv=n_kv)
    kw = dict(scaling=0.3)
    kw |= dict(sliding_window=3) if feature == "window" else {}
    kw |= dict(softcap=2.0) if feature == "softcap" else {}
    ref = reference(q, k, v, LENS, scale=0.3, window=kw.get("sliding_window"), softcap=kw.get("softcap"))
    torch.testing.assert_close(packed_call(backend, q, k, v, LENS, "cu", **kw).double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(padded_call(backend, q, k, v, LENS, **kw).double(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_FWD_BWD)
def test_dense_causal_and_decode_step(backend):
    """Unpacked rows are plain causal; a decode step (S < L, queries at the end) is bottom-right causal."""
    q, k, v = make_qkv(torch.float32, total=9)
    full, _ = attention_forward(backend, None, q[None], k[None], v[None], None, scaling=0.25)
    torch.testing.assert_close(full[0].double(), reference(q, k, v, [9], scale=0.25), **TOL[torch.float32])
    step, _ = attention_forward(backend, None, q[None, :, -2:], k[None], v[None], None, scaling=0.25)
    torch.testing.assert_close(step[0], full[0, -2:], **TOL[torch.float32])


def test_changing_one_document_leaves_the_others():
    q, k, v = make_qkv(torch.float32)
    base = packed_call("sdpa", q, k, v, LENS, "position_ids")
    k2 = k.clone()
    k2[:, : LENS[0]] += 5.0  # change the first document only
    out = packed_call("sdpa", q, k2, v, LENS, "position_ids")
    torch.testing.assert_close(out[LENS[0] :], base[LENS[0] :])
    assert not torch.allclose(out[: LENS[0]], base[: LENS[0]])


def test_kernel_report_names_what_ran():
    q, k, v = make_qkv(torch.float32)
    packed_call("sdpa", q, k, v, LENS, "cu")
    assert kernel_report()["sdpa/per-doc float32 D16"] == "cpu sdpa"  # packed: one causal call per document


def test_available_keeps_reasons():
    got = available(device="cpu", dtype=torch.float32, head_dim=16, run=True)
    assert got["eager"] is None and got["sdpa"] is None
    assert "CUDA" in got["flash_attention_4"] and "CUDA" in got["varlen"]
    assert "backward on CPU" in got["flex_attention"]  # the tiny fwd+bwd probe keeps torch's own error


def test_import_errors_are_classified():
    assert "package not installed" in import_status("fasttune_no_such_module")
    assert import_status("torch") is None
    abi = explain_import_error(ImportError("/x/flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice"))
    assert abi.startswith("ABI mismatch between torch")
    assert "cannot" in explain_import_error(ImportError("cannot import name 'x'"))


def test_auto_routes_each_call_by_layout_and_row_length():
    """On a Hopper GPU with flash-attn-4: documents and long rows -> FA4, short unpadded rows -> sdpa (cuDNN), and
    calls with a window/softcap/dropout stay on FA4, which computes them natively. A simulated machine (CPU test)."""
    from fasttune.attention.select import Plan, make_plan

    usable = {"flash_attention_4", "sdpa", "varlen", "flex_attention"}
    plan = make_plan("hopper", usable.__contains__, 128)
    assert plan == Plan(packed="flash_attention_4", rows="flash_attention_4", short_rows="sdpa", short_below=1024)
    assert plan.route("packed", 512) == "flash_attention_4"
    assert plan.route("rows", 1023) == "sdpa"
    assert plan.route("rows", 1024) == "flash_attention_4"
    assert plan.route("rows", 512, plain=False) == "flash_attention_4"
    assert plan.route("right", 512) == "flash_attention_4"  # right-padded rows: never cuDNN (a plan per shape)
    assert plan.route("padded", 512) == "flash_attention_4"  # left padding: FA4 on the unpadded tokens
    assert "sdpa" in plan.describe()
    usable.discard("flash_attention_4")
    assert make_plan("hopper", usable.__contains__, 128) == Plan("varlen", "sdpa", None, 1024)
    assert make_plan("hopper", usable.__contains__, 64).short_below == 2048
    assert make_plan("cpu", {"sdpa", "eager"}.__contains__, 64) == Plan("sdpa", "sdpa", None, 2048)


def test_unavailable_backend_warns_once_with_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        got = resolve("flash_attention_4", device="cpu", dtype=torch.float32, head_dim=16, packed=True)
    assert got.name == "sdpa" and got.hf_name == "fasttune_sdp"
    ours = [r for r in caplog.records if r.name.startswith("fasttune")]  # not torchao's import-time lines
    warnings = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "flash_attention_4" in warnings[0] and "needs a CUDA GPU" in warnings[0]
    assert "using 'sdpa' instead" in warnings[0]


def test_strict_raises_listing_names_and_reasons():
    with pytest.raises(FasttuneError) as err:
        resolve("varlen", device="cpu", dtype=torch.float32, head_dim=16, packed=True, strict=True)
    msg = str(err.value)
    assert "\n" not in msg and "Available here: eager, sdpa" in msg and "flash_attention_2 (" in msg
    with pytest.raises(FasttuneError, match="valid: auto, eager"):
        resolve("flash", device="cpu", dtype=torch.float32, head_dim=16, packed=True)


def test_softcap_model_steers_away_from_sdpa(caplog):
    class Config:
        attn_logit_softcapping = 50.0

    with caplog.at_level(logging.WARNING, logger="fasttune"):
        got = resolve("sdpa", device="cpu", dtype=torch.float32, head_dim=16, packed=False, model_config=Config())
    assert got.name == "eager" and "softcap" in caplog.text
    assert probe("sdpa", "cpu", torch.float32, 16) is None


def test_auto_on_cpu_picks_sdpa(caplog):
    with caplog.at_level(logging.INFO, logger="fasttune"):
        got = resolve("auto", device="cpu", dtype=torch.float32, head_dim=16, packed=True)
    assert got.name == "sdpa" and "auto -> 'sdpa'" in caplog.text


def _right_padded_rows():
    q, k, v = make_qkv(torch.float32, total=6)
    rows = [torch.stack([x, x]) for x in (q, k, v)]
    mask_BL = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    return q, k, v, rows, mask_BL


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
def test_padded_call_works_under_inference_mode(backend):
    """Inference tensors have no version counter: the per-forward memo must not need one (HF pipelines)."""
    q, k, v, rows, mask_BL = _right_padded_rows()
    with torch.inference_mode():
        right, _ = attention_forward(backend, None, *rows, mask_BL, scaling=0.3)
        left, _ = attention_forward(backend, None, *rows, mask_BL.flip(1), scaling=0.3)
    ref = reference(q[:, :4], k[:, :4], v[:, :4], [4], scale=0.3)
    torch.testing.assert_close(right[1, :4].double(), ref, **TOL[torch.float32])
    assert torch.isfinite(left).all()


def test_padding_mask_wins_over_position_ids():
    """With a padding mask, position_ids never define documents (scaled or offset positions are legitimate), so a
    right-padded batch with positions 0, 2, 4, ... is plain causal per row, as in transformers."""
    q, k, v, rows, mask_BL = _right_padded_rows()
    pos = (2 * torch.arange(6))[None].expand(2, -1)
    out, _ = attention_forward("sdpa", None, *rows, mask_BL, scaling=0.3, position_ids=pos)
    ref = reference(q, k, v, [6], scale=0.3)
    torch.testing.assert_close(out[0].double(), ref, **TOL[torch.float32])


def test_lazy_auto_plan_under_no_grad_keeps_backends_usable(monkeypatch):
    """auto's plan can first be made inside a forward under no_grad (its probes then run there): the backward part
    of the probe must still run, so nothing is cached as unusable because of the caller's grad mode."""
    from fasttune.attention import select

    q, k, v = make_qkv(torch.float32, head_dim=24, total=6)
    with torch.no_grad():
        out, _ = attention_forward("auto", None, q[None], k[None], v[None], None, scaling=0.3)
    assert select.auto_plan(torch.device("cpu"), torch.float32, 24) == select.Plan("sdpa", "sdpa")
    assert probe("sdpa", "cpu", torch.float32, 24) is None
    torch.testing.assert_close(out[0].double(), reference(q, k, v, [6], scale=0.3), **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["eager", "sdpa", "varlen", "auto"])
def test_non_causal_module_is_bidirectional(backend):
    """A module with is_causal=False (vision towers, bidirectional encoders) attends both ways, padding honoured."""
    q, k, v, rows, mask_BL = _right_padded_rows()

    class Encoder(torch.nn.Module):
        is_causal = False

    out, _ = attention_forward(backend, Encoder(), *rows, mask_BL, scaling=0.3)
    keep = mask_BL[1]
    s = q[:, keep] @ k.repeat_interleave(2, 0)[:, keep].transpose(-1, -2) * 0.3
    want = (torch.softmax(s, -1) @ v.repeat_interleave(2, 0)[:, keep]).transpose(0, 1)
    torch.testing.assert_close(out[1, :4], want, **TOL[torch.float32])


def test_model_without_attention_interface_uses_transformers_own(caplog):
    """Falcon computes attention in its own code: detected before loading, it runs on transformers' own sdpa with a
    logged reason (a registered name would end in a bare KeyError inside from_config), or is refused under strict."""
    from transformers import AutoModelForCausalLM, FalconConfig

    config = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        got = resolve("sdpa", device="cpu", dtype=torch.float32, head_dim=8, packed=False, model_config=config)
    assert got.hf_name == "sdpa" and "falcon" in caplog.text and "AttentionInterface" in caplog.text
    assert "'sdpa' runs as transformers' own call in that code, not as fasttune's 'sdpa' backend" in caplog.text
    assert "instead of 'sdpa'" not in caplog.text  # it said "using transformers' own 'sdpa' ... instead of 'sdpa'"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        resolve("varlen", device="cpu", dtype=torch.float32, head_dim=8, packed=True, model_config=config)
    assert "using transformers' own 'sdpa' implementation instead of 'varlen'" in caplog.text
    model = AutoModelForCausalLM.from_config(config, attn_implementation=got.hf_name)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    with pytest.raises(FasttuneError, match="drop --strict-attention"):
        resolve("auto", device="cpu", dtype=torch.float32, head_dim=8, packed=True, model_config=config, strict=True)


def test_flex_is_not_usable_for_training_on_cpu_without_running():
    """flex_attention has no CPU backward: the static check (no tiny run) already says so."""
    assert "backward on CPU" in available(device="cpu", dtype=torch.float32, head_dim=16)["flex_attention"]


def test_choice_is_described_without_repeating_itself():
    from fasttune.attention import describe

    assert describe("sdpa", "sdpa", "requested") == "sdpa (as requested)"
    assert describe("auto", "varlen", "fastest usable") == "auto -> varlen (fastest usable)"
    long = ("fastest usable for cuda packed D64 by measured preference flash_attention_4>varlen; not usable: "
            "flash_attention_4 (package not installed (no module 'flash_attn'))")  # fmt: skip
    assert describe("auto", "varlen", long) == ("auto -> varlen (fastest usable for cuda packed D64; faster ones not "
                                                "usable here: the log or `fasttune doctor` says why)")  # fmt: skip
    why = "'varlen' unavailable (needs a CUDA GPU); using sdpa"
    assert describe("varlen", "sdpa", why) == f"sdpa ({why})"


def test_pad_query_sees_the_real_keys_of_its_row_not_itself():
    """As transformers' eager mask: a right pad sees its row's real keys only; a left pad with no visible key has an
    empty row (uniform weights in the kernels, as eager's additive mask gives)."""
    from fasttune.attention.layout import allow_mask

    padding_BL = torch.tensor([[True, True, False], [False, True, True]])
    allow = allow_mask(3, 3, torch.device("cpu"), padding_BL=padding_BL)[:, 0]
    assert allow[0, 2].tolist() == [True, True, False]  # right pad: real keys, not itself
    assert allow[1, 0].tolist() == [False, False, False]  # left pad: nothing visible
    assert allow[1, 2].tolist() == [False, True, True]


def test_per_forward_facts_are_read_once(monkeypatch):
    """Host syncs happen once per forward, not once per layer: every layer gets the same mask / max-length tensors,
    and the facts read from them are memoized on the tensor object (#12 item 11: the per-call path)."""
    from fasttune.attention.layout import packed_from_kwargs, padding_of

    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    mask_BL = torch.tensor([[True, True, False], [True, True, True]])
    first = padding_of(mask_BL)
    assert padding_of(mask_BL) is first and len(reads) == 1  # the second "layer" reuses the first read
    assert first.lens == (2, 3) and first.right and not first.full
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=torch.tensor(4), max_length_k=torch.tensor(4))
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(2) or real_item(t))
    for _ in range(3):
        assert packed_from_kwargs(kwargs, 1, 7, 7).max_q == 4
    assert reads.count(2) == 2  # max_length_q and max_length_k, once each
    q, k, v, rows, _ = _right_padded_rows()
    left = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    out, _ = attention_forward("sdpa", None, *rows, left, scaling=0.3)
    assert torch.isfinite(out).all()


def test_sdpa_gives_a_query_with_no_visible_key_eagers_uniform_weights():
    """A left-padded query sees no key: eager's additive finfo.min mask gives it the mean value over all keys. sdpa
    sets that explicitly, whatever its kernel does with such a row (cuDNN returned zeros on an H200)."""
    from fasttune.attention import kernels

    q, k, v = (torch.randn(2, h, 5, 8) for h in (4, 2, 2))
    allow = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    allow[0, :, :2] = False  # row 0: its first two queries see nothing
    out = kernels.sdpa(q, k, v, allow, scale=8**-0.5)
    want = kernels.eager(q, k, v, allow, scale=8**-0.5)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out[0, :, :2], kernels.repeat_kv(v, 2)[0].mean(1, keepdim=True).expand(4, 2, 8))


class _WrongKeyGrad(torch.autograd.Function):
    """Identity forward, key gradient doubled: a kernel that runs, gives the right output and trains another model
    (what flash-attn-4 4.0.0b36 did at D8 with GQA on an H200)."""

    @staticmethod
    def forward(ctx, k):
        return k.view_as(k)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


@pytest.mark.parametrize("softcap", [False, True])
def test_probe_refuses_a_backend_whose_gradients_are_wrong(monkeypatch, softcap):
    from fasttune.attention import probe as probe_module

    assert probe_module.probe("sdpa", "cpu", torch.float32, 16, softcap) is None  # the real kernel passes
    real = probe_module.attention_forward

    def wrong(name, module, q, k, v, mask, **kw):
        return real(name, module, q, _WrongKeyGrad.apply(k), v, mask, **kw)

    monkeypatch.setattr(probe_module, "attention_forward", wrong)
    why = probe_module.smoke_test("sdpa", torch.device("cpu"), torch.float32, 16, softcap)
    assert why is not None and why.startswith("gives wrong results (4 query / 2 kv heads, 48 tokens, D16")
    assert "relative error 1" in why  # doubled key gradients: |2g - g| / |g|


def test_auto_names_why_a_preferred_backend_is_not_used():
    """Gemma 2's attention softcap rules sdpa out on a CPU: the line said 'preference sdpa>eager' and chose eager
    without saying why."""
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=16,
                          num_attention_heads=2, num_key_value_heads=2, attn_logit_softcapping=50.0)  # fmt: skip
    got = resolve("auto", device="cpu", dtype=torch.float32, head_dim=16, packed=True, model_config=config)
    assert got.name == "eager" and "not usable: sdpa (no attention logit softcap" in got.reason


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_fp32_inputs_under_autocast_route_and_run_in_the_autocast_dtype(backend, monkeypatch):
    """fp32 weights under bf16 autocast: RoPE's fp32 cos/sin make q and k fp32. The route sees them in bf16, as the
    kernels run them (torch's varlen kernel and flash-attn have no fp32: a route probing fp32 sent each packed
    document to its own sdpa call, 12.7x slower on an H200), and the result is the reference on the bf16 inputs."""
    from fasttune.attention import dispatch

    seen = []
    real = dispatch._route
    monkeypatch.setattr(dispatch, "_route", lambda name, q, *a: seen.append(q.dtype) or real(name, q, *a))
    q, k, v = make_qkv(torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        out = packed_call(backend, q, k, v, LENS, "pos", scaling=0.25)
    want = reference(*(x.to(torch.bfloat16).double() for x in (q, k, v)), LENS, scale=0.25)
    assert seen and set(seen) == {torch.bfloat16} and out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), want, atol=2e-2)
