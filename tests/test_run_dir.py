"""Run directories: --overwrite clears only fasttune's files and only after every check passed; --resume refuses
options that would change the run; a torn metrics line does not stop a resume; a double save stays atomic."""

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import pytest
from helpers import copy_of_run, losses, tiny_config, train_once

from fasttune.data.pipeline import build_data
from fasttune.errors import ConfigError, DataError, FasttuneError
from fasttune.train import checkpoint, loop
from fasttune.train.run_dir import RunFolder


@pytest.fixture(scope="module")
def _finished_trained(tmp_path_factory, _no_gpu_unless_marked):
    return train_once(tmp_path_factory, "finished", max_steps=3, save_every=3, eval_every=0)


@pytest.fixture
def finished(_finished_trained, tmp_path):
    """(config, result) of a finished 3-step run (a checkpoint at step 3) in tmp_path / "run": each test's own copy
    of the run trained once for this file."""
    return copy_of_run(_finished_trained, tmp_path)


def test_overwrite_with_bad_data_keeps_the_old_run(finished, tmp_path):
    cfg, result = finished
    bad = dataclasses.replace(cfg, overwrite=True, data=dataclasses.replace(cfg.data, path=str(tmp_path / "nope")))
    with pytest.raises(DataError):
        loop.train(bad)
    assert checkpoint.list_checkpoints(result.run_dir)  # nothing deleted before the checks passed


def test_overwrite_without_disk_space_keeps_the_old_run(finished, monkeypatch):
    """The disk check runs before --overwrite clears anything."""
    import shutil

    from fasttune.errors import FasttuneError

    cfg, result = finished
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(FasttuneError, match="free"):
        loop.train(dataclasses.replace(cfg, overwrite=True))
    assert checkpoint.list_checkpoints(result.run_dir) and (result.run_dir / "metrics.jsonl").is_file()


def test_overwrite_replaces_run_but_keeps_user_files(finished):
    cfg, result = finished
    (result.run_dir / "notes.txt").write_text("mine")
    shutil.copytree(result.checkpoint, result.run_dir / "checkpoints" / "best")  # a copy of a checkpoint, kept
    (result.run_dir / "checkpoints" / "NOTES.txt").write_text("step 3 was the best")
    again = loop.train(dataclasses.replace(cfg, overwrite=True))
    assert (result.run_dir / "notes.txt").read_text() == "mine"
    assert losses(again.records) == losses(result.records)
    ckpts = result.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["NOTES.txt", "best", "step-000003"]
    assert checkpoint.verify(ckpts / "best")[1] is None and checkpoint.list_checkpoints(result.run_dir) == [
        ckpts / "step-000003"
    ]


def test_folder_of_someone_elses_files_is_never_used(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = dataclasses.replace(tiny_config(tmp_path), output_dir=str(folder), overwrite=True)
    with pytest.raises(
        ConfigError, match="is not empty .config.json. and is not a fasttune run folder.*--output-dir .*run"
    ):
        loop.train(cfg)
    assert (folder / "config.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("data", "max_documents", 30), ("data", "packing", False), ("model", "preset", "tiny"), (None, "seed", 5)],
)
def test_resume_refuses_changed_options(finished, section, field, value):
    cfg, _ = finished
    if section:
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
    else:
        changed = dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ConfigError, match=f"--resume: {section + '.' if section else ''}{field} is"):
        loop.train(dataclasses.replace(changed, resume=True))


def test_resume_may_extend_max_steps_and_survives_a_torn_metrics_line(finished, caplog):
    """A larger --max-steps stretches the cosine over the new horizon, so the rate jumps back up: said, with both
    rates, and the next step trains at the new schedule's rate."""
    cfg, result = finished
    with (result.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # what a kill -9 in the middle of a write leaves
    longer = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=5))
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        resumed = loop.train(longer)
    assert sorted(losses(resumed.records)) == [1, 2, 3, 4, 5]
    said = [r.getMessage() for r in caplog.records if "learning-rate schedule now spans 5 steps" in r.getMessage()]
    t = cfg.training
    old_rate = t.lr * t.min_lr_ratio  # the 3-step run's cosine had reached its floor
    step4 = next(r["lr"] for r in resumed.records if r.get("step") == 4 and "lr" in r)
    assert step4 > 1.5 * old_rate and said and f"step 4 trains at lr {step4:.3g} instead of {old_rate:.3g}" in said[0]


