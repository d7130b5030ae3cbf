"""Chat data through the tokenizer's chat template: a conversation rendered (with the record's tools and
chat_template_kwargs, at FIXED_DATE), and the character spans of the turns it trains, for data/sft.py to tokenize.

A trained turn spans from the end of the text before it (for an assistant turn, the conversation before it with the
generation prompt) through its end-of-turn token. A template that renders a conversation differently from its own
beginning gives its {% generation %} spans where it has them, else one text per trained turn (`chat_texts`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from fasttune.data.chat_fields import TRAINING_KEYS, message_flag, template_messages
from fasttune.errors import DataError, one_line

Span = tuple[int, int]
"""A trained character span of a rendered text: [start, end)."""

FIXED_DATE = datetime.datetime(2024, 7, 26)
"""The date chat templates that write today's (transformers' strftime_now: Llama 3.2/3.3's "Today Date", Granite's,
Mistral Small's) see while training and eval data is rendered, so that the same data gives the same tokens on every
day: --resume compares them (a run resumed the next day was refused as trained on other data), and eval's loss
matches training's. 26 Jul 2024 is Llama 3.2's own template's date where strftime_now is missing. Generation renders
prompts with the real date, as transformers does."""


@contextlib.contextmanager
def fixed_date() -> Iterator[None]:
    """Chat templates rendered inside see FIXED_DATE as today: transformers' strftime_now reads the `datetime` class of
    its chat_template_utils module, replaced here for the duration (template kwargs cannot replace the function)."""
    from transformers.utils import chat_template_utils as templates

    real = getattr(templates, "datetime", None)
    if not (isinstance(real, type) and issubclass(real, datetime.datetime)):  # another transformers: left as it is
        yield
        return

    class Fixed(real):
        @classmethod
        def now(cls, tz=None):
            return cls.combine(FIXED_DATE.date(), FIXED_DATE.time(), tzinfo=tz)

    templates.datetime = Fixed
    try:
        yield
    finally:
        templates.datetime = real


@dataclass
class Chat:
    """One conversation of chat data, rendered through the tokenizer's chat template with the record's `tools` (TRL's
    column of function schemas, which templates write into the system turn) and `kwargs` (its chat_template_kwargs);
    `where` names it in errors."""

    tokenizer: object
    messages: list[dict]
    tools: list | None
    where: str
    specials: tuple[str, ...] | None = None
    """The tokenizer's special tokens (special_tokens), once per dataset: a Llama 3 tokenizer has ~256."""
    kwargs: dict | None = None

    def check_tools(self) -> None:
        """Refuse tools the template does not write (Llama 3.0's, Gemma's): the run would train tool calls to tools
        the model was never shown."""
        if self.tools and self.render(len(self.messages), False) == Chat(**{**vars(self), "tools": None}).render(
            len(self.messages), False
        ):
            raise DataError(f"{self.where} has 'tools', but the chat template does not render them (it knows no "
                            "tools); use a model whose chat template does, or drop the field")  # fmt: skip

    def render(self, n: int, add_generation_prompt: bool) -> str:
        """The first `n` messages as text."""
        try:
            return self.tokenizer.apply_chat_template(template_messages(self.messages[:n]), tools=self.tools,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **(self.kwargs or {}))  # fmt: skip
        except Exception as e:  # jinja raises TemplateError/UndefinedError/its own raise_exception text
            raise DataError(f"{self.where}: the chat template rejected this conversation ({one_line(e)})") from e


def record_tools(record: dict, where: str) -> list | None:
    """A record's `tools` (a list of function schemas, or that list as a JSON string, as TRL reads it), or None."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise DataError(f"{where}: field 'tools' is a string but not JSON ({e}); store the list of function "
                            "schemas itself, or as JSON") from None  # fmt: skip
    if tools is None or (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return tools or None
    raise DataError(f"{where}: field 'tools' must be a list of function schemas (objects), got "
                    f"{type(tools).__name__}; fix the record or drop the field")  # fmt: skip


def chat_texts(chat: Chat, first: int, tagged: bool) -> tuple[list[tuple[str, list[Span]]], bool]:
    """The text(s) to tokenize for a conversation and their trained spans: each trained message from messages[first]
    on (_trained) spans from the end of the text before it (_before) to its end-of-turn token. One text, the whole
    conversation, when every such prefix is a prefix of it; else the template rewrites earlier turns (Qwen3 drops
    their reasoning, Mistral moves the system prompt to the last user turn): the whole conversation with the spans of
    its {% generation %} tags where it has them (_generation_spans), else one text per turn, the conversation through
    it, as generation renders that turn's prompt (and True: trained turn by turn)."""
    throughs = [(j, chat.render(j + 1, False)) for j in _trained(chat, first)]
    turns = [(j, _before(chat, j, through), through) for j, through in throughs]
    full = chat.render(len(chat.messages), False)
    if all(full.startswith(before) and full.startswith(through) for _, before, through in turns):
        return [(full, [_turn_span(chat, j, before, through) for j, before, through in turns])], False
    found = _generation_spans(chat, first) if tagged else None
    if found is not None and not isinstance(found, str):
        return [found], False
    try:
        return [(through, [_turn_span(chat, j, before, through)]) for j, before, through in turns], True
    except DataError:
        if found is None:
            raise
        raise DataError(f"{chat.where}: the chat template renders the conversation differently from its own "
                        f"beginning, and its {{% generation %}} tags cannot mark the turns trained: {found}; or use "
                        "--data.train-on-prompt") from None  # fmt: skip


