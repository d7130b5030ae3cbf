"""Chat data through real-world template shapes: the record's tools, templates that drop what a turn holds, and
templates that render a conversation differently from its own beginning (Qwen3's reasoning, Mistral's system
prompt). The reference for every mask is the template's own rendering of each prefix."""

from __future__ import annotations

import json

import pytest
from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer
from helpers import save_base_model
from test_masking import trained_runs

from fasttune.data.sft import tokenize_records
from fasttune.errors import DataError

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
# ChatML that writes the tools into a system turn and an assistant's tool calls into its turn (Qwen2.5's shape)
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<call>{{ c['function'] | tojson }}</call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURNS = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
         {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}]  # fmt: skip


def test_a_records_tools_are_rendered_into_the_sample():
    """TRL's `tools` column (a list of function schemas, or that list as JSON) reaches the chat template: it was
    dropped, and the run trained tool calls to functions the model was never shown."""
    tok = build_tiny_tokenizer(chat_template=CHATML_TOOLS)
    for tools in (TOOLS, json.dumps(TOOLS)):
        (sample,) = tokenize_records([{"messages": TURNS, "tools": tools}], "chat", tok)
        assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(TURNS, tools=TOOLS, tokenize=False)
        assert '"name": "add", "parameters"' in tok.decode(sample["input_ids"])
        call = f"<call>{json.dumps(CALL['function'])}</call><|im_end|>"
        assert trained_runs(tok, sample) == [call, "It is 4.<|im_end|>"]


@pytest.mark.parametrize(
    ("tools", "error"),
    [("[oops", "record 1: field 'tools' is a string but not JSON"), (5, "field 'tools' must be a list of function")],
)
def test_tools_that_are_not_a_list_of_schemas_name_the_record(tools, error):
    tok = build_tiny_tokenizer(chat_template=CHATML_TOOLS)
    with pytest.raises(DataError, match=error):
        tokenize_records([{"messages": TURNS, "tools": tools}], "chat", tok)


def test_tools_a_template_does_not_render_are_refused():
    tok = build_tiny_tokenizer(chat_template=CHATML)
    with pytest.raises(DataError, match="record 1 has 'tools', but the chat template does not render them"):
        tokenize_records([{"messages": TURNS[-2:], "tools": TOOLS}], "chat", tok)


def test_a_turn_the_template_renders_empty_is_refused():
    """A template that knows no tool calls (Llama 3.0's, this ChatML) rendered an assistant tool call as an empty turn,
    trained as an instant end of turn."""
    tok = build_tiny_tokenizer(chat_template=CHATML)
    with pytest.raises(DataError, match="record 1: the chat template renders assistant message 1 as an empty turn, "
                       "dropping its tool_calls; use a chat template that renders them"):  # fmt: skip
        tokenize_records([{"messages": TURNS}], "chat", tok)


@pytest.mark.parametrize("call", [{"role": "assistant", "tool_calls": [CALL]},
                                  {"role": "assistant", "content": None, "tool_calls": [CALL]}])  # fmt: skip
def test_a_tool_call_without_content_trains_as_the_template_renders_it(call):
    """A tool call as HF's tool-use docs and OpenAI write it (no content, or null; Qwen2.5's template guards it) was
    refused: "messages[1].content must be a string, got null"."""
    tok = build_tiny_tokenizer(chat_template=CHATML_TOOLS.replace("{{ m['content'] }}", "{{ m['content'] or '' }}"))
    turns = [TURNS[0], call, *TURNS[2:]]
    (sample,) = tokenize_records([{"messages": turns, "tools": TOOLS}], "chat", tok)
    assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(turns, tools=TOOLS, tokenize=False)
    assert trained_runs(tok, sample) == [f"<call>{json.dumps(CALL['function'])}</call><|im_end|>", "It is 4.<|im_end|>"]
    with pytest.raises(DataError, match=r"record 1: messages\[1\].content must be a string, got null"):
        tokenize_records([{"messages": [TURNS[0], {"role": "assistant", "content": None}]}], "chat", tok)


