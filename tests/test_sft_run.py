"""Supervised runs as the user sees them: where the loss is computed (said at start, logged per step), and what an
input model's folder leaves in the output (no auto_map pointing at custom code that was not used)."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from helpers import GSM8K, save_micro_model, sft_config, tiny_config
from transformers import AutoModelForCausalLM

from fasttune.data.packing import IGNORE
from fasttune.train import loop


@pytest.fixture(scope="module")
def model_with_auto_map(tmp_path_factory) -> Path:
    """A micro Llama saved like a hub model whose config also names custom code (auto_map) it does not need."""
    path = save_micro_model(tmp_path_factory.mktemp("base") / "model")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_response_only_loss_is_reported_and_logged_and_auto_map_is_not_copied(tmp_path, model_with_auto_map, caplog):
    cfg = sft_config(tmp_path, model_with_auto_map, max_steps=2, save_every=0, eval_every=0)
    caplog.set_level(logging.INFO, logger="fasttune")
    result = loop.train(cfg)

    from fasttune.data.pipeline import build_data

    train = build_data(cfg).train
    total = sum(len(s["input_ids"]) for s in train)
    targets = sum(sum(t != IGNORE for t in s["labels"][1:]) for s in train)
    assert 0 < targets < total / 2  # GSM8K prompts are long: most tokens are not trained on
    assert f"loss on responses only: {targets:,} of {total:,} tokens ({100 * targets / total:.1f}%)" in caplog.text

    steps = [r for r in result.records if r.get("loss") is not None]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 < r["target_tokens"] < r["tokens"] for r in steps)

    saved = json.loads((result.checkpoint / "config.json").read_text())
    assert "auto_map" not in saved
    AutoModelForCausalLM.from_pretrained(result.checkpoint)  # loads without trust_remote_code


def test_sft_splits_a_long_text_file_and_truncates_supervised_samples(tmp_path, caplog):
    """`sft`'s default overlong policy (auto): a plain-text file longer than data.max_length is split into pieces,
    every token trained (it kept the first max_length tokens of a 60 KB book and dropped the rest, said only in the
    summary's count); supervised samples are truncated, not split from their prompts, without a warning."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.config import get_experiment
    from fasttune.data.pipeline import build_data

    tok = build_tiny_tokenizer()
    book = tmp_path / "book.txt"
    book.write_text("Natalia sold clips to her friends in April and May. " * 200)
    whole = len(tok(book.read_text(), add_special_tokens=False)["input_ids"])
    cfg = get_experiment("sft")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(book), max_length=64, val_fraction=0))
    data = build_data(cfg, tokenizer=tok)
    assert (data.summary.split, data.summary.truncated) == (1, 0)
    assert whole < sum(len(s["input_ids"]) for s in data.train) <= whole + 2  # all of it (and BOS/EOS)
    assert max(len(s["input_ids"]) for s in data.train) == 64

    caplog.set_level(logging.WARNING, logger="fasttune")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "2+2? ", "completion": "four " * 100}) + "\n")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(long)))
    data = build_data(cfg, tokenizer=tok)
    assert (data.summary.split, data.summary.truncated, len(data.train)) == (0, 1, 1)
    assert len(data.train[0]["input_ids"]) == 64 and "applies to plain text only" not in caplog.text


def test_trl_conversational_data_is_said_to_be_read_as_chat(tmp_path):
    """TRL's conversational prompt/completion is converted to chat; the data summary says so (it read "(chat)" only,
    a format the file does not have)."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.config import get_experiment
    from fasttune.data.pipeline import build_data

    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    data = tmp_path / "trl.jsonl"
    record = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
    data.write_text(json.dumps(record) + "\n")
    cfg = get_experiment("sft")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data), val_fraction=0))
    lines = build_data(cfg, tokenizer=tok).summary.lines()
    assert lines[0].endswith("(chat)") and any("read as chat: TRL's conversational" in line for line in lines)


def test_alpaca_records_with_a_system_prompt_or_history_say_it_is_not_trained_on(tmp_path, caplog):
    """LLaMA-Factory's and Axolotl's Alpaca variants carry "system" (and "history"); the Alpaca prompt has no place for
    them, and they were dropped without a word. The samples are those of the same records without the fields."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.config import get_experiment
    from fasttune.data.pipeline import build_data

    tok = build_tiny_tokenizer()
    plain = [{"instruction": f"add {i} and 2", "input": "", "output": str(i + 2)} for i in range(6)]
    extra = [{**r, "system": "You are a calculator."} if i % 2 else dict(r) for i, r in enumerate(plain)]
    extra[0]["history"] = [["hi", "hello"]]
    cfg = get_experiment("sft")
    samples = {}
    for name, records in (("plain", plain), ("extra", extra)):
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
        caplog.clear()
        data = dataclasses.replace(cfg.data, path=str(tmp_path / f"{name}.json"), val_fraction=0)
        with caplog.at_level(logging.WARNING, logger="fasttune"):
            samples[name] = build_data(dataclasses.replace(cfg, data=data), tokenizer=tok).train
        said = [r.getMessage() for r in caplog.records if "has no place for" in r.getMessage()]
        if name == "plain":
            assert said == []
    assert samples["extra"] == samples["plain"]
    assert len(said) == 2 and "3 of 6 records have a 'system' field" in said[0] and "1 of 6" in said[1]
    assert all("extra.json" in line and "convert the records to chat" in line for line in said)


