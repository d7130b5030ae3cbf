"""Loss masking: exactly the response tokens (plus EOS / end-of-turn) carry labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.tiny_tokenizer import build_tiny_tokenizer
from helpers import FIXTURES

from fasttune.data.formats import load_records
from fasttune.data.packing import IGNORE
from fasttune.data.sft import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    check_lengths,
    format_prompt,
    tokenize_records,
)
from fasttune.errors import DataError

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def trained_runs(tokenizer, sample: dict) -> list[str]:
    """Decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"], strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a trained label is the token itself (unshifted)"
            current.append(token)
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def test_alpaca_trains_exactly_the_response(tok):
    records, fmt = load_records(str(FIXTURES / "gsm8k_alpaca_20.json"))
    samples = tokenize_records(records, fmt, tok)
    assert len(samples) == 20
    for record, sample in zip(records, samples, strict=True):
        assert trained_runs(tok, sample) == [record["output"] + EOS]
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
        assert tok.decode(sample["input_ids"]) == prompt + record["output"] + EOS


def test_alpaca_with_input_uses_input_template(tok):
    records, fmt = load_records(str(FIXTURES / "alpaca.jsonl"))
    sample = tokenize_records(records[:1], fmt, tok)[0]
    expected_prompt = ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")
    assert format_prompt(records[0], fmt) == expected_prompt
    assert tok.decode(sample["input_ids"]) == expected_prompt + "5" + EOS
    assert trained_runs(tok, sample) == ["5" + EOS]


def test_train_on_prompt_trains_everything(tok):
    records, fmt = load_records(str(FIXTURES / "alpaca.jsonl"))
    for sample in tokenize_records(records, fmt, tok, train_on_prompt=True):
        assert sample["labels"] == sample["input_ids"]


def test_prompt_completion_concatenates_as_is(tok):
    records, fmt = load_records(str(FIXTURES / "prompt_completion.jsonl"))
    for record, sample in zip(records, tokenize_records(records, fmt, tok), strict=True):
        assert tok.decode(sample["input_ids"]) == record["prompt"] + record["completion"] + EOS
        assert trained_runs(tok, sample) == [record["completion"] + EOS]


