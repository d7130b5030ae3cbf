"""Data parallel training (DDP via torchrun, gloo on CPU) computes what one process computes: two ranks with one
micro-batch each give the losses, validation losses and weights of one process accumulating the same two
micro-batches. Rank 0 alone writes the run folder."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, losses, save_micro_model, save_tiny_model, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fasttune.model.lora import apply_lora
from fasttune.train import loop

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _cli_overrides(cfg) -> list[str]:
    d, t = cfg.data, cfg.training
    return [
        "--experiment", "quick", "--model.preset", "micro", "--output-dir", cfg.output_dir,
        "--data.max-documents", str(d.max_documents), "--data.tokenizer-vocab-size", str(d.tokenizer_vocab_size),
        "--data.max-length", str(d.max_length), "--data.micro-batch-size", str(d.micro_batch_size),
        "--data.cache-dir", d.cache_dir, "--training.device", "cpu", "--training.grad-accum", "1",
        *(["--max-steps", str(t.max_steps)] if t.epochs is None else ["--epochs", str(t.epochs)]),
        "--training.warmup-steps", str(t.warmup_steps),
        "--training.eval-every", str(t.eval_every), "--training.eval-batches", str(t.eval_batches),
        "--training.save-every", str(t.save_every), "--training.log-every", "1", "--training.lr", str(t.lr),
        "--generation.max-new-tokens", "4",
    ]  # fmt: skip


def _torchrun(cfg, *extra: str, cwd=None, check: bool = True, script: Path | None = None):
    """`fasttune train` over 2 ranks with `cfg`'s options and `extra`, through `script` where given (a file of
    tests/fixtures that changes what it tests, then calls cli.main); returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    entry = ["-m", "fasttune"] if script is None else [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
           "train", *_cli_overrides(cfg), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_start_up_error_on_rank_0_is_one_line_and_the_other_ranks_stop_quietly(tmp_path):
    """Rank 0 checks the run folder, --model and --data while the others wait: when it fails, they stop with its exit
    code and print nothing, instead of a traceback each for the lost peer or a copy of its error line."""
    cfg = tiny_config(tmp_path, max_steps=1)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "mine.txt").write_text("not a run")
    proc = _torchrun(cfg, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("error: --output-dir") == 1, out[-3000:]
    assert "[rank1]" not in out and "Connection closed" not in out, out[-3000:]
    proc = _torchrun(cfg, "--training.weight-decay", "much", check=False)  # a bad option: every rank parses it,
    out = proc.stdout + proc.stderr  # rank 0 alone says so
    assert proc.returncode != 0 and out.count("error: --training.weight-decay") == 1, out[-3000:]
    missing = tmp_path / "missing.jsonl"  # a bad input: every rank would find it missing, rank 0 alone says so
    proc = _torchrun(cfg, "--data", str(missing), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count(f"error: {missing}: no such file") == 1, out[-3000:]
    assert "[rank 1]" not in out and "Connection closed" not in out, out[-3000:]


@pytest.mark.slow
def test_a_start_up_error_on_a_later_rank_stops_every_rank_instead_of_a_hang(tmp_path):
    """Rank 1 fails to read its data after rank 0's checks passed and the gate opened: rank 0 had gone on to the
    model's first collective (DDP's broadcast) and met the lost peer there: gloo's 'Connection closed by peer'
    traceback once rank 1's process ended, a wait for good while it lived on (a script that catches the error).
    Now every rank agrees at the end of start-up: rank 1 says its own error, rank 0 one line naming it, both exit 2."""
    loop.train(tiny_config(tmp_path / "cache", max_steps=1, eval_every=0, save_every=0))  # the tokenizer, cached
    cfg = tiny_config(tmp_path, max_steps=1, eval_every=0, save_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(FIXTURES / "rank_start_fails.py"), "train", *_cli_overrides(cfg)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert "rank 0: exit 2" in out and "rank 1: exit 2" in out, out[-3000:]
    assert out.count("[rank 1] error: data.jsonl: unreadable on this node") == 1, out[-3000:]
    assert out.count("stopping every rank: rank 1 failed to start (its own error says why)") == 1, out[-3000:]
    assert "fasttune/train/" not in out and "Connection closed" not in out, out[-3000:]  # no rank's traceback


def test_the_start_up_agreement_stops_the_ranks_that_started_well(monkeypatch, caplog):
    """StartGate.agree without processes: a peer's failed flag arrives through the all-reduce."""
    from fasttune.errors import PeerFailed
    from fasttune.train import distributed

    def peer_failed(flags, *_a, **_k):
        flags[1] = 1.0

    monkeypatch.setattr(distributed.dist, "get_backend", lambda *_a: "gloo")
    monkeypatch.setattr(distributed.dist, "all_reduce", peer_failed)
    gate = distributed.StartGate(distributed.Dist(0, 2, 0, False))
    gate.agree()  # the gate never opened (rank 0's checks failed, or nothing to train): no collective
    gate.started = True
    with pytest.raises(PeerFailed, match="rank 1 failed to start") as e:
        gate.agree()
    assert e.value.exit_code == 2 and caplog.text.count("stopping every rank: rank 1 failed to start") == 1
    gate.agree()  # once only: the failure's handler calls it again
    failing = distributed.StartGate(distributed.Dist(1, 2, 0, False))
    failing.started = True
    failing.agree(OSError("no such model"))  # the failing rank goes on with its own error

    def lost(*_a, **_k):
        raise RuntimeError("gloo: Connection closed by peer")

    monkeypatch.setattr(distributed.dist, "all_reduce", lost)
    gone = distributed.StartGate(distributed.Dist(1, 2, 0, False))
    gone.started = True
    gone.agree(KeyboardInterrupt())  # the peers are gone: its own error stands


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_accumulating(tmp_path, mode):
    # 3 validation batches over 2 ranks: under FSDP2 the rank with one runs a second forward it leaves out
    ref_cfg = tiny_config(tmp_path / "one", max_steps=3, eval_every=3, save_every=3, grad_accum=2, eval_batches=3)
    ref = loop.train(ref_cfg)  # also caches the tokenizer the ranks load
    ddp_cfg = tiny_config(tmp_path / mode, max_steps=3, eval_every=3, save_every=3, eval_batches=3)
    proc = _torchrun(ddp_cfg, *(["--training.fsdp"] if mode == "fsdp" else []))

    run = ddp_cfg.run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got, want = losses(records), losses(ref.records)
    assert got.keys() == want.keys() == {1, 2, 3}
    assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want), (got, want)
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    assert math.isclose(vals[-1], ref.last_val_loss, rel_tol=1e-5) and math.isclose(vals[0], ref.first_val_loss)
    # both ranks' samples counted: tokens of a step = those of the accumulating process
    assert [r["tokens"] for r in records if r.get("loss")] == [r["tokens"] for r in ref.records if r.get("loss")]
    w_ddp = load_file(run / "checkpoints" / "step-000003" / "model.safetensors")
    w_one = load_file(ref.checkpoint / "model.safetensors")
    assert w_ddp.keys() == w_one.keys()  # the same files (a tied embedding stored once, also under FSDP2)
    for name, w in w_one.items():
        torch.testing.assert_close(w_ddp[name], w, atol=1e-5, rtol=1e-4)
    assert proc.stdout.count("fasttune run summary") == 1  # one rank reports
    assert "peak memory  " in proc.stdout and "GPUs" not in proc.stdout  # CPU ranks: "fullest of 2 GPUs" said before
    # what ran, said before step 1 and in the summary: the strategy, the ranks and the process group's backend
    said = f"training: {'FSDP2' if mode == 'fsdp' else 'DDP'} over 2 ranks (gloo); pure fp32 weights"
    assert (proc.stdout + proc.stderr).count(said) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{'FSDP2' if mode == 'fsdp' else 'DDP'} over 2 ranks (gloo); pure" in proc.stdout.split("run summary")[1]


@pytest.mark.slow
def test_epochs_count_the_micro_batches_of_every_rank(tmp_path):
    """--epochs on two ranks: each step trains one micro-batch per rank, so an epoch is half the steps of one
    process (grad_accum 1); the run is that of one process accumulating the ranks' micro-batches, step for step."""
    one = loop.train(tiny_config(tmp_path / "one", epochs=0.02, grad_accum=2, eval_every=0, save_every=0))
    alone = loop.train(tiny_config(tmp_path / "alone", epochs=0.02, eval_every=0, save_every=0))
    cfg = tiny_config(tmp_path / "ddp", epochs=0.02, eval_every=0, save_every=0)
    proc = _torchrun(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    got, want = losses(records), losses(one.records)
    assert got.keys() == want.keys() == set(range(1, one.steps + 1)) and one.steps < alone.steps
    assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want), (got, want)
    assert f"0.02 epochs = {one.steps} steps" in proc.stdout + proc.stderr
    assert json.loads((cfg.run_dir / "config.json").read_text())["training"]["max_steps"] == one.steps


def test_rank_0_alone_digests_the_inputs_and_a_finished_runs_resume_ends_on_every_rank_before_the_data(tmp_path):
    """The digest of the input files (every data file read once more) is recorded by rank 0 alone, in its checkpoints:
    the other ranks do not compute it. The resume of the finished run is one line (rank 0's) on every rank, before
    any reads the data or builds the model: rank 0 tells the others at its start-up gate. Its resume with a
    --max-steps below its step is refused by rank 0 (one error) and every rank stops with its exit code."""
    script = FIXTURES / "rank_inputs.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "rank 0: training digested the inputs 1x, recorded: True" in out, out[-3000:]
    assert "rank 1: training digested the inputs 0x, recorded: -" in out, out[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: the resume read the data 0x, built 0 models, ended at step 2" in out, out[-3000:]
    assert out.count("already complete (step 2 of training.max_steps=2)") == 1, out[-3000:]
    assert "rank 0: the resume with --max-steps 1 refused: ConfigError, exit 2" in out, out[-3000:]
    assert "rank 1: the resume with --max-steps 1 refused: PeerFailed, exit 2" in out, out[-3000:]


@pytest.mark.slow
def test_fsdp_resume_matches_an_uninterrupted_run(tmp_path):
    """FSDP2 checkpoints gather the shards into ordinary files (weights + optimizer state); resuming from one on
    two ranks continues exactly like a single process that never stopped."""
    ref = loop.train(tiny_config(tmp_path / "one", max_steps=4, eval_every=0, save_every=4, grad_accum=2))
    cfg = tiny_config(tmp_path / "fsdp", max_steps=2, eval_every=0, save_every=2)
    _torchrun(cfg, "--training.fsdp")
    _torchrun(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=4)), "--training.fsdp",
              "--resume")  # fmt: skip
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    got, want = losses(records), losses(ref.records)
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want), (got, want)


