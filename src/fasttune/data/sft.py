"""Render records to text, tokenize them, and mask the loss to the response.

Each record becomes one string plus the character spans that are trained; the string is tokenized once and a token
is trained when it *starts* inside a trained span. Tokenizing the whole string (rather than prompt and response
apart) gives the same ids the model sees at generation time, and SentencePiece tokenizers do not get a spurious
word-start marker at the response. Tokenizers without offset mappings (slow ones) tokenize span by span instead, and
so do records whose prompt ends inside a token ("A: " + "5" is one token " 5"; a chat template's "ASSISTANT: " +
"the"): that token would be left untrained, and generation, which tokenizes the prompt alone, sends "A:", " " instead.

Rendering per format:
    text               the text + EOS; every token trained.
    alpaca             ALPACA_PROMPT (or ALPACA_PROMPT_NO_INPUT when input is empty) + output + EOS.
    prompt_completion  prompt + completion + EOS, concatenated as-is (no template, as in TRL).
    chat               the tokenizer's chat template (with the record's `tools` and `chat_template_kwargs`); each
                       assistant turn is trained from after its header (the add_generation_prompt text) through its
                       end-of-turn marker; nothing is appended. A message's training/weight key (data/chat_fields.py)
                       makes it context, or trains one of another role (its content through its end of turn). A
                       template that renders a conversation differently from its own beginning (Qwen3 drops earlier
                       turns' reasoning) trains it turn by turn: one sample per trained turn, the conversation through
                       it, as generation renders that turn's prompt (a template with {% generation %} tags: the whole
                       conversation, its tagged spans trained). A conversational prompt/completion record (read as
                       chat, data/formats.py) trains its completion's assistant turns only: those of its prompt are
                       context.
Alpaca and prompt_completion never use the chat template, so the same data trains the same way on every model;
convert to chat format to train through a model's template. Supervised formats train the response (and EOS) only
unless train_on_prompt. A BOS id is prepended (never trained) when the tokenizer itself adds one, except for chat,
whose templates write their own. Labels are aligned with input_ids (unshifted, HF convention; -100 = no loss).
Nothing is truncated here: see `check_lengths`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fasttune.data.chat_fields import TRAINING_KEYS, check_kwargs, message_flag, record_kwargs, template_messages
from fasttune.data.formats import FORMATS, PROMPT_TURNS, validate_record
from fasttune.data.longtext import encode_texts
from fasttune.data.packing import IGNORE
from fasttune.data.tokenizer import without_length_warning
from fasttune.errors import DataError

log = logging.getLogger("fasttune")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_ENCODE_CHUNK = 1024  # records per batched tokenizer call: parallel in Rust, bounded memory
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

Span = tuple[int, int]


MASKING_CHANGES = {
    2: "records and chat replies with an empty response are not trained, and chat turns end at their end-of-turn token",
    3: "an Alpaca or prompt/completion prompt that ends inside a token is tokenized apart from its response",
    4: "a chat turn whose assistant header ends inside a token is tokenized apart from its reply",
    5: "a chat record's tools are written into the conversation by the chat template (they were dropped)",
    6: "chat templates that write today's date (Llama 3.2/3.3, Granite, Mistral Small) write a fixed one",
    7: "a chat message's training/weight key decides whether it is trained, a record's chat_template_kwargs reach the "
    "template, and {% generation %} spans train the tokens that start in them (as other chat turns)",
}
"""What each version of the masking rules changed (see MASKING_RULES), for --resume of a run started before."""
MASKING_RULES = max(MASKING_CHANGES)
"""Version of the rules that turn records into trained labels, kept in every checkpoint: a change that trains other
tokens of the same data bumps it (a new MASKING_CHANGES entry), so that --resume of an older run says why its data
fingerprint differs."""


def masking_changes_since(version: int) -> str:
    """The changes of the masking rules after `version` (1: a checkpoint that recorded none), for messages."""
    return "; ".join(text for v, text in sorted(MASKING_CHANGES.items()) if v > version)


def format_prompt(record: dict, fmt: str) -> str:
    """The prompt text of an alpaca or prompt_completion record, as trained: what generation should be fed."""
    if fmt == "alpaca":
        template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=record["instruction"], input=record.get("input") or "")
    if fmt == "prompt_completion":
        return record["prompt"]
    raise ValueError(f"format_prompt needs an alpaca or prompt_completion record, not {fmt!r}")


def tokenize_records(
    records: Sequence[dict],
    fmt: str,
    tokenizer,
    *,
    train_on_prompt: bool = False,
    source: str = "dataset",
    notes: list[str] | None = None,
) -> list[dict]:
    """Tokenize `records` of format `fmt` into [{"input_ids": [...], "labels": [...]}] (labels -100 where no loss);
    a chat record whose template rewrites earlier turns gives one sample per assistant turn. `source` names the
    dataset in error messages; `notes` (else the log) gets a line on how many records were so split."""
    if fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    without_length_warning(tokenizer)
    for i, record in enumerate(records):
        validate_record(record, fmt, f"{source} record {i}")
    if fmt == "chat":
        return _tokenize_chat(records, tokenizer, train_on_prompt, source, notes)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer has no eos_token, needed to end each {fmt} sample; set tokenizer.eos_token")
    if fmt == "text" and getattr(tokenizer, "is_fast", False):  # all trained: no offsets, long texts in pieces
        samples = [{"input_ids": ids, "labels": list(ids)}
                   for ids in encode_texts(tokenizer, [r["text"] for r in records], source)]  # fmt: skip
    else:
        samples = _encode(tokenizer, [_render_plain(record, fmt, train_on_prompt) for record in records], True)
    bos = _bos_prefix(tokenizer)
    for record, sample in zip(records, samples, strict=True):
        ids, labels = sample["input_ids"], sample["labels"]
        if not ids or ids[-1] != eos:  # text that already ends in EOS keeps its own
            ids.append(eos)
            labels.append(eos)
        if not train_on_prompt and not _response(record, fmt).strip():  # nothing to learn but an instant EOS: left
            labels = [IGNORE] * len(labels)  # out (fit_length counts it as a sample with no trained token)
        sample["input_ids"], sample["labels"] = bos + ids, [IGNORE] * len(bos) + labels
    return samples


def _response(record: dict, fmt: str) -> str:
    return record["text"] if fmt == "text" else record["output"] if fmt == "alpaca" else record["completion"]


def _render_plain(record: dict, fmt: str, train_on_prompt: bool) -> tuple[str, list[Span]]:
    if fmt == "text":
        text = record["text"]
        return text, [(0, len(text))]
    prompt = format_prompt(record, fmt)
    text = prompt + _response(record, fmt)
    return text, [(0 if train_on_prompt else len(prompt), len(text))]


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when this tokenizer adds BOS on its own (Llama), [] when it does not (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


# ---- chat ----------------------------------------------------------------------------------------------------------


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


def _tokenize_chat(records: Sequence[dict], tokenizer, train_on_prompt: bool, source: str,
                   notes: list[str] | None) -> list[dict]:  # fmt: skip
    with fixed_date():
        return _tokenize_chat_records(records, tokenizer, train_on_prompt, source, notes)


def _tokenize_chat_records(records: Sequence[dict], tokenizer, train_on_prompt: bool, source: str,
                           notes: list[str] | None) -> list[dict]:  # fmt: skip
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(
            f"{source} is chat data but the tokenizer has no chat template; use a model whose tokenizer_config.json "
            "has one, or convert the data to prompt/completion"
        )
    _check_roles(records, tokenizer, source)
    tagged = isinstance(template, str) and bool(_GENERATION_TAG.search(template))
    rendered: list[tuple[str, list[Span]]] = []
    by_turn, specials = 0, _special_tokens(tokenizer)
    for i, record in enumerate(records):
        where = f"{source} record {i}"
        tools, kwargs = record_tools(record, where), record_kwargs(record, where)
        check_kwargs(tokenizer, kwargs, tools, where)
        chat = Chat(tokenizer, record["messages"], tools, where, specials, kwargs)
        chat.check_tools()
        if train_on_prompt:
            text = chat.render(len(chat.messages), False)
            rendered.append((text, [(0, len(text))]))
            continue
        first = record.get(PROMPT_TURNS, 0)  # a conversational prompt/completion's prompt: not trained
        texts, turn_by_turn = _chat_texts(chat, first, tagged)
        by_turn += turn_by_turn
        rendered.extend(texts)
    if by_turn:
        line = (f"  {by_turn} of {len(records)} conversations trained turn by turn (a sample per assistant turn, the "
                "conversation before it as context): the chat template renders them differently from their own "
                "beginning (e.g. it drops earlier turns' reasoning)")  # fmt: skip
        if notes is not None:
            notes.append(line)
        else:
            log.info("%s: %s", source, line.strip())
    return _encode(tokenizer, rendered, prompt_apart=True)


def _check_roles(records: Sequence[dict], tokenizer, source: str) -> None:
    """A checkpoint of a fasttune run on Alpaca or prompt/completion data carries that format as its chat template
    (generate/template.py), which renders user and assistant turns only: refuse a message it would drop."""
    from fasttune.generate.template import check_roles, prompt_format

    fmt = prompt_format(tokenizer)
    for i, record in enumerate(records):
        check_roles(record["messages"], fmt, f"{source} record {i}", "remove them from the data, or start from the "
                    "base model that run began with (its own chat template)")  # fmt: skip


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
    """The tokenizer's special tokens (_special_tokens), once per dataset: a Llama 3 tokenizer has ~256."""
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
            raise DataError(f"{self.where}: the chat template rejected this conversation ({_one_line(e)})") from e


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


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


