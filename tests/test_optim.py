"""`--training.optimizer adamw_8bit` (torchao's AdamW8bit): it trains like torch's AdamW (same groups, betas and
schedule), a run stopped and resumed equals an uninterrupted one, the memory planner and the disk check count its
8-bit moments as they are really held, and without torchao it stops with one line before anything starts."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import torch
from helpers import crash_at, losses, tiny_config

from fasttune import cli
from fasttune.config import TrainingConfig
from fasttune.errors import ConfigError, FasttuneError
from fasttune.model.build import preset_config
from fasttune.train import loop
from fasttune.train.checkpoint import list_checkpoints, load_trainer_state
from fasttune.train.estimate import GiB, Setup, setup_of
from fasttune.train.footprint import checkpoint_bytes, fp32_master_fits
from fasttune.train.memory import choose_plan
from fasttune.train.optim import build_optimizer, state_bytes

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao not installed (pip install 'fasttune[adam8bit]')"
)
STEPS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 10-step micro run with AdamW and with 8-bit AdamW (checkpoints at steps 3, 6, 9 and 10). The first
    8-bit step compiles torchao's update (torch.compile, one graph per parameter shape): ~20 s on a cold 2-core CPU,
    once per test process; the other tests here reuse those graphs (same shapes)."""
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed (pip install 'fasttune[adam8bit]')")
    out = {}
    for name in ("adamw", "adamw_8bit"):
        cfg = tiny_config(tmp_path_factory.mktemp(name), max_steps=STEPS, eval_every=5, optimizer=name)
        out[name] = cfg, loop.train(cfg)
    return out


@needs_torchao
def test_8bit_adamw_trains_within_a_tolerance_of_adamw(runs):
    """Its losses track AdamW's step by step within 2e-3 relative (measured: under 1e-4; on this model a learning
    rate 30% lower than AdamW's moved the loss by 7e-3 to 2.7e-2 from step 6 on, in a 20-step run), and fall."""
    (_, ref), (_, ours) = runs["adamw"], runs["adamw_8bit"]
    a, b = losses(ref.records), losses(ours.records)
    assert a.keys() == b.keys() == set(range(1, STEPS + 1))
    for step in a:
        assert abs(b[step] - a[step]) <= 2e-3 * a[step], (step, a[step], b[step])
    assert a != b  # another optimizer really ran
    assert ours.last_val_loss < ours.first_val_loss
    assert abs(ours.last_val_loss - ref.last_val_loss) <= 2e-3 * ref.last_val_loss
    state = load_trainer_state(ours.checkpoint)["optimizer"]  # weights_only: torchao's state tensors load
    kinds = {type(s["exp_avg"]).__name__ for s in state["state"].values()}
    assert kinds == {"OptimState8bit", "Tensor"}  # large tensors quantised, norms (< 4096 values) in fp32
    assert state["param_groups"][0]["betas"] == (0.9, 0.95) and state["param_groups"][1]["weight_decay"] == 0.0


@needs_torchao
def test_8bit_run_stopped_and_resumed_equals_the_uninterrupted_run(runs, tmp_path):
    ref_cfg, ref = runs["adamw_8bit"]
    cfg = dataclasses.replace(ref_cfg, output_dir=str(tmp_path / "run"))
    crash_at(cfg, 5)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000003"]
    resumed = loop.train(dataclasses.replace(cfg, resume=True))
    assert losses(resumed.records) == losses(ref.records)  # bit-identical on CPU
    assert resumed.last_val_loss == ref.last_val_loss


