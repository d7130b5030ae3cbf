"""Run directories: --overwrite clears only fasttune's files and only after every check passed; a folder that is not
a fasttune run's, or lies inside one, is never used; one process at a time holds a run; what a killed run leaves is
put right; a double save stays atomic. What --resume accepts and refuses: test_resume_checks.py."""

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
from helpers import losses, tiny_config

from fasttune.data.pipeline import build_data
from fasttune.errors import ConfigError, DataError, FasttuneError
from fasttune.train import checkpoint, loop
from fasttune.train.run_dir import RunFolder


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


def test_overwrite_keeps_user_files_in_tensorboard(tmp_path):
    """--overwrite removes the old run's TensorBoard event files alone: tensorboard/ was removed whole, with a file
    of the user's in it (the README: --overwrite removes only fasttune's own files)."""
    cfg = dataclasses.replace(tiny_config(tmp_path), overwrite=True)
    folder = RunFolder(Path(cfg.output_dir))
    folder.tensorboard.mkdir(parents=True)
    (folder.tensorboard / "events.out.tfevents.1764680000.host.1.0").write_bytes(b"old run")
    (folder.tensorboard / "notes.md").write_text("mine")
    folder.start(cfg)
    assert [p.name for p in folder.tensorboard.iterdir()] == ["notes.md"]
    (folder.tensorboard / "notes.md").unlink()
    (folder.tensorboard / "events.out.tfevents.1764680001.host.1.0").write_bytes(b"old run")
    folder.start(cfg)
    assert not folder.tensorboard.exists()  # nothing of the user's: the folder goes, as before


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
