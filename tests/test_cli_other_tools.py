"""Options and config keys named as HF Trainer, TRL and Axolotl name them: each is answered with fasttune's own
option, or with what fasttune does instead, in one line (several of them: all in that line)."""

from __future__ import annotations

import json

import pytest

from fasttune import cli


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--training.learning-rate", "did you mean --training.lr?"),  # it suggested --training.min-lr-ratio
        ("--lr", "did you mean --training.lr?"),
        ("--learning_rate", "did you mean --training.lr?"),
        ("--per_device_train_batch_size", "did you mean --data.micro-batch-size?"),
        ("--gradient_accumulation_steps", "did you mean --training.grad-accum?"),
        ("--max_seq_length", "did you mean --data.max-length?"),
        ("--lora_r", "did you mean --lora.rank?"),
        ("--rank", "did you mean --lora.rank?"),  # one option of that name, in another section
        # HF Trainer's precision switches: no hint before, then --model.dtype, which has no fp16 and whose bf16 is
        # pure bf16, not HF's --bf16 (autocast over fp32 weights: fasttune's default on a GPU)
        *((f, "fasttune has no such option: on a GPU it trains in bf16 by default, never fp16 (--model.dtype auto: "
              "bf16 autocast over fp32 weights, as HF's --bf16;") for f in ("--bf16", "--fp16")),
        ("--warmup_ratio", "fasttune has no such option: warmup is counted in steps, --training.warmup-steps N"),
        # TRL's and peft's LoRA options: --use_peft was answered with --seed, --lora_modules_to_save with
        # --lora.merge-on-save (another thing), DoRA and QLoRA's with the closest spelling or nothing
        ("--use_peft", "did you mean --lora.enabled?"),
        ("--lora_modules_to_save", "fasttune has no such option: LoRA trains adapters on --lora.targets"),
        ("--modules_to_save", "fasttune has no such option: LoRA trains adapters on --lora.targets"),
        ("--use_dora", "fasttune has no such option: its LoRA is plain LoRA (no DoRA)"),
        ("--use_rslora", "fasttune has no such option: LoRA's scaling is --lora.alpha / --lora.rank"),
        ("--load_in_4bit", "fasttune has no such option: it loads no quantized base (QLoRA)"),
        ("--assistant_only_loss", "fasttune has no such option: chat data trains the assistant turns only"),
        # TRL's evaluation and schedule options had no hint at all
        ("--eval_strategy", "fasttune has no such option: val_loss is computed every --training.eval-every N steps"),
        # TRL's and Axolotl's validation data were answered "no such option"; --data.val-path reads it now
        *((f, "did you mean --data.val-path?") for f in ("--eval_dataset", "--test_datasets", "--test-datasets")),
        ("--dataset_test_split", "fasttune has no such option: it reads no Hub splits by name; pass the test split's "
                                 "own file or folder (a save_to_disk DatasetDict's DATA/test) as --data.val-path"),
        *((f, "fasttune has no such option: its one schedule is a linear warmup over "
              "--training.warmup-steps, then a cosine down to --training.min-lr-ratio") for f in
          ("--lr_scheduler_type", "--lr_scheduler")),
        ("--evals_per_epoch", "fasttune has no such option: val_loss is computed every --training.eval-every N steps"),
        ("--saves_per_epoch", "fasttune has no such option: a checkpoint is saved every --save-every N steps"),
        # Axolotl's attention switches were answered with --strict-attention (another thing), its prepared-data
        # cache with --data.val-path (validation data), TRL's --dataset_num_proc with --data.train-on-prompt
        *((f, "did you mean --attn-implementation?") for f in ("--flash_attention", "--sdp_attention")),
        ("--use_liger_kernel", "did you mean --model.liger?"),
        ("--dataset_prepared_path", "fasttune has no such option: it keeps no prepared copy of the data"),
        ("--dataset_num_proc", "fasttune has no such option: the data is tokenized in the training process"),
        *((f, "fasttune has no such option: chat data is rendered with the model's own chat template; to use "
              "another, save it in the model folder") for f in ("--chat_template", "--chat_template_path")),
        *((f, "did you mean --training.epochs?") for f in
          ("--training.num-epochs", "--num-train-epochs", "--num_train_epochs", "--num_epochs")),
        *((f, "fasttune has no such option: it logs to metrics.jsonl in the run folder, and with "
              "--training.tensorboard also to its tensorboard/ folder; for W&B, `wandb sync --sync-tensorboard "
              "OUTPUT_DIR/tensorboard` uploads that;") for f in ("--report_to", "--report-to")),
    ],
)  # fmt: skip
def test_other_tools_option_names_point_at_fasttunes(flag, expected, capsys):
    assert cli.main(["train", flag, "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: unknown option {flag}; {expected}") and len(err.strip().splitlines()) == 1, err


def test_several_unknown_options_are_named_in_one_line(capsys):
    """A command line copied from TRL has several options of other names: one line names them all with fasttune's
    (it named the first, so the user learnt them one run at a time)."""
    argv = ["train", "--learning_rate", "1e-4", "--num_train_epochs=3", "--lora_r", "8", "--report_to", "wandb"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 unknown options: --learning_rate -> --training.lr, --num_train_epochs -> "
                          "--training.epochs, --lora_r -> --lora.rank, --report_to (fasttune has no such option) "
                          "(fasttune's names after ->; see `fasttune train --help`"), err  # fmt: skip
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--dataset_text_field", "--dataset-text-field", "--data.dataset_text_field"])
def test_trls_text_field_option_says_which_field_is_read_and_how_to_rename(flag, capsys, tmp_path):
    """TRL's --dataset_text_field got only 'unknown option'. The hint's advice holds: records with another field are
    no data fasttune can read, the same records renamed as it says are read as text."""
    from fasttune.data.formats import load_records
    from fasttune.errors import DataError

    assert cli.main(["train", flag, "content"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: unknown option {flag}; fasttune has no such option: text data is read from each "
                          "record's `text` field") and "rename your field to text" in err  # fmt: skip
    assert len(err.strip().splitlines()) == 1
    data = [{"content": "def f(x):\n    return x\n", "id": 1}, {"content": "print(1)\n", "id": 2}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    with pytest.raises(DataError, match="cannot tell the data format"):
        load_records(str(tmp_path / "in.jsonl"))
    (tmp_path / "out.jsonl").write_text("".join(json.dumps({"text": r["content"]}) + "\n" for r in data))  # jq's
    assert load_records(str(tmp_path / "out.jsonl")) == ([{"text": r["content"]} for r in data], "text")


def test_every_other_tools_name_maps_to_a_real_option():
    from fasttune.config.argcheck import _suggestion, option_table
    from fasttune.config.other_tools import OTHER_NAMES

    table = option_table()
    assert {"learning-rate", "num-train-epochs", "per-device-train-batch-size", "gradient-accumulation-steps",
            "max-seq-length", "warmup-steps", "lora-r", "lora-alpha", "output-dir"} <= OTHER_NAMES.keys()  # fmt: skip
    for name, target in OTHER_NAMES.items():
        assert target in table, name
        if f"--{name}" not in table:
            assert _suggestion(f"--{name}", table) == f"did you mean {target}? ", name
    assert "--training.lr" not in _suggestion("--lr", {"--limit": int, "--seed": int})  # eval has no such option


def test_the_report_to_answer_names_the_files_a_run_writes():
    """HF/TRL's --report_to: the answer names the run folder's own files (metrics.jsonl, tensorboard/), which W&B's
    `wandb sync --sync-tensorboard` uploads."""
    from pathlib import Path

    from fasttune.config.argcheck import option_table
    from fasttune.config.other_tools import NO_SUCH_OPTION
    from fasttune.train.run_dir import RunFolder

    folder = RunFolder(Path("OUTPUT_DIR"))
    answer = NO_SUCH_OPTION["report-to"]
    assert folder.metrics.name in answer and f"`wandb sync --sync-tensorboard {folder.tensorboard}`" in answer
    assert "--training.tensorboard" in answer and "--training.tensorboard" in option_table()


@pytest.mark.parametrize("name", ["sharegpt", "conversational", "chat_template"])
def test_other_tools_chat_format_names_read_what_chat_reads(name, tmp_path, capsys):
    """--data.format sharegpt was refused ("choose one of: auto, text, ...") though auto read ShareGPT records as chat;
    ShareGPT's, TRL's conversational and Axolotl's chat_template name chat: the records chat reads (from/value turns,
    role/content messages, TRL's conversational prompt/completion) are read as chat by each name, given on the command
    line, in a --config file, or as eval's --format; a file of another format is refused as chat refuses it."""
    from fasttune.config import DataConfig
    from fasttune.data.formats import load_records
    from fasttune.errors import DataError

    data = {
        "sharegpt.jsonl": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "messages.jsonl": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "trl.jsonl": {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant",
                                                                                     "content": "yo"}]},
    }  # fmt: skip
    for file, record in data.items():
        (tmp_path / file).write_text(json.dumps(record) + "\n")
        assert load_records(str(tmp_path / file), name) == load_records(str(tmp_path / file), "chat"), file
        assert load_records(str(tmp_path / file), name)[1] == "chat"
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    with pytest.raises(DataError, match="missing field 'messages' for format chat"):
        load_records(str(tmp_path / "alpaca.jsonl"), name)
    assert DataConfig(format=name).format == name
    (tmp_path / "run.yaml").write_text(f"data: {{format: {name}}}\n")
    for argv in (["--data.format", name], ["--config", str(tmp_path / "run.yaml")]):
        assert cli.main(["train", *argv, "--bogus"]) == 2  # parsed and checked; the unknown option stops it
        err = capsys.readouterr().err
        assert err.startswith("error: unknown option --bogus"), err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("completion", "Axolotl's completion (records of one text field) is text here, and prompt/completion records "
                       "are prompt_completion"),
        ("messages", "records of messages are chat"),
        ("alpaca_chat", "Axolotl's alpaca_chat renders Alpaca records as a chat; alpaca trains them with the Alpaca "
                        "prompt, and records converted to messages train as chat"),
    ],
)  # fmt: skip
def test_other_tools_format_names_of_two_meanings_say_which_format_reads_them(name, expected, tmp_path, capsys):
    names = "auto, text, alpaca, prompt_completion, chat, sharegpt, conversational, chat_template"
    file = tmp_path / "run.yaml"
    file.write_text(f"data: {{format: {name}}}\n")
    for argv, shown in ((["--data.format", name], "--data.format"), (["--config", str(file)], f"{file}: data.format")):
        assert cli.main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {shown}={name!r} is not valid; {expected}; choose one of: {names}\n", err


def test_the_chat_template_hints_advice_gives_the_model_folder_that_template(tmp_path, capsys):
    """Axolotl's chat_template: and TRL's --chat_template_path had no hint (a --config file's: none either); what the
    hint says to do makes the model's tokenizer render chat with the template."""
    from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer
    from transformers import AutoTokenizer

    (tmp_path / "ax.yaml").write_text("experiment: sft\nchat_template: chatml\n")
    assert cli.main(["train", "--config", str(tmp_path / "ax.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown key chat_template; fasttune has no such option: chat data is rendered with the model's" in err, err
    build_tiny_tokenizer(chat_template=None).save_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert not tokenizer.chat_template
    tokenizer.chat_template = CHATML  # the hint's two steps
    tokenizer.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "chat_template.jinja").read_text() == CHATML
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template == CHATML
