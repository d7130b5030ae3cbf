"""The prompt format a run trained with, recorded in its checkpoints and applied again at generation.

Chat data trains through the tokenizer's own chat template, which the checkpoint keeps. Alpaca and prompt/completion
data do not use a chat template (data/sft.py renders them), so training records their format *as* the tokenizer's
chat template (`record_prompt_format`, called once the data is tokenized): every checkpoint's tokenizer then renders
`[{"role": "user", "content": ...}]` exactly as the run's prompts were rendered, for fasttune (`generate`, `chat`)
and for plain HF users alike: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives the token
ids training saw for the prompt, BOS first where the tokenizer adds one (the template renders `bos_token` then, as
Llama's own templates do; as text, tokenize=False, it is tokenized with add_special_tokens=False, as any chat
template's). A Jinja comment in the template names the format; tokenizer_config.json also names it
(`fasttune_prompt_format`), so a plain-text run's checkpoints generate raw continuations.

A base model's chat template is replaced in the checkpoints of an Alpaca or prompt/completion run (logged): the
fine-tuned model answers the format it was trained on, not the base's.
"""

from __future__ import annotations

import logging
import re

from fasttune.errors import DataError, FasttuneError, one_line

log = logging.getLogger("fasttune")

_MARKER = re.compile(r"fasttune prompt format: (\w+)")
FORMAT_KEY = "fasttune_prompt_format"

# Alpaca as data/sft.py renders it (ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT + output + EOS); a user message's optional
# "input" key fills the Input section. System messages are not part of the format: the template skips them, and
# check_roles refuses one that is not blank before it gets there (training and generation alike).
ALPACA_TEMPLATE = (
    "{#- fasttune prompt format: alpaca -#}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}\n"
    "{%- if message.get('input') -%}{{- '### Input:\\n' + message['input'] + '\\n\\n' -}}{%- endif -%}\n"
    "{{- '### Response:\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- message['content'] + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}"
)
# prompt + completion + EOS, concatenated as-is (no scaffolding), as data/sft.py trains them.
PROMPT_COMPLETION_TEMPLATE = (
    "{#- fasttune prompt format: prompt_completion -#}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}{{- message['content'] -}}\n"
    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}"
)
TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "prompt_completion": PROMPT_COMPLETION_TEMPLATE}
_BOS_FIRST = "{{- bos_token -}}\n"


def recorded_template(tokenizer, fmt: str) -> str | None:
    """The chat template that renders the `fmt` prompts as training tokenized them: BOS first exactly where training
    put it (data/sft.py: where the tokenizer adds one itself), so that apply_chat_template(tokenize=True) gives the
    training ids; None for formats without one (chat: the model's own; text)."""
    from fasttune.data.sft import bos_prefix

    template = TEMPLATES.get(fmt)
    if template is None or not bos_prefix(tokenizer):
        return template
    comment, rest = template.split("\n", 1)  # the format's name stays the first line
    return f"{comment}\n{_BOS_FIRST}{rest}"


def record_prompt_format(tokenizer, fmt: str) -> None:
    """Training hook: make `tokenizer` (saved into every checkpoint) carry the data format `fmt` it was trained on."""
    # the name too (tokenizer_config.json keeps init kwargs): a plain-text run must not answer through a chat template
    # its tokenizer happens to have (the locally trained tokenizer ships a minimal one)
    if not isinstance(getattr(tokenizer, "init_kwargs", None), dict):
        return  # not an HF tokenizer (a benchmark's stand-in): nothing to record in
    tokenizer.init_kwargs[FORMAT_KEY] = fmt
    template = recorded_template(tokenizer, fmt)
    if template is None or getattr(tokenizer, "chat_template", None) == template:
        return  # chat: the tokenizer's template is the format already; text: no prompt format
    if tokenizer.chat_template and prompt_format(tokenizer) != fmt:  # not a checkpoint of this format (before BOS)
        log.info("checkpoints: the tokenizer's chat template becomes the %s prompt format this run trains on", fmt)
    tokenizer.chat_template = template


def check_roles(messages: list[dict], fmt: str, where: str, fix: str) -> None:
    """Refuse what the alpaca / prompt_completion format would drop silently when it renders `messages` (its template
    renders user and assistant turns only): a system message that is not blank, another role, tool calls. The one
    check for training on chat data through such a checkpoint (data/sft.py) and for generate / chat with it; `where`
    names the record (or option), `fix` says what to do. Other formats: nothing to check."""
    from fasttune.data.chat_render import blank_message

    if fmt not in TEMPLATES:
        return
    for m in messages:
        if m.get("role") == "system" and blank_message(m):
            continue  # a blank system message (common in exported chats): dropping it loses nothing
        what = f"a '{m.get('role')}' message" if m.get("role") not in ("user", "assistant") else None
        what = what or ("an assistant message with tool_calls" if m.get("tool_calls") else None)
        if what:
            raise DataError(
                f"{where} has {what}, which the tokenizer's chat template drops: it is the {fmt} prompt format a "
                f"fasttune run trained this model on (user and assistant turns only); {fix}"
            )


def prompt_format(tokenizer) -> str:
    """alpaca / prompt_completion (recorded by a fasttune run), chat (a model's own template), or raw (none, or a run
    that trained on plain text)."""
    recorded = getattr(tokenizer, "init_kwargs", {}).get(FORMAT_KEY)
    if recorded == "text":
        return "raw"
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return "raw" if not template else "chat"
    m = _MARKER.search(template)
    return m.group(1) if m else "chat"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>), which chat training teaches to end a reply; None when it writes none. Special: a registered special
    token or an added token marked special (Llama 3's <|eot_id|> is only the latter), as training reads them."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    try:
        convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        text = tokenizer.apply_chat_template(convo, tokenize=False)
        after = tokenizer(text[text.rindex("b") + 1 :], add_special_tokens=False)["input_ids"]
    except Exception:  # a template that rejects this probe
        return None
    from fasttune.data.chat_render import special_tokens  # what training ends an assistant turn at

    return after[0] if after and tokenizer.convert_ids_to_tokens(after[0]) in special_tokens(tokenizer) else None


def multi_turn(fmt: str) -> bool:
    """Alpaca and prompt/completion runs trained on single exchanges: each chat turn starts afresh."""
    return fmt == "chat"


def prompt_ids(
    tokenizer, messages: list[dict], raw: bool = False, tools: list | None = None, kwargs: dict | None = None
) -> list[int]:
    """Token ids the model sees for `messages` (the last one the user's): through the template the run trained with
    (given `tools`, function schemas, and `kwargs`, template variables, as training renders a record's), ending where
    the answer starts; raw (or no template): the last message's text as is, tokenized as a continuation."""
    from fasttune.data.chat_fields import template_messages

    fmt = "raw" if raw else prompt_format(tokenizer)
    if fmt == "raw":
        return list(tokenizer(messages[-1]["content"])["input_ids"])
    try:
        text = tokenizer.apply_chat_template(template_messages(messages), tools=tools, tokenize=False,
                                             add_generation_prompt=True, **(kwargs or {}))  # fmt: skip
    except Exception as e:  # jinja's TemplateError / UndefinedError / the template's own raise_exception
        raise FasttuneError(
            f"the model's chat template rejected the prompt ({one_line(e)}); pass --raw to send the text as is"
        ) from None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if fmt in TEMPLATES and "bos_token" not in tokenizer.chat_template:  # recorded before the template rendered BOS
        from fasttune.data.sft import bos_prefix  # training puts BOS in front exactly when the tokenizer adds one

        ids = bos_prefix(tokenizer) + ids
    return ids
