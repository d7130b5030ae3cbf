"""`fasttune eval` of a run: without --data it scores the run's own validation split, rebuilt from its config.json as
training built it, and gives the val_loss the run logged at the checkpoint's step (refused in one line when the data
file is gone or edited); with --data it takes the run's data.max_length and data.overlong, so the held-out records
give that val_loss too."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import GSM8K, save_base_model, sft_config, tiny_config

from fasttune.cli import main
from fasttune.data.corpus import holdout

LENGTH = 300


def _val_losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}


def _eval(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "eval"
    assert main(["eval", *args, "--output-dir", str(out), "--overwrite"]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def drop_run(tmp_path_factory):
    """Four steps of sft on a copy of the 20 GSM8K records, records longer than LENGTH dropped (data.overlong drop:
    3 of the 6 held out; all 6 fit the model's context of 1024), val_loss at steps 2 and 4 with a checkpoint at
    each."""
    from fasttune.train import loop

    tmp = tmp_path_factory.mktemp("split-run")
    data = tmp / "gsm8k.json"
    shutil.copy(GSM8K, data)
    base = save_base_model(tmp / "base", context=1024)
    cfg = sft_config(tmp, base, data, max_length=LENGTH, val_fraction=0.3, max_steps=4, save_every=2, eval_every=2,
                     eval_batches=1000, keep_last=2)  # fmt: skip
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, overlong="drop"))
    return loop.train(cfg), data


def test_eval_without_data_gives_the_runs_val_loss_at_each_checkpoint(drop_run, tmp_path, capsys):
    result, _ = drop_run
    logged = _val_losses(result.run_dir)
    step2 = _eval(tmp_path, "--checkpoint", str(result.run_dir / "checkpoints" / "step-000002"))
    assert step2["loss"] == pytest.approx(logged[2], rel=1e-6)
    latest = _eval(tmp_path, "--checkpoint", str(result.run_dir))  # the run folder: its latest checkpoint
    assert latest["loss"] == pytest.approx(logged[4], rel=1e-6) and latest["loss"] != step2["loss"]
    said = [x for x in capsys.readouterr().err.splitlines() if "the run's validation split:" in x]
    assert len(said) == 2 and said[-1].startswith(f"eval: the run's validation split: {latest['samples']} samples of ")


def test_eval_without_data_of_a_checkpoint_named_from_inside_checkpoints(drop_run, tmp_path, monkeypatch):
    """`--checkpoint step-000002` typed in the run's checkpoints/ folder is that run's checkpoint: its split is scored
    (it was refused as no fasttune run: the path's parents were read as typed, without the working folder)."""
    result, _ = drop_run
    monkeypatch.chdir(result.run_dir / "checkpoints")
    summary = _eval(tmp_path, "--checkpoint", "step-000002")
    assert summary["loss"] == pytest.approx(_val_losses(result.run_dir)[2], rel=1e-6)


def test_eval_with_the_held_out_records_takes_the_runs_max_length_and_overlong(drop_run, tmp_path, capsys):
    """The run dropped its held-out records longer than LENGTH: eval of those records scored them whole (and with
    --max-length, truncated them), another number than its val_loss."""
    result, data = drop_run
    records = json.loads(data.read_text())
    _, held = holdout(records, [str(i) for i in range(len(records))], 0.3)
    path = tmp_path / "held.json"
    path.write_text(json.dumps(held))
    summary = _eval(tmp_path, "--checkpoint", str(result.run_dir), "--data", str(path))
    assert (summary["max_length"], summary["overlong"]) == (LENGTH, "drop")
    assert summary["dropped_longer_than_max_length"] == 3
    assert summary["loss"] == pytest.approx(_val_losses(result.run_dir)[4], rel=1e-6)
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("eval: the settings of the run")]
    assert len(said) == 1 and f"data.max_length {LENGTH}, data.overlong drop" in said[0], said
    whole = _eval(tmp_path, "--checkpoint", str(result.run_dir), "--data", str(path), "--overlong", "truncate")
    assert whole["overlong"] == "truncate" and whole["samples"] > summary["samples"]  # the flag overrides the run's


def test_eval_without_data_refuses_a_max_length_past_the_context_as_eval_of_the_records_does(drop_run, tmp_path,
                                                                                              capsys):  # fmt: skip
    """--max-length over the model's context (1024) scored the run's split past the positions the model knows, where
    eval of the same records (--data) and training refuse it. Reference: eval --data's line."""
    result, data = drop_run
    records = json.loads(data.read_text())
    (path := tmp_path / "held.json").write_text(json.dumps(holdout(records, [str(i) for i in range(len(records))],
                                                                   0.3)[1]))  # fmt: skip
    args = ["eval", "--checkpoint", str(result.run_dir), "--max-length", "2048"]
    assert main([*args, "--data", str(path)]) == 2
    reference = capsys.readouterr().err.strip().splitlines()[-1]
    assert main(args) == 2
    ours = capsys.readouterr().err.strip().splitlines()[-1]
    said = "error: --max-length 2048 is longer than the model's context (1024 tokens); pass at most 1024"
    assert ours == reference == said, (ours, reference)


def test_eval_without_data_refuses_a_data_file_gone_or_edited(drop_run, tmp_path, capsys):
    result, data = drop_run
    original = data.read_text()
    args = ["eval", "--checkpoint", str(result.run_dir)]
    try:
        data.unlink()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: --checkpoint {result.run_dir}: the run's data file {data} (data.path in "
                                  "its config.json) is gone"), err  # fmt: skip
        assert "pass --data" in err[-1] and not any("Traceback" in x for x in err)
        records = json.loads(original)
        records[0]["output"] += " (edited)"
        data.write_text(json.dumps(records))
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert f"its data ({data}) is not what it trained on" in err[-1], err
        assert err[-1].endswith("pass --data with the records to score")
    finally:
        data.write_text(original)


