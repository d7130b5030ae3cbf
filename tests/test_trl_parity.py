"""TRL parity: fasttune trains the same tokens of the same records as TRL's SFTTrainer prepares them.

TRL's own dataset preparation (`SFTTrainer(...).train_dataset`: tokenized `input_ids` and the `labels` it builds from
`assistant_masks` / `completion_mask`) against fasttune's samples, with the tiny tokenizer and a ChatML template
carrying {% generation %} markers (TRL's assistant_only_loss needs them). Labels are compared from position 1: the
first label is never a target (the loss shifts), and TRL leaves a text sample's BOS as its own label where fasttune
writes -100. The differences fasttune keeps by choice (README, "Coming from HF Trainer or TRL") are asserted as such.
"""

from __future__ import annotations

import pytest
from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer

from fasttune.data.formats import load_records
from fasttune.data.packing import IGNORE
from fasttune.data.pipeline import DataSummary, fit_length
from fasttune.data.sft import tokenize_records

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # SFTConfig sets gradient_checkpointing
trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'trl>=1.0') to compare with its SFTTrainer")

# ChatML as the fixture writes it, the assistant's reply and end-of-turn token in a {% generation %} block (TRL's
# assistant_only_loss), the newlines around them outside: what fasttune trains of any template's assistant turn.
TAGGED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}{% else %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
# TAGGED with tools (Qwen2.5's layout, in the system turn), assistant tool calls (in the {% generation %} block) and
# `tool` results, and a `brief` variable for chat_template_kwargs.
TOOL_TEMPLATE = (
    "{% if brief %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}# Tools\n<tools>"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n{% elif messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>\n{{ {'name': c['function']['name'], 'arguments': "
    "c['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% elif m['role'] == 'tool' %}<|im_start|>tool\n{{ m['content'] }}<|im_end|>\n"
    "{% elif not (m['role'] == 'system' and loop.first) %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TOOL_CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
TOOL_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]  # fmt: skip
EOS = "<|endoftext|>"
CHATS = [
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "there"}]},
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "Paris."},
    ]},
]  # fmt: skip
PROMPT_COMPLETIONS = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "Add the numbers.\n", "completion": "5"},
    {"prompt": "Q", "completion": "5" + EOS},  # already ends in EOS: not doubled, by either
]
CONVERSATIONS = [  # TRL's conversational prompt/completion
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
     "completion": [{"role": "assistant", "content": "Paris."}]},
    {"prompt": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "there"},
                {"role": "user", "content": "how are you?"}],
     "completion": [{"role": "assistant", "content": "Paris."}]},
]  # fmt: skip


@pytest.fixture(scope="module", params=[None, "<s>"], ids=["no-bos", "bos"])
def tok(request):
    return build_tiny_tokenizer(chat_template=TAGGED, bos=request.param)


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(config)


def trl_prepared(tmp_path, model, tok, records: list[dict], **config) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each record as TRL's SFTTrainer prepares its train dataset."""
    from datasets import Dataset, disable_progress_bars
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                     **{"max_length": None, **config})  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok)
    return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]


def fasttune_prepared(tok, records: list[dict], fmt: str, max_length: int | None = None, **kw):
    """(input_ids, labels) of each sample fasttune trains (data.overlong truncate at `max_length`, when given)."""
    samples = tokenize_records(records, fmt, tok, **kw)
    if max_length is not None:
        samples = fit_length(samples, max_length, "truncate", DataSummary("x", fmt))
    return [(s["input_ids"], s["labels"]) for s in samples]


def targets(prepared):
    """Each sample's ids and its labels after the first (the targets the shifted loss reads)."""
    return [(ids, labels[1:]) for ids, labels in prepared]


def trained_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids[1:], labels[1:], strict=True) if label != IGNORE])


def test_tagged_template_renders_chatml(tok):
    """The template TRL masks with renders the conversations exactly as the fixture's ChatML."""
    for record in CHATS:
        assert tok.apply_chat_template(record["messages"], tokenize=False) == tok.apply_chat_template(
            record["messages"], tokenize=False, chat_template=CHATML
        )


def test_chat_matches_assistant_only_loss(tmp_path, model, tok):
    """messages (system prompt, multi-turn): each assistant reply through <|im_end|>, as TRL's assistant_only_loss."""
    ours = fasttune_prepared(tok, CHATS, "chat")
    assert targets(ours) == targets(trl_prepared(tmp_path, model, tok, CHATS, assistant_only_loss=True))
    assert trained_text(tok, *ours[1]) == "The capital of France is Paris.<|im_end|>Paris.<|im_end|>"


def test_chat_train_on_prompt_matches_trl_default(tmp_path, model, tok):
    """TRL's default (assistant_only_loss=False) trains the whole conversation: fasttune's --data.train-on-prompt."""
    theirs = trl_prepared(tmp_path, model, tok, CHATS)
    assert targets(fasttune_prepared(tok, CHATS, "chat", train_on_prompt=True)) == targets(theirs)
    assert targets(fasttune_prepared(tok, CHATS, "chat")) != targets(theirs)  # fasttune's default: replies only