def test_a_prompt_ending_inside_a_token_is_tokenized_as_generation_sends_it(tok):
    """The prompt "Natalia " + "sold clips" tokenizes whole as ..., "a", " sold", " clips": " sold" starts in the
    prompt, so the response's first token was never trained (a one-token answer after "A: " trained only EOS), and
    generation, which tokenizes the prompt alone (..., "a", " "), sent ids training never had. The prompt is now
    tokenized apart."""
    from fasttune.generate.template import prompt_ids, record_prompt_format

    record = {"prompt": "Natalia ", "completion": "sold clips"}
    assert " sold" in [tok.decode([t]) for t in tok(record["prompt"] + record["completion"])["input_ids"]]
    sample = tokenize_records([record], "prompt_completion", tok)[0]
    generation = build_tiny_tokenizer()
    record_prompt_format(generation, "prompt_completion")
    prompt = prompt_ids(generation, [{"role": "user", "content": record["prompt"]}])
    response = tok(record["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sample["input_ids"] == prompt + response and sample["labels"] == [IGNORE] * len(prompt) + response
    assert trained_runs(tok, sample) == ["sold clips" + EOS]


def test_a_chat_header_ending_inside_a_token_is_tokenized_as_generation_sends_it():
    """A template whose assistant header ends in a space ("ASSISTANT: ") before the reply "the answer is 4": whole,
    " the" starts in the header and was never trained, and generation (the rendered prompt alone, ..., ":", " ")
    sends ids training never had. The conversation is now tokenized with the header apart: the prompt's ids are
    generation's, and the reply is trained from its first token."""
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n{% else %}ASSISTANT: "
        "{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    )
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "the answer is 4"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert " the" in [tok.decode([t]) for t in tok(rendered, add_special_tokens=False)["input_ids"]]
    sample = tokenize_records([{"messages": messages}], "chat", tok)[0]
    prompt = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]  # fmt: skip
    assert sample["input_ids"][: len(prompt)] == prompt and set(sample["labels"][: len(prompt)]) == {IGNORE}
    assert trained_runs(tok, sample) == ["the answer is 4" + EOS]
    assert tok.decode(sample["input_ids"]) == rendered


def test_text_trains_all_and_ends_with_eos(tok):
    records, fmt = load_records(str(FIXTURES / "text.jsonl"))
    for record, sample in zip(records, tokenize_records(records, fmt, tok), strict=True):
        assert sample["labels"] == sample["input_ids"]
        assert sample["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(sample["input_ids"]) == record["text"] + EOS


def test_bos_is_prepended_untrained_when_the_tokenizer_adds_it():
    tok = build_tiny_tokenizer(bos="<s>")
    sample = tokenize_records([{"prompt": "Q:", "completion": " 4"}], "prompt_completion", tok)[0]
    assert sample["input_ids"][0] == tok.bos_token_id and sample["labels"][0] == IGNORE
    assert sample["input_ids"].count(tok.bos_token_id) == 1
    assert trained_runs(tok, sample) == [" 4" + EOS]


def test_chat_trains_each_assistant_turn(tok):
    records, fmt = load_records(str(FIXTURES / "chat.jsonl"))
    samples = tokenize_records(records, fmt, tok)
    for record, sample in zip(records, samples, strict=True):
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert trained_runs(tok, sample) == [reply + "<|im_end|>" for reply in replies]  # not the newline after it
        assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(record["messages"], tokenize=False)
    # the control tokens are single special tokens, not spelled out in bytes
    assert tok.convert_tokens_to_ids("<|im_start|>") in samples[0]["input_ids"]


def test_chat_train_on_prompt(tok):
    records, fmt = load_records(str(FIXTURES / "chat.jsonl"))
    for sample in tokenize_records(records, fmt, tok, train_on_prompt=True):
        assert sample["labels"] == sample["input_ids"]


def test_a_template_whose_turns_end_in_whitespace_alone_trains_it():
    """With no end-of-turn token (a Vicuna-style template), the whitespace after a reply is what ends the turn: it
    stays trained; after an end-of-turn token (ChatML) it is not (test above)."""
    vicuna = ("{% for m in messages %}{% if m['role'] == 'assistant' %}### Assistant: {% else %}### User: {% endif %}"
              "{{ m['content'] }}\n\n{% endfor %}{% if add_generation_prompt %}### Assistant: {% endif %}")  # fmt: skip
    tok = build_tiny_tokenizer(chat_template=vicuna)
    records, fmt = load_records(str(FIXTURES / "chat.jsonl"))
    for record, sample in zip(records, tokenize_records(records, fmt, tok), strict=True):
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert trained_runs(tok, sample) == [reply + "\n\n" for reply in replies]


# Not prefix-stable (the turn count at the top changes as the conversation grows), with {% generation %} tags.
COUNTING_TEMPLATE = (
    "{{ messages | length }} turns\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_unstable_template_falls_back_to_generation_mask():
    tok = build_tiny_tokenizer(chat_template=COUNTING_TEMPLATE)
    records, fmt = load_records(str(FIXTURES / "chat.jsonl"))
    for record, sample in zip(records, tokenize_records(records, fmt, tok), strict=True):
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert trained_runs(tok, sample) == [reply + "<|im_end|>" for reply in replies]


def test_unstable_template_without_generation_tags_is_a_data_error():
    tok = build_tiny_tokenizer(
        chat_template=COUNTING_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    records, fmt = load_records(str(FIXTURES / "chat.jsonl"))
    with pytest.raises(DataError, match=r"chat.jsonl record 1: the chat template renders the conversation before "
                       "assistant message 2 differently from the conversation through it"):  # fmt: skip
        tokenize_records(records, fmt, tok, source="chat.jsonl")
    assert tokenize_records(records, fmt, tok, train_on_prompt=True)  # needs no spans


def test_slow_tokenizer_path_gives_the_same_masks(tok):
    class Slow(type(tok)):
        @property
        def is_fast(self) -> bool:
            return False

    slow = build_tiny_tokenizer()
    slow.__class__ = Slow
    assert not slow.is_fast
    for name in ("gsm8k_alpaca_20.json", "chat.jsonl", "prompt_completion.jsonl"):
        records, fmt = load_records(str(FIXTURES / name))
        slow_samples = tokenize_records(records, fmt, slow)
        for record, fast, piecewise in zip(records, tokenize_records(records, fmt, tok), slow_samples, strict=True):
            assert trained_runs(tok, piecewise) == trained_runs(tok, fast), record


def test_check_lengths(tok):
    records, fmt = load_records(str(FIXTURES / "gsm8k_alpaca_20.json"))
    samples = tokenize_records(records, fmt, tok)
    lengths = sorted(len(s["input_ids"]) for s in samples)
    report = check_lengths(samples, lengths[10])
    assert report.samples == 20 and report.longest == lengths[-1]
    assert report.overlong == sum(n > lengths[10] for n in lengths)
    assert 0 <= report.no_loss_if_truncated <= report.overlong and "longer than max_length" in report.message()
    assert check_lengths(samples, 8).no_loss_if_truncated == 20  # 8 tokens hold only part of each prompt
    assert check_lengths(samples, lengths[-1]).message() is None


def test_records_with_an_empty_response_are_left_out_and_counted(tok):
    """An alpaca record with an empty (or blank) output, an empty completion or text would train only an instant
    EOS: it keeps no trained token, and the data step leaves it out and counts it."""
    from fasttune.data.pipeline import DataSummary, fit_length

    records = [{"instruction": "q1", "input": "", "output": "a1"}, {"instruction": "", "input": "", "output": ""},
               {"instruction": "q2", "input": "", "output": " \n"}]  # fmt: skip
    samples = tokenize_records(records, "alpaca", tok)
    assert [any(t != -100 for t in s["labels"]) for s in samples] == [True, False, False]
    summary = DataSummary("test", "alpaca")
    assert fit_length(samples, 512, "truncate", summary) == samples[:1] and summary.untrained == 2
    texts = tokenize_records([{"text": ""}, {"text": "x"}], "text", tok)
    completions = tokenize_records([{"prompt": "p", "completion": ""}], "prompt_completion", tok)
    assert [any(t != -100 for t in s["labels"]) for s in texts + completions] == [False, True, False]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "Paris."}]  # fmt: skip
    (sample,) = tokenize_records([{"messages": chat}], "chat", tok)
    assert trained_runs(tok, sample) == ["Paris.<|im_end|>"]  # the blank reply is not trained
    # with --data.train-on-prompt the prompt is training text: kept, but for a record with neither instruction nor
    # input, whose prompt is the template alone (left out since masking rules 8: tests/test_empty_prompts.py)
    trained = tokenize_records(records, "alpaca", tok, train_on_prompt=True)
    assert [s["labels"] == s["input_ids"] for s in trained] == [True, False, True]
    assert set(trained[1]["labels"]) == {-100}


def test_texts_longer_than_the_tokenizers_limit_raise_no_indexing_warning(tok):
    """A checkpoint's tokenizer carries the model's context; fasttune cuts samples itself (data.overlong), so
    transformers' 'will result in indexing errors' warning is not shown when records are longer."""
    import logging

    from transformers.utils import logging as hf_logging

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = hf_logging.get_logger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    limit, tok.model_max_length = tok.model_max_length, 16
    try:
        long = tokenize_records([{"text": "hello world " * 40}], "text", tok)
    finally:
        logger.removeHandler(handler)
        tok.model_max_length = limit
    assert len(long[0]["input_ids"]) > 16 and not [r for r in seen if "indexing errors" in r.getMessage()]


def test_chat_data_through_a_recorded_alpaca_format_refuses_a_message_it_would_drop():
    """A fasttune checkpoint of an Alpaca run carries that format as its chat template: user/assistant chats train
    through it (as the Alpaca run's prompts), a system message, which it would drop silently, is refused by record."""
    from fasttune.generate.template import record_prompt_format

    tokenizer = build_tiny_tokenizer()
    record_prompt_format(tokenizer, "alpaca")
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    (sample,) = tokenize_records([{"messages": turns}], "chat", tokenizer)
    assert trained_runs(tokenizer, sample) == ["4" + EOS]
    with pytest.raises(DataError, match="record 2 has a 'system' message.*alpaca prompt format"):
        tokenize_records([{"messages": turns}, {"messages": [{"role": "system", "content": "Be brief."}, *turns]}],
                         "chat", tokenizer)  # fmt: skip
    blank = [{"role": "system", "content": " "}, *turns]  # a blank system message drops nothing: trained as without
    assert tokenize_records([{"messages": blank}], "chat", tokenizer) == [sample]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    with pytest.raises(DataError, match="record 1 has an assistant message with tool_calls"):
        tokenize_records([{"messages": [turns[0], {"role": "assistant", "content": "", "tool_calls": [call]}]}],
                         "chat", tokenizer)  # fmt: skip


def _jsonl(path: Path, records: list[dict]) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_conversational_prompt_completion_trains_the_completions_assistant_turns_as_chat(tok, tmp_path):
    """TRL's conversational prompt/completion ({"prompt": [messages], "completion": [messages]}) is read as chat data,
    {"messages": prompt + completion}: the same tokens as that messages record, trained on the completion's assistant
    turns only; an assistant turn inside the prompt (an earlier exchange) is context, as in TRL."""
    system = {"role": "system", "content": "You are terse."}
    q1, a1 = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    q2, a2 = {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}
    conversational = [
        {"prompt": [system, q1], "completion": [a1], "id": 1},
        {"prompt": [q1, a1, q2], "completion": [a2]},
    ]
    records, fmt = load_records(_jsonl(tmp_path / "trl.jsonl", conversational))
    assert fmt == "chat" and [r["messages"] for r in records] == [[system, q1, a1], [q1, a1, q2, a2]]
    assert records[0]["id"] == 1  # the record's other fields are kept
    ours = tokenize_records(records, fmt, tok)
    chat = tokenize_records([{"messages": r["messages"]} for r in records], "chat", tok)
    assert ours[0] == chat[0] and trained_runs(tok, ours[0]) == ["4<|im_end|>"]  # exactly the messages record's
    assert ours[1]["input_ids"] == chat[1]["input_ids"]
    assert trained_runs(tok, chat[1]) == ["4<|im_end|>", "12<|im_end|>"]  # a messages record trains every reply,
    assert trained_runs(tok, ours[1]) == ["12<|im_end|>"]  # the conversational one its completion's only
    everything = tokenize_records(records, fmt, tok, train_on_prompt=True)
    assert all(s["labels"] == s["input_ids"] for s in everything)
    # a template that rewrites earlier turns, with {% generation %} tags: its tagged spans, the prompt's untrained
    # (each block is its assistant message's, so the prompt need not render as the conversation's beginning)
    counting = build_tiny_tokenizer(chat_template=COUNTING_TEMPLATE)
    tagged = tokenize_records(records, fmt, counting)
    assert [trained_runs(counting, s) for s in tagged] == [["4<|im_end|>"], ["12<|im_end|>"]]
    assert counting.decode(tagged[1]["input_ids"]) == counting.apply_chat_template(records[1]["messages"],
                                                                                   tokenize=False)  # fmt: skip


def test_sharegpt_trains_the_tokens_of_the_messages_record_it_converts_to(tok, tmp_path):
    """ShareGPT records (conversations of from/value turns) train exactly what the equivalent messages records train:
    the same ids, each gpt reply through its end-of-turn token, a turn's `weight: 0` kept (that reply is context)."""
    shared = [
        {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4", "weight": 0},
                           {"from": "human", "value": "times 3?"}, {"from": "gpt", "value": "12"}]},
    ]  # fmt: skip
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"messages": [{"role": roles[t.pop("from")], "content": t.pop("value"), **t}
                              for t in [dict(t) for t in r["conversations"]]]} for r in shared]  # fmt: skip
    records, fmt = load_records(_jsonl(tmp_path / "sharegpt.jsonl", shared))
    assert fmt == "chat" and records == messages
    ours = tokenize_records(records, fmt, tok)
    assert ours == tokenize_records(messages, "chat", tok)
    assert [trained_runs(tok, s) for s in ours] == [["4<|im_end|>"], ["12<|im_end|>"]]