def test_eval_without_data_of_a_model_folder_still_needs_data(drop_run, tmp_path, capsys):
    result, _ = drop_run
    base = Path(json.loads((result.run_dir / "config.json").read_text())["model"]["path"])
    assert main(["eval", "--checkpoint", str(base)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: `fasttune eval` needs --data"), err


def test_eval_without_data_of_a_text_run_scores_the_batches_its_val_loss_covers(tmp_path):
    """The embedded corpus (no data.path), a validation split of more micro-batches than training.eval_batches: the
    run's val_loss covers its first ones, and so does eval; --whole-split scores every sample, as a run whose
    val_loss covers them all (eval_batches large, the same training otherwise) logged it."""
    from fasttune.train import loop

    cfg = tiny_config(tmp_path / "a", max_steps=1, save_every=1, eval_every=1, eval_batches=2)  # 109 held out
    result = loop.train(cfg)
    summary = _eval(tmp_path, "--checkpoint", str(result.run_dir))
    assert summary["format"] == "text" and summary["loss"] == pytest.approx(_val_losses(result.run_dir)[1], rel=1e-6)
    every = loop.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "b"),
                                           training=dataclasses.replace(cfg.training, eval_batches=1000)))  # fmt: skip
    whole = _eval(tmp_path, "--checkpoint", str(result.run_dir), "--whole-split")
    assert whole["samples"] > summary["samples"]
    assert whole["loss"] == pytest.approx(_val_losses(every.run_dir)[1], rel=1e-6) != summary["loss"]


def test_eval_without_data_of_a_checkpoint_from_before_a_resume_with_another_eval_batches(tmp_path):
    """training.eval_batches may change on resume: each checkpoint records the count its step's val_loss scored, and
    eval of it scores that many (it took config.json's, the resume's: another loss than the one logged); a checkpoint
    that records none (an older fasttune) takes config.json's, as before."""
    import torch

    from fasttune.train import loop
    from fasttune.train.checkpoint import STATE_FILE

    cfg = tiny_config(tmp_path, max_steps=1, save_every=1, eval_every=1, eval_batches=2)  # 109 held out
    loop.train(cfg)
    more = dataclasses.replace(cfg.training, max_steps=2, eval_batches=5)
    loop.train(dataclasses.replace(cfg, resume=True, training=more))
    logged, ckpts = _val_losses(cfg.run_dir), cfg.run_dir / "checkpoints"
    one, two = (_eval(tmp_path, "--checkpoint", str(ckpts / f"step-00000{n}"))["loss"] for n in (1, 2))
    assert one == pytest.approx(logged[1], rel=1e-5) and two == pytest.approx(logged[2], rel=1e-5)
    older = torch.load(ckpts / "step-000002" / STATE_FILE, weights_only=True)
    assert older.pop("eval_batches") == 5
    torch.save(older, ckpts / "step-000002" / STATE_FILE)
    assert _eval(tmp_path, "--checkpoint", str(ckpts / "step-000002"))["loss"] == two