def test_prompt_completion_matches_completion_only_loss(tmp_path, model, tok):
    """prompt/completion strings: the completion + EOS (appended once), BOS first when the tokenizer adds one."""
    ours = fasttune_prepared(tok, PROMPT_COMPLETIONS, "prompt_completion")
    assert targets(ours) == targets(trl_prepared(tmp_path, model, tok, PROMPT_COMPLETIONS))
    assert [trained_text(tok, *s) for s in ours] == [" Paris." + EOS, "5" + EOS, "5" + EOS]
    assert [ids[0] == tok.bos_token_id for ids, _ in ours] == [tok.bos_token is not None] * 3


def test_text_matches(tmp_path, model, tok):
    records = [{"text": "Hello there"}, {"text": "Paris." + EOS}]
    assert targets(fasttune_prepared(tok, records, "text")) == targets(trl_prepared(tmp_path, model, tok, records))


def test_conversational_prompt_completion(tmp_path, model, tok):
    """Lists of messages: the completion's assistant turns, as TRL with assistant_only_loss; TRL's completion_mask
    alone (its default) also trains the newline the template writes after <|im_end|>, which fasttune never trains."""
    ours = fasttune_prepared(tok, load_chat(tmp_path, CONVERSATIONS), "chat")
    assert targets(ours) == targets(trl_prepared(tmp_path, model, tok, CONVERSATIONS, assistant_only_loss=True))
    assert [trained_text(tok, *s) for s in ours] == ["Paris.<|im_end|>"] * 2
    theirs = trl_prepared(tmp_path, model, tok, CONVERSATIONS)
    assert [trained_text(tok, *s) for s in theirs] == ["Paris.<|im_end|>\n"] * 2
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]


def load_chat(tmp_path, records: list[dict]) -> list[dict]:
    """The records as fasttune reads them from a file (conversational prompt/completion becomes chat)."""
    import json

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, fmt = load_records(str(path))
    assert fmt == "chat"
    return loaded


@pytest.mark.parametrize("max_length", [20, 24])
def test_truncation_matches_keep_start(tmp_path, model, tok, max_length):
    """Over max_length: the start kept (TRL's truncation_mode keep_start, fasttune's data.overlong truncate: its
    default but for text, which it splits), and a sample whose prompt alone fills it left out by both."""
    records = [*PROMPT_COMPLETIONS, {"prompt": "Natalia sold clips to 48 of her friends in April", "completion": "5"}]
    ours = fasttune_prepared(tok, records, "prompt_completion", max_length=max_length)
    assert targets(ours) == targets(trl_prepared(tmp_path, model, tok, records, max_length=max_length))
    assert len(ours) == 3  # the long prompt's record: no completion token left
    chats = fasttune_prepared(tok, CHATS, "chat", max_length=max_length)
    assert targets(chats) == targets(trl_prepared(tmp_path, model, tok, CHATS, assistant_only_loss=True,
                                                  max_length=max_length))  # fmt: skip
    texts = [{"text": "Natalia sold clips to 48 of her friends in April"}, {"text": "Paris."}]
    assert targets(fasttune_prepared(tok, texts, "text", max_length=max_length)) == targets(
        trl_prepared(tmp_path, model, tok, texts, max_length=max_length)
    )


def test_differences_kept_by_choice(tmp_path, model, tok):
    """An empty completion: TRL trains its EOS alone, fasttune leaves the record out (an instant EOS teaches
    nothing). A prompt ending inside a token ("Hello " + "there": " there" is one token): TRL trains the merged token
    after a prompt cut short, fasttune tokenizes the prompt apart, as generation will feed it."""
    empty = [{"prompt": "Q", "completion": ""}]
    assert trained_text(tok, *trl_prepared(tmp_path, model, tok, empty)[0]) == EOS
    assert fasttune_prepared(tok, empty, "prompt_completion", max_length=64) == []
    merged = [{"prompt": "Hello ", "completion": "there"}]
    theirs_ids, _ = trl_prepared(tmp_path, model, tok, merged)[0]
    ours_ids, ours_labels = fasttune_prepared(tok, merged, "prompt_completion")[0]
    prompt = tok("Hello ")["input_ids"]
    assert ours_ids[: len(prompt)] == prompt and theirs_ids[: len(prompt)] != prompt
    assert trained_text(tok, ours_ids, ours_labels) == "there" + EOS


