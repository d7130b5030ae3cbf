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
                       chat, data/records.py) trains its completion's assistant turns only: those of its prompt are
                       context. The chat rendering and its trained spans: data/chat_render.py.
Alpaca and prompt_completion never use the chat template, so the same data trains the same way on every model;
convert to chat format to train through a model's template. Supervised formats train the response (and EOS) only
unless train_on_prompt. A BOS id is prepended (never trained) when the tokenizer itself adds one, except for chat,
whose templates write their own. Labels are aligned with input_ids (unshifted, HF convention; -100 = no loss),
each trained token its own label: a sample (data/sample.py) keeps the ids and the trained spans, per batched
tokenizer call, so the whole data set is never held as Python lists. Nothing is truncated here: see `check_lengths`.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fasttune.data.chat_fields import check_kwargs, record_kwargs
from fasttune.data.chat_render import Chat, Span, chat_texts, fixed_date, record_tools, special_tokens
from fasttune.data.formats import FORMATS
from fasttune.data.longtext import encode_texts
from fasttune.data.records import PROMPT_TURNS, validate_record
from fasttune.data.sample import Sample
from fasttune.data.tokenizer import without_length_warning
from fasttune.errors import DataError

log = logging.getLogger("fasttune")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_ENCODE_CHUNK = 1024  # records per batched tokenizer call: parallel in Rust, bounded memory
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


MASKING_CHANGES = {
    2: "records and chat replies with an empty response are not trained, and chat turns end at their end-of-turn token",
    3: "an Alpaca or prompt/completion prompt that ends inside a token is tokenized apart from its response",
    4: "a chat turn whose assistant header ends inside a token is tokenized apart from its reply",
    5: "a chat record's tools are written into the conversation by the chat template (they were dropped)",
    6: "chat templates that write today's date (Llama 3.2/3.3, Granite, Mistral Small) write a fixed one",
    7: "a chat message's training/weight key decides whether it is trained, a record's chat_template_kwargs reach the "
    "template, and {% generation %} spans train the tokens that start in them (as other chat turns)",
    8: "an Alpaca record whose instruction and input are both empty (a prompt of the template alone) is not trained",
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
    origins: list[int] | None = None,
    names: Callable[[int], str] | None = None,
    run_data: bool = False,
) -> list[Sample]:
    """Tokenize `records` of format `fmt` into Samples (token ids and the spans trained: labels -100 elsewhere); a
    chat record whose template rewrites earlier turns gives one sample per assistant turn. `source` names the
    dataset in error messages, `names(i)` records[i] (default "{source} record {i + 1}", counted from 1 as a file's
    records are; a split's records are named by their place in the data read); `notes` (else the log) gets a line on
    how many records were so split; `origins`, when given, gets each sample's record: its position in `records`.
    `run_data`: the records are the data of the run whose checkpoint's tokenizer this is (a resume; eval of the run's
    split)."""
    if fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    without_length_warning(tokenizer)
    names = names or (lambda i: f"{source} record {i + 1}")
    for i, record in enumerate(records):
        validate_record(record, fmt, names(i))
    if fmt == "chat":
        _check_roles(records, tokenizer, names, run_data)
        return _tokenize_chat(records, tokenizer, train_on_prompt, source, notes, origins, names)
    if origins is not None:
        origins.extend(range(len(records)))  # a sample per record
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer has no eos_token, needed to end each {fmt} sample; set tokenizer.eos_token")
    if fmt == "text" and getattr(tokenizer, "is_fast", False):  # all trained: no offsets, long texts in pieces
        texts = [r["text"] for r in records]
        samples = [Sample(ids, [(0, len(ids))]) for ids in encode_texts(tokenizer, texts, source)]
    else:
        samples = _encode(tokenizer, [_render_plain(record, fmt, train_on_prompt) for record in records], True)
    bos = bos_prefix(tokenizer)
    for i, record in enumerate(records):
        # nothing to learn but an instant EOS, or a prompt of the template alone: left out (fit_length counts it as a
        # sample with no trained token; say_empty_prompts said the second)
        trained = train_on_prompt or bool(_response(record, fmt).strip())
        samples[i] = _framed(samples[i], bos, eos, trained and not empty_prompt(record, fmt))
    return samples


