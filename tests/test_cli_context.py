"""The command line against the model's context: --data.max-length defaults to it, a longer one is refused in one
line, a context extended by RoPE scaling (YaRN, Llama 3) is reached, and the config edit the refusal advises works."""

import math

import pytest

from fasttune import cli


@pytest.fixture
def short_context_model(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=300).save_pretrained(tmp_path / "m")  # fmt: skip
    return str(tmp_path / "m")


def _captured_config(monkeypatch, argv):
    """cli.main(argv) up to the training call; the config training would get."""
    import types

    from fasttune.train import loop

    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg
        return types.SimpleNamespace(first_val_loss=None, sample_prompt=None, model_dir=None)

    monkeypatch.setattr(loop, "train", fake_train)
    rc = cli.main(argv)
    return rc, seen.get("cfg")


def test_default_max_length_adapts_to_the_models_context(short_context_model, monkeypatch, capsys):
    argv = ["train", "--experiment", "sft", "--model", short_context_model, "--data", "tests/fixtures/alpaca.jsonl"]
    rc, cfg = _captured_config(monkeypatch, argv)
    assert rc == 0 and cfg.data.max_length == 128  # the preset's 1024 exceeds the model's 128 positions
    log = capsys.readouterr().err  # the CLI logs to stderr
    assert "data.max_length: 128, the context of" in log and "default is 1024" in log
    rc, cfg = _captured_config(monkeypatch, [*argv, "--data.max-length", "64"])
    assert rc == 0 and cfg.data.max_length == 64  # within the context: as given


def test_max_length_help_states_every_presets_default(capsys):
    """`fasttune train --help` (quick's defaults) says what sft and lora use, as the presets and the test above do."""
    from fasttune.config.experiments import EXPERIMENTS

    n = {name: make().data.max_length for name, make in EXPERIMENTS.items()}
    assert n["lora"] == n["sft"] and set(n) == {"quick", "full", "sft", "lora"}
    for experiment in ([], ["--experiment", "sft"]):
        assert cli.main(["train", *experiment, "--help"]) == 0
        shown = " ".join(capsys.readouterr().out.split())
        assert f"(quick {n['quick']}, full {n['full']}, sft and lora {n['sft']};" in shown
        assert f"sft and lora train at the smaller of {n['sft']} and the model's context" in shown


def test_explicit_max_length_beyond_the_context_is_an_error(short_context_model, monkeypatch, capsys):
    argv = ["train", "--experiment", "sft", "--model", short_context_model, "--data", "tests/fixtures/alpaca.jsonl",
            "--data.max_length", "1024"]  # fmt: skip
    rc, cfg = _captured_config(monkeypatch, argv)
    assert rc == 2 and cfg is None
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --data.max-length 1024 exceeds the context of") and "max_position_embeddings=128" in err
    )


