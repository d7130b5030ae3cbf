"""--resume: options that would change the run are refused, naming the option and both values; what may change
(--max-steps, the thread count, grad_accum) is said; the data path spelled another way, another name of the format
and the values an older fasttune recorded resume; a finished run says it is complete."""

import dataclasses
import logging

import pytest
from helpers import losses, tiny_config

from fasttune.errors import ConfigError
from fasttune.train import checkpoint, loop
from fasttune.train.run_dir import RunFolder


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


# -- a finished run (#13 item 5) ----------------------------------------------------------------------------------


def _never_build(monkeypatch) -> None:
    """The resume of a finished run must end before its data is read or its model built."""

    def never(*_a, **_k):
        raise AssertionError("the resume of a finished run read its data or built its model")

    monkeypatch.setattr(loop, "build_data", never)
    monkeypatch.setattr(loop, "prepare_model", never)


def test_resume_of_a_finished_run_says_it_is_complete(finished, monkeypatch, capsys, tmp_path):
    """The same command again once the run is finished (a scheduler's retry): one line says it is complete, at which
    step, where its final checkpoint is and how to train further, and it ends with exit 0 before the data is read or
    the model built (they took their time, then the summary and a sample were shown again); a larger --max-steps
    trains on. The length is named where it was set (the run's config.json, a --config file: not a --max-steps the
    user never typed)."""
    from fasttune.cli import main

    cfg, result = finished

    _never_build(monkeypatch)
    run = result.run_dir
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"the run in {run} is already complete (step 3 of training.max_steps: 3 in {run / 'config.json'}); its final "
        f"checkpoint is {run / 'checkpoints' / 'step-000003'}; to train further, resume with a larger "
        "--max-steps (or --epochs)"
    ]
    (again := tmp_path / "again.yaml").write_text("training:\n  max_steps: 3\n")
    assert main(["train", "--output-dir", str(run), "--resume", "--config", str(again)]) == 0
    assert f"already complete (step 3 of training.max_steps: 3 in {again});" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    assert (
        checkpoint.list_checkpoints(run)[-1].name == "step-000004" and "fasttune run summary" in capsys.readouterr().out
    )


def test_resume_below_the_step_reached_is_refused_and_with_its_own_max_steps_is_complete(finished, monkeypatch,
                                                                                          capsys):  # fmt: skip
    """--max-steps 2 of a run at step 3 cannot be honoured: refused in one error line (exit 2) with the fix, before
    the data is read or the model built; its own --max-steps 3 again (a scheduler's retry) is complete, exit 0."""
    from fasttune.cli import main

    _, result = finished

    _never_build(monkeypatch)
    run = result.run_dir
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"error: the run in {run} is already past step 2 (stopped at step 3); to continue it, resume with "
        "--max-steps above 3 (e.g. its original --max-steps)"
    ]
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "3"]) == 0
    assert "is already complete (step 3 of --max-steps=3)" in capsys.readouterr().err
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-000003"]


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


def test_resume_of_a_run_of_older_masking_rules_whose_samples_are_the_same_goes_on(finished):
    """A run started by the previous fasttune (an older `masking_rules`) whose data no later rule tokenizes otherwise
    (the same data fingerprint) resumes: the rules are named only when the samples differ."""
    import torch

    from fasttune.data.sft import MASKING_RULES

    cfg, result = finished
    state_file = result.checkpoint / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["masking_rules"] = MASKING_RULES - 1
    torch.save(state, state_file)
    more = dataclasses.replace(cfg, resume=True, training=dataclasses.replace(cfg.training, max_steps=4))
    assert sorted(losses(loop.train(more).records)) == [1, 2, 3, 4]


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


@pytest.mark.parametrize("given", [["typo.json"], ["d.json", "typo.json"]])
def test_a_resume_given_data_that_does_not_exist_is_refused_finished_or_not(finished_sft, capsys, given):
    """--resume --data NEW where NEW does not exist (a typo; or one of several paths): the resume of a finished run
    said it was complete (exit 0), hiding the typo. Refused in the one line a new run gets, naming the path, before
    the run folder is touched, finished or with steps left."""
    from fasttune.cli import main

    run = finished_sft / "run"
    config = (run / "config.json").read_bytes()
    data = [str(finished_sft / name) for name in given]
    capsys.readouterr()
    for more in ([], ["--max-steps", "3"]):
        assert main(["train", "--output-dir", str(run), "--resume", "--data", *data, *more]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {finished_sft / 'typo.json'}: no such file or "
                                                        "folder; check --data"]  # fmt: skip
    assert (run / "config.json").read_bytes() == config
    assert checkpoint.list_checkpoints(run)[-1].name == "step-000002"