def empty_prompt(record: dict, fmt: str) -> bool:
    """An Alpaca record whose instruction and input are both empty or blank: its prompt is the template alone."""
    return fmt == "alpaca" and not record["instruction"].strip() and not (record.get("input") or "").strip()


def say_empty_prompts(records: Sequence[dict], fmt: str, source: str, names: Callable[[int], str]) -> None:
    """Warn once of the Alpaca records whose prompt is the template alone (left out by tokenize_records, as records
    with an empty response are), naming the first (`names(i)`: how errors name records[i]); refuse data of nothing
    else, which has no prompt to train a response to."""
    empty = [i for i, record in enumerate(records) if empty_prompt(record, fmt)]
    if not empty:
        return
    first = f"(the first: {names(empty[0])})"
    if len(empty) == len(records):
        raise DataError(f"{source}: every Alpaca record has an empty instruction and input {first}, so no record has a "
                        "prompt to train a response to; fill in their instructions")  # fmt: skip
    log.warning("%s: %d of %d Alpaca records have an empty instruction and input %s, so their prompt is the template "
                "alone: they are left out, as records with an empty response are; fill in their instruction", source,
                len(empty), len(records), first)  # fmt: skip


def _framed(sample: Sample, bos: list[int], eos: int, trained: bool) -> Sample:
    """`sample` after `bos` (never trained) and ending in EOS (trained; text that already ends in EOS keeps its own);
    nothing trained unless `trained`."""
    ids, spans = sample.ids, sample.pairs()
    if not len(ids) or ids[-1] != eos:
        ids, spans = np.append(ids, np.int32(eos)), [*spans, (len(ids), len(ids) + 1)]
    shift = len(bos)
    spans = [(lo + shift, hi + shift) for lo, hi in spans] if trained else []
    return Sample(np.concatenate([np.array(bos, dtype=np.int32), ids]) if bos else ids, spans)


def _response(record: dict, fmt: str) -> str:
    return record["text"] if fmt == "text" else record["output"] if fmt == "alpaca" else record["completion"]