@pytest.mark.slow
def test_fsdp_resume_of_an_moe_model_matches_an_uninterrupted_run(tmp_path):
    """An MoE model (Qwen3-MoE: its experts fused in the model, one per expert in its files and in the checkpoints
    FSDP2 gathers) resumes on two ranks like one process that never stopped."""
    base = save_tiny_model(tmp_path / "base", "qwen3_moe")
    one = tiny_config(tmp_path / "one", max_steps=4, eval_every=0, save_every=4, grad_accum=2)
    ref = loop.train(dataclasses.replace(one, model=dataclasses.replace(one.model, path=str(base))))
    cfg = tiny_config(tmp_path / "fsdp", max_steps=2, eval_every=0, save_every=2)
    _torchrun(cfg, "--training.fsdp", "--model", str(base))
    _torchrun(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=4)), "--training.fsdp",
              "--model", str(base), "--resume")  # fmt: skip
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    got, want = losses(records), losses(ref.records)
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want), (got, want)
    _assert_same_tensors(load_file(cfg.run_dir / "checkpoints" / "step-000004" / "model.safetensors"),
                         load_file(ref.checkpoint / "model.safetensors"))  # fmt: skip


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_fsdp(tmp_path):
    """A checkpoint of one process (positional optimizer state) resumes on two FSDP2 ranks (which load it by
    parameter name), with a warning that the global batch changes."""
    cfg = tiny_config(tmp_path / "one", max_steps=2, eval_every=0, save_every=2)
    loop.train(cfg)  # one process, started without --training.fsdp: the flag may change on resume
    proc = _torchrun(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=3)),
                     "--training.fsdp", "--resume")  # fmt: skip
    assert (
        "resuming with 2 micro-batches per step (2 ranks x grad_accum 1), the checkpoint trained with 1 (1 x "
        "1): the global batch changes" in proc.stdout + proc.stderr
    )
    assert (cfg.run_dir / "checkpoints" / "step-000003").is_dir()