def test_trl_training_template_trains_the_newlines(tmp_path, model, tok):
    """A model whose template has no {% generation %} tags (Qwen2.5's): TRL's assistant_only_loss swaps in its own
    training template, whose blocks also hold the newline ending the assistant header and the one after <|im_end|>;
    fasttune trains the reply through <|im_end|> from the model's own template (the generation prompt ends in that
    first newline; generation stops at <|im_end|>). The same ids."""
    from pathlib import Path

    qwen = build_tiny_tokenizer(
        chat_template=(Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    )
    theirs = trl_prepared(tmp_path, model, qwen, CHATS[:1], assistant_only_loss=True)
    ours = fasttune_prepared(qwen, CHATS[:1], "chat")
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
    assert trained_text(qwen, *theirs[0]) == "\nthere<|im_end|>\n"
    assert trained_text(qwen, *ours[0]) == "there<|im_end|>"


@pytest.fixture(scope="module")
def tool_tok(tok):
    return build_tiny_tokenizer(chat_template=TOOL_TEMPLATE, bos=tok.bos_token)


def test_tools_and_tool_calls_match(tmp_path, model, tool_tok):
    """A `tools` list (and it as a JSON string, as TRL reads it), assistant `tool_calls` and `tool` results: the
    calls and the final reply trained, the tool result context, as TRL's assistant_only_loss; as messages and as a
    conversational prompt/completion. With --data.train-on-prompt every token, as TRL's default."""
    import json

    for tools in ([WEATHER], json.dumps([WEATHER])):  # apart: a datasets column holds lists or strings
        records = [{"tools": tools, "messages": TOOL_MESSAGES}]
        ours = fasttune_prepared(tool_tok, records, "chat")
        assert targets(ours) == targets(trl_prepared(tmp_path, model, tool_tok, records, assistant_only_loss=True))
        assert trained_text(tool_tok, *ours[0]) == TOOL_CALL + "Sunny.<|im_end|>"
        assert "# Tools" in tool_tok.decode(ours[0][0])
    everything = fasttune_prepared(tool_tok, records, "chat", train_on_prompt=True)  # TRL's default: every token
    assert targets(everything) == targets(trl_prepared(tmp_path, model, tool_tok, records))
    whole = ours
    split = [{"tools": [WEATHER], "prompt": TOOL_MESSAGES[:2], "completion": TOOL_MESSAGES[2:]}]
    ours = fasttune_prepared(tool_tok, load_chat(tmp_path, split), "chat")
    assert targets(ours) == targets(trl_prepared(tmp_path, model, tool_tok, split, assistant_only_loss=True))
    assert targets(ours) == targets(whole)


def test_chat_template_kwargs_and_final_user_turn_match(tmp_path, model, tool_tok):
    """A record's chat_template_kwargs reach the template, record by record, as TRL passes them; a conversation that
    ends with a user turn trains its assistant replies alone, as TRL."""
    pair = CHATS[0]["messages"]
    ending_user = [*pair, {"role": "user", "content": "how are you?"}]
    records = [{"messages": pair, "chat_template_kwargs": {"brief": True}},
               {"messages": ending_user, "chat_template_kwargs": {"brief": False}}]  # fmt: skip
    ours = fasttune_prepared(tool_tok, records, "chat")
    assert targets(ours) == targets(trl_prepared(tmp_path, model, tool_tok, records, assistant_only_loss=True))
    assert [tool_tok.decode(ids).startswith("<|im_start|>system\nBe brief.") for ids, _ in ours] == [True, False]
    assert [trained_text(tool_tok, *s) for s in ours] == ["there<|im_end|>"] * 2


def test_chat_differences_kept_by_choice(tmp_path, model, tool_tok):
    """A blank assistant reply: TRL's assistant_only_loss trains its <|im_end|> alone, fasttune never trains it (an
    instant end of turn teaches nothing). A conversational completion holding a tool result (or a system message):
    TRL's completion_mask (its default) trains it, which the model never generates; fasttune trains the completion's
    assistant turns alone. The same ids."""
    blank = [{"messages": [*CHATS[0]["messages"][:1], {"role": "assistant", "content": ""}, *CHATS[0]["messages"]]}]
    ours, theirs = fasttune_prepared(tool_tok, blank, "chat"), trl_prepared(tmp_path, model, tool_tok, blank,
                                                                           assistant_only_loss=True)  # fmt: skip
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
    assert (trained_text(tool_tok, *ours[0]), trained_text(tool_tok, *theirs[0])) == (
        "there<|im_end|>", "<|im_end|>there<|im_end|>")  # fmt: skip
    split = [{"tools": [WEATHER], "prompt": TOOL_MESSAGES[:2], "completion": TOOL_MESSAGES[2:]}]
    ours, theirs = fasttune_prepared(tool_tok, load_chat(tmp_path, split), "chat"), trl_prepared(
        tmp_path, model, tool_tok, split)  # fmt: skip
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
    assert trained_text(tool_tok, *ours[0]) == TOOL_CALL + "Sunny.<|im_end|>"
    assert trained_text(tool_tok, *theirs[0]) == TOOL_CALL + "\n<|im_start|>tool\nsunny<|im_end|>\n" + (
        "<|im_start|>assistant\nSunny.<|im_end|>\n")  # fmt: skip
    reply = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "there"}]
    system = [{"prompt": [{"role": "user", "content": "Hello"}], "completion": reply}]
    ours, theirs = fasttune_prepared(tool_tok, load_chat(tmp_path, system), "chat"), trl_prepared(
        tmp_path, model, tool_tok, system)  # fmt: skip
    assert trained_text(tool_tok, *ours[0]) == "there<|im_end|>"
    assert trained_text(tool_tok, *theirs[0]) == "system\nBe brief.<|im_end|>\n<|im_start|>assistant\nthere<|im_end|>\n"