def _render_plain(record: dict, fmt: str, train_on_prompt: bool) -> tuple[str, list[Span]]:
    if fmt == "text":
        text = record["text"]
        return text, [(0, len(text))]
    prompt = format_prompt(record, fmt)
    text = prompt + _response(record, fmt)
    return text, [(0 if train_on_prompt else len(prompt), len(text))]


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when this tokenizer adds BOS on its own (Llama), [] when it does not (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


# ---- chat ----------------------------------------------------------------------------------------------------------


def _tokenize_chat(records: Sequence[dict], tokenizer, train_on_prompt: bool, source: str, notes: list[str] | None,
                   origins: list[int] | None, names: Callable[[int], str]) -> list[Sample]:  # fmt: skip
    with fixed_date():
        return _tokenize_chat_records(records, tokenizer, train_on_prompt, source, notes, origins, names)


def _tokenize_chat_records(records: Sequence[dict], tokenizer, train_on_prompt: bool, source: str,
                           notes: list[str] | None, origins: list[int] | None,
                           names: Callable[[int], str]) -> list[Sample]:  # fmt: skip
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        model = getattr(tokenizer, "name_or_path", "") or "the model"
        raise DataError(  # transformers 5 saves a template as chat_template.jinja, 4 in tokenizer_config.json
            f"{source} is chat data but the tokenizer of {model} has no chat template; fine-tune an instruct model's "
            f"folder, save a template in it (tokenizer.chat_template = TEMPLATE; tokenizer.save_pretrained({model}) "
            "writes chat_template.jinja), or convert the data to prompt/completion"
        )
    tagged = isinstance(template, str) and bool(_GENERATION_TAG.search(template))
    rendered: list[tuple[str, list[Span]]] = []
    by_turn, specials = 0, special_tokens(tokenizer)
    for i, record in enumerate(records):
        where = names(i)
        tools, kwargs = record_tools(record, where), record_kwargs(record, where)
        check_kwargs(tokenizer, kwargs, tools, where)
        chat = Chat(tokenizer, record["messages"], tools, where, specials, kwargs)
        chat.check_tools()
        if train_on_prompt:
            text = chat.render(len(chat.messages), False)
            texts = [(text, [(0, len(text))])]
        else:
            first = record.get(PROMPT_TURNS, 0)  # a conversational prompt/completion's prompt: not trained
            texts, turn_by_turn = chat_texts(chat, first, tagged)
            by_turn += turn_by_turn
        rendered.extend(texts)
        if origins is not None:
            origins.extend([i] * len(texts))
    if by_turn:
        line = (f"  {by_turn} of {len(records)} conversations trained turn by turn (a sample per assistant turn, the "
                "conversation before it as context): the chat template renders them differently from their own "
                "beginning (e.g. it drops earlier turns' reasoning)")  # fmt: skip
        if notes is not None:
            notes.append(line)
        else:
            log.info("%s: %s", source, line.strip())
    return _encode(tokenizer, rendered, prompt_apart=True)


def _check_roles(records: Sequence[dict], tokenizer, names: Callable[[int], str], run_data: bool) -> None:
    """A checkpoint of a fasttune run on Alpaca or prompt/completion data carries that format as its chat template
    (generate/template.py), which renders user and assistant turns only: refuse a message it would drop. `run_data`:
    the records are that run's own data, which passed this check when it trained on them (or were not chat), so one
    that fails it is not the run's data (its resume refuses changed data anyway): said so, not a fix that cannot
    help."""
    from fasttune.generate.template import check_roles, prompt_format

    fmt = prompt_format(tokenizer)
    fix = "remove them from the data, or start from the base model that run began with (its own chat template)"
    if run_data:
        fix = ("the data is not what that run trained on (records added or edited since, or other data): restore it, "
               "or train on these records in a new run (another --output-dir) from the base model that run began "
               "with")  # fmt: skip
    for i, record in enumerate(records):
        check_roles(record["messages"], fmt, names(i), fix)


# ---- tokenizing ----------------------------------------------------------------------------------------------------


def _encode(tokenizer, rendered: list[tuple[str, list[Span]]], prompt_apart: bool = False) -> list[Sample]:
    """Tokenize each (text, trained character spans) pair into a Sample; `prompt_apart`: a text whose trained span
    starts inside a token is tokenized piece by piece, as generation tokenizes the prompt alone."""
    if not getattr(tokenizer, "is_fast", False):
        return [_encode_by_pieces(tokenizer, text, spans) for text, spans in rendered]
    samples: list[Sample] = []
    for lo in range(0, len(rendered), _ENCODE_CHUNK):
        chunk = rendered[lo : lo + _ENCODE_CHUNK]
        enc = tokenizer([text for text, _ in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for (text, spans), ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
            starts = [start for start, _ in offsets]
            if prompt_apart and _starts_inside_a_token(offsets, starts, spans):
                samples.append(_encode_by_pieces(tokenizer, text, spans))
                continue
            samples.append(Sample(ids, _token_spans(starts, spans)))
    return samples


def _starts_inside_a_token(offsets: list[tuple[int, int]], starts: list[int], spans: list[Span]) -> bool:
    """Whether a trained span starts inside a token (the token before it runs past the span's first character)."""
    for lo_char, _ in spans:
        i = bisect_left(starts, lo_char)
        if i > 0 and offsets[i - 1][1] > lo_char:
            return True
    return False


def _token_spans(starts: list[int], spans: list[Span]) -> list[Span]:
    """The token spans of character spans, for tokens with sorted start offsets `starts`: a token is trained where
    it starts inside a span."""
    return [(bisect_left(starts, lo_char), bisect_left(starts, hi_char)) for lo_char, hi_char in spans]


def _encode_by_pieces(tokenizer, text: str, spans: list[Span]) -> Sample:
    """Slow-tokenizer path: tokenize the text between span boundaries piece by piece."""
    cuts = sorted({0, len(text), *(b for span in spans for b in span)})
    ids: list[int] = []
    trained: list[Span] = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        piece = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
        if any(s <= lo and hi <= e for s, e in spans):
            trained.append((len(ids), len(ids) + len(piece)))
        ids.extend(piece)
    return Sample(ids, trained)


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


def check_lengths(samples: Sequence[Sample], max_length: int) -> LengthReport:
    """Count samples longer than `max_length` and those truncation would leave without any trained token."""
    lengths = [len(s) for s in samples]
    overlong = [s for s, n in zip(samples, lengths, strict=True) if n > max_length]
    lost = sum(s.trained(0, max_length) == 0 for s in overlong)
    return LengthReport(len(samples), max(lengths, default=0), len(overlong), lost, max_length)