def test_fsdp_in_one_process_says_it_trains_unsharded(tmp_path, caplog, monkeypatch):
    """--training.fsdp without torchrun trained one unsharded process without a word."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = tiny_config(tmp_path, max_steps=1, eval_every=0, save_every=0)
    with caplog.at_level("WARNING", logger="fasttune"):
        loop.train(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, fsdp=True)))
    said = "training.fsdp shards the model over the processes of a torchrun launch; this run is one process"
    assert caplog.text.count(said) == 1, caplog.text


def test_fsdp_in_one_process_is_said_once_by_the_command(tmp_path, capsys, monkeypatch):
    """`fasttune train --training.fsdp` said it twice: once as the command checked its options, once as train()
    checked the launch again. (A folder of the user's stops the run after the warning, before anything is built.)"""
    from fasttune import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (theirs := tmp_path / "theirs").mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert cli.main(["train", "--training.fsdp", "--output-dir", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert err.count("--training.fsdp shards the model over the processes of a torchrun launch") == 1, err
    assert "is not a fasttune run folder" in err and (theirs / "notes.txt").read_text() == "mine"


def test_a_start_that_fails_because_the_peers_are_gone_keeps_rank_0s_own_error(monkeypatch):
    """Ctrl-C while rank 0 loads the model reaches every rank: the others are gone when rank 0 tells them it failed.
    Its KeyboardInterrupt must stay the error (the CLI's quiet "interrupted"), not the broadcast's lost connection."""
    from fasttune.train import distributed

    def lost(*_a, **_k):
        raise RuntimeError("gloo: Connection closed by peer")

    monkeypatch.setattr(distributed.dist, "broadcast_object_list", lost)
    distributed.StartGate(distributed.Dist(0, 2, 0, False)).open(KeyboardInterrupt())  # no new error
    with pytest.raises(RuntimeError, match="Connection closed"):  # a start that succeeded must reach the peers
        distributed.StartGate(distributed.Dist(0, 2, 0, False)).open()


def test_oom_retry_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_config(tmp_path, oom_retry=True)
    with pytest.raises(Exception, match="single-process only"):
        loop.train(cfg)


def _rank_pid(agent_pid: int, rank: int) -> int | None:
    """pid of the torchrun worker with RANK=rank among the agent's children (Linux /proc)."""
    for stat in os.listdir("/proc"):
        if not stat.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1])
            environ = open(f"/proc/{stat}/environ", "rb").read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(stat)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker through /proc (Linux)")
@pytest.mark.parametrize("target", ["rank 1", "torchrun"])
def test_sigterm_on_one_rank_stops_all_with_a_checkpoint(tmp_path, target):
    """SIGTERM to rank 1 only, or Ctrl-C's SIGINT to torchrun (which forwards it to every rank): both ranks stop after
    the same step, rank 0 writes that step's checkpoint and says so once (every rank printed "stopping after this
    step"), and the run resumes from it."""
    import signal
    import time

    loop.train(tiny_config(tmp_path / "tok", max_steps=1, eval_every=0, save_every=0))  # cache the tokenizer
    cfg = tiny_config(tmp_path / "run", max_steps=100000, eval_every=0, save_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fasttune",
           "train", *_cli_overrides(cfg)]  # fmt: skip
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    victim = _rank_pid(agent.pid, 1) if target == "rank 1" else agent.pid
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGTERM if target == "rank 1" else signal.SIGINT)
    out, _ = agent.communicate(timeout=300)
    assert out.count("stopping after this step") == (target == "torchrun"), out[-3000:]  # rank 0's, if it got one
    assert out.count("interrupted at step") == 1, out[-3000:]
    checkpoints = sorted((cfg.run_dir / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.pt").is_file(), out[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert step >= max(logged) >= 3, (step, logged)  # the checkpoint is the step both ranks stopped after
    assert "interrupted at step" in out, out[-3000:]
    _torchrun(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=step + 1)), "--resume")
    assert (cfg.run_dir / "checkpoints" / f"step-{step + 1:06d}").is_dir()