def test_eval_without_data_batches_the_split_as_the_run_did_not_as_the_class_suggests(tmp_path, monkeypatch):
    """A run whose batching is not its class's default (here a Llama trained with transformers' own attention, as a
    remote-code class whose config names a class that computes attention in its own code: padded rows by length,
    not packed): eval scores the samples of the first training.eval_batches micro-batches the run made, so its loss
    is the logged val_loss (the class alone said packed: other samples, another loss)."""
    from fasttune.attention import select
    from fasttune.train import loop

    cfg = tiny_config(tmp_path / "a", max_steps=1, save_every=1, eval_every=1, eval_batches=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_documents=60, val_fraction=0.3))
    with monkeypatch.context() as m:
        m.setattr(select, "native_attention", lambda config: "sdpa")
        result = loop.train(cfg)
    summary = _eval(tmp_path, "--checkpoint", str(result.run_dir))
    assert summary["loss"] == pytest.approx(_val_losses(result.run_dir)[1], rel=1e-6)


def test_eval_from_another_directory_finds_a_run_started_with_relative_paths(tmp_path, monkeypatch):
    """A run started with --model base --data gsm8k.json (relative, as users type them) records the files absolute,
    so eval without --data from another directory rebuilds its split (it said the data file was gone)."""
    from fasttune.train import loop

    shutil.copy(GSM8K, tmp_path / "gsm8k.json")
    save_base_model(tmp_path / "base", context=1024)
    monkeypatch.chdir(tmp_path)
    cfg = sft_config(Path("."), Path("base"), Path("gsm8k.json"), max_length=LENGTH, val_fraction=0.3, max_steps=1,
                     save_every=1, eval_every=1)  # fmt: skip
    loop.train(dataclasses.replace(cfg, output_dir="run"))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["data"]["path"] == [str(tmp_path / "gsm8k.json")] and recorded["model"]["path"] == str(
        tmp_path / "base")  # fmt: skip
    monkeypatch.chdir(tmp_path / "run")
    summary = _eval(tmp_path, "--checkpoint", ".")
    assert summary["loss"] == pytest.approx(_val_losses(tmp_path / "run")[1], rel=1e-6)


def test_eval_of_a_run_trained_on_a_hugging_face_cache_file_reads_it_through_its_link(tmp_path, capsys):
    """--data snapshots/REV/train.json, a symlink to blobs/SHA (no suffix: the Hugging Face cache keeps files so):
    config.json records the link made absolute, not resolved to the blob, whose missing suffix says no format (a bare
    --resume and eval without --data said "unsupported file type '(no extension)'"), and eval without --data scores
    the run's split, the held-out records alone (the input digest resolves both to the same file)."""
    from fasttune.train import loop

    (tmp_path / "blobs").mkdir()
    (tmp_path / "snapshots" / "rev").mkdir(parents=True)
    shutil.copy(GSM8K, tmp_path / "blobs" / "9f2c")
    link = tmp_path / "snapshots" / "rev" / "train.json"
    link.symlink_to(Path("..", "..", "blobs", "9f2c"))
    base = save_base_model(tmp_path / "base", context=1024)
    cfg = sft_config(tmp_path, base, link, max_length=LENGTH, val_fraction=0.3, max_steps=1, save_every=1,
                     eval_every=1)  # fmt: skip
    result = loop.train(cfg)
    assert json.loads((result.run_dir / "config.json").read_text())["data"]["path"] == [str(link)]
    summary = _eval(tmp_path, "--checkpoint", str(result.run_dir))
    assert summary["loss"] == pytest.approx(_val_losses(result.run_dir)[1], rel=1e-6)
    said = [x for x in capsys.readouterr().err.splitlines() if "validation split:" in x]
    assert len(said) == 1 and "as at step 1: the input files' digest" in said[0], said


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
    """One step of sft validated on two hand-built records (--data.val-path): one exactly data.max_length tokens long,
    one longer (cut: data.overlong truncate); --training.eval-generate-every answers held-out samples at step 1."""
    from transformers import AutoTokenizer

    from fasttune.data.sft import tokenize_records
    from fasttune.train import loop

    tmp = tmp_path_factory.mktemp("edge-run")
    base = save_base_model(tmp / "base", context=1024)
    exact = {"instruction": "How many legs do 3 cats have?", "input": "", "output": "3 x 4 = 12 legs. #### 12"}
    longer = {**exact, "output": "Each cat has four legs and there are three cats, so 3 x 4 = 12 legs. #### 12"}
    length = len(tokenize_records([exact], "alpaca", AutoTokenizer.from_pretrained(base))[0])
    train = tmp / "train.json"  # shorter than `length`: none cut or dropped, under any data.overlong
    train.write_text(json.dumps([{"instruction": f"What is {i} + 1?", "input": "", "output": str(i + 1)}
                                 for i in range(8)]))  # fmt: skip
    val = tmp / "val.json"
    val.write_text(json.dumps([exact, longer]))
    cfg = sft_config(tmp, base, train, max_length=length, max_steps=1, save_every=1, eval_every=1,
                     eval_generate_every=1)  # fmt: skip
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_path=str(val), overlong="truncate"),
                              generation=dataclasses.replace(cfg.generation, max_new_tokens=2))  # fmt: skip
    return loop.train(cfg), exact