# Qwen3's shape: an assistant turn after the last user message shows its reasoning, earlier ones do not, so the
# conversation through turn 1 is not the beginning of the whole conversation's rendering.
REASONING = (
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.index0 > ns.last %}"
    "<think>{{ m.get('reasoning_content', '') }}</think>{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REASONED = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add"},
    {"role": "user", "content": "times 3?"},
    {"role": "assistant", "content": "12", "reasoning_content": "x"},
]


def test_a_template_that_rewrites_earlier_turns_trains_each_turn_as_generation_renders_it(caplog):
    """A template that renders a conversation differently from its own beginning (Qwen3 drops earlier turns'
    reasoning) stopped every multi-turn record; each assistant turn is now its own sample: the conversation through
    it, trained on that turn, its prompt the very ids `generate` / `chat` send for it."""
    from fasttune.generate.template import prompt_ids

    tok = build_tiny_tokenizer(chat_template=REASONING)
    caplog.set_level("INFO", logger="fasttune")
    samples = tokenize_records([{"messages": REASONED}, {"messages": REASONED[:2]}], "chat", tok, source="c.jsonl")
    assert "c.jsonl: 1 of 2 conversations trained turn by turn" in caplog.text
    assert len(samples) == 3  # the two-turn record's two turns, and the one-turn record (already stable)
    for sample, j in zip(samples, (1, 3, 1), strict=True):
        assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(REASONED[: j + 1], tokenize=False)
        message = REASONED[j]
        assert trained_runs(tok, sample) == [f"<think>{message['reasoning_content']}</think>{message['content']}"
                                             "<|im_end|>"]  # fmt: skip
        start = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        assert prompt_ids(tok, REASONED[:j]) == sample["input_ids"][:start]
    # a conversational prompt/completion trains its completion's turns only
    (sample,) = tokenize_records([{"messages": REASONED, "_prompt_turns": 3}], "chat", tok)
    assert sample == samples[1]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_origins_give_each_samples_record_as_tokenizing_the_records_one_by_one_does(train_on_prompt):
    """`origins`: the record of each sample (several of a conversation trained turn by turn), for eval's numbering,
    which tokenized every record a second time on its own to count its samples."""
    tok = build_tiny_tokenizer(chat_template=REASONING)
    blank = {"role": "assistant", "content": " "}  # not trained
    conversations = (REASONED, REASONED[:2], REASONED, [REASONED[0], blank], [*REASONED[:3], blank])
    records = [{"messages": m} for m in conversations]
    origins: list[int] = []
    samples = tokenize_records(records, "chat", tok, train_on_prompt=train_on_prompt, notes=[], origins=origins)
    one_by_one = [(i, s) for i, r in enumerate(records)
                  for s in tokenize_records([r], "chat", tok, train_on_prompt=train_on_prompt, notes=[])]  # fmt: skip
    assert list(zip(origins, samples, strict=True)) == one_by_one
    assert origins == ([0, 1, 2, 3, 4] if train_on_prompt else [0, 0, 1, 2, 2, 3, 4])
    alpaca: list[int] = []
    tokenize_records([{"instruction": "a", "output": "b"}] * 2, "alpaca", tok, origins=alpaca)
    assert alpaca == [0, 1]


