"""Chat data fields beside role and content: Axolotl's per-message `training` / `weight` (which messages are trained)
and TRL's per-record `chat_template_kwargs` (template variables), and the {% generation %}-tag path's empty turns.
The reference for every mask is the template's own rendering of each prefix."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer
from helpers import save_base_model
from test_chat_templates import generate_case
from test_masking import COUNTING_TEMPLATE, trained_runs

from fasttune.data.formats import load_records
from fasttune.data.sft import tokenize_records
from fasttune.errors import DataError

Q1, A1 = {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hello"}
Q2, A2 = {"role": "user", "content": "The capital of France?"}, {"role": "assistant", "content": "Paris."}


def _jsonl(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _reference_runs(tok, messages: list[dict], trained: list[int]) -> list[str]:
    """Each trained message as the template renders it: the conversation through it, less the conversation before it
    (with the generation prompt for an assistant message, with the message's role header for another), its end of
    turn kept and the newline after it not."""
    runs = []
    for j in trained:
        through = tok.apply_chat_template(messages[: j + 1], tokenize=False)
        if messages[j]["role"] == "assistant":
            before = tok.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True)
        else:
            before = tok.apply_chat_template(messages[:j], tokenize=False) + f"<|im_start|>{messages[j]['role']}\n"
        assert through.startswith(before)
        runs.append(through[len(before) :].rstrip("\n"))
    return runs


def test_training_and_weight_decide_which_messages_are_trained(tmp_path):
    """Axolotl's `training` (message_field_training: training) and `weight` (ShareGPT's 0 / 1) were ignored: every
    assistant turn was trained, the ones the data marks as context too. An assistant message marked false / 0 is
    context, true / 1 trained; a user message marked true is trained as Axolotl trains it; a blank one never."""
    tok = build_tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, Q1, {**A1, "training": False}, {**Q2, "training": True},
                {**A2, "weight": 1}, {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You are welcome", "weight": 0.0}]  # fmt: skip
    records, fmt = load_records(_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]))
    (sample,) = tokenize_records(records, fmt, tok)
    plain = [{k: v for k, v in m.items() if k in ("role", "content")} for m in messages]
    assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(plain, tokenize=False)  # keys not rendered
    runs = ["The capital of France?<|im_end|>", "Paris.<|im_end|>"]
    assert trained_runs(tok, sample) == _reference_runs(tok, plain, [3, 4]) == runs
    # unmarked: every assistant turn, as before; marked by a null (a Parquet column's missing value): unmarked
    nulls = [{**m, "training": None, "weight": None} for m in plain]
    for unmarked in (plain, nulls):
        (sample,) = tokenize_records([{"messages": unmarked}], "chat", tok)
        assert trained_runs(tok, sample) == _reference_runs(tok, plain, [2, 4, 6])
    blank = [Q1, {"role": "assistant", "content": " ", "training": True}, Q2, A2]
    (sample,) = tokenize_records([{"messages": blank}], "chat", tok)
    assert trained_runs(tok, sample) == ["Paris.<|im_end|>"]


def test_training_flags_through_a_template_that_rewrites_earlier_turns():
    """A template that renders a conversation differently from its own beginning: with {% generation %} tags, an
    assistant message marked context is left out of the tagged spans; a user message marked trained (the tags mark
    assistant turns only) trains the conversation turn by turn where each turn renders as its prompt (Qwen3's
    shape), else it is refused by record."""
    from test_chat_templates import REASONED, REASONING

    tok = build_tiny_tokenizer(chat_template=COUNTING_TEMPLATE)
    (sample,) = tokenize_records([{"messages": [Q1, {**A1, "training": False}, Q2, A2]}], "chat", tok)
    assert trained_runs(tok, sample) == ["Paris.<|im_end|>"]
    tags = ("record 1: the chat template renders the conversation differently from its own beginning, and its "
            "{% generation %} tags cannot mark the turns trained: they mark assistant turns, and user message 2 is "
            "marked trained; drop its training/weight key")  # fmt: skip
    with pytest.raises(DataError, match=tags):
        tokenize_records([{"messages": [Q1, A1, {**Q2, "training": True}, A2]}], "chat", tok)
    tagged = REASONING.replace("{{ m['content'] }}<|im_end|>", "{% if m['role'] == 'assistant' %}{% generation %}"
                               "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>"
                               "{% endif %}")  # fmt: skip
    tok = build_tiny_tokenizer(chat_template=tagged)
    messages = [REASONED[0], REASONED[1], {**REASONED[2], "training": True}, REASONED[3]]
    samples = tokenize_records([{"messages": messages}], "chat", tok)
    assert [tok.decode(s["input_ids"]) for s in samples] == [
        tok.apply_chat_template(REASONED[: j + 1], tokenize=False) for j in (1, 2, 3)
    ]
    assert [trained_runs(tok, s) for s in samples] == [["<think>add</think>4<|im_end|>"], ["times 3?<|im_end|>"],
                                                       ["<think>x</think>12<|im_end|>"]]  # fmt: skip


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({**A1, "weight": 0.5}, r"line 1: messages\[1\]\.weight must be 0 \(context\) or 1 \(trained\), got float"),
        ({**A1, "weight": 2}, r"messages\[1\]\.weight must be 0 \(context\) or 1"),
        ({**A1, "weight": "1"}, r"messages\[1\]\.weight must be 0 \(context\) or 1 \(trained\), got str"),
        ({**A1, "training": "yes"}, r"messages\[1\]\.training must be true or false"),
        ({**A1, "training": True, "weight": 0}, r"messages\[1\] has training true and weight 0, which disagree"),
    ],
)
def test_a_bad_training_or_weight_is_refused_naming_the_record(tmp_path, message, error):
    with pytest.raises(DataError, match=error):
        load_records(_jsonl(tmp_path / "d.jsonl", [{"messages": [Q1, message]}]))


def test_a_conversational_prompt_message_marked_trained_is_refused(tmp_path):
    """TRL's prompt is context: a message in it marked trained would have been passed over in silence."""
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": [Q1, {**A1, "weight": 1}, Q2], "completion": [A2]}])
    with pytest.raises(DataError, match=r"d.jsonl line 1: prompt\[1\] is marked trained \(weight 1\), but a prompt"):
        load_records(path)


