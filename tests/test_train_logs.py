"""What a training run says and logs: TensorBoard events (each step once, also across a crash and resume), the
progress bar, the warmup warning and its advice, the kernel summary, and where the attention backend came from."""

import dataclasses

import pytest
import torch
from helpers import crash_at, losses, tiny_config

from fasttune.cli import main
from fasttune.train import loop


def test_tensorboard_logging_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, max_steps=2, tensorboard=True, eval_every=0, save_every=0)
    loop.train(cfg)
    events = list((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_the_progress_bar_shows_mfu_where_it_is_known():
    """README: tokens/s, samples/s, MFU and peak memory on the progress bar every step; MFU was computed per step (a
    GPU of known peak) but never shown there."""
    rec = {"loss": 2.0, "tokens_per_s": 50_000.0, "samples_per_s": 12.5, "lr": 1e-4, "peak_mem_gib": 14.1, "mfu": 0.423}
    assert "MFU 42.3%" in loop._status(rec) and "mem 14.1G" in loop._status(rec)
    assert "MFU" not in loop._status({**rec, "mfu": None, "peak_mem_gib": None})  # a CPU: no peak known


def test_tensorboard_after_a_crash_and_resume_shows_each_step_once(tmp_path):
    """A run killed after logging step 4 (checkpoint at 3) and resumed logs step 4 again: TensorBoard showed both."""
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = tiny_config(tmp_path, tensorboard=True, eval_every=0)
    crash_at(cfg, 5)
    resumed = loop.train(dataclasses.replace(cfg, resume=True))
    events = tensorboard.EventAccumulator(str(cfg.run_dir / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses(resumed.records))
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_warmup_not_below_max_steps_warns_once_and_keeps_the_schedule(tmp_path, caplog):
    from fasttune.train.optim import build_optimizer

    cfg = tiny_config(tmp_path, max_steps=20, warmup_steps=30, lr=1e-3)
    with caplog.at_level("WARNING", logger="fasttune"):
        optimizer, scheduler = build_optimizer(cfg, torch.nn.Linear(2, 2), torch.device("cpu"))
    lrs = []
    for _ in range(cfg.training.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # the schedule is the configured one (resume with a larger --max-steps must train the same steps): still warming up
    assert lrs == pytest.approx([1e-3 * (s + 1) / 31 for s in range(20)])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "training.warmup_steps=30" in warnings[0] and "training.max_steps=20" in warnings[0]
    assert "never reaches its peak, 0.001," in warnings[0]


@pytest.mark.parametrize("max_steps", [1, 2, 30])
def test_the_warmup_the_warning_suggests_is_below_max_steps(tmp_path, caplog, max_steps):
    """Taking the warning's advice silences it: for a 1-step run it said "e.g. 1", which is not below 1."""
    import re

    from fasttune.train.optim import build_optimizer

    def warnings(warmup: int) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="fasttune"):
            build_optimizer(tiny_config(tmp_path, max_steps=max_steps, warmup_steps=warmup), torch.nn.Linear(2, 2),
                            torch.device("cpu"))  # fmt: skip
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    (said,) = warnings(max_steps + 5)
    suggested = int(re.search(r"\(e\.g\. (\d+)\)", said).group(1))
    assert warnings(suggested) == []


def test_the_summary_names_the_kernels_of_the_runs_calls_not_of_its_probes(tmp_path, caplog):
    # padded rows on CPU run sdpa's dense path; the probe that checked sdpa ran its per-document path, which the run
    # never took (on CUDA the summary said "sdpa/per-doc" for runs whose documents all went to the varlen kernel)
    cfg = tiny_config(tmp_path, max_steps=2, save_every=0, eval_every=0)
    cfg = dataclasses.replace(cfg, attn_implementation="sdpa", data=dataclasses.replace(cfg.data, packing=False))
    with caplog.at_level("INFO", logger="fasttune"):
        loop.train(cfg)
    from fasttune import attention

    assert any(k.startswith("sdpa/dense") for k in attention.kernel_report()), attention.kernel_report()
    assert not any(k.startswith("sdpa/per-doc") for k in attention.kernel_report()), attention.kernel_report()


def test_the_attention_line_says_where_its_backend_came_from(tmp_path, capsys):
    """`attention: sdpa (requested)` was logged for every preset run whose user asked for nothing: the line names
    the preset, the flag, the config file (or a --resume's own config.json) it came from."""
    tiny = ["--model.preset", "micro", "--data.max-documents", "40", "--data.tokenizer-vocab-size", "384",
            "--data.max-length", "64", "--training.eval-every", "0", "--generation.sample-prompt", "",
            "--data.cache-dir", str(tmp_path / "cache")]  # fmt: skip
    (tmp_path / "a.yaml").write_text("attn_implementation: eager\n")
    for argv, line in [
        (["--output-dir", str(tmp_path / "a"), "--max-steps", "1"], "attention: sdpa (the quick preset's default)"),
        (["--output-dir", str(tmp_path / "b"), "--max-steps", "1", "--attn_implementation=eager"],
         "attention: eager (--attn-implementation)"),
        (["--output-dir", str(tmp_path / "c"), "--max-steps", "1", "--config", str(tmp_path / "a.yaml")],
         f"attention: eager (set in {tmp_path / 'a.yaml'})"),
        (["--output-dir", str(tmp_path / "a"), "--resume", "--max-steps", "2"],
         f"attention: sdpa (set in {tmp_path / 'a' / 'config.json'})"),
    ]:  # fmt: skip
        assert main(["train", *tiny, *argv]) == 0
        err = capsys.readouterr().err
        assert [x for x in err.splitlines() if x.startswith("attention:")] == [line], err


def test_an_attention_fallback_is_said_once(tmp_path, capsys):
    """A requested backend that cannot run the model (sdpa has no logit softcap; Gemma 2 uses one) is one warning
    naming the reason and what runs instead; the `attention:` line that followed it said the same again."""
    from helpers import GSM8K, save_tiny_model

    model = save_tiny_model(tmp_path / "gemma2", "gemma2", attn_logit_softcapping=50.0)
    argv = ["--experiment", "sft", "--model", str(model), "--data", str(GSM8K), "--attn-implementation", "sdpa",
            "--max-steps", "1", "--training.warmup-steps", "0", "--training.eval-every", "0",
            "--generation.sample-prompt", "", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(["train", *argv]) == 0
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if "softcap" in x and "attention" in x]
    assert said == ["attention backend 'sdpa' unavailable: no attention logit softcap (model uses 50.0); using "
                    "'eager' instead"], err  # fmt: skip