@pytest.mark.parametrize("overlong", ["truncate", "split", "drop"])
def test_eval_generate_without_data_leaves_out_the_cut_samples_not_those_of_max_length(edge_run, tmp_path, capsys,
                                                                                      overlong):  # fmt: skip
    """--generate of the run's split answers the held-out record exactly data.max_length tokens long (it was left out
    as cut, on its length alone) and leaves out the longer one, which truncate (and split, which truncates supervised
    samples) cut and drop left out of the split: counted in summary.json and said in the log. The loss is still the
    run's val_loss; the training hook answered the same record."""
    result, exact = edge_run
    summary = _eval(tmp_path, "--checkpoint", str(result.run_dir), "--generate", "--max-new-tokens", "2",
                    "--overlong", overlong)  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "eval" / "completions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [exact["output"]] and summary["generated_samples"] == 1
    cut = 0 if overlong == "drop" else 1
    assert summary["generate_skipped_cut_at_max_length"] == cut and summary["samples"] == 1 + cut
    said = [x for x in capsys.readouterr().err.splitlines() if "--generate leaves out" in x]
    assert said == ([f"eval: --generate leaves out 1 of 2 validation samples: cut at data.max_length "
                     f"{summary['max_length']} (data.overlong {overlong}), so their answers are cut too"]
                    if cut else [])  # fmt: skip
    if overlong == "truncate":  # the run's own setting
        assert summary["loss"] == pytest.approx(_val_losses(result.run_dir)[1], rel=1e-6)
    assert [r["gen_samples"] for r in result.records if "gen_samples" in r] == [1]


def test_eval_generate_without_data_of_a_split_cut_whole_says_so(edge_run, tmp_path, capsys):
    """Every held-out sample cut (here at an eval --max-length one below the record exactly the run's length): no
    answer to score, said as such (it read as data with no prompt, which alpaca is not)."""
    result, _ = edge_run
    length = json.loads((result.run_dir / "config.json").read_text())["data"]["max_length"]
    assert main(["eval", "--checkpoint", str(result.run_dir), "--generate", "--max-length", str(length - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: the validation split of the run {result.run_dir}: every sample was cut at "
                       f"data.max_length {length - 1}, so no answer is whole to score; pass --data with the held-out "
                       "records (--generate answers them whole)"), err  # fmt: skip


def _chat_file(path: Path) -> Path:
    turns = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]
             for i in range(12)]  # fmt: skip
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in turns))
    return path


