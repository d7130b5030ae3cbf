"""A vision-language checkpoint whose language model transformers ships as a causal LM (Gemma 3: AutoModelForCausalLM
builds Gemma3ForConditionalGeneration; Mistral 3, LLaVA-style: no causal-LM class for the whole): fasttune trains the
language model alone (model/text_part.py). Both were refused as having "no attention layers"."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import train_tiny
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
)

from fasttune.config import ModelConfig
from fasttune.errors import ConfigError
from fasttune.model.build import build_model

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, max_position_embeddings=512)  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)  # fmt: skip


def _gemma3(vocab: int):  # AutoModelForCausalLM builds it whole; its text config ties the embeddings
    return Gemma3Config(text_config={**TEXT, "vocab_size": vocab, "sliding_window": 16}, vision_config=VISION,
                        mm_tokens_per_image=4)  # fmt: skip


def _mistral3(vocab: int):  # LLaVA-style: no causal-LM class for the whole; tied at the top, not in its text_config
    text = {**TEXT, "model_type": "mistral", "vocab_size": vocab}
    return Mistral3Config(text_config=text, vision_config={**VISION, "model_type": "pixtral", "head_dim": 16})


@pytest.fixture(scope="module", params=[_gemma3, _mistral3], ids=["gemma3", "mistral3"])
def vlm(request, tmp_path_factory):
    from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("vlm")
    tok = build_tiny_tokenizer(chat_template=CHATML, bos="<s>")
    torch.manual_seed(0)
    config = request.param(len(tok))
    (Gemma3ForConditionalGeneration if isinstance(config, Gemma3Config) else Mistral3ForConditionalGeneration)(
        config
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_language_model_is_loaded_alone_with_the_checkpoints_weights(vlm, caplog):
    whole_class = {"gemma3": Gemma3ForConditionalGeneration, "mistral3": Mistral3ForConditionalGeneration}
    whole = whole_class[AutoConfig.from_pretrained(vlm).model_type].from_pretrained(vlm)
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        ours = build_model(ModelConfig(path=str(vlm)), 0, "eager", torch.float32)
    assert (
        type(ours).__name__
        == {"gemma3": "Gemma3ForCausalLM", "mistral3": "MistralForCausalLM"}[whole.config.model_type]
    )
    assert f"is a vision-language model ({type(whole).__name__})" in caplog.text
    assert "not used by" not in caplog.text  # the vision tower's tensors are said once, as not loaded
    ids = torch.randint(0, 250, (2, 24))  # longer than Gemma 3's sliding window here
    torch.testing.assert_close(ours(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_one_whose_language_model_has_no_causal_lm_class_is_refused_in_one_line(tmp_path):
    Qwen2_5_VLConfig(architectures=["Qwen2_5_VLForConditionalGeneration"]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(path=str(tmp_path)), 0, "eager", torch.float32)
    assert str(e.value) == (
        f"--model {tmp_path} is a vision-language model (Qwen2_5_VLForConditionalGeneration) whose language model "
        "transformers has no causal-LM class for, so fasttune cannot train it alone; fine-tune it with its own code "
        "(TRL), or pass a text model"
    )


@pytest.mark.parametrize("lora", [{}, {"enabled": True}], ids=["sft", "lora"])
def test_what_it_trains_loads_as_the_causal_lm_in_plain_hf(vlm, tmp_path, lora):
    result = train_tiny(tmp_path, vlm, **lora)
    folder = result.run_dir / "merged" if lora else result.checkpoint
    trained = AutoModelForCausalLM.from_pretrained(folder)
    assert type(trained).__name__.endswith("ForCausalLM")  # its own names: every weight loaded (no random init)
    start = build_model(ModelConfig(path=str(vlm)), 0, "eager", torch.float32).state_dict()
    weights = trained.state_dict()
    assert weights.keys() == start.keys()
    changed = [k for k in weights if not torch.equal(weights[k], start[k])]
    assert changed and all(("proj" in k) for k in changed) if lora else changed
    assert not any("vision" in k for k in weights)


def test_generate_skips_a_prompt_longer_than_its_language_models_context(vlm, tmp_path, capsys):
    """A vision-language checkpoint's context is its text_config's (512 here; the whole config names none): a prompt
    of a --prompts file longer than it is skipped as for a text model, the others answered (it stopped the file in a
    line naming no prompt, the model's config read as having no context)."""
    import json

    from fasttune.cli import main

    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello there"}) + "\n" + json.dumps({"prompt": "word " * 700}) + "\n")
    assert main(["generate", "--checkpoint", str(vlm), "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "2"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["completion"] is not None and rows[1]["completion"] is None
    assert rows[1]["skipped"].startswith("longer than the model's context of 512 tokens")
    assert f"(the first: {prompts} line 2, " in capsys.readouterr().err
