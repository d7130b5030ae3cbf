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
    chat               the tokenizer's chat template (with the record's `tools`); each assistant turn is trained
                       from after its header (the add_generation_prompt text) through its end-of-turn marker;
                       nothing is appended. A
                       conversational prompt/completion record (read as chat, data/formats.py) trains its
                       completion's assistant turns only: those of its prompt are context.
Alpaca and prompt_completion never use the chat template, so the same data trains the same way on every model;
convert to chat format to train through a model's template. Supervised formats train the response (and EOS) only
unless train_on_prompt. A BOS id is prepended (never trained) when the tokenizer itself adds one, except for chat,
whose templates write their own. Labels are aligned with input_ids (unshifted, HF convention; -100 = no loss).
Nothing is truncated here: see `check_lengths`.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from fasttune.data.formats import FORMATS, PROMPT_TURNS, validate_record
from fasttune.data.packing import IGNORE
from fasttune.data.tokenizer import without_length_warning
from fasttune.errors import DataError

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_ENCODE_CHUNK = 1024  # records per batched tokenizer call: parallel in Rust, bounded memory
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

Span = tuple[int, int]


MASKING_RULES = 5
"""Version of the rules that turn records into trained labels, kept in every checkpoint: a change that trains other
tokens of the same data bumps it, so that --resume of an older run says why its data fingerprint differs. 2: records
and chat replies with an empty response are not trained; chat turns end at their end-of-turn token. 3: an Alpaca or
prompt/completion prompt that ends inside a token is tokenized apart from its response. 4: so is a chat turn whose
assistant header ends inside a token (a template's "ASSISTANT: " before "the": " the" was one untrained token)."""


def format_prompt(record: dict, fmt: str) -> str:
    """The prompt text of an alpaca or prompt_completion record, as trained: what generation should be fed."""
    if fmt == "alpaca":
        template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=record["instruction"], input=record.get("input") or "")
    if fmt == "prompt_completion":
        return record["prompt"]
    raise ValueError(f"format_prompt needs an alpaca or prompt_completion record, not {fmt!r}")


def tokenize_records(
    records: Sequence[dict], fmt: str, tokenizer, *, train_on_prompt: bool = False, source: str = "dataset"
) -> list[dict]:
    """Tokenize `records` of format `fmt` into [{"input_ids": [...], "labels": [...]}] (labels -100 where no loss).
    `source` names the dataset in error messages."""
    if fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    without_length_warning(tokenizer)
    for i, record in enumerate(records):
        validate_record(record, fmt, f"{source} record {i}")
    if fmt == "chat":
        return _tokenize_chat(records, tokenizer, train_on_prompt, source)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer has no eos_token, needed to end each {fmt} sample; set tokenizer.eos_token")
    rendered = [_render_plain(record, fmt, train_on_prompt) for record in records]
    samples = _encode(tokenizer, rendered, prompt_apart=True)
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


def _tokenize_chat(records: Sequence[dict], tokenizer, train_on_prompt: bool, source: str) -> list[dict]:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(
            f"{source} is chat data but the tokenizer has no chat template; use a model whose tokenizer_config.json "
            "has one, or convert the data to prompt/completion"
        )
    _check_roles(records, tokenizer, source)
    rendered: list[tuple[str, list[Span]]] = []
    direct: dict[int, dict] = {}  # samples tokenized by the template's own {% generation %} mask
    for i, record in enumerate(records):
        chat = Chat(tokenizer, record["messages"], _tools(record, f"{source} record {i}"), f"{source} record {i}")
        chat.check_tools()
        if train_on_prompt:
            text = chat.render(len(chat.messages), False)
            rendered.append((text, [(0, len(text))]))
            continue
        first = record.get(PROMPT_TURNS, 0)  # a conversational prompt/completion's prompt: not trained
        spans = _assistant_spans(chat, first)
        if spans is not None:
            rendered.append(spans)
        elif isinstance(template, str) and _GENERATION_TAG.search(template):
            direct[i] = _generation_mask_sample(chat, first)
            rendered.append(("", []))
        else:
            raise DataError(
                f"{chat.where}: the chat template renders a conversation differently from its own beginning, so the "
                "assistant turns cannot be located; use a template with {% generation %} tags or --data.train_on_prompt"
            )
    samples = _encode(tokenizer, rendered, prompt_apart=True)
    for i, sample in direct.items():
        samples[i] = sample
    return samples


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
    column of function schemas, which templates write into the system turn); `where` names it in errors."""

    tokenizer: object
    messages: list[dict]
    tools: list | None
    where: str

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
            return self.tokenizer.apply_chat_template(self.messages[:n], tools=self.tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)  # fmt: skip
        except Exception as e:  # jinja raises TemplateError/UndefinedError/its own raise_exception text
            raise DataError(f"{self.where}: the chat template rejected this conversation ({_one_line(e)})") from e


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _tools(record: dict, where: str) -> list | None:
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


def _assistant_spans(chat: Chat, first: int = 0) -> tuple[str, list[Span]] | None:
    """Render the conversation and, for each assistant turn from messages[first] on, the prefixes just before its
    content (with the generation prompt) and just after its end; their lengths are the turn's trained span. None when
    a prefix is not a prefix of the full rendering (templates that rewrite earlier turns, e.g. strip reasoning)."""
    full = chat.render(len(chat.messages), False)
    spans: list[Span] = []
    specials = _special_tokens(chat.tokenizer)
    for j, message in enumerate(chat.messages):
        if j < first or message["role"] != "assistant" or blank_message(message):
            continue
        # An assistant turn that opens the conversation has no prefix to render; train the whole turn.
        before = chat.render(j, True) if j else ""
        through = chat.render(j + 1, False)
        if not (full.startswith(before) and full.startswith(through)) or len(through) <= len(before):
            return None
        spans.append((len(before), _turn_end(through, len(before), specials)))
    return full, spans


def blank_message(message: dict) -> bool:
    """A message with blank content and nothing else (no tool calls, no reasoning): an assistant one trained would
    teach an instant end of turn."""
    content = message.get("content")
    return set(message) <= {"role", "content", "name"} and isinstance(content, str) and not content.strip()


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


def _generation_mask_sample(chat: Chat, first: int = 0) -> dict:
    """The template's own {% generation %} mask; assistant turns before messages[first] (a conversational
    prompt/completion's prompt) untrained: the tokens of the prompt rendered with the generation prompt, which must
    begin the conversation's."""
    tokenizer, messages, where = chat.tokenizer, chat.messages, chat.where
    try:
        out = tokenizer.apply_chat_template(
            messages, tools=chat.tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        prompt = None
        if any(m["role"] == "assistant" for m in messages[:first]):
            prompt = tokenizer.apply_chat_template(messages[:first], tools=chat.tools, tokenize=True, return_dict=True,
                                                   add_generation_prompt=True)["input_ids"]  # fmt: skip
    except Exception as e:
        raise DataError(f"{where}: the chat template rejected this conversation ({_one_line(e)})") from e
    ids = list(out["input_ids"])
    labels = [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"], strict=True)]
    if prompt is not None:
        if ids[: len(prompt)] != list(prompt):
            raise DataError(
                f"{where}: the chat template renders the conversation differently from its prompt alone, so the "
                "prompt's assistant turns cannot be told from the completion's; use a chat template that renders "
                "the beginning of a conversation as the whole conversation does, or --data.train-on-prompt"
            )
        labels[: len(prompt)] = [IGNORE] * len(prompt)
    return {"input_ids": ids, "labels": labels}


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
