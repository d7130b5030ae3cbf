"""--training.epochs N: the run trains the fewest optimizer steps that pass over every training sample N times, as
the loop batches them (packing, micro-batch, grad accumulation, ranks, the validation split), and is the same run as
--max-steps set to those steps by hand; --resume keeps its length."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from helpers import crash_at, losses, tiny_config

from fasttune import cli
from fasttune.cli import parse_train_args
from fasttune.errors import ConfigError
from fasttune.train import loop, run
from fasttune.train.checkpoint import list_checkpoints
from fasttune.train.length import epochs_to_steps


def _cfg(tmp_path: Path, packing: bool = True, **training):
    """A tiny run on 3 documents of the embedded corpus: ~60 training samples of up to 64 tokens, some held out."""
    cfg = tiny_config(tmp_path, **{"eval_every": 0, "save_every": 0, **training})
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_documents=3, micro_batch_size=3,
                                                             packing=packing))  # fmt: skip


def _key(sample) -> tuple[int, ...]:
    return tuple(sample.ids.tolist())


def _train_counting(cfg, monkeypatch):
    """(result, the micro-batches trained in order as lists of sample keys, the Run)."""
    seen, runs = [], []
    real_open, real_next = loop._open, run.DataStream.next

    def spy_open(*args, **kwargs):
        runs.append(real_open(*args, **kwargs))
        return runs[-1]

    def spy_next(self):
        batch = real_next(self)
        seen.append([_key(s) for s in batch])
        return batch

    monkeypatch.setattr(loop, "_open", spy_open)
    monkeypatch.setattr(run.DataStream, "next", spy_next)
    result = loop.train(cfg)
    monkeypatch.undo()
    return result, seen, runs[0]


def _first_pass(seen: list[list], train: Counter) -> int:
    """The micro-batches it takes to see every training sample once."""
    count = Counter()
    for n, batch in enumerate(seen, 1):
        count.update(batch)
        if count == train:
            return n
    raise AssertionError("the run never passed over its training data once")


@pytest.mark.parametrize(("packing", "grad_accum"), [(True, 4), (False, 5)])
def test_epochs_train_the_fewest_steps_that_see_every_sample_that_often(tmp_path, monkeypatch, caplog, packing,
                                                                        grad_accum):  # fmt: skip
    caplog.set_level("INFO", logger="fasttune")
    cfg = _cfg(tmp_path, packing=packing, epochs=2, grad_accum=grad_accum)  # the preset's max_steps (6) overridden
    result, seen, the_run = _train_counting(cfg, monkeypatch)
    train = Counter(_key(s) for s in the_run.data.train)
    assert the_run.data.val and not {_key(s) for s in the_run.data.val} & set(train)  # the held-out part: untrained
    per_epoch = _first_pass(seen, train)
    flat = [k for batch in seen[: 2 * per_epoch] for k in batch]
    assert Counter(flat) == Counter({k: 2 * n for k, n in train.items()})  # each sample exactly twice
    steps = result.steps
    assert len(seen) == steps * grad_accum  # every step takes grad_accum micro-batches
    assert (steps - 1) * grad_accum < 2 * per_epoch <= steps * grad_accum  # the fewest steps that cover both passes
    assert steps != 6
    records = [r for r in result.records if r.get("loss") is not None]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert sum(r["samples"] for r in records) == len([k for batch in seen for k in batch])
    assert result.records[-1]["step"] == steps and result.records[-1].get("val_loss") is not None  # eval at the end
    assert result.checkpoint.name == f"step-{steps:06d}"  # saved at the end
    saved = json.loads((cfg.run_dir / "config.json").read_text())["training"]
    assert (saved["epochs"], saved["max_steps"]) == (2.0, steps)
    per_step = Fraction(per_epoch, grad_accum)
    assert f"2 epochs = {steps} steps ({float(per_step):.4g} per epoch" in caplog.text


def test_epochs_are_the_run_of_their_steps_given_by_hand(tmp_path):
    by_epochs = loop.train(_cfg(tmp_path / "epochs", epochs=2, grad_accum=2))
    by_steps = loop.train(_cfg(tmp_path / "steps", max_steps=by_epochs.steps, grad_accum=2))
    assert by_steps.steps == by_epochs.steps
    assert losses(by_epochs.records) == losses(by_steps.records)  # bit-identical on CPU
    lrs = [[r["lr"] for r in res.records if r.get("lr") is not None] for res in (by_epochs, by_steps)]
    assert lrs[0] == lrs[1]  # the schedule spans the computed total


def test_resume_of_an_epochs_run_keeps_its_length_and_refuses_another(tmp_path, capsys, monkeypatch):
    ref = loop.train(_cfg(tmp_path / "ref", epochs=1.5))
    cfg = _cfg(tmp_path / "run", epochs=1.5, save_every=3)
    crash_at(cfg, 5)
    # the command line resumes from the run's config.json, which records both epochs and their steps
    run_dir = str(cfg.run_dir)
    resumed = parse_train_args(["--resume", "--output-dir", run_dir])
    assert (resumed.training.epochs, resumed.training.max_steps) == (1.5, ref.steps)
    extended = parse_train_args(["--resume", "--output-dir", run_dir, "--max-steps", "40"])
    assert (extended.training.epochs, extended.training.max_steps) == (None, 40)  # typed --max-steps decides
    again = parse_train_args(["--config", str(cfg.run_dir / "config.json"), "--output-dir", str(tmp_path / "new")])
    assert again.training.epochs == 1.5  # a run's config.json trains that run again
    # the same epochs at another global batch would be another length: refused, naming the fix, before the model
    other = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, grad_accum=2))
    monkeypatch.setattr(loop, "prepare_model", _never)
    with pytest.raises(ConfigError, match=rf"--resume: 1.5 epochs are \d+ steps now .* but the run was started as "
                                          rf"{ref.steps} steps; .* --max-steps {ref.steps}"):  # fmt: skip
        loop.train(other)
    monkeypatch.undo()
    result = loop.train(dataclasses.replace(cfg, resume=True))
    assert result.steps == ref.steps
    assert losses(result.records) == losses(ref.records)  # the uninterrupted run's steps and losses
    assert json.loads((cfg.run_dir / "config.json").read_text())["training"]["max_steps"] == ref.steps


def _never(*args, **kwargs):
    raise AssertionError("the model was built")


def test_fractional_epochs_count_exactly():
    assert epochs_to_steps(0.1, Fraction(30)) == 3  # 0.1 x 30 is 3.0000000000000004 in floats
    assert epochs_to_steps(0.5, Fraction(16, 3)) == 3  # 8/3 steps: a third step finishes the half epoch
    assert epochs_to_steps(1e-9, Fraction(5)) == 1
    assert epochs_to_steps(3, Fraction(7, 2)) == 11


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-steps", "5", "--epochs", "2"], "--max-steps and --epochs both set the run's length"),  # as typed
        (["--training.max_steps=5", "--training.epochs=2"], "--training.max-steps and --training.epochs both set"),
        (["--epochs", "0"], "--epochs=0.0 is not valid; it must be > 0"),  # the flag typed, not the field
        (["--epochs=-2"], "--epochs=-2.0 is not valid; it must be > 0"),
        (["--training.epochs", "-1"], "--training.epochs=-1.0 is not valid; it must be > 0"),
        (["--max-steps", "0"], "--max-steps=0 is not valid; it must be > 0"),
        (["--epochs", "many"], "--epochs: 'many' is not a valid number or None"),
        (["--training.epochs", "many"], "--training.epochs: 'many' is not a valid number or None"),
    ],
)
def test_a_wrong_length_is_one_line(args, expected, capsys):
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err


def test_a_file_sets_one_length_and_a_flag_beats_the_files(tmp_path, capsys):
    both = tmp_path / "both.yaml"
    both.write_text("training:\n  max_steps: 5\n  epochs: 2\n")
    assert cli.main(["train", "--config", str(both)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {both}: training.max_steps and training.epochs both set the run's length")
    steps = tmp_path / "steps.yaml"
    steps.write_text("training:\n  max_steps: 5\n")
    assert parse_train_args(["--config", str(steps), "--epochs", "0.5"]).training.epochs == 0.5
    epochs = tmp_path / "epochs.yaml"
    epochs.write_text("training:\n  epochs: 3\n")
    cfg = parse_train_args(["--config", str(epochs), "--max-steps", "7"])
    assert (cfg.training.epochs, cfg.training.max_steps) == (None, 7)
    assert parse_train_args(["--config", str(epochs)]).training.epochs == 3
    sft = parse_train_args(["--experiment", "sft", "--model", "m", "--data", "d", "--epochs", "1"])
    assert sft.training.epochs == 1  # over the preset's max_steps (the loop computes the steps)


def test_the_step_count_is_ceil_of_epochs_times_steps_per_epoch_as_batched(tmp_path, caplog):
    """The logged line and the total for a fraction of an epoch: ceil(0.5 x micro-batches / per step)."""
    from fasttune.data.packing import Batcher

    caplog.set_level("INFO", logger="fasttune")
    cfg = _cfg(tmp_path, epochs=0.5, grad_accum=3)
    result = loop.train(cfg)
    lengths = [len(s) for s in _data(cfg).train]
    micro = len(Batcher.from_config(cfg.data, cfg.seed).plan(lengths, epoch=3))  # any epoch: the same count
    assert result.steps == math.ceil(micro / 2 / 3)
    assert f"0.5 epochs = {result.steps} steps" in caplog.text


def _data(cfg):
    from fasttune.data.pipeline import build_data

    return build_data(cfg)


def test_the_cpu_estimate_of_an_epochs_run_counts_its_steps_not_the_presets(tmp_path, monkeypatch):
    """A preset whose max_steps would take hours on this CPU: --epochs 1 trains its few steps (refused before, on the
    preset's steps); epochs that come to hours are refused once their steps are known, before the run folder and
    before the model is built."""
    hours = 10**8  # steps of the micro model: far over the hour the check allows
    result = loop.train(_cfg(tmp_path / "one", max_steps=hours, epochs=1))
    assert 0 < result.steps < 100
    many = _cfg(tmp_path / "many", max_steps=6, epochs=10**7)
    monkeypatch.setattr(loop, "prepare_model", _never)
    with pytest.raises(ConfigError, match=r"is GPU-scale and no GPU is available: [\d,]+ steps \(1e\+07 epochs\) of "
                                          r"up to 192 tokens .* fewer --epochs\), or pass --force"):  # fmt: skip
        loop.train(many)
    assert not (many.run_dir / "config.json").exists()


def test_the_schedule_warning_of_a_resume_names_the_length_option_changed(tmp_path, caplog):
    caplog.set_level("INFO", logger="fasttune")
    cfg = _cfg(tmp_path, epochs=1)
    one = loop.train(cfg)
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, epochs=2))
    two = loop.train(more)
    assert two.steps > one.steps
    loop.train(more)  # finished: says so in the option that set its length
    assert f"already complete (step {two.steps} of training.epochs=2 ({two.steps} steps))" in caplog.text
    with pytest.raises(ConfigError) as e:  # nothing trained: refused in the option typed, not a --max-steps
        loop.train(dataclasses.replace(more, training=dataclasses.replace(more.training, epochs=1)))
    assert str(e.value).endswith(
        f"already past training.epochs=1 ({one.steps} steps) (stopped at step {two.steps}); to continue it, resume "
        f"with a larger --epochs (e.g. its original one) or --max-steps above {two.steps}"
    )
    assert [p.name for p in list_checkpoints(cfg.run_dir)][-1] == f"step-{two.steps:06d}"
    said = [r.getMessage() for r in caplog.records if "is not the checkpoint's run's" in r.getMessage()]
    assert said == [
        f"training.epochs=2 ({two.steps} steps) is not the checkpoint's run's: the learning-rate schedule now "
        f"spans {two.steps} steps, and step {one.steps + 1} trains at lr " + said[0].split(" at lr ")[1]
    ]
    caplog.clear()
    steps = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, epochs=None,
                                                                                max_steps=two.steps + 2))  # fmt: skip
    loop.train(steps)
    assert (
        f"training.max_steps={two.steps + 2} is not the checkpoint's run's: the learning-rate schedule" in caplog.text
    )


def test_the_warmup_warning_of_an_epochs_run_names_epochs(tmp_path, caplog):
    """A run whose length --epochs set is told its warmup reaches past its steps in --epochs, not in a --max-steps the
    user never typed; the suggested warmup is below those steps."""
    import torch

    from fasttune.train.optim import build_optimizer

    with caplog.at_level("WARNING", logger="fasttune"):
        build_optimizer(tiny_config(tmp_path, epochs=0.5, max_steps=6, warmup_steps=20), torch.nn.Linear(2, 2),
                        torch.device("cpu"))  # fmt: skip
    (said,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "is not below training.epochs=0.5 (6 steps)" in said and "max_steps" not in said
    assert "training.warmup_steps=20 is not below" in said and "set it below 6 (e.g. 1)" in said


def test_counts_of_one_are_singular(tmp_path, caplog, monkeypatch):
    """One epoch of one step is said as such ("1 epoch = 1 step", "--epochs 1 (1 step)"), not "1 epochs = 1 steps";
    so are the CPU estimate's one step of about one hour and the data summary's one left-out sample."""
    from fasttune.data.pipeline import DataSummary
    from fasttune.train import device

    caplog.set_level("INFO", logger="fasttune")
    cfg = _cfg(tmp_path, epochs=1, grad_accum=64)  # more micro-batches per step than the epoch has
    assert loop.train(cfg).steps == 1
    assert "1 epoch = 1 step (" in caplog.text
    loop.train(dataclasses.replace(cfg, resume=True))
    assert "already complete (step 1 of training.epochs=1 (1 step))" in caplog.text
    monkeypatch.setattr(device, "cpu_hours", lambda cfg: (1.4, 10.0))
    one = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=1))
    with pytest.raises(ConfigError, match=r"no GPU is available: 1 step \(1 epoch\) of up to .* take about 1 hour at"):
        device.refuse_gpu_scale(one, torch.device("cpu"))
    lines = "\n".join(DataSummary("d", "alpaca", untrained=1, no_response=1, val_left_out=1).lines())
    assert "left out: 1 sample with no trained token" in lines and "1 overlong sample whose prompt" in lines
    assert "left out of validation: 1 held-out sample, by" in lines