def test_saving_the_same_step_twice_never_leaves_it_missing(finished, monkeypatch):
    _, result = finished
    ckpt = result.checkpoint
    calls = []
    real_rename = checkpoint.os.rename

    def spy(src, dst):
        calls.append((str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", spy)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    state = checkpoint.load_trainer_state(ckpt)
    checkpoint.save_checkpoint(result.run_dir, 3, model, tok, {k: state[k] for k in state if k != "rng"}, 2)
    # the complete old folder is moved aside before the new one takes its name: never a moment without step-3
    assert calls[0][0].endswith("step-000003") and ".old-step-000003" in calls[0][1]
    assert [p.name for p in checkpoint.list_checkpoints(result.run_dir)] == ["step-000003"]


# -- the lock (#13 item 1) ---------------------------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from fasttune.train.run_dir import RunLock
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
lock = RunLock(Path(sys.argv[1]) / ".fasttune-lock")
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holder_frees_the_folder(finished):
    """Two real processes: one holds the run folder's lock, the other (this one) is refused with its PID; after the
    holder is killed with SIGKILL (no chance to clean up), the folder is usable again."""
    import os
    import signal
    import subprocess
    import sys

    cfg, result = finished
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(result.run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=4))
        for attempt in (more, dataclasses.replace(cfg, overwrite=True)):
            with pytest.raises(FasttuneError, match=f"in use by another fasttune run \\(PID {holder.pid}\\)"):
                loop.train(attempt)
        assert [p.name for p in checkpoint.list_checkpoints(result.run_dir)] == ["step-000003"]  # nothing touched
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    resumed = loop.train(more)  # the kernel dropped the dead holder's lock: no stale lock to clean by hand
    assert sorted(losses(resumed.records)) == [1, 2, 3, 4]


def test_a_finished_runs_lock_file_stays_unlocked_as_the_docs_say(finished):
    """The lock is released when the run ends, however it ends; the file stays, with the PID of the run that last
    held it (only a failed start removes it). The troubleshooting guide said the lock file "disappears"."""
    import fcntl
    from pathlib import Path

    _, result = finished
    lock = result.run_dir / ".fasttune-lock"
    assert lock.read_text().strip() == str(os.getpid())
    with lock.open() as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it
    docs = (Path(__file__).resolve().parents[1] / "docs" / "TROUBLESHOOTING.md").read_text()
    row = next(line for line in docs.splitlines() if "is in use by another fasttune run" in line)
    assert "disappears" not in row and "file itself stays in the folder, unlocked" in row


# -- folders that are not ours (#12 item 2) ------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_non_empty_folder_without_the_marker_is_refused_with_the_fix(tmp_path, overwrite):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    (folder / "data.csv").write_text("a,b\n")
    cfg = dataclasses.replace(tiny_config(tmp_path), output_dir=str(folder), overwrite=overwrite)
    with pytest.raises(ConfigError, match=r"not empty \(data.csv, thesis.txt\).*--output-dir .*thesis/run"):
        loop.train(cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv", "thesis.txt"]  # not even a lock file left


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_in_another_runs_checkpoints_is_refused_naming_that_run(finished, resume):
    """A checkpoint given as --output-dir (HF Trainer's resume_from_checkpoint habit) was refused as 'not a fasttune
    run folder' with the fix --output-dir CHECKPOINT/run: a run that the other run's keep-last pruning deletes."""
    cfg, result = finished
    for inside in (result.checkpoint, result.checkpoint / "run"):
        again = dataclasses.replace(cfg, output_dir=str(inside), resume=resume)
        with pytest.raises(ConfigError, match=f"lies in checkpoints/ of the fasttune run {result.run_dir}.*"
                                              f"--output-dir {result.run_dir} --resume"):  # fmt: skip
            loop.train(again)
    assert not (result.checkpoint / "run").exists() and checkpoint.verify(result.checkpoint)[1] is None


def test_a_checkpoint_given_relative_to_the_cwd_or_by_a_symlink_is_refused_and_a_path_through_it_is_not(
    tmp_path, monkeypatch
):
    """The refusal of a folder in another run's checkpoints/ looked at the path as typed: `--output-dir step-N` from
    inside checkpoints/ or a symlink to a checkpoint passed (and the run went on to 'not a fasttune run folder' with
    the fix CHECKPOINT/run, which that run's pruning deletes), while run/checkpoints/../../new, a folder outside the
    run, was refused."""
    cfg = tiny_config(tmp_path)
    run = RunFolder(tmp_path / "run")
    step = run.checkpoints / "step-000003"
    step.mkdir(parents=True)
    run.marker.write_text("")
    (step / "model.safetensors").write_text("weights")
    (tmp_path / "latest").symlink_to(step)
    monkeypatch.chdir(run.checkpoints)
    for typed in ("step-000003", "step-000003/run", str(tmp_path / "latest"), str(tmp_path / "latest" / "run")):
        with pytest.raises(ConfigError, match=f"lies in checkpoints/ of the fasttune run {run.path.resolve()}"):
            RunFolder(Path(typed)).prepare(cfg)
    outside = RunFolder(run.checkpoints / ".." / ".." / "new")
    outside.prepare(cfg).release()
    assert outside.path.resolve() == tmp_path / "new" and sorted(os.listdir(step)) == ["model.safetensors"]


def test_a_runs_checkpoints_or_merged_folder_itself_is_refused_naming_the_run(tmp_path, monkeypatch):
    """--output-dir RUN/merged (or RUN/checkpoints) was 'not a fasttune run folder' with the fix --output-dir
    RUN/merged/run, which the next start refused as lying in that run's merged/: two errors, the first one's advice
    wrong."""
    cfg = tiny_config(tmp_path)
    run = RunFolder(tmp_path / "run")
    for folder in (run.checkpoints / "step-000003", run.merged):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("weights")
    run.marker.write_text("")
    monkeypatch.chdir(run.checkpoints)
    for typed, name in ((run.merged, "merged"), (run.checkpoints, "checkpoints"), (Path("."), "checkpoints")):
        with pytest.raises(ConfigError, match=f"lies in {name}/ of the fasttune run {run.path.resolve()}"):
            RunFolder(typed).prepare(cfg)
    assert sorted(os.listdir(run.merged)) == ["model.safetensors"]


# -- what a killed run leaves behind (#13 item 8) ------------------------------------------------------------------


def test_stale_temporaries_are_cleaned_and_a_moved_aside_checkpoint_is_restored(finished):
    cfg, result = finished
    root = result.run_dir / "checkpoints"
    os.rename(root / "step-000003", root / ".old-step-000003-4242")  # killed between the two renames of a re-save
    (root / ".tmp-step-000004-4242").mkdir()  # killed while writing step 4
    (root / ".tmp-step-000004-4242" / "model.safetensors").write_bytes(b"half")
    (root / ".pruned-step-000001-4242").mkdir()  # killed while deleting a pruned checkpoint
    lock = RunFolder(result.run_dir).prepare(dataclasses.replace(cfg, resume=True))
    lock.release()
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]
    assert checkpoint.verify(root / "step-000003")[1] is None


def test_a_folder_written_whole_or_not_at_all(tmp_path):
    """checkpoint.write_folder (checkpoints, a LoRA run's adapter/ and merged/): a failed write leaves the previous
    folder as it was and says so in one line; a kill between the renames is put right at the next start."""
    run = tmp_path / "run"
    merged = run / "merged"
    checkpoint.write_folder(merged, lambda tmp: (tmp / "config.json").write_text("{}"), "could not", "fix")

    def full_disk(tmp):
        (tmp / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(FasttuneError, match=r"^could not write .*merged \(No space left on device\); free it$"):
        checkpoint.write_folder(merged, full_disk, f"could not write {merged}", "free it")
    assert sorted(p.name for p in run.iterdir()) == ["merged"] and (merged / "config.json").read_text() == "{}"
    os.rename(merged, run / ".old-merged-4242")  # killed between the two renames of a re-write
    (run / ".tmp-adapter-4242").mkdir()  # killed while writing adapter/
    RunFolder(run).clean_stale()
    assert sorted(p.name for p in run.iterdir()) == ["merged"] and (merged / "config.json").is_file()


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_a_failed_rename_puts_the_previous_folder_back_at_once(tmp_path, monkeypatch, error):
    """A failure (or Ctrl-C) after the previous merged/ was moved aside and before the new one took its place: the
    previous one is back in the same call, not only at the next start (until then generate skipped merged/)."""
    merged = tmp_path / "run" / "merged"
    checkpoint.write_folder(merged, lambda tmp: (tmp / "config.json").write_text('"old"'), "could not", "fix")
    real = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise error
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(FasttuneError if isinstance(error, OSError) else KeyboardInterrupt):
        checkpoint.write_folder(merged, lambda tmp: (tmp / "config.json").write_text('"new"'), "could not", "fix")
    assert sorted(p.name for p in merged.parent.iterdir()) == ["merged"]
    assert (merged / "config.json").read_text() == '"old"'


def test_a_fifo_or_an_empty_data_path_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    cfg = tiny_config(tmp_path)
    with pytest.raises(DataError, match="data.jsonl: not a regular file or folder"):
        build_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(fifo))))
    with pytest.raises(DataError, match="--data is empty"):
        build_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="")))