# Qwen3's shape: with enable_thinking false, an empty reasoning block after each assistant header
THINKING = CHATML.replace(
    "{{ m['content'] }}",
    "{% if m['role'] == 'assistant' and enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{{ m['content'] }}",
).replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}",
)


def test_a_records_chat_template_kwargs_reach_the_template_in_training_and_eval(tmp_path):
    """TRL's chat_template_kwargs ({"enable_thinking": false} for Qwen3) were dropped: the record trained as rendered
    without them. They reach the template in training and eval (its loss and --generate prompts); a null value (a
    Parquet column's) is dropped."""
    from fasttune.eval.run import _samples

    tok = build_tiny_tokenizer(chat_template=THINKING)
    kwargs = {"enable_thinking": False}
    records = [{"messages": [Q1, A1, Q2, A2], "chat_template_kwargs": {**kwargs, "other": None}}]
    (sample,) = tokenize_records(records, "chat", tok)
    assert tok.decode(sample["input_ids"]) == tok.apply_chat_template([Q1, A1, Q2, A2], tokenize=False, **kwargs)
    assert "<think>" in tok.decode(sample["input_ids"])
    assert trained_runs(tok, sample) == ["Hello<|im_end|>", "Paris.<|im_end|>"]
    start = next(i for i, t in enumerate(sample["labels"]) if t != -100)
    prompt = tok.apply_chat_template([Q1], tokenize=False, add_generation_prompt=True, **kwargs)
    assert sample["input_ids"][:start] == tok(prompt, add_special_tokens=False)["input_ids"]
    args = SimpleNamespace(
        data=(_jsonl(tmp_path / "e.jsonl", records),),
        format="auto",
        field=None,
        limit=None,
        max_length=None,
        overlong=None,
    )
    assert _samples(args, tok, 512)[0][0]["input_ids"] == sample["input_ids"]