@pytest.mark.parametrize(
    "rope, context",
    [(None, 128), ({"rope_type": "yarn", "factor": 4.0}, 512),  # Qwen's YaRN: max_position_embeddings stays 128
     ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),  # already the scaled one
     # Qwen3's model card: YaRN 4 x 32768 beside its config's 40960 positions is 131072, not 40960
     ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 100}, 400),
     ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
       "original_max_position_embeddings": 16}, 128)],  # Llama 3.1: 131072 is the scaled context
)  # fmt: skip
def test_max_length_may_reach_a_yarn_extended_context(tmp_path, monkeypatch, capsys, rope, context):
    """A model whose config extends RoPE with YaRN the way Qwen2.5/Qwen3 document it (max_position_embeddings left at
    the original, factor 4) trains at 4x that length: it was refused beyond max_position_embeddings. The context is
    what transformers' own YaRN takes (the factor as given); other configs keep max_position_embeddings."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    conf = LlamaConfig(max_position_embeddings=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=300, rope_scaling=rope)  # fmt: skip
    conf.save_pretrained(tmp_path / "m")
    if rope and rope["rope_type"] == "yarn" and context > 128:  # transformers scales by the factor as given
        assert ROPE_INIT_FUNCTIONS["yarn"](conf, "cpu")[1] == pytest.approx(0.1 * math.log(4.0) + 1.0)
    argv = ["train", "--experiment", "sft", "--model", str(tmp_path / "m"), "--data", "tests/fixtures/alpaca.jsonl"]
    rc, cfg = _captured_config(monkeypatch, [*argv, "--data.max-length", str(context)])
    assert rc == 0 and cfg.data.max_length == context
    rc, cfg = _captured_config(monkeypatch, [*argv, "--data.max-length", str(context + 1)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and cfg is None and f"pass --data.max-length {context} or less" in err, err
    if context == 512:
        assert "(max_position_embeddings=128 x yarn factor 4.0 = 512)" in err
    elif context == 400:
        assert "(original_max_position_embeddings=100 x yarn factor 4.0 = 400)" in err
    elif rope is None:  # plain RoPE: how to extend it
        assert '"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128' in err, err
    else:
        assert "(max_position_embeddings=128);" in err and "yarn" not in err.split(";")[1], err


@pytest.mark.parametrize("saved_by", ["transformers 5", "transformers 4"])
def test_the_advised_yarn_edit_extends_the_context_and_keeps_the_rope_base(tmp_path, monkeypatch, capsys, saved_by):
    """The refusal's advice, made to config.json as written, trains the length on the model's own RoPE base. Given as
    `rope_scaling` beside the `rope_parameters` transformers 5 saves (every fasttune checkpoint), transformers took
    the YaRN keys alone and dropped rope_theta to its default (500000 -> 10000): another model, silently."""
    import json
    import re

    from transformers import AutoConfig, LlamaConfig

    from fasttune.model.context import context_length

    LlamaConfig(max_position_embeddings=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=300, rope_theta=500000.0).save_pretrained(tmp_path / "m")  # fmt: skip
    file = tmp_path / "m" / "config.json"
    data = json.loads(file.read_text())
    if saved_by == "transformers 4":  # a Hub download's config: rope_theta beside a null rope_scaling
        data.update(rope_theta=data.pop("rope_parameters")["rope_theta"], rope_scaling=None)
        file.write_text(json.dumps(data))
    argv = ["train", "--experiment", "sft", "--model", str(tmp_path / "m"), "--data", "tests/fixtures/alpaca.jsonl",
            "--data.max-length", "300"]  # fmt: skip
    assert _captured_config(monkeypatch, argv) == (2, None)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    key, value = re.search(r'"(rope_\w+)": (\{[^}]*\})', err).groups()
    file.write_text(json.dumps({**data, key: json.loads(value)}))  # the edit the line asks for
    edited = AutoConfig.from_pretrained(tmp_path / "m")
    assert edited.rope_parameters["rope_theta"] == 500000.0, (err, edited.rope_parameters)
    assert context_length(edited) == 384
    rc, cfg = _captured_config(monkeypatch, argv)
    assert rc == 0 and cfg.data.max_length == 300


def test_no_yarn_edit_is_advised_for_rope_parameters_per_layer_type():
    """Gemma 3 (1B, 270M) keeps plain RoPE per layer type ({"sliding_attention": {...}, "full_attention": {...}}): the
    advised flat "rope_parameters" edit, made as written, was ignored by every layer (each kept its own default RoPE)
    while fasttune read the context as extended: the run trained past it on unextended RoPE, and the advice named
    the sliding layers' rope_theta (10000) for the full-attention ones (1000000)."""
    from transformers import Gemma3TextConfig

    from fasttune.model.context import too_long

    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config = Gemma3TextConfig(num_hidden_layers=2, vocab_size=300, max_position_embeddings=128, **sizes)
    assert set(config.rope_parameters) == {"sliding_attention", "full_attention"}
    message = too_long(config, 300, "m")
    assert message.endswith("(max_position_embeddings=128); pass --data.max-length 128 or less"), message