# -- the disk check (#13 item 2) -----------------------------------------------------------------------------------


def test_disk_check_counts_the_checkpoints_already_on_disk(finished, monkeypatch):
    """Resuming to 3 more saves with keep_last=2 and one checkpoint on disk: at the fullest moment two more exist
    (the one on disk is already paid for), measured from the one on disk. Not three, as if nothing were there
    (max_bad_steps 1: no unhealthy saves can keep a healthy one past keep_last, tests/test_disk_check.py)."""
    import shutil

    cfg, result = finished
    size = sum(p.stat().st_size for p in result.checkpoint.rglob("*") if p.is_file())
    free = int(1.02 * 2 * size + 50e6) + 1000  # room for two more checkpoints, not for three
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    t = dataclasses.replace(cfg.training, max_steps=6, save_every=1, max_bad_steps=1)
    loop.train(dataclasses.replace(cfg, resume=True, training=t))
    fresh = dataclasses.replace(cfg, output_dir=str(result.run_dir.parent / "fresh"), training=t)
    with pytest.raises(FasttuneError, match="GB more \\(3 x "):  # the same plan from scratch: three at once
        loop.train(fresh)


# -- a finished run (#13 item 5) ----------------------------------------------------------------------------------


def test_resume_of_a_finished_run_says_it_is_complete(finished, monkeypatch, capsys):
    """The same command again once the run is finished (a scheduler's retry): one line says it is complete, at which
    step, where its final checkpoint is and how to train further, and it ends with exit 0 before the data is read or
    the model built (they took their time, then the summary and a sample were shown again); a larger --max-steps
    trains on."""
    from fasttune.cli import main

    cfg, result = finished

    def never(*_a, **_k):
        raise AssertionError("the resume of a finished run read its data or built its model")

    monkeypatch.setattr(loop, "build_data", never)
    monkeypatch.setattr(loop, "prepare_model", never)
    run = result.run_dir
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"the run in {run} is already complete (step 3 of --max-steps 3); its final checkpoint is "
        f"{run / 'checkpoints' / 'step-000003'}; to train further, resume with a larger --max-steps (or --epochs)"
    ]
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    assert (
        checkpoint.list_checkpoints(run)[-1].name == "step-000004" and "fasttune run summary" in capsys.readouterr().out
    )