def test_explicit_gpu_index_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="CUDA_VISIBLE_DEVICES"):
        loop.train(tiny_config(tmp_path, device="cuda:1"))


LORA = {"enabled": True, "rank": 4, "alpha": 8}
PEFT_READS_DEPRECATED = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


def _lora_base(root: Path) -> Path:
    """A micro Llama with a tokenizer, saved like any local HF model folder: the frozen base LoRA trains on."""
    return save_micro_model(root / "base")


def _lora(cfg, base: Path):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(base)),
                               lora=dataclasses.replace(cfg.lora, **LORA))  # fmt: skip


def _lora_args(base: str) -> list[str]:
    return ["--model", base, "--lora.enabled", "--lora.rank", str(LORA["rank"]), "--lora.alpha", str(LORA["alpha"])]


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_lora_ddp_matches_one_process_accumulating(tmp_path):
    base = _lora_base(tmp_path)
    ref = loop.train(_lora(tiny_config(tmp_path / "one", max_steps=2, eval_every=0, save_every=2, grad_accum=2), base))
    cfg = tiny_config(tmp_path / "ddp", max_steps=2, eval_every=0, save_every=2)
    _torchrun(cfg, *_lora_args(str(base)))
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    got, want = losses(records), losses(ref.records)
    assert got.keys() == want.keys() == {1, 2}
    assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want), (got, want)
    _assert_same_tensors(load_file(cfg.run_dir / "adapter" / "adapter_model.safetensors"),
                         load_file(ref.run_dir / "adapter" / "adapter_model.safetensors"))  # fmt: skip