def _chat_texts(chat: Chat, first: int, tagged: bool) -> tuple[list[tuple[str, list[Span]]], bool]:
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
    return chat.specials if chat.specials is not None else _special_tokens(chat.tokenizer)


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


def _special_tokens(tokenizer) -> tuple[str, ...]:
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
        raise DataError(f"{chat.where}: the chat template rejected this conversation ({_one_line(e)})") from e
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


# ---- tokenizing ----------------------------------------------------------------------------------------------------


def _encode(tokenizer, rendered: list[tuple[str, list[Span]]], prompt_apart: bool = False) -> list[dict]:
    """Tokenize each (text, trained spans) pair into input_ids and labels; `prompt_apart`: a text whose trained span
    starts inside a token is tokenized piece by piece, as generation tokenizes the prompt alone."""
    if not getattr(tokenizer, "is_fast", False):
        return [_encode_by_pieces(tokenizer, text, spans) for text, spans in rendered]
    samples: list[dict] = []
    for lo in range(0, len(rendered), _ENCODE_CHUNK):
        chunk = rendered[lo : lo + _ENCODE_CHUNK]
        enc = tokenizer([text for text, _ in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for (text, spans), ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
            starts = [start for start, _ in offsets]
            if prompt_apart and _starts_inside_a_token(offsets, starts, spans):
                samples.append(_encode_by_pieces(tokenizer, text, spans))
                continue
            ids = list(ids)
            samples.append({"input_ids": ids, "labels": _span_labels(ids, starts, spans)})
    return samples


def _starts_inside_a_token(offsets: list[tuple[int, int]], starts: list[int], spans: list[Span]) -> bool:
    """Whether a trained span starts inside a token (the token before it runs past the span's first character)."""
    for lo_char, _ in spans:
        i = bisect_left(starts, lo_char)
        if i > 0 and offsets[i - 1][1] > lo_char:
            return True
    return False


def _span_labels(ids: list[int], starts: list[int], spans: list[Span]) -> list[int]:
    """Labels for tokens with sorted start offsets `starts`: the token where it starts inside a span, else -100."""
    labels = [IGNORE] * len(ids)
    for lo_char, hi_char in spans:
        lo, hi = bisect_left(starts, lo_char), bisect_left(starts, hi_char)
        labels[lo:hi] = ids[lo:hi]
    return labels


def _encode_by_pieces(tokenizer, text: str, spans: list[Span]) -> dict:
    """Slow-tokenizer path: tokenize the text between span boundaries piece by piece."""
    cuts = sorted({0, len(text), *(b for span in spans for b in span)})
    ids: list[int] = []
    labels: list[int] = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        piece = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
        trained = any(s <= lo and hi <= e for s, e in spans)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))
    return {"input_ids": ids, "labels": labels}


# ---- lengths -------------------------------------------------------------------------------------------------------


@dataclass
class LengthReport:
    """How a tokenized dataset compares with the model's context, for the pipeline's overlong handling."""

    samples: int
    longest: int
    overlong: int
    """Samples longer than max_length."""
    no_loss_if_truncated: int
    """Samples whose trained tokens all lie beyond max_length: truncation would leave them nothing to learn."""
    max_length: int

    def message(self) -> str | None:
        """A one-line warning when anything is overlong, else None."""
        if not self.overlong:
            return None
        return (
            f"{self.overlong} of {self.samples} samples are longer than max_length={self.max_length} "
            f"(longest {self.longest} tokens); {self.no_loss_if_truncated} would keep no response if truncated"
        )


def check_lengths(samples: Sequence[dict], max_length: int) -> LengthReport:
    """Count samples longer than `max_length` and those truncation would leave without any trained token."""
    lengths = [len(s["input_ids"]) for s in samples]
    overlong = [s for s, n in zip(samples, lengths, strict=True) if n > max_length]
    lost = sum(all(t == IGNORE for t in s["labels"][:max_length]) for s in overlong)
    return LengthReport(len(samples), max(lengths, default=0), len(overlong), lost, max_length)
