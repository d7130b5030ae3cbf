"""The prompt format a run trains with, recorded in its tokenizer as a chat template (generate/template.py): generate
renders the prompt tokens training saw (BOS exactly where training put it); chat data keeps the model's own
template, plain text is continued raw. Reference: the training samples' own prompt tokens and plain HF
apply_chat_template."""

import pytest
from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer
from transformers import AutoTokenizer

from fasttune.data.packing import IGNORE as IGNORE_INDEX
from fasttune.data.sft import tokenize_records
from fasttune.generate.template import prompt_format, prompt_ids, record_prompt_format

RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "How many clips did Natalia sell?", "input": "", "output": "72"},
]


@pytest.mark.parametrize("bos", ["added", "never added", "none"])
@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion"])
def test_recorded_format_renders_the_trained_prompt_tokens(fmt, bos):
    """fasttune (prompt_ids) and plain HF (apply_chat_template, which tokenizes without adding special tokens) give
    the ids training saw before the response: BOS first exactly when training put it (Llama-like tokenizers, which add
    it), never twice, none for GPT-2-like (a bos_token never added) or none at all. HF's dropped the BOS."""
    from fasttune.generate.template import TEMPLATES

    tok = build_tiny_tokenizer(chat_template=None, bos="<s>" if bos == "added" else None)
    if bos == "never added":
        tok.bos_token = "<|endoftext|>"
    records = RECORDS if fmt == "alpaca" else [{"prompt": "2 + 3 =", "completion": " 5"}]
    samples = tokenize_records(records, fmt, tok)
    record_prompt_format(tok, fmt)
    assert prompt_format(tok) == fmt
    for record, sample in zip(records, samples, strict=True):
        first_trained = next(i for i, t in enumerate(sample["labels"]) if t != IGNORE_INDEX)
        message = {"role": "user", "content": record.get("instruction", record.get("prompt"))}
        if record.get("input"):
            message["input"] = record["input"]
        want = sample["input_ids"][:first_trained]
        assert want.count(tok.bos_token_id) == (bos == "added") and (want[0] == tok.bos_token_id) == (bos == "added")
        assert prompt_ids(tok, [message]) == want
        assert tok.apply_chat_template([message], add_generation_prompt=True)["input_ids"] == want
    tok.chat_template = TEMPLATES[fmt]  # a checkpoint recorded before the template rendered BOS: generate adds it
    assert prompt_ids(tok, [message]) == want


def test_resuming_a_run_recorded_before_the_template_rendered_bos_does_not_say_it_replaces_the_template(caplog):
    """--resume of an Alpaca run whose checkpoints carry the format without BOS (an earlier fasttune) updates it to
    render BOS, quietly: "the tokenizer's chat template becomes the alpaca prompt format" was said as if a base model's
    own template were replaced. A model's own template still gets that line."""
    from fasttune.generate.template import TEMPLATES, recorded_template

    caplog.set_level("INFO", logger="fasttune")
    for template, said in ((TEMPLATES["alpaca"], False), (CHATML, True)):
        caplog.clear()
        tok = build_tiny_tokenizer(chat_template=template, bos="<s>")
        record_prompt_format(tok, "alpaca")
        assert tok.chat_template == recorded_template(tok, "alpaca") and "bos_token" in tok.chat_template
        assert ("chat template becomes the alpaca prompt format" in caplog.text) == said, template


def test_chat_data_keeps_the_models_template(tmp_path):
    tok = build_tiny_tokenizer(chat_template=CHATML)
    record_prompt_format(tok, "chat")
    assert tok.chat_template == CHATML and prompt_format(tok) == "chat"
    messages = [{"role": "user", "content": "Hello"}]
    sample = tokenize_records([{"messages": [*messages, {"role": "assistant", "content": "Hi"}]}], "chat", tok)[0]
    first_trained = next(i for i, t in enumerate(sample["labels"]) if t != IGNORE_INDEX)
    assert prompt_ids(tok, messages) == sample["input_ids"][:first_trained]


def test_a_plain_text_run_generates_raw_even_if_its_tokenizer_has_a_template(tmp_path):
    tok = build_tiny_tokenizer(chat_template=CHATML)
    record_prompt_format(tok, "text")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert prompt_format(loaded) == "raw"
    assert prompt_ids(loaded, [{"role": "user", "content": "def f"}]) == loaded("def f")["input_ids"]


def test_recording_skips_what_is_not_an_hf_tokenizer():
    class Plain:  # e.g. a benchmark's synthetic-token stand-in
        pad_token_id = 0

    record_prompt_format(Plain(), "text")
    record_prompt_format(Plain(), "alpaca")


def test_an_alpaca_records_input_on_a_chat_model_follows_its_instruction_on_the_next_line():
    """A prompt record with instruction and input, for a model with a chat template: one user message, the two
    joined by one newline (LLaMA-Factory's Alpaca converter, Axolotl's alpaca_chat), not the blank line it had."""
    from fasttune.generate.prompts import record_messages

    tok = build_tiny_tokenizer(chat_template=CHATML)
    record_prompt_format(tok, "chat")
    messages = record_messages({"instruction": "Add the numbers.", "input": "2 and 3"}, prompt_format(tok))
    assert tok.decode(prompt_ids(tok, messages)) == (
        "<|im_start|>user\nAdd the numbers.\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
    )
    alone = record_messages({"instruction": "Add the numbers.", "input": ""}, prompt_format(tok))
    assert tok.decode(prompt_ids(tok, alone)) == "<|im_start|>user\nAdd the numbers.<|im_end|>\n<|im_start|>assistant\n"