def test_generate_sends_a_prompt_records_chat_template_kwargs(tmp_path, capsys, prompts_seen):
    """generate --prompts renders a record with its chat_template_kwargs, as training put the prompt before the reply;
    --raw, which has no template to give them to, is refused by line."""
    from fasttune.cli import main

    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    argv, prompt = generate_case(tmp_path, THINKING, {"messages": [Q1, A1], **kwargs}, kwargs)
    prompts = argv[4]
    assert main(argv) == 0 and prompts_seen == [prompt]
    assert main([*argv, "--raw"]) == 2
    assert f"{prompts} line 1 has 'chat_template_kwargs', and without a chat template" in capsys.readouterr().err
    plain = save_base_model(tmp_path / "plain", chat_template=CHATML)
    assert main([*argv[:2], str(plain), *argv[3:]]) == 2
    assert "line 1: chat_template_kwargs sets enable_thinking, which the chat template does not read" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ([1], "record 1: field 'chat_template_kwargs' must be an object of template variables with string names"),
        ({1: True}, "field 'chat_template_kwargs' must be an object of template variables"),
        ({"tools": []}, "record 1: chat_template_kwargs sets tools, which the chat template is given by fasttune"),
        ({"enable_thinking": False, "foo": 1}, "record 1: chat_template_kwargs sets foo, which the chat template does"),
    ],
)
def test_bad_chat_template_kwargs_are_refused_naming_the_record(kwargs, error):
    tok = build_tiny_tokenizer(chat_template=THINKING)
    with pytest.raises(DataError, match=error):
        tokenize_records([{"messages": [Q1, A1], "chat_template_kwargs": kwargs}], "chat", tok)


def test_chat_template_kwargs_on_data_no_chat_template_renders_are_refused():
    with pytest.raises(DataError, match="record 1: chat_template_kwargs are for chat data, and prompt_completion"):
        tokenize_records([{"prompt": "a", "completion": "b", "chat_template_kwargs": {"x": 1}}], "prompt_completion",
                         build_tiny_tokenizer())  # fmt: skip


# COUNTING_TEMPLATE (not prefix-stable, {% generation %} tags) with the tags around the content only, as a template
# that knows no tool calls renders them: an assistant tool call is an empty generation span
CONTENT_TAGGED = COUNTING_TEMPLATE.replace("{{ m['content'] }}<|im_end|>{% endgeneration %}",
                                           "{{ m['content'] }}{% endgeneration %}<|im_end|>")  # fmt: skip


def test_a_turn_the_generation_tags_mark_empty_is_refused():
    """The {% generation %} path lacked the empty-turn check the other path has: an assistant tool call the template
    drops was trained as an instant end of turn (or, tags around the content only, not at all, in silence). It is
    refused by record; a blank reply is left untrained, as on the other path."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}
    turns = [Q1, {"role": "assistant", "content": "", "tool_calls": [call]}, Q2, A2]
    for template in (COUNTING_TEMPLATE, CONTENT_TAGGED):
        tok = build_tiny_tokenizer(chat_template=template)
        with pytest.raises(DataError, match="d.jsonl record 1: the chat template renders assistant message 1 as an "
                           "empty turn, dropping its tool_calls"):  # fmt: skip
            tokenize_records([{"messages": turns}], "chat", tok, source="d.jsonl")
        (sample,) = tokenize_records([{"messages": [Q1, {"role": "assistant", "content": " "}, Q2, A2]}], "chat", tok)
        assert trained_runs(tok, sample) == ["Paris.<|im_end|>" if template == COUNTING_TEMPLATE else "Paris."]