def test_resuming_with_another_thread_count_warns_that_bits_may_differ(finished, caplog):
    """CPU reductions split their work by thread (a sum over 2 threads differs from 1 in the last bits), so a resume
    is bit-exact only with the thread count of the run: say so when it changed."""
    import torch

    cfg, result = finished
    path = result.checkpoint / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    assert state["threads"] == torch.get_num_threads()
    torch.save({**state, "threads": torch.get_num_threads() + 3}, path)
    loop.train(dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=4)))
    assert f"the checkpoint trained with {torch.get_num_threads() + 3}" in caplog.text


def test_overwrite_refuses_to_delete_the_model_it_trains_from(finished):
    """A model inside the run folder (its own checkpoint) would be deleted by --overwrite after being loaded (and
    a LoRA adapter would then name a base that is gone): refused before anything is touched."""
    cfg, result = finished
    step = checkpoint.list_checkpoints(result.run_dir)[-1]
    again = dataclasses.replace(cfg, overwrite=True, model=dataclasses.replace(cfg.model, path=str(step)))
    with pytest.raises(ConfigError, match=r"--model .* lies in .*checkpoints, which --overwrite would delete; copy"):
        loop.train(again)
    assert checkpoint.list_checkpoints(result.run_dir)[-1] == step and (step / "model.safetensors").is_file()