def _held_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What the optimizer really holds for its moments: int8 codes + fp32 block scales, or plain tensors."""
    total = 0
    for s in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = s[key]
            parts = (t.codes, t.scale) if hasattr(t, "codes") else (t,)
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


@needs_torchao
def test_planner_counts_the_moments_the_optimizer_really_holds(tmp_path):
    from fasttune.model.build import build_preset

    model = build_preset("micro", 384, "sdpa", torch.float32)  # the shapes the runs above compiled the step for
    for name in ("adamw", "adamw_8bit"):
        cfg = tiny_config(tmp_path, optimizer=name)
        optimizer, _ = build_optimizer(cfg, model, torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # the moments exist from the first step
        held = _held_bytes(optimizer)
        assert state_bytes(name, model.parameters()) == held
        st = setup_of(cfg, model, liger=False, chunked=True)
        assert st.optimizer_bytes * st.trainable == pytest.approx(held)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert checkpoint_bytes(model, name) == (weights + held, 0)
    big = torch.nn.Linear(4096, 4096, bias=False)  # 8-bit: 2 bytes per parameter + one fp32 scale per 256
    assert state_bytes("adamw_8bit", big.parameters()) / big.weight.numel() == pytest.approx(2 + 8 / 256)
    assert state_bytes("adamw", big.parameters()) / big.weight.numel() == 8


def test_8bit_moments_let_more_fit():
    """1B shape: the optimizer part of the estimate drops to ~2 bytes per parameter, fp32 master weights fit where
    AdamW's 18 bytes per parameter would not, and a run that cannot fit names the 8-bit optimizer as a fix."""
    n = 1_104_150_528
    config = preset_config("1b", 32000)
    from fasttune.train.activations import Shape

    adamw = Setup(Shape.of(config), n, n, 2, 4.0, 16384)
    ours = Setup(**{**adamw.__dict__, "optimizer_bytes": 2 + 8 / 256, "optimizer": "adamw_8bit"})
    a, b = choose_plan("none", adamw, 139 * GiB), choose_plan("none", ours, 139 * GiB)
    assert b.optimizer == pytest.approx(a.optimizer * (2 + 8 / 256) / 4)
    assert a.total - b.total == pytest.approx(a.optimizer - b.optimizer)
    cuda = torch.device("cuda")
    assert not fp32_master_fits(config, cuda, free_bytes=32 * GiB)  # 19.9 GB > half of 32 GiB
    assert fp32_master_fits(config, cuda, free_bytes=32 * GiB, optimizer="adamw_8bit")  # 13.2 GB
    with pytest.raises(FasttuneError, match="--training.optimizer adamw_8bit"):
        choose_plan("auto", Setup(**{**adamw.__dict__, "tokens": 65536}), 16 * GiB)
    with pytest.raises(FasttuneError) as e:
        choose_plan("auto", Setup(**{**ours.__dict__, "tokens": 65536}), 16 * GiB)
    assert "adamw_8bit" not in str(e.value)  # already on: not offered again


def test_optimizer_option_validates():
    with pytest.raises(ConfigError, match="training.optimizer='sgd' is not valid; choose one of: adamw, adamw_8bit"):
        TrainingConfig(optimizer="sgd")