@pytest.mark.parametrize("case", ["alpaca", "val_path", "chat", "corpus", "text_pieces"])
def test_the_held_out_records_built_alone_are_the_split_build_data_makes(tmp_path, case):
    """build_validation (eval of a run whose input files are unchanged) tokenizes the held-out records alone: its
    samples, their fingerprint, format and source are build_data's, for records held out of --data (some dropped as
    too long), a --data.val-path file, chat, the embedded corpus; text of too few documents, whose last pieces are
    held out, needs every sample (None)."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.data.pipeline import build_data, build_validation, input_digest

    tok = build_tiny_tokenizer(bos="<s>")  # ChatML
    tok.save_pretrained(tmp_path / "tok")
    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads(GSM8K.read_text())[:5]))
    text = tmp_path / "text.txt"
    text.write_text("one short document, split into pieces at data.max_length " * 40)
    path = {"chat": _chat_file(tmp_path / "chat.jsonl"), "corpus": None, "text_pieces": text}.get(case, GSM8K)
    cfg = sft_config(tmp_path, tmp_path / "tok", GSM8K, max_length=LENGTH, val_fraction=0.3)
    overlong = "split" if case in ("corpus", "text_pieces") else "drop"  # text: pieces, not whole, the same ones
    d = dataclasses.replace(cfg.data, path=None if path is None else str(path), overlong=overlong,
                            val_path=str(val) if case == "val_path" else None, max_documents=40)  # fmt: skip
    cfg = dataclasses.replace(cfg, data=d)
    full = build_data(cfg, tokenizer=tok)
    alone = build_validation(cfg, tok)
    if case == "text_pieces":
        assert alone is None and len(full.val) > 0
        return
    samples, summary = alone
    assert len(samples) > 0 and list(samples) == list(full.val)
    assert (summary.val_fingerprint, summary.format, summary.source) == (
        full.summary.val_fingerprint,
        full.summary.format,
        full.summary.source,
    )
    assert full.summary.inputs == input_digest(d) != ""
    if case == "alpaca":
        assert full.summary.val_left_out > 0  # some held out too long (dropped): the same ones


def _tokenized_records(monkeypatch) -> list[int]:
    """How many records each tokenize_records call gets from now on."""
    from fasttune.data import sft

    calls, tokenize = [], sft.tokenize_records
    monkeypatch.setattr(sft, "tokenize_records", lambda records, *a, **kw: calls.append(len(records)) or
                        tokenize(records, *a, **kw))  # fmt: skip
    return calls


def test_eval_without_data_of_unchanged_files_tokenizes_the_held_out_records_alone(drop_run, tmp_path, capsys,
                                                                                   monkeypatch):  # fmt: skip
    """The checkpoint records its input files' digest and its validation samples' fingerprint: while the files are
    unchanged, the 6 held-out records alone are tokenized (not the 14 trained), and the loss is the logged val_loss.
    The same records written another way (the file's bytes changed, its records not) are checked as before, every
    record tokenized against the data fingerprint: the same loss (an edited record is refused: the test above)."""
    result, data = drop_run
    logged, calls = _val_losses(result.run_dir)[4], _tokenized_records(monkeypatch)
    assert _eval(tmp_path, "--checkpoint", str(result.run_dir))["loss"] == pytest.approx(logged, rel=1e-6)
    assert calls == [6]
    original = data.read_text()
    try:
        data.write_text(json.dumps(json.loads(original), indent=1))
        calls.clear()
        assert _eval(tmp_path, "--checkpoint", str(result.run_dir))["loss"] == pytest.approx(logged, rel=1e-6)
        assert calls == [14, 6]
    finally:
        data.write_text(original)
    said = [x.split(" samples of ")[1] for x in capsys.readouterr().err.splitlines() if "validation split:" in x]
    assert said == [
        f"{data}, held out at data.val_fraction 0.3; as at step 4: the input files' digest and these "
        "samples' fingerprint (the training samples not tokenized)",
        f"{data}, held out at data.val_fraction 0.3; checked against the data fingerprint of step 4",
    ]


@pytest.mark.parametrize("recorded", ["no digest (an older fasttune)", "other validation samples",
                                      "older masking rules"])  # fmt: skip
def test_eval_without_data_checks_every_sample_when_the_digest_cannot_tell(drop_run, tmp_path, monkeypatch, recorded):
    """A checkpoint without the digest (saved by an older fasttune), whose validation samples are not those the
    unchanged files give now (another tokenizer, other rules), or of older masking rules that give its data the same
    samples (the run's data has nothing a later rule changed): every record is tokenized and checked against the data
    fingerprint, as before (a checkpoint of older rules was refused even when its fingerprint matched)."""
    from fasttune.data.sft import MASKING_RULES
    from fasttune.train import checkpoint

    load = checkpoint.load_trainer_state
    edit = {"no digest (an older fasttune)": lambda s: s.pop("inputs"), "other validation samples":
            lambda s: s.update(val_data="0" * 16), "older masking rules":
            lambda s: s.update(masking_rules=MASKING_RULES - 1)}[recorded]  # fmt: skip
    monkeypatch.setattr(checkpoint, "load_trainer_state", lambda ckpt: (s := load(ckpt), edit(s))[0])
    result, _ = drop_run
    calls = _tokenized_records(monkeypatch)
    summary = _eval(tmp_path, "--checkpoint", str(result.run_dir))
    assert summary["loss"] == pytest.approx(_val_losses(result.run_dir)[4], rel=1e-6)
    assert calls == ([6, 14, 6] if recorded == "other validation samples" else [14, 6])


def test_the_input_digest_changes_with_every_file_the_data_is_read_from(tmp_path):
    """input_digest (eval's test for a run's files unchanged): an edited or renamed file of a --data folder, or an
    edited --data.val-path, changes it; a file of the folder that no reader reads (weights beside the data, a FIFO)
    does not."""
    from fasttune.config import DataConfig
    from fasttune.data.pipeline import input_digest

    folder = tmp_path / "texts"
    shutil.copytree(Path(__file__).parent / "fixtures" / "text_folder", folder)
    val = tmp_path / "val.txt"
    val.write_text("held out\n")
    d = DataConfig(path=str(folder), val_path=str(val))
    seen = {input_digest(d)}
    (folder / "ignored.bin").write_bytes(b"\0" * 64)
    os.mkfifo(folder / "pipe.jsonl")  # not read (its read would wait for a writer), as the reader leaves it
    assert input_digest(d) in seen
    edits = (lambda: (folder / "a.txt").write_text("edited\n"), lambda: (folder / "a.txt").rename(folder / "c.txt"),
             lambda: val.write_text("held out too\n"))  # fmt: skip
    for change in edits:
        change()
        assert input_digest(d) not in seen
        seen.add(input_digest(d))


def test_the_input_digest_of_data_given_through_a_symlink_is_that_of_the_path_config_json_records(tmp_path):
    """Training digests --data as typed; config.json records it resolved (RunFolder.write_config), and eval digests
    that: a data file (or folder) given through a symlink of another name (data.jsonl -> v3/train.jsonl) has the
    same digest both ways, so eval of the run tokenizes the held-out records alone, not every record every time."""
    from fasttune.config import DataConfig
    from fasttune.data.pipeline import input_digest

    (tmp_path / "v3").mkdir()
    shutil.copy(GSM8K, tmp_path / "v3" / "train.json")
    (tmp_path / "data.json").symlink_to(tmp_path / "v3" / "train.json")
    (tmp_path / "data").symlink_to(tmp_path / "v3")
    for link in (tmp_path / "data.json", tmp_path / "data"):
        assert input_digest(DataConfig(path=str(link))) == input_digest(DataConfig(path=str(link.resolve()))) != ""


def test_the_training_hook_says_every_held_out_sample_was_cut_not_that_none_has_a_prompt(tmp_path, caplog):
    """--training.eval-generate-every with every held-out sample cut at data.max_length (alpaca: each has a prompt):
    the warning before training says they were cut, as eval --generate does, not 'no held-out sample with a prompt to
    answer (alpaca data)'."""
    from types import SimpleNamespace

    from fasttune.data.pipeline import DataSummary
    from fasttune.data.sample import Sample, Samples
    from fasttune.eval.in_training import say_nothing_to_answer

    cfg = sft_config(tmp_path, tmp_path, max_length=8, eval_generate_every=1)
    cut = Sample(range(8), [(3, 8)], whole=False)
    say_nothing_to_answer(cfg, SimpleNamespace(val=Samples([cut]), summary=DataSummary("d", "alpaca")), fsdp=False)
    assert caplog.messages == ["training.eval_generate_every: every held-out sample was cut at data.max_length 8, so "
                               "no answer is whole to score (raise --data.max-length); skipped"]  # fmt: skip


def test_the_training_hook_splits_only_the_held_out_samples_it_answers(tmp_path, monkeypatch):
    """held_out_examples (every --training.eval-generate-every steps) reads the first eval_generate_samples whole
    held-out samples with a prompt, not every one of a large split (0.4 s per 10,000 samples, each time, on rank 0
    while the others wait): the same examples, from as many samples as it needs."""
    from types import SimpleNamespace

    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.data.sample import Samples
    from fasttune.data.sft import tokenize_records
    from fasttune.eval import in_training as run

    tok = build_tiny_tokenizer(bos="<s>")
    samples = tokenize_records(json.loads(GSM8K.read_text()), "alpaca", tok)
    samples[0] = samples[0].cut(0, len(samples[0]) - 1)  # cut: left out, the next one answered in its place
    data = SimpleNamespace(val=Samples(samples), tokenizer=tok)
    cfg = sft_config(tmp_path, tmp_path, eval_generate_samples=3)
    calls, split = [], run.split_sample
    monkeypatch.setattr(run, "split_sample", lambda s, t: calls.append(s) or split(s, t))
    assert run.held_out_examples(cfg, data) == [split(s, tok) for s in samples[1:4]]
    assert len(calls) == 3