def _trained(chat: Chat, first: int) -> list[int]:
    """The messages trained from messages[first] on: those a training/weight key marks so, else the assistant ones;
    never a blank one (it would teach an instant end of turn)."""
    return [j for j, m in enumerate(chat.messages) if j >= first and not blank_message(m)
            and (m["role"] == "assistant" if (flag := message_flag(m)) is None else flag)]  # fmt: skip


def _before(chat: Chat, j: int, through: str) -> str:
    """The text before message j's trained part in `through`, the conversation through it: for an assistant message,
    the conversation before it with the generation prompt (its header); for another role's (trained by its training
    key), which no generation prompt heads, `through` up to its content: where it and the same conversation with
    other content in message j part (as Axolotl finds a turn)."""
    message = chat.messages[j]
    if message["role"] == "assistant":
        return chat.render(j, True) if j else ""
    other = "b" if message["content"].lstrip().startswith("a") else "a"
    stand_in = Chat(**{**vars(chat), "messages": [*chat.messages[:j], {**message, "content": other}]})
    return through[: len(os.path.commonprefix([through, stand_in.render(j + 1, False)]))]


def _turn_span(chat: Chat, j: int, before: str, through: str) -> Span:
    """Message j's trained span in `through`, the conversation rendered through it; `before`: the text before it
    (_before). A turn the template renders empty (it drops the message's tool calls, say) is refused: it would teach
    an instant end of turn."""
    # An assistant turn that opens the conversation has no prefix to render (before is ""): the whole turn is trained.
    role = chat.messages[j]["role"]
    if not through.startswith(before) or len(through) <= len(before):
        raise DataError(
            f"{chat.where}: the chat template renders the conversation before {role} message {j} differently from "
            "the conversation through it, so the turn cannot be located; use a template with {% generation %} tags "
            "or --data.train_on_prompt"
        )
    end = _turn_end(through, len(before), _specials(chat))
    if not _without(through[len(before) : end], _specials(chat)).strip():
        raise _empty_turn(chat, j)
    return len(before), end


def _specials(chat: Chat) -> tuple[str, ...]:
    return chat.specials if chat.specials is not None else special_tokens(chat.tokenizer)


def _empty_turn(chat: Chat, j: int) -> DataError:
    message = chat.messages[j]
    held = [k for k in message if k not in ("role", "name", *TRAINING_KEYS) and message[k]] or ["content"]
    return DataError(f"{chat.where}: the chat template renders {message['role']} message {j} as an empty turn, "
                     f"dropping its {', '.join(held)}; use a chat template that renders them, or remove the "
                     "message")  # fmt: skip


def _without(text: str, specials: tuple[str, ...]) -> str:
    for special in specials:
        text = text.replace(special, "")
    return text


def blank_message(message: dict) -> bool:
    """A message with blank content and nothing else (no tool calls, no reasoning; its training keys aside): an
    assistant one trained would teach an instant end of turn."""
    content = message.get("content")
    rest = {k for k, v in message.items() if v is not None and k not in TRAINING_KEYS}
    return rest <= {"role", "content", "name"} and isinstance(content, str) and not content.strip()


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens, those registered as such and added tokens marked special (a
    chat template's end-of-turn token is often only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {*getattr(tokenizer, "all_special_tokens", ()), *(t.content for t in added.values() if t.special)}
    return tuple(t for t in texts if t and t.strip())


def _turn_end(through: str, start: int, specials: tuple[str, ...]) -> int:
    """Where an assistant turn's trained span ends: at its end-of-turn token, not the whitespace a template puts
    after it (ChatML's "<|im_end|>\n"), as TRL's {% generation %} spans; a template whose turns end in whitespace
    alone (no end-of-turn token) keeps it: it is what tells the model the turn is over."""
    stripped = through.rstrip()
    return len(stripped) if len(stripped) > start and stripped.endswith(specials) else len(through)


def _generation_spans(chat: Chat, first: int) -> tuple[str, list[Span]] | str:
    """The whole conversation and, as trained spans, its {% generation %} blocks of the assistant messages trained
    (_trained: a conversational prompt's are context); a trained message whose block is empty is refused, as in
    _turn_span. Why not, and the fix (trained turn by turn instead), when the blocks are not one per assistant
    message, or a message of another role is trained: the blocks mark assistant turns only."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer, trained = chat.tokenizer, _trained(chat, first)
    messages = [{k: v for k, v in m.items() if v is not None} for m in template_messages(chat.messages)]
    try:  # apply_chat_template's rendering, which gives the blocks' characters only to its own token mask
        (text,), (blocks,) = render_jinja_template(
            conversations=[messages], tools=chat.tools, chat_template=tokenizer.get_chat_template(None, chat.tools),
            return_assistant_tokens_mask=True, **{**tokenizer.special_tokens_map, **(chat.kwargs or {})},
        )  # fmt: skip
    except Exception as e:  # jinja raises TemplateError/UndefinedError/its own raise_exception text
        raise DataError(f"{chat.where}: the chat template rejected this conversation ({one_line(e)})") from e
    assistants = [j for j, m in enumerate(chat.messages) if m["role"] == "assistant"]
    if other := [j for j in trained if chat.messages[j]["role"] != "assistant"]:
        return (f"they mark assistant turns, and {chat.messages[other[0]]['role']} message {other[0]} is marked "
                "trained; drop its training/weight key")  # fmt: skip
    if len(blocks) != len(assistants):
        return (f"it renders {len(blocks)} of them for {len(assistants)} assistant messages; use a template with one "
                "per assistant message")  # fmt: skip
    spans = {j: (lo, hi) for j, (lo, hi) in zip(assistants, blocks, strict=True) if j in trained}
    for j, (lo, hi) in spans.items():
        if not _without(text[lo:hi], _specials(chat)).strip():
            raise _empty_turn(chat, j)
    return text, list(spans.values())