def test_without_torchao_8bit_stops_with_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    for name in ("torchao", "torchao.optim"):
        monkeypatch.setitem(sys.modules, name, None)  # `import torchao` now fails as if it were not installed

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "prepare_model", never)
    monkeypatch.setattr(loop, "build_data", never)
    out = str(tmp_path / "run")
    rc = cli.main(["train", "--experiment", "quick", "--model.preset", "micro", "--output-dir", out,
                   "--training.optimizer", "adamw_8bit"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["error: --training.optimizer=adamw_8bit needs torchao: pip install 'fasttune[adam8bit]'"]
    assert not (tmp_path / "run").exists()  # nothing started, nothing to clean up


def test_8bit_under_fsdp2_is_refused_with_one_line_before_anything_starts(tmp_path, monkeypatch):
    """Its gathered FSDP2 state is not a checkpoint that resumes (optim.require_optimizer says why): refused on every
    rank before the process group or the run folder exist. DDP and one process take it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = tiny_config(tmp_path, optimizer="adamw_8bit", fsdp=True)
    with pytest.raises(
        ConfigError, match="adamw_8bit does not work with --training.fsdp yet.*--training.optimizer adamw"
    ):
        loop.train(cfg)
    assert not cfg.run_dir.exists() and not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def adamw_8bit_logs():
    """stderr of a process that imports 8-bit AdamW under the command line's logging and logs one torchao warning
    of its own, as typed (False) and with --debug (True), the reference that shows every line."""
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed (pip install 'fasttune[adam8bit]')")
    logs = {}
    for debug in (False, True):
        code = (
            "import logging, sys; from fasttune.cli import _command_logging\n"
            f"with _command_logging({debug}):\n"
            "    from fasttune.train.optim import adamw_8bit_class; adamw_8bit_class()\n"
            "    logging.getLogger('torchao').warning('a real torchao warning')"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "a real torchao warning" in done.stderr  # only the extension lines: torchao's others still show
        logs[debug] = done.stderr
    return logs


@pytest.mark.parametrize(
    ("needle", "absent_because"),
    [("Failed to load ", "torchao loads all its extensions here"), ("Detected no triton", "triton is installed")],
)
def test_the_command_line_does_not_print_torchaos_extension_warnings(adamw_8bit_logs, needle, absent_because):
    """torchao's import logs 'Failed to load ..._C_*.so' for CUDA extensions 8-bit AdamW does not use (and a missing
    triton on CPU); transformers imports torchao on every model load once installed. The CLI hides those lines, which
    --debug shows (tests/test_quiet.py checks a whole training run the same way)."""
    if needle not in adamw_8bit_logs[True]:
        pytest.skip(f"no {needle.strip()!r} line here, --debug included: {absent_because}")
    assert needle not in adamw_8bit_logs[False], adamw_8bit_logs[False]


@pytest.mark.parametrize("bad", [None, "loss", "norm"])
def test_fused_adamw_step_is_queued_and_skips_non_finite_steps_on_the_device(bad):
    """torch's fused AdamW (CPU here, CUDA in runs) updates exactly as its plain step when the loss and gradient norm
    are finite, and leaves weights, moments and step counts untouched when either is not, without the host reading
    them first (Run._optimizer_step)."""
    from fasttune.train.run import Run

    w, opt, run = _fused_run()
    ref_w, ref_opt, _ = _fused_run()
    if bad == "norm":
        w.grad[0, 0] = float("inf")
    loss = torch.tensor(float("nan") if bad == "loss" else 2.5)
    loss_f, gn = Run._optimizer_step(run, loss, 0.0).values()
    assert [loss_f, gn] == pytest.approx([float(loss), float(w.grad.norm())], nan_ok=True)
    if bad is None:
        ref_opt.step()
    assert torch.equal(w, ref_w) and not hasattr(opt, "found_inf")
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[w][k], ref_opt.state[ref_w][k]), k


def _fused_run(scale: float = 1.0):
    """A parameter with AdamW state and a gradient, its fused AdamW, and the part of a Run _optimizer_step uses."""
    import types

    from fasttune.train.distributed import SINGLE

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    for _ in range(2):  # some state to keep
        w.grad = torch.randn(8, 4)
        opt.step()
    w.grad = torch.randn(8, 4) * scale
    return w, opt, types.SimpleNamespace(dist=SINGLE, device=torch.device("cpu"), optimizer=opt, params=[w])


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_fused_step_clips_inside_the_optimizer_as_clip_grad_norm_does(scale):
    """With fused AdamW the clipping is the kernel's grad_scale (no pass over the gradients of its own): the update
    equals clip_grad_norm_ then the plain step, exactly below the limit, to fp32 rounding above it."""
    from fasttune.train.run import Run

    w, opt, run = _fused_run(scale)
    ref_w, ref_opt, _ = _fused_run(scale)
    norm = torch.nn.utils.clip_grad_norm_([ref_w], 1.0)
    ref_opt.step()
    assert Run._optimizer_step(run, torch.tensor(2.5), 1.0).values() == pytest.approx((2.5, float(norm)))
    assert (scale > 1) == (float(norm) > 1.0)
    if scale < 1:
        assert torch.equal(w, ref_w)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[w][k], ref_opt.state[ref_w][k], atol=1e-7, rtol=1e-5)
    assert not hasattr(opt, "grad_scale")


def test_a_resumed_non_fused_optimizer_takes_the_waiting_path():
    """A checkpoint of a non-fused AdamW (a CPU run) resumed into a fused one: param_groups carry fused=False, so the
    step must not hand it found_inf (torch asserts that only fused optimizers take it)."""
    import types

    from fasttune.train.distributed import SINGLE
    from fasttune.train.run import Run

    w = torch.nn.Parameter(torch.ones(4))
    saved = torch.optim.AdamW([w], lr=0.1, fused=False)
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    opt.load_state_dict(saved.state_dict())
    assert opt.defaults["fused"] and not opt.param_groups[0]["fused"]
    w.grad = torch.ones(4)
    run = types.SimpleNamespace(dist=SINGLE, device=torch.device("cpu"), optimizer=opt, params=[w])
    assert Run._optimizer_step(run, torch.tensor(1.0), 0.0).values() == (1.0, 2.0)
    assert torch.all(w < 1)  # updated


@pytest.mark.gpu
def test_on_cuda_the_host_returns_before_the_update_finishes():
    """The point of queuing: the host has the loss and norm while the fused AdamW kernels still run (~1 GB of fp32
    weights: a few ms of kernels), and the update is the plain step's."""
    import copy
    import types

    from fasttune.train.distributed import SINGLE
    from fasttune.train.run import Run

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    weights = [torch.nn.Parameter(torch.randn(1 << 24, device="cuda")) for _ in range(16)]
    opt = torch.optim.AdamW(weights, lr=0.1, fused=True)
    for w in weights:
        w.grad = torch.randn_like(w)
    opt.step()  # the moments exist: the measured step allocates nothing
    ref = [w.detach().clone().requires_grad_() for w in weights]
    ref_opt = torch.optim.AdamW(ref, lr=0.1, fused=True)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch keeps same-device moments by reference
    for r, w in zip(ref, weights, strict=True):
        r.grad = w.grad.clone()
    ref_opt.step()
    run = types.SimpleNamespace(dist=SINGLE, device=torch.device("cuda"), optimizer=opt, params=weights)
    Run._optimizer_step(run, torch.tensor(float("nan"), device="cuda"), 0.0)  # skipped on the device
    torch.cuda.synchronize()
    loss_f, gn = Run._optimizer_step(run, torch.tensor(3.0, device="cuda"), 0.0).values()
    after = torch.cuda.Event()
    after.record()
    assert not after.query()  # the update is still running
    torch.cuda.synchronize()
    assert loss_f == 3.0 and gn == pytest.approx(float(torch.nn.utils.get_total_norm([w.grad for w in weights])))
    assert all(torch.equal(w, r) for w, r in zip(weights, ref, strict=True))