@pytest.mark.slow
def test_lora_fsdp_of_an_moe_model_trains_its_fused_experts_as_one_process_does(tmp_path):
    """LoRA on a sharded DeepSeek-V3, whose experts are fused 3-D parameters adapted in place (peft's ParamWrapper)
    beside a shared expert and a dense MLP adapted through their weights: two ranks give one process's losses and
    adapters, the experts' and the shared expert's among them, and merged/ holds trained experts. Three layers: the
    MoE layer between the dense one and the last is resharded after its forward, so backward runs its experts' grouped
    matmuls, and their adapters' thin ones (model/expert_lora_act.py), on weights and adapters gathered again (the last
    layer stays gathered)."""
    base = save_tiny_model(tmp_path / "base", "deepseek_v3", num_hidden_layers=3)
    ref = loop.train(_lora(tiny_config(tmp_path / "one", max_steps=2, eval_every=0, save_every=2, grad_accum=2), base))
    cfg = tiny_config(tmp_path / "fsdp", max_steps=2, eval_every=0, save_every=2)
    _torchrun(cfg, "--training.fsdp", *_lora_args(str(base)))
    got, want = (losses([json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]),
                 losses(ref.records))  # fmt: skip
    assert got.keys() == want.keys() == {1, 2}
    assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want), (got, want)
    adapter = load_file(cfg.run_dir / "adapter" / "adapter_model.safetensors")
    assert any(".experts.lora_B" in k and w.abs().max() > 0 for k, w in adapter.items())  # the experts trained
    assert any(".shared_experts." in k and "lora_B" in k and w.abs().max() > 0 for k, w in adapter.items())
    _assert_same_tensors(adapter, load_file(ref.run_dir / "adapter" / "adapter_model.safetensors"))
    merged, plain = load_file(cfg.run_dir / "merged" / "model.safetensors"), load_file(base / "model.safetensors")
    _assert_same_tensors(merged, load_file(ref.run_dir / "merged" / "model.safetensors"))
    experts = [k for k in plain if ".experts." in k]
    assert experts and not [k for k in experts if torch.equal(merged[k], plain[k])]


