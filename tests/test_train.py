"""End to end on CPU with a micro model: train -> checkpoint -> resume gives the same losses as an uninterrupted
run (bit-identical on CPU); checkpoints load with plain transformers; faults leave the last checkpoint intact."""

import dataclasses
import json
import os
import signal
import time
import types

import pytest
import torch
from helpers import crash_at, fail_at, losses, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main
from fasttune.errors import ConfigError, FasttuneError
from fasttune.train import loop, run
from fasttune.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 6-step run, shared by the tests that compare against it."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = tiny_config(tmp)
    return cfg, loop.train(cfg)


def test_run_directory_contents(reference):
    cfg, result = reference
    run = result.run_dir
    for name in ("config.json", "metrics.jsonl", "loss.png", "throughput.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["attn_implementation"] == "sdpa"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"loss", "lr", "tokens_per_s", "samples_per_s"} <= set(r) for r in steps)
    assert [r["step"] for r in recs if r.get("val_loss") is not None] == [0, 3, 6]
    assert [p.name for p in list_checkpoints(run)] == ["step-000003", "step-000006"]
    assert result.last_val_loss < result.first_val_loss  # even 6 steps learn something


def test_checkpoint_loads_with_plain_transformers(reference):
    _, result = reference
    ckpt = result.checkpoint
    assert (ckpt / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.use_cache  # training passes use_cache=False per call; the saved model keeps its KV cache
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.model_max_length == model.config.max_position_embeddings  # not HF's 1e30: plain truncation works
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_resume_after_crash_matches_uninterrupted_run(reference, tmp_path):
    ref_cfg, ref = reference
    cfg = dataclasses.replace(tiny_config(tmp_path), seed=ref_cfg.seed)
    crash_at(cfg, 5)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000003"]
    resumed = loop.train(dataclasses.replace(cfg, resume=True))
    assert losses(resumed.records) == losses(ref.records)  # bit-identical on CPU
    assert resumed.last_val_loss == ref.last_val_loss


def test_existing_run_is_never_overwritten_silently(reference):
    cfg, _ = reference
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        loop.train(cfg)


def test_resume_without_run_is_clear(tmp_path):
    cfg = dataclasses.replace(tiny_config(tmp_path), resume=True)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        loop.train(cfg)
    assert not cfg.run_dir.exists()  # a mistyped --resume path creates nothing


def test_resume_without_output_dir_names_the_runs_beside_the_folder_it_looked_in(tmp_path, monkeypatch, capsys):
    """`fasttune train --resume` looks in the preset's runs/quick; the user's run is runs/sft: the error names it (and
    no folder that is not a run) and says to pass --output-dir."""
    from fasttune.train.run_dir import MARKER

    monkeypatch.chdir(tmp_path)
    for name in ("sft", "lora", "notes"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    for name in ("sft", "lora"):
        (tmp_path / "runs" / name / MARKER).write_text("fasttune run directory; see config.json\n")
    assert main(["train", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs/quick holds no run to resume" in err, err
    assert "the runs beside it: runs/lora, runs/sft; pass --output-dir RUN to resume one" in err, err
    assert "notes" not in err and not (tmp_path / "runs" / "quick").exists()
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "elsewhere" / "run")]) == 2
    assert "beside" not in capsys.readouterr().err  # no run beside it: said as before


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch, caplog):
    cfg = tiny_config(tmp_path, max_bad_steps=1)
    calls = {"n": 0}
    original = run.forward_backward

    def nan_from_step_4(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(run, "forward_backward", nan_from_step_4)
    with pytest.raises(FasttuneError, match="non-finite.*last healthy checkpoint: .*step-000003"):
        loop.train(cfg)
    assert "update skipped" in caplog.text
    ckpts = list_checkpoints(cfg.run_dir)
    assert [p.name for p in ckpts] == ["step-000003"]
    AutoModelForCausalLM.from_pretrained(ckpts[-1])  # still loadable


def test_oom_is_explained_or_retried_with_same_global_batch(tmp_path, monkeypatch, reference):
    _, ref = reference
    cfg = tiny_config(tmp_path / "a")
    fail_at(monkeypatch, 2, lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    with pytest.raises(FasttuneError, match="out of memory at step 2: micro-batch 4 samples / 256 tokens") as e:
        loop.train(cfg)
    assert "recompute more activations (--model.memory every:2 or full, now none)" in str(e.value)
    # a run that recomputes every layer already is offered the host, not recomputation it has
    full = dataclasses.replace(cfg, output_dir=str(tmp_path / "c"), model=dataclasses.replace(cfg.model, memory="full"))
    monkeypatch.undo()
    fail_at(monkeypatch, 2, lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    with pytest.raises(FasttuneError, match="out of memory at step 2") as e:
        loop.train(full)
    assert "(--model.memory offload)" in str(e.value) and "recompute more" not in str(e.value)
    monkeypatch.undo()
    fail_at(monkeypatch, 2, lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    cfg = tiny_config(tmp_path / "b", oom_retry=True)
    result = loop.train(cfg)
    got, want = losses(result.records), losses(ref.records)
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) < 1e-4 for k in got)  # split micro-batches: same loss up to fp32 rounding


def test_an_oom_the_retry_cannot_fix_does_not_advise_the_retry(tmp_path, monkeypatch):
    """--training.oom-retry on, every micro-batch split down to one sample and still out of memory: the message named
    --training.oom-retry as a fix (it named it under torchrun too, which refuses it); and one sample per micro-batch
    has its length to lower, not --data.micro-batch-size."""

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(run, "forward_backward", oom)
    with pytest.raises(FasttuneError, match="out of memory at step 1: ") as e:
        loop.train(tiny_config(tmp_path / "a", oom_retry=True))
    assert "oom-retry" not in str(e.value) and str(e.value).endswith("or full, now none)")
    cfg = tiny_config(tmp_path / "b")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=1))
    state, dist = types.SimpleNamespace(step=0, micro_split=1), types.SimpleNamespace(on=True)  # under torchrun
    ranks = types.SimpleNamespace(cfg=cfg, device=torch.device("cpu"), memory_plan="full", state=state, dist=dist)
    ranks._more_recompute = lambda: run.Run._more_recompute(ranks)
    msg = run.Run._oom_message(ranks)
    assert "oom-retry" not in msg and "micro-batch-size" not in msg and "Lower --data.max-length" in msg
    assert msg.endswith(" or keep the layers' inputs in host memory (--model.memory offload)")


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    from fasttune.train import checkpoint

    cfg = tiny_config(tmp_path)
    real_save, count = checkpoint.torch.save, {"n": 0}

    def failing_save(obj, path, *a, **k):
        count["n"] += 1
        if count["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(FasttuneError, match="could not write checkpoint .*step-000006.*previous checkpoint is intact"):
        loop.train(cfg)
    root = cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]  # no half-written folder left behind
    AutoModelForCausalLM.from_pretrained(root / "step-000003")


def test_sigint_saves_and_exits_130(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    original, calls = run.forward_backward, {"n": 0}

    def interrupt_at_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "forward_backward", interrupt_at_2)
    with pytest.raises(loop.Interrupted, match="interrupted at step 2.*same command plus --resume") as e:
        loop.train(cfg)
    assert e.value.exit_code == 130
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000002"]
    calls["n"] = 0  # started again with --overwrite: the hint says what to drop (--resume with it is refused)
    with pytest.raises(loop.Interrupted, match="same command with --resume instead of --overwrite"):
        loop.train(dataclasses.replace(cfg, overwrite=True))


def test_a_second_ctrl_c_during_the_save_names_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C at step 5, then Ctrl-C again while step 5 is saved: it aborts at once (exit 130), leaving no half
    checkpoint, and says which checkpoint --resume starts from and how (it said only "interrupted (Ctrl-C)")."""
    from fasttune.train import checkpoint

    cfg = tiny_config(tmp_path)  # save_every 3: step 3 is saved before
    original, calls, fsync = run.forward_backward, {"n": 0}, checkpoint.fsync_tree

    def interrupt_at_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    def interrupt_saving_5(path):
        if "step-000005" in path.name:
            os.kill(os.getpid(), signal.SIGINT)
        return fsync(path)

    monkeypatch.setattr(run, "forward_backward", interrupt_at_5)
    monkeypatch.setattr(checkpoint, "fsync_tree", interrupt_saving_5)
    with pytest.raises(loop.Interrupted) as e:
        try:
            loop.train(cfg)
        except KeyboardInterrupt:  # not as a KeyboardInterrupt, which would end the test session
            pytest.fail("a bare KeyboardInterrupt: the CLI says only 'interrupted (Ctrl-C)'")
    root = cfg.run_dir / "checkpoints"
    assert e.value.exit_code == 130 and "\n" not in str(e.value)
    assert str(e.value) == (
        f"interrupted again after step 5 (aborted at once); the newest complete checkpoint is {root / 'step-000003'}"
        f". Resume from it with the same command plus --resume (output dir {cfg.run_dir})"
    )
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]


def test_a_run_stopped_before_its_first_checkpoint_is_not_offered_to_resume(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, save_every=0)
    fail_at(monkeypatch, 2, lambda: RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(cfg)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="stopped before its first checkpoint .nothing to resume.; pass --overwrite"):
        loop.train(cfg)
    old = cfg.run_dir / "checkpoints" / ".old-step-000001-123"  # a re-save killed between its renames: recoverable
    old.mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        loop.train(cfg)
    old.rmdir()
    assert loop.train(dataclasses.replace(cfg, overwrite=True)).steps == cfg.training.max_steps


def test_output_dir_checks(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        loop.train(dataclasses.replace(tiny_config(tmp_path), output_dir=str(blocker)))
    with pytest.raises(ConfigError, match="not writable"):
        loop.train(dataclasses.replace(tiny_config(tmp_path), output_dir=str(blocker / "run")))
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(FasttuneError, match="GB free, the checkpoints of this run need about"):
        loop.train(tiny_config(tmp_path / "disk"))
    assert blocker.read_text() == "mine"


def test_generate_command_streams_text(reference, capsys):
    _, result = reference
    rc = main(["generate", "--checkpoint", str(result.checkpoint), "--prompt", "import ", "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("import ") and "tok/s" in captured.err


def test_force_does_not_change_the_initial_weights(tmp_path, monkeypatch):
    """--force skips the CPU speed probe; the probe must not draw from the generator that seeds the model. A run this
    short is not probed (device.SLOWEST_GFLOPS): here every run is."""
    from fasttune.train import device

    monkeypatch.setattr(device, "SLOWEST_GFLOPS", 0.0)
    probes, cpu_hours = [], device.cpu_hours
    monkeypatch.setattr(device, "cpu_hours", lambda cfg: probes.append(cfg.force) or cpu_hours(cfg))
    probed = loop.train(tiny_config(tmp_path / "probed", max_steps=1))
    result = loop.train(dataclasses.replace(tiny_config(tmp_path / "forced", max_steps=1), force=True))
    assert probes == [False]
    assert result.records[0]["step"] == 0 and probed.records[0]["step"] == 0
    assert result.records[0]["val_loss"] == probed.records[0]["val_loss"]


def test_each_step_logs_its_target_tokens(reference):
    _, ref = reference
    steps = [r for r in ref.records if r.get("loss") is not None]
    # packed plain text: every token is a target but the first of each sample (nothing predicts it)
    assert all(r["target_tokens"] == r["tokens"] - r["samples"] for r in steps)


def test_checkpoint_files_get_the_usual_permissions(reference):
    _, ref = reference
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in ref.checkpoint.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_divergence_stops_naming_the_last_healthy_checkpoint_which_pruning_kept(tmp_path, monkeypatch):
    """A finite but exploding loss (1e6 x from step 4 on) is unhealthy: after max_bad_steps of them the run stops,
    and the healthy step-3 checkpoint survives keep_last=1 pruning (steps 4 and 5 were saved after it)."""
    cfg = tiny_config(tmp_path, save_every=1, keep_last=1, max_bad_steps=2, max_steps=8)
    original, calls = run.forward_backward, {"n": 0}

    def explode_from_step_4(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * 1e6 if calls["n"] >= 4 else loss

    monkeypatch.setattr(run, "forward_backward", explode_from_step_4)
    with pytest.raises(FasttuneError, match="stopped at step 6: 3 unhealthy steps.*exploding.*last healthy "
                                            "checkpoint: .*step-000003"):  # fmt: skip
        loop.train(cfg)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-000003", "step-000005"]
    AutoModelForCausalLM.from_pretrained(cfg.run_dir / "checkpoints" / "step-000003")


@pytest.mark.parametrize(("limit", "library"), [(100_000, "safetensors"), (600_000, "torch.save")])
def test_a_real_write_failure_is_one_line_and_leaves_the_previous_checkpoint(reference, tmp_path, limit, library):
    """A real write error, not a mock: the file size limit (RLIMIT_FSIZE, what a full small disk also does to a
    write) stops safetensors (model.safetensors, ~400 kB) or torch.save (trainer_state.pt, ~800 kB) mid-file."""
    import resource
    import shutil

    from fasttune.train import checkpoint

    _, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref.run_dir, run_dir)
    model, tok = AutoModelForCausalLM.from_pretrained(ref.checkpoint), AutoTokenizer.from_pretrained(ref.checkpoint)
    state = checkpoint.load_trainer_state(ref.checkpoint)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(FasttuneError) as e:
            checkpoint.save_checkpoint(run_dir, 7, model, tok, {k: v for k, v in state.items() if k != "rng"}, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(e.value)
    assert "\n" not in msg and "could not write checkpoint" in msg and "previous checkpoint is intact" in msg
    assert "File too large" in msg or "could not be written" in msg, msg
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000006"]  # no temporary left behind
    assert all(checkpoint.verify(p)[1] is None for p in root.iterdir())


def test_resume_with_max_steps_below_the_step_reached_is_refused_not_called_complete(reference, tmp_path):
    import shutil

    cfg, result = reference
    shutil.copytree(result.run_dir, tmp_path / "run")  # the shared reference run stays as it is
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "run"), resume=True)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=3))
    with pytest.raises(ConfigError, match=r"already past step 3 \(stopped at step 6\).*--max-steps above 6") as e:
        loop.train(cfg)  # nothing trained and the length given cannot be honoured: refused (exit 2)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())  # a plain --resume reads it: keep the run's 6
    assert saved["training"]["max_steps"] == 6


def test_steps_with_nothing_due_are_read_after_the_next_is_queued(reference, tmp_path, monkeypatch):
    """The loop queues step N+1 (Run.step) before it reads step N's loss and grad norm (Run.settle)
    exactly when nothing but the record follows N: never before an evaluation or a checkpoint (eval_every = save_every
    = 3 here), never the last step. Records, validation losses and checkpoints equal the run that reads every step
    at once (Run.due always true), and every step is timed from the previous step's end (together no more than the
    run's wall time; a new stretch starts only after evaluation or saving)."""
    cfg, ref = reference
    events, fresh = [], []  # fresh: steps that start a new stretch of step time (after evaluation and saving only)
    real_step, real_settle = run.Run.step, run.Run.settle

    def step(self):
        events.append(f"queue {self.state.step + 1}")
        if self.clock is None:
            fresh.append(self.state.step + 1)
        return real_step(self)

    def settle(self, rec):
        events.append(f"read {rec['step']}")
        return real_settle(self, rec)

    monkeypatch.setattr(run.Run, "step", step)
    monkeypatch.setattr(run.Run, "settle", settle)
    began = time.perf_counter()
    deferred = loop.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "deferred")))
    wall = time.perf_counter() - began
    assert " ".join(events) == (
        "queue 1 queue 2 read 1 queue 3 read 2 read 3 queue 4 queue 5 read 4 queue 6 read 5 read 6"
    )
    assert fresh == [1, 4]
    fresh.clear()
    monkeypatch.setattr(run.Run, "due", lambda self, step: True)
    at_once = loop.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "at-once")))
    assert fresh == [1, 4], "steps read at once still run one stretch between evaluations"
    for got in (deferred, at_once):
        assert losses(got.records) == losses(ref.records)
        assert [r.get("val_loss") for r in got.records] == [r.get("val_loss") for r in ref.records]
        assert [r["step"] for r in got.records] == [r["step"] for r in ref.records]
        assert all(r["step_s"] > 0 and r["grad_norm"] is not None for r in got.records if r["step"])
    assert [p.name for p in list_checkpoints(deferred.run_dir)] == ["step-000003", "step-000006"]
    assert sum(r["step_s"] for r in deferred.records if r["step"]) < wall