def generate_case(tmp_path, template: str, trained: dict, extra: dict) -> tuple[list[str], list[int]]:
    """`generate --prompts` of the first message of `trained` (with `extra`'s fields) on a model whose chat template is
    `template`: (argv, the prompt ids training puts before `trained`'s reply)."""
    model = save_base_model(tmp_path / "m", chat_template=template)
    tok = build_tiny_tokenizer(chat_template=template, bos="<s>")
    (sample,) = tokenize_records([trained], "chat", tok)
    prompt = sample["input_ids"][: next(i for i, t in enumerate(sample["labels"]) if t != -100)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": trained["messages"][:1], **extra}) + "\n")
    argv = ["generate", "--checkpoint", str(model), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
            "--max-new-tokens", "2", "--overwrite"]  # fmt: skip
    return argv, prompt


def test_generate_sends_a_prompt_records_tools_as_training_rendered_them(tmp_path, capsys, prompts_seen):
    """generate --prompts: a record's tools reach the chat template, so the prompt is the very ids training puts
    before that reply; --raw, which cannot send them, and a template that does not write them are refused by line."""
    from fasttune.cli import main

    argv, prompt = generate_case(tmp_path, CHATML_TOOLS, {"messages": TURNS[:2], "tools": TOOLS}, {"tools": TOOLS})
    prompts = argv[4]
    assert main(argv) == 0 and prompts_seen == [prompt]
    assert main([*argv, "--raw"]) == 2
    assert f"{prompts} line 1 has 'tools', and without a chat template" in capsys.readouterr().err
    plain = save_base_model(tmp_path / "plain", chat_template=CHATML)
    assert main([*argv[:2], str(plain), *argv[3:]]) == 2
    assert f"{prompts} line 1 has 'tools', but the chat template does not render them" in capsys.readouterr().err


def test_generation_stops_at_the_end_of_turn_token_chat_training_taught():
    """The end-of-turn token (here ChatML's <|im_end|>, like Llama 3's <|eot_id|> on a base model whose EOS is
    <|end_of_text|>) is often an added token marked special, not a registered special token: `generate` / `chat` did
    not stop at it, and the checkpoint's generation config (plain HF generate) did not name it."""
    from transformers import AutoModelForCausalLM

    from fasttune.generate.generate import stop_ids
    from fasttune.generate.template import record_prompt_format
    from fasttune.model.build import preset_config
    from fasttune.train.model_prep import align_special_tokens

    tok = build_tiny_tokenizer(chat_template=CHATML)
    (sample,) = tokenize_records([{"messages": TURNS[-2:]}], "chat", tok)
    turn_end = [t for t in sample["labels"] if t != -100][-1]  # the last trained token
    assert tok.convert_ids_to_tokens(turn_end) == "<|im_end|>" and turn_end not in tok.all_special_ids
    for fmt, stops in (("chat", [tok.eos_token_id, turn_end]), ("alpaca", [tok.eos_token_id])):
        tok = build_tiny_tokenizer(chat_template=CHATML)
        record_prompt_format(tok, fmt)
        model = AutoModelForCausalLM.from_config(preset_config("micro", len(tok)))
        model.generation_config.eos_token_id = tok.eos_token_id  # a pretrained model's own, the tokenizer's EOS
        align_special_tokens(model, tok, fresh=False)
        assert model.generation_config.eos_token_id == (stops if len(stops) > 1 else stops[0]), fmt
        assert stop_ids(model, tok) == sorted(stops), fmt


# Llama 3.2's system header: today's date through transformers' strftime_now
DATED = (
    "{% if strftime_now is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% else %}"
    "{% set date_string = '26 Jul 2024' %}{% endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
    + CHATML
)


def _today(monkeypatch, day: int):
    import datetime

    from transformers.utils import chat_template_utils

    class Today(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, day, tzinfo=tz)

    monkeypatch.setattr(chat_template_utils, "datetime", Today)


def test_a_template_that_writes_todays_date_tokenizes_the_same_data_the_same_on_every_day(monkeypatch):
    """Llama 3.2/3.3's template writes today's date: the same data gave other tokens the next day, so --resume
    refused the run as trained on other data. Training and eval data see a fixed date; generation the real one."""
    from fasttune.generate.template import prompt_ids

    tok = build_tiny_tokenizer(chat_template=DATED)
    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    days = []
    for day in (29, 30):
        _today(monkeypatch, day)
        days.append(tokenize_records([record], "chat", tok))
        assert f"Today Date: {day} Nov 2026" in tok.decode(prompt_ids(tok, record["messages"][:1]))  # the real date
    assert days[0] == days[1]
    assert "Today Date: 26 Jul 2024" in tok.decode(days[0][0]["input_ids"])
    assert trained_runs(tok, days[0][0]) == ["4<|im_end|>"]