@pytest.mark.slow
def test_lora_fsdp_of_moe_experts_on_recipes_trains_as_one_process_does(tmp_path, monkeypatch):
    """The experts' adapters on model/expert_lora.py's recipes (the path of eager and batched_mm experts and of expert
    parallelism; forced as tests/test_expert_lora.py forces it, on every rank through a fixture script): W' folded
    from the weights FSDP2 gathered for the forward, and remade in backward from those it gathers again (layer 0 is
    resharded after its forward), gives the losses and adapters of one process on the recipes; and those of one
    process whose adapters act on the activations (model/expert_lora_act.py), the same sums in another order.
    Tolerances: those of the other equivalence tests here (1e-5 relative on the losses; _assert_same_tensors). fp32
    throughout: the ranks differ from one process accumulating only in the order the two micro-batches' gradients
    and losses are summed (the adapters come out bit for bit equal, the losses within 1e-7), the two paths only in
    the order of their matmuls' sums (1e-6 on an A of 0.1). Adam's first steps move each adapter by about lr (1e-3)
    whatever its gradient's size, so a wrong W' moves the adapters far outside them (checked: a scale dropped on
    every rank, or on rank 1 alone, or rank 1's backward remaking W for W', each moved an A by about 4e-4), though
    not always the losses (the dropped scale: 6e-6 at step 2)."""
    from fasttune.model import expert_lora, expert_lora_act

    base = save_tiny_model(tmp_path / "base", "qwen3_moe")
    one = tiny_config(tmp_path / "one", max_steps=2, eval_every=0, save_every=2, grad_accum=2)
    act = loop.train(_lora(dataclasses.replace(one, output_dir=str(tmp_path / "act" / "run")), base))
    ran, real = [], expert_lora._recipes
    monkeypatch.setattr(expert_lora_act, "enabled", False)
    monkeypatch.setattr(expert_lora, "_recipes", lambda *a, **k: ran.append(1) or real(*a, **k))
    ref = loop.train(_lora(one, base))
    assert ran  # the reference ran the recipes, the other run did not (tests/test_expert_lora_act.py)
    cfg = tiny_config(tmp_path / "fsdp", max_steps=2, eval_every=0, save_every=2)
    proc = _torchrun(cfg, "--training.fsdp", *_lora_args(str(base)), script=FIXTURES / "expert_lora_recipes.py")
    for rank in (0, 1):
        assert f"rank {rank}: experts on recipes True, on the activations 0" in proc.stdout, proc.stdout[-3000:]
    got = losses([json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()])
    adapter = load_file(cfg.run_dir / "adapter" / "adapter_model.safetensors")
    assert any(".experts.lora_B" in k and w.abs().max() > 0 for k, w in adapter.items())  # the experts trained
    for want in (ref, act):
        assert got.keys() == losses(want.records).keys() == {1, 2}
        assert all(math.isclose(got[k], v, rel_tol=1e-5) for k, v in losses(want.records).items()), (got, want.records)
        _assert_same_tensors(adapter, load_file(want.run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.filterwarnings(PEFT_READS_DEPRECATED)  # the test's own peft loading, not fasttune's
def test_lora_fsdp_matches_one_process_and_resumes_on_any_number_of_ranks(tmp_path):
    """LoRA on an FSDP2-sharded frozen base: two ranks train, checkpoint (plain peft adapter folders whose base path
    is absolute) and resume exactly like one process accumulating the same micro-batches without stopping, and end
    with the same merged model; the two-rank checkpoint also resumes in one process."""
    import shutil

    from peft import AutoPeftModelForCausalLM

    from fasttune.train.distributed import SINGLE
    from fasttune.train.optim import build_optimizer

    base = _lora_base(tmp_path)
    ref_cfg = _lora(tiny_config(tmp_path / "one", max_steps=4, eval_every=2, save_every=2, grad_accum=2), base)
    ref = loop.train(ref_cfg)
    cfg = tiny_config(tmp_path / "fsdp", max_steps=2, eval_every=2, save_every=2)
    args = ["--training.fsdp", *_lora_args("base")]  # relative to the working directory, as users type it
    _torchrun(cfg, *args, cwd=tmp_path)
    step2 = cfg.run_dir / "checkpoints" / "step-000002"
    ref2 = ref.run_dir / "checkpoints" / "step-000002"
    _assert_same_tensors(load_file(step2 / "adapter_model.safetensors"), load_file(ref2 / "adapter_model.safetensors"))
    adapter_config = json.loads((step2 / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())

    # the by-name optimizer state FSDP2 wrote lands on the right parameters of a one-process optimizer
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), ref_cfg.lora)
    optimizer, _ = build_optimizer(ref_cfg, model, torch.device("cpu"))
    SINGLE.load_optimizer(model, optimizer, torch.load(step2 / "trainer_state.pt", weights_only=True)["optimizer"])
    want = torch.load(ref2 / "trainer_state.pt", weights_only=True)["optimizer"]
    assert optimizer.state_dict()["param_groups"] == want["param_groups"]
    for i, s in want["state"].items():
        _assert_same_tensors(optimizer.state_dict()["state"][i], s)
    shutil.copytree(cfg.run_dir, tmp_path / "copy" / "run")

    longer = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=4))
    _torchrun(longer, *args, "--resume", cwd=tmp_path)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    got, want = losses(records), losses(ref.records)
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want), (got, want)
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    assert math.isclose(val[-1], ref.last_val_loss, rel_tol=1e-5)
    _assert_same_tensors(load_file(cfg.run_dir / "adapter" / "adapter_model.safetensors"),
                         load_file(ref.run_dir / "adapter" / "adapter_model.safetensors"))  # fmt: skip
    _assert_same_tensors(load_file(cfg.run_dir / "merged" / "model.safetensors"),
                         load_file(ref.run_dir / "merged" / "model.safetensors"))  # fmt: skip
    # the adapter loads from this (another) working directory, its base found through the recorded path
    adapted = AutoPeftModelForCausalLM.from_pretrained(cfg.run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "merged").eval()
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)

    # the two-rank checkpoint resumes in one process (the optimizer state turned back into torch's positional form),
    # without --training.fsdp (ignored in one process: no need to repeat it)
    one = dataclasses.replace(
        _lora(longer, Path("base")), output_dir=str(tmp_path / "copy" / "run"), resume=True,
        training=dataclasses.replace(longer.training, max_steps=3, fsdp=False, grad_accum=2),  # 1 x 2 = 2 ranks x 1
    )  # fmt: skip
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        resumed = loop.train(one)
    finally:
        os.chdir(cwd)
    assert resumed.checkpoint.name == "step-000003" and resumed.steps == 3
    assert math.isclose(losses(resumed.records)[3], losses(ref.records)[3], rel_tol=1e-5)  # the same global batch