def test_a_queued_step_keeps_its_record_when_the_next_step_fails(tmp_path, monkeypatch, caplog):
    """Step 2 is queued (nothing due after it) when step 3 runs out of memory: step 2's record is still written,
    and a warning names the step it is about (here: exploding losses from step 2 on, each named by its own step,
    queued or not)."""
    cfg = tiny_config(tmp_path, max_bad_steps=10)
    original, calls = run.forward_backward, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        loss = original(*args, **kwargs)
        return loss * 1e6 if calls["n"] >= 2 else loss

    monkeypatch.setattr(run, "forward_backward", failing)
    monkeypatch.setattr(run.Run, "exploding", lambda self, loss: loss > 1e3)
    with pytest.raises(FasttuneError, match="out of memory at step 3"):
        loop.train(cfg)
    logged = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2]
    assert "step 2: loss" in caplog.text and "far above" in caplog.text and "step 3: loss" not in caplog.text


def test_a_step_ends_after_its_update_unless_the_host_would_wait_for_it():
    """run.step_end: the update's end when it has run or something follows that waits anyway; else (a step read at
    once under DDP/FSDP2 while its update still runs) the end of its backward pass, so the host never waits for the
    update just to time the step."""

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    update, backward = Event(False), Event(True)
    assert run.step_end(update, backward, wait=False) is backward
    assert run.step_end(update, backward, wait=True) is update
    finished = Event(True)
    assert run.step_end(finished, backward, wait=False) is finished
    assert run.step_end(update, None, wait=False) is update  # no earlier mark to use
    assert run.step_end(1.5, None, wait=False) == 1.5  # CPU: the host's clock