def test_a_failed_start_leaves_no_lock_file_behind(tmp_path):
    """A start that fails its checks leaves no folder it created and no lock file in the user's own empty one."""
    cfg = tiny_config(tmp_path)
    nope = dataclasses.replace(cfg.data, path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError):
        loop.train(dataclasses.replace(cfg, data=nope))
    assert not cfg.run_dir.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(DataError):
        loop.train(dataclasses.replace(cfg, data=nope, output_dir=str(mine)))
    assert mine.is_dir() and not list(mine.iterdir())
    with pytest.raises(DataError):  # nor the parents it created
        loop.train(dataclasses.replace(cfg, data=nope, output_dir=str(mine / "a" / "b" / "run")))
    assert not list(mine.iterdir())


def test_a_lock_file_removed_by_a_failed_start_is_never_held_twice(tmp_path, monkeypatch):
    """Run B opens the lock file, run A (failing its start) removes it, B locks what it opened: B sees the file is
    gone and locks the one at the path, so a third run is refused rather than holding a lock of its own."""
    import fcntl

    from fasttune.train import run_dir

    path = tmp_path / "run" / run_dir.LOCK
    a = run_dir.RunLock(path)
    real = fcntl.flock

    def a_gives_up_first(fd, op):
        if a.fd is not None:
            a.release(tidy=True)
        return real(fd, op)

    monkeypatch.setattr(run_dir.fcntl, "flock", a_gives_up_first)
    b = run_dir.RunLock(path)
    monkeypatch.undo()
    assert os.fstat(b.fd).st_ino == os.stat(path).st_ino
    with pytest.raises(FasttuneError, match="in use by another fasttune run"):
        run_dir.RunLock(path)


def test_resume_takes_the_same_data_path_spelled_another_way(finished, tmp_path, monkeypatch):
    import json

    cfg, result = finished
    folder = RunFolder(result.run_dir)
    saved = json.loads(folder.config.read_text())
    saved["data"]["path"] = "corpus/train.jsonl"
    folder.config.write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    for same in ("./corpus/train.jsonl", str(tmp_path / "corpus" / "train.jsonl")):
        again = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=same))
        folder.check_resume(again)
        assert folder.moved_data(again) == {}
    # another path is left to the content check after tokenizing (test_finetune.py: moved data resumes)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="corpus/other.jsonl"))
    folder.check_resume(other)
    assert folder.moved_data(other) == {"data.path": "corpus/train.jsonl"}