@pytest.mark.slow
def test_lora_fsdp_bf16_mixed_precision_matches_one_process_under_autocast(tmp_path):
    """The precision LoRA trains in on a GPU, on CPU: a bf16 frozen base, fp32 adapters, FSDP2 gathering in bf16 and
    reducing in fp32 (its mixed precision policy) gives the adapters of one process under torch's bf16 autocast."""
    script = FIXTURES / "fsdp_bf16_lora.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path / "fsdp.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], check=True, env=env, timeout=300)
    got, want = torch.load(tmp_path / "fsdp.pt"), torch.load(tmp_path / "one.pt")
    assert len(want) == 8 and all(".lora_" in k for k in want)  # the adapters alone were gathered
    assert all(w.dtype == torch.float32 for w in got.values())
    assert any(w.abs().max() > 0 for k, w in want.items() if "lora_B" in k)  # they trained
    _assert_same_tensors(got, want)


def test_ddp_is_gone_before_its_process_group_is_destroyed(tmp_path):
    """A DDP reducer that outlives its gloo group destroys the group from its own deallocation with the GIL held, while
    gloo's threads may need the GIL: the ranks hung at exit now and then (a CI run of the two-rank test above did)."""
    script = FIXTURES / "ddp_teardown.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: DDP objects alive at destroy_process_group: 0" in proc.stdout, proc.stdout[-3000:]