@pytest.fixture(scope="module")
def micro_falcon(tmp_path_factory) -> Path:
    """A micro multi-query Falcon (its attention in its own code, not transformers' AttentionInterface), with the
    tests' tokenizer."""
    import torch
    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from transformers import FalconConfig

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = FalconConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          multi_query=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("falcon") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_model_with_its_own_attention_trains_on_padded_rows_not_on_leaking_packs(tmp_path, micro_falcon, caplog):
    """Falcon's own attention code ignores the samples of a packed row: a sample packed after another gets other
    logits than alone (checked first). Asked to pack (the default), the run trains on padded rows of samples of
    similar length within the packing budget: its first loss is plain HF's on that padded batch, and the log and the
    summary say so. It trained leaking packs before."""
    import torch

    from fasttune.data.packing import Batcher, collate_packed
    from fasttune.data.pipeline import build_data

    model = AutoModelForCausalLM.from_pretrained(micro_falcon).eval()
    first, second = ({"input_ids": list(r), "labels": list(r)} for r in (range(3, 13), range(20, 28)))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
        packed = collate_packed([first, second])
        after = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0, 10:]
    assert (after - alone).abs().max() > 1e-3  # the leak a packed run would train on

    cfg = sft_config(tmp_path, micro_falcon, micro_batch_size=4, max_steps=2, save_every=0, eval_every=0)
    caplog.set_level(logging.WARNING, logger="fasttune")
    run = loop.train(cfg)
    assert "data.packing: off: this model (FalconForCausalLM) computes attention in its own code" in caplog.text

    data = build_data(cfg)
    batcher = Batcher.from_config(cfg.data, cfg.seed, data.tokenizer.pad_token_id, packing=False, grouped=True)
    plan = batcher.plan([len(s["input_ids"]) for s in data.train], epoch=0)
    assert len(plan[0]) > 1 and all(len(b) * max(len(data.train[i]["input_ids"]) for i in b) <= 1024 for b in plan)
    batch = batcher.collate([data.train[i] for i in plan[0]])
    assert "attention_mask" in batch and "position_ids" not in batch
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(micro_falcon)(**batch).loss.item()
    first = next(r for r in run.records if r.get("loss") is not None)
    assert first["step"] == 1 and abs(first["loss"] - want) <= 1e-5 * want


def test_a_loaded_class_without_attention_interface_is_not_packed(tmp_path):
    """Remote code is not known from its config (the attention choice says it packs): the loaded class decides. A
    subclass of Bloom's, as remote code could be, trains on grouped padded rows; Llama's packs."""
    import transformers as T

    from fasttune.train.model_prep import AttentionChoice, batcher_for

    class MyBloomForCausalLM(T.BloomForCausalLM):
        pass

    cfg = tiny_config(tmp_path)
    attn = AttentionChoice("sdpa", "sdpa", "sdpa", "as requested")
    bloom = MyBloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=64))  # fmt: skip
    assert batcher_for(cfg, attn, bloom, 0).layout == "grouped" and batcher_for(cfg, attn, llama, 0).layout == "packed"