def test_resume_with_a_larger_max_steps_follows_the_new_schedule_from_its_first_step(tmp_path):
    """A finished 6-step run resumed to 10 steps trains steps 7-10 at the rates an uninterrupted 10-step run does
    (the optimizer state held the 6-step schedule's last rate, the floor: step 7 trained at it before)."""
    cfg = tiny_config(tmp_path / "a", save_every=6, eval_every=0)
    loop.train(cfg)
    longer = dataclasses.replace(cfg.training, max_steps=10)
    resumed = loop.train(dataclasses.replace(cfg, resume=True, training=longer))
    straight = loop.train(tiny_config(tmp_path / "b", max_steps=10, save_every=0, eval_every=0))

    def rates(records):
        return {r["step"]: r["lr"] for r in records if r.get("lr") is not None and r["step"] > 6}

    assert rates(resumed.records) == pytest.approx(rates(straight.records), rel=1e-12)
    assert sorted(rates(resumed.records)) == [7, 8, 9, 10]


def test_a_preset_trained_beyond_its_context_saves_a_context_that_covers_it(tmp_path):
    """The small presets' configs say 4096 positions; a run at a longer data.max_length saves that length as the
    checkpoint's context, so that fine-tuning or generating from the checkpoint at the length it trained on works."""
    from fasttune.model.context import context_length

    cfg = tiny_config(tmp_path, max_steps=1, save_every=1, eval_every=0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=4160, micro_batch_size=1))
    result = loop.train(cfg)
    saved = AutoModelForCausalLM.from_pretrained(result.checkpoint).config
    assert context_length(saved) == 4160
    assert AutoTokenizer.from_pretrained(result.checkpoint).model_max_length == 4160


@pytest.mark.parametrize(("every", "steps", "validated"), [(0, 3, [0, 3]), (2, 5, [0, 2, 4, 5])])
def test_eval_every_validates_as_its_help_says(tmp_path, capsys, every, steps, validated):
    """--training.eval-every N: step 0, every N-th step and the last; 0: step 0 and the last only."""
    assert main(["train", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "The untrained model (step 0; not again on --resume) and the last step are always validated: 0" in shown
    result = loop.train(tiny_config(tmp_path, max_steps=steps, eval_every=every, save_every=0))
    assert [r["step"] for r in result.records if r.get("val_loss") is not None] == validated
