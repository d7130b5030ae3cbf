"""`generate --prompts` and `eval --data` never write their results over what they read, whatever --overwrite says:
the same file by another spelling, a symlink or a hard link, or a file in the data folder."""

import os
from pathlib import Path

import pytest
from helpers import save_micro_model

from fasttune.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_micro_model(tmp_path_factory.mktemp("kept") / "model")


@pytest.mark.parametrize("spelling", ["same", "other spelling", "symlink", "hard link"])
def test_generate_output_that_is_the_prompts_file_is_refused_before_any_work(model, tmp_path, capsys, monkeypatch,
                                                                              spelling):  # fmt: skip
    """With --overwrite the prompts file was replaced by the completions, after the model loaded and generated."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"Why?"\n')
    (tmp_path / "sub").mkdir()
    output = {"same": prompts, "other spelling": tmp_path / "sub" / ".." / "p.jsonl", "symlink": tmp_path / "link",
              "hard link": tmp_path / "hard"}[spelling]  # fmt: skip
    if spelling == "symlink":
        output.symlink_to(prompts)
    elif spelling == "hard link":
        os.link(prompts, output)
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--checkpoint", str(model), "--prompts", "p.jsonl", "--max-new-tokens", "2", "--overwrite"]
    assert main([*argv, "--output", str(output)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"error: --output {output} is the --prompts file p.jsonl: writing there would replace what is read; choose "
        "another --output\n"
    )  # the model was never loaded: nothing logged
    assert prompts.read_text() == '"Why?"\n'
    assert main([*argv, "--output", "answers.jsonl"]) == 0  # another file: written, the prompts kept
    assert prompts.read_text() == '"Why?"\n' and (tmp_path / "answers.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("data", ["file", "folder", "folder, new files"])
def test_eval_output_dir_holding_the_data_is_refused_before_any_work(model, tmp_path, capsys, data):
    """eval --output-dir D --overwrite replaced D/completions.jsonl, the --data file itself (or one of a folder's);
    new files in the --data folder (or a folder in it) would be read with the data from then on: the next train on
    that folder trained the model's own completions (prompt/completion records)."""
    folder = tmp_path / "d"
    folder.mkdir()
    records = folder / ("completions.jsonl" if data != "folder, new files" else "train.jsonl")
    records.write_text("".join(line + "\n" for line in ['{"instruction": "Why?", "output": "Because."}'] * 3))
    source = records if data == "file" else folder
    out = folder if data != "folder, new files" else folder / "eval"
    argv = ["eval", "--checkpoint", str(model), "--data", str(source), "--output-dir", str(out), "--overwrite",
            "--generate", "--max-new-tokens", "2"]  # fmt: skip
    before = records.read_text()
    assert main(argv) == 2
    err = capsys.readouterr().err
    named, why = {  # the folder given is named, unless the file written there is the --data file itself
        "file": (out / "completions.jsonl", f"is the --data file {source}: writing there would replace what is read"),
        "folder": (out, f"is the --data folder {source}: writing there would replace what is read"),
        "folder, new files": (out, f"is in the --data folder {source}: writing there would change the data it reads"),
    }[data]
    assert err == f"error: --output-dir {named} {why}; choose another --output-dir\n"
    assert sorted(p.name for p in folder.rglob("*")) == [records.name]  # nothing written there
    assert records.read_text() == before
    assert main([*argv[:5], "--output-dir", str(tmp_path / "out"), *argv[7:]]) == 0  # elsewhere: written
    assert records.read_text() == before and (tmp_path / "out" / "completions.jsonl").is_file()


def test_a_run_folder_in_the_data_folder_is_not_read_as_data(model, tmp_path, caplog):
    """`--data d --output-dir d/run` (or `--data .` beside the default runs/): the run's config.json, metrics.jsonl
    and checkpoint files were read as data from then on, so its --resume stopped ('config.json record 1: missing
    field instruction') and so did every later run on d. A run folder in the data folder is skipped, said in the log
    (once a start): the resume reads the records the run started on and continues it."""
    import dataclasses

    from helpers import GSM8K, sft_config

    from fasttune.data.formats import load_records
    from fasttune.train import loop

    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.json").write_bytes(GSM8K.read_bytes())
    before = load_records(str(folder))
    cfg = dataclasses.replace(sft_config(tmp_path, model, folder, max_steps=2, save_every=2, eval_every=0),
                              output_dir=str(folder / "run"))  # fmt: skip
    first = loop.train(cfg)
    caplog.set_level("INFO", logger="fasttune")
    assert load_records(str(folder)) == before
    assert f"{folder}: not read as data: {folder / 'run'} (fasttune run folders)" in caplog.text
    caplog.clear()
    resumed = loop.train(dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=3)))
    assert caplog.text.count("not read as data") == 1  # said by the reader; the input files' digest walks quietly
    got = {r["step"]: r["loss"] for r in resumed.records if r.get("loss") is not None}
    assert sorted(got) == [1, 2, 3] and all(got[r["step"]] == r["loss"] for r in first.records if r.get("loss"))