def test_reductions_over_ranks_give_every_rank_the_sum_and_the_largest_value():
    """Dist.sum_ (the step's loss) and Dist.max_ (the summary's peak memory: the fullest GPU, not rank 0's)."""
    script = FIXTURES / "dist_reduce.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: sum [3.0, 4.0] max 10.5" in proc.stdout, proc.stdout


@pytest.mark.parametrize("head", ["tied", "apart", "tied-on-rank-0"])
def test_fsdp_ranks_but_the_first_build_on_the_meta_device_and_get_rank_0s_weights(tmp_path, head):
    """Under FSDP2 no rank holds the whole model on its device and only rank 0 reads the weight files: rank 1 builds
    the model on the meta device (its from_pretrained raises if called), adopts rank 0's dtypes and tied weights, and
    its shards come from rank 0's weights, buffers (RoPE) included: both ranks compute plain HF's loss, and the
    weights gathered back are the folder's. `apart`: a config that says tied embeddings, files that hold a head of
    their own (from_pretrained unties them; a model built from the config would not); `tied-on-rank-0`: the reverse
    (rank 0's model ties what the config keeps apart)."""
    folder = save_micro_model(tmp_path / "base")
    if head != "tied":
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.config.tie_word_embeddings = False
        apart = AutoModelForCausalLM.from_config(model.config)
        apart.load_state_dict(model.state_dict(), strict=False)
        torch.nn.init.normal_(apart.lm_head.weight, std=0.02)
        apart.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": head == "apart"}))
    script = FIXTURES / "fsdp_meta_ranks.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    mode = ["tie-on-rank-0"] if head == "tied-on-rank-0" else []
    proc = subprocess.run([*cmd, str(folder), str(tmp_path / "out.pt"), *mode], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert set(out["built"][0]) == {"cpu"} and set(out["built"][1]) == {"meta"}
    assert out["losses"][0] == out["losses"][1]
    torch.testing.assert_close(out["losses"][0], out["reference"], atol=2e-3, rtol=0)  # bf16: 5.7433 for 5.7432
    tied = set() if head == "apart" else {"lm_head.weight"}  # tied to the embeddings: gathered once
    assert out["plain"].keys() - out["weights"].keys() == tied
    _assert_same_tensors(out["weights"], {k: w for k, w in out["plain"].items() if k in out["weights"]})
    assert {w.dtype for w in out["weights"].values()} == {torch.bfloat16}