def test_resume_under_other_batching_goes_on_from_the_next_epoch(caplog):
    """A checkpoint's cursor indexes its epoch's plan; under another layout (a run that packed a model with its own
    attention, before it was padded) the rest of that epoch would repeat or skip samples (a resumed 2-step Falcon run
    trained 4 samples of its finished epoch again): the run goes on from the next epoch, and says so."""
    from fasttune.data.packing import Batcher
    from fasttune.train.loop import _check_batching
    from fasttune.train.run import TrainState

    grouped = Batcher(packing=False, micro_batch_size=2, max_length=8, grouped=True)
    caplog.set_level(logging.WARNING, logger="fasttune")
    for saved, before, moved in (({"batching": "packed"}, "packed", True), ({}, "packed", True),
                                 ({"batching": "grouped"}, "packed", False), ({}, "grouped", False)):  # fmt: skip
        state = TrainState(step=2, epoch=0, cursor=2)
        _check_batching(saved, grouped, state, before)
        assert (state.epoch, state.cursor) == ((1, 0) if moved else (0, 2)), saved
    assert "micro-batches were packed and are grouped now; going on from epoch 1" in caplog.text


def test_a_hybrid_linear_attention_model_trains_on_padded_rows(tmp_path, caplog):
    """Qwen3-Next (gated delta-rule layers beside attention; no AttentionInterface) refuses packed rows in transformers
    without flash-linear-attention ("can't keep packed sequences apart"): `sft` on it, packing by default, stopped at
    its first step. It trains on padded rows now."""
    import torch
    import transformers as T
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    if "qwen3_next" not in T.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Qwen3-Next")
    tok = build_tiny_tokenizer()
    config = T.AutoConfig.for_model(
        "qwen3_next", vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path / "qwen3-next"
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = sft_config(tmp_path, path, max_steps=2, save_every=0, eval_every=0)
    caplog.set_level(logging.WARNING, logger="fasttune")
    run = loop.train(cfg)
    assert "this model (Qwen3NextForCausalLM) computes attention in its own code" in caplog.text
    assert [r["step"] for r in run.records if r.get("loss") is not None] == [1, 2]


def test_data_summary_counts_every_record_held_out_ones_left_out_included(tmp_path):
    """Held-out samples left out (the prompt fills max_length) are counted and said: the summary's counts add up to
    the records (283 + 15 + 93 of 400 did before, the 9 held-out ones unsaid)."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.config import get_experiment
    from fasttune.data.corpus import holdout
    from fasttune.data.pipeline import build_data
    from fasttune.data.sft import tokenize_records

    tok = build_tiny_tokenizer()
    records = [{"instruction": ("Add the numbers. " * (30 if i % 3 == 0 else 1)) + str(i), "input": "", "output": "5"}
               for i in range(60)]  # fmt: skip
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    cfg = get_experiment("sft")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path), max_length=64, val_fraction=0.3))
    s = build_data(cfg, tokenizer=tok).summary
    _, held = holdout(records, [str(i) for i in range(len(records))], 0.3)
    long = [r for r in tokenize_records(held, "alpaca", tok) if all(t == -100 for t in r["labels"][1:64])]
    assert len(long) > 0 and s.val_left_out == len(long)
    assert s.train_samples + s.no_response + s.val_samples + s.val_left_out == len(records)
    assert f"  left out of validation: {len(long)} held-out samples, by the same rules" in "\n".join(s.lines())


def test_no_validation_names_held_out_samples_left_out_by_max_length(tmp_path, caplog):
    """Every held-out sample too long for max_length: the warning said "the data is too small to hold one out" of 60
    records, and sent the user to --data.val-fraction, which holds out more samples that are left out the same way."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.config import get_experiment
    from fasttune.data.corpus import holdout
    from fasttune.data.pipeline import build_data

    keys = [str(i) for i in range(60)]
    _, held = holdout(keys, keys, 0.05)
    records = [{"instruction": "Add the numbers. " * (30 if str(i) in held else 1), "input": "", "output": "5"}
               for i in range(60)]  # fmt: skip
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    cfg = get_experiment("sft")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path), max_length=64))
    data = build_data(cfg, tokenizer=build_tiny_tokenizer())
    assert not data.val and data.summary.val_left_out == len(held) > 0 and data.train
    caplog.set_level(logging.WARNING, logger="fasttune")
    loop._say_no_validation(cfg, data)
    assert f"no validation: the {len(held)} held-out samples were all left out" in caplog.text
    assert "too small" not in caplog.text and "raise --data.max-length" in caplog.text