def test_resume_takes_several_data_paths_spelled_another_way_and_leaves_another_order_to_the_content(
    finished, tmp_path, monkeypatch
):
    """config.json records several --data paths as a list: the same files spelled another way resume; another order,
    another file or one path fewer is left to the content check (the records, in that order, are the data); a
    --data.val-path given where the run had none is a change."""
    import json

    cfg, result = finished
    folder = RunFolder(result.run_dir)
    saved = json.loads(folder.config.read_text())
    saved["data"]["path"] = ["corpus/a.jsonl", str(tmp_path / "corpus" / "b")]
    folder.config.write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    same = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=(str(tmp_path / "corpus/a.jsonl"),
                                                                            "./corpus/b")))  # fmt: skip
    folder.check_resume(same)
    assert folder.moved_data(same) == {}
    for paths in (("corpus/b", "corpus/a.jsonl"), ("corpus/a.jsonl",), ("corpus/a.jsonl", "corpus/b", "corpus/c")):
        other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=paths))
        folder.check_resume(other)
        assert folder.moved_data(other) == {"data.path": f"corpus/a.jsonl {tmp_path / 'corpus' / 'b'}"}
    with_val = dataclasses.replace(same, data=dataclasses.replace(same.data, val_path=("v.jsonl", "w.jsonl")))
    with pytest.raises(ConfigError, match=r"^--resume: data.val_path is 'v.jsonl w.jsonl' but the run was started "
                                          "with None"):  # fmt: skip
        folder.check_resume(with_val)


def test_resume_takes_another_name_of_the_format_the_run_read(finished):
    """sharegpt, conversational and chat_template read what chat reads (formats.FORMAT_NAMES): a run started with
    one resumes with another (it was refused as a changed data.format); another format, or auto, is still a change."""
    import json

    cfg, result = finished
    folder = RunFolder(result.run_dir)
    saved = json.loads(folder.config.read_text())
    for was, now in (("sharegpt", "chat"), ("chat", "sharegpt"), ("conversational", "chat_template")):
        saved["data"]["format"] = was
        folder.config.write_text(json.dumps(saved))
        folder.check_resume(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format=now)))
    for now in ("alpaca", "auto"):
        with pytest.raises(ConfigError, match=f"data.format is '{now}' but the run was started with 'conversational'"):
            folder.check_resume(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format=now)))


def test_resume_of_a_run_recorded_before_overlong_auto_continues_with_the_same_data(finished):
    """Runs started before data.overlong's default became `auto` recorded `split` (quick, full) or `truncate` (sft):
    they resume with the value they recorded (auto could give other samples: test below); an explicit other value is
    still refused."""
    import json

    cfg, result = finished
    folder = RunFolder(result.run_dir)
    saved = json.loads(folder.config.read_text())
    assert saved["data"]["overlong"] == cfg.data.overlong == "auto"
    saved["data"]["overlong"] = "split"
    folder.config.write_text(json.dumps(saved))
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=5))
    assert sorted(losses(loop.train(more).records))[-1] == 5
    assert json.loads(folder.config.read_text())["data"]["overlong"] == "split"  # what the run goes on with
    with pytest.raises(ConfigError, match="data.overlong is 'drop' but the run was started with 'split'"):
        folder.check_resume(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, overlong="drop")))


def test_resume_of_a_text_run_recorded_with_truncate_keeps_truncating(tmp_path):
    """An `sft` run on a text file recorded data.overlong=truncate (the default then); `auto`, the default now, would
    split the text into other samples, and the resume was refused as if the data had been edited. It goes on with
    the policy the run recorded, and the same losses as an uninterrupted run."""
    book = tmp_path / "book.txt"
    book.write_text("Natalia sold clips to her friends in April and May. " * 60)
    cfg = tiny_config(tmp_path, max_steps=4, save_every=2, eval_every=0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(book), overlong="truncate"))
    whole = loop.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))
    two = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=2))
    loop.train(two)
    auto = dataclasses.replace(cfg, resume=True, data=dataclasses.replace(cfg.data, overlong="auto"))
    assert losses(loop.train(auto).records) == losses(whole.records)