def test_alpaca_records_with_a_misspelt_input_field_say_its_text_is_not_read(tmp_path, caplog):
    """A record whose input was typed "inptu" (or "Input") trained on the instruction alone, its input dropped without
    a word; a look-alike beside a filled field (outputs beside output) is another field and is not named."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    from fasttune.config import get_experiment
    from fasttune.data.pipeline import build_data

    records = [{"instruction": "add the numbers", "input": f"{i} and 2", "output": str(i + 2)} for i in range(6)]
    records[1] = {"instruction": "add the numbers", "inptu": "1 and 2", "output": "3"}
    records[2] = {**records[2], "input": "", "Input": "2 and 2"}
    records[3]["outputs"] = "5, 6"
    (tmp_path / "typo.json").write_text(json.dumps(records))
    cfg = get_experiment("sft")
    data = dataclasses.replace(cfg.data, path=str(tmp_path / "typo.json"), val_fraction=0)
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        build_data(dataclasses.replace(cfg, data=data), tokenizer=build_tiny_tokenizer())
    said = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert said == [
        f"{tmp_path / 'typo.json'}: 1 of 6 records have a 'Input' field and no 'input': it is not read (a misspelt "
        "'input'?); rename it to train with its text",
        f"{tmp_path / 'typo.json'}: 1 of 6 records have a 'inptu' field and no 'input': it is not read (a misspelt "
        "'input'?); rename it to train with its text",
    ]


def test_the_records_texts_are_gathered_and_hashed_only_to_train_a_tokenizer(tmp_path, monkeypatch):
    """With --model the tokenizer is the model's: the records' texts, joined and hashed to key a locally trained one,
    were gathered anyway (two more copies of the data set's text). The data is the same without that work, and a
    locally trained tokenizer keeps its cache key (sha1 of the texts joined by NUL), so a cached one is still found."""
    import hashlib

    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from transformers import AutoTokenizer

    from fasttune.data import pipeline
    from fasttune.data.corpus import holdout
    from fasttune.data.formats import load_records

    folder = tmp_path / "tokenizer"
    build_tiny_tokenizer(chat_template=None).save_pretrained(folder)
    cfg = sft_config(tmp_path, folder, max_length=1024)  # the data pipeline does not read the experiment
    ref = pipeline.build_data(cfg, tokenizer=AutoTokenizer.from_pretrained(folder))
    real, seen = pipeline._record_text, []
    monkeypatch.setattr(pipeline, "_record_text", lambda record: seen.append(record) or real(record))
    ours = pipeline.build_data(cfg)
    assert not seen
    assert (ours.train, ours.val, ours.summary.lines()) == (ref.train, ref.val, ref.summary.lines())

    local = pipeline.build_data(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=None)))
    records, _ = load_records(str(GSM8K))
    train, _ = holdout(records, [str(i) for i in range(len(records))], 0.2)
    assert seen == train
    key = hashlib.sha1("\0".join(map(real, train)).encode()).hexdigest()[:16]
    cached = Path(cfg.data.cache_dir) / f"tokenizer-{key}-{cfg.data.tokenizer_vocab_size}"
    assert AutoTokenizer.from_pretrained(cached).get_vocab() == local.tokenizer.get_vocab()


def test_remote_code_with_its_own_attention_counts_epochs_on_the_rows_it_trains(tmp_path, monkeypatch):
    """A class known only once loaded (remote code: no class for its config, no attention known) is counted on the
    batching the loaded class gets, not on packed rows: a resumed --epochs run keeps its length (the packed count,
    another total, refused the resume before the model loaded). Here a Llama whose class takes no attention
    functions, as remote code may."""
    import transformers as T

    from fasttune.attention import select
    from fasttune.train import model_prep

    monkeypatch.setattr(model_prep, "model_class", lambda *config: None)  # unknown before loading
    monkeypatch.setattr(select, "native_attention", lambda config: None)
    monkeypatch.setattr(T.LlamaForCausalLM, "_supports_attention_backend", False)  # the loaded class: padded rows
    cfg = tiny_config(tmp_path, max_steps=100, save_every=0, eval_every=0, epochs=0.1)  # 58 steps packed, 59 padded
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=256, micro_batch_size=2))
    first = loop.train(cfg)
    again = loop.train(dataclasses.replace(cfg, resume=True))  # complete: nothing to train, and no refusal
    assert again.steps == first.steps


def test_a_trusted_auto_map_is_not_taken_for_transformers_own_class(model_with_auto_map):
    """--model.trust-remote-code with a config whose auto_map names a causal LM: transformers builds the folder's
    class, so its batching is not known before loading; untrusted, transformers' own class is built."""
    from transformers import LlamaForCausalLM

    from fasttune.model.build import read_config
    from fasttune.train.model_prep import model_class

    config = read_config(model_with_auto_map)
    assert model_class(config) is LlamaForCausalLM and model_class(config, trust_remote_code=True) is None