def test_resume_of_a_run_begun_from_a_config_json_alone_loads_its_checkpoint(tmp_path):
    """A run begun from a folder with config.json and no weights (random init, before --model.random-init was
    needed for it; its config.json has no random_init) resumes from its checkpoint's weights, not refused as an
    incomplete download."""
    import json

    from helpers import save_micro_model

    model = save_micro_model(tmp_path / "shape")
    (model / "model.safetensors").unlink()
    cfg = tiny_config(tmp_path, max_steps=2, save_every=2, eval_every=0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(model), random_init=True))
    first = loop.train(cfg)
    folder = RunFolder(first.run_dir)
    saved = json.loads(folder.config.read_text())
    del saved["model"]["random_init"]  # as a run of the version before recorded it
    folder.config.write_text(json.dumps(saved))
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, random_init=False))
    with pytest.raises(ConfigError, match="holds a config.json but no weight files"):
        loop.train(dataclasses.replace(plain, output_dir=str(tmp_path / "new")))  # a new run: refused
    more = dataclasses.replace(plain, resume=True, training=dataclasses.replace(plain.training, max_steps=4))
    assert sorted(losses(loop.train(more).records)) == [1, 2, 3, 4]


@pytest.mark.parametrize("rules", [None, 4])
def test_resume_of_a_run_tokenized_under_older_masking_rules_says_so(finished, rules):
    """A checkpoint written before the masking rules changed (no `masking_rules`, or an older one; another data
    fingerprint) is refused naming the changes since its version, not as data "added, removed or edited": a chat run
    with tools started under rules 4 was told of the empty-response and token-boundary changes, never of its tools."""
    import torch

    cfg, result = finished
    state_file = result.checkpoint / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state.pop("masking_rules")
    if rules is not None:
        state["masking_rules"] = rules
    state["data"] = "0" * len(state["data"])
    torch.save(state, state_file)
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=5))
    with pytest.raises(
        ConfigError, match="started by an earlier fasttune that trained other tokens.*--model .*step"
    ) as e:
        loop.train(more)
    assert "a chat record's tools are written into the conversation by the chat template" in str(e.value)
    assert ("an empty response are not trained" in str(e.value)) == (rules is None)


def test_resume_with_another_grad_accum_warns_also_for_checkpoints_that_did_not_record_it(finished, caplog):
    """--training.grad-accum may change on --resume (with the number of ranks); in one process it changes the
    global batch, said in a warning, also for a checkpoint written before grad_accum was recorded (the run's
    config.json says what it was)."""
    import torch

    cfg, result = finished
    state_file = result.checkpoint / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state.pop("grad_accum")
    torch.save(state, state_file)
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=4, grad_accum=2))
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        loop.train(more)
    assert "resuming with 2 micro-batches per step (1 rank x grad_accum 2), the checkpoint trained with 1" in (
        caplog.text
    )


def test_a_run_recorded_before_the_adam_options_resumes_with_its_betas_only(finished):
    """A config.json written before --training.adam-beta1/beta2/epsilon: the run trained with 0.9, 0.95 and 1e-8, and
    its optimizer state brings them back on resume, so another value would go unused (and config.json would claim
    it): refused, as for a run that recorded them; the same values resume."""
    import json

    cfg, result = finished
    folder = RunFolder(result.run_dir)
    saved = json.loads(folder.config.read_text())
    for key in ("adam_beta1", "adam_beta2", "adam_epsilon"):
        del saved["training"][key]
    folder.config.write_text(json.dumps(saved))
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=4))
    hf = dataclasses.replace(more, training=dataclasses.replace(more.training, adam_beta2=0.999))
    with pytest.raises(ConfigError, match="training.adam_beta2 is 0.999 but the run was started with 0.95"):
        loop.train(hf)
    assert sorted(losses(loop.train(more).records))[-1] == 4
