"""Plain text tokenized in bounded pieces: the same ids as one tokenizer call on the whole text, in a fraction of the
memory, with progress.

One call on a whole text file holds every token's Rust encoding (ids, offsets, token strings) and, with offsets
asked for, a Python tuple per token: a 20 MB text file (16.8M tokens of a small BPE vocabulary) peaked at 7.1 GB of
RAM and took 48 s without a word; a text file of several hundred MB could not be tokenized on a 24 GB machine.
Here a text is cut at line starts (after a newline, before a character that is not whitespace) every CHUNK_CHARS
characters, and a cut is kept only where the tokenizer gives the same ids across it as without it (checked on the
WINDOW characters around it); the pieces are tokenized in batches (parallel in Rust) and their ids joined into an
int32 array per text (4 bytes per token, where a Python list of them holds ~36). A
tokenizer that tokenizes a line start differently from the same text mid-line (SentencePiece's word-start marker on
Llama 2 / Mistral) finds no such cut, and its text is tokenized whole, as before.
"""

from __future__ import annotations

import logging
import re
from array import array

log = logging.getLogger("fasttune")

CHUNK_CHARS = 1 << 20
"""Characters between cuts of a long text (~1 MB: small beside the text, large beside the checks)."""
WINDOW = 512
"""Characters on each side of a cut that are tokenized with and without it."""
BATCH_CHARS = 4 << 20
"""Characters of text per batched tokenizer call."""
PROGRESS_CHARS = 16 << 20
"""Texts of at least this many characters in all log their tokenizing progress (about every tenth)."""
_LINE_START = re.compile(r"\n(?=\S)")
_TRIES = 64
"""Line starts tried past each CHUNK_CHARS mark for a cut that keeps the ids."""


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _keeps_ids(tokenizer, text: str, cut: int) -> bool:
    left, right = text[max(0, cut - WINDOW) : cut], text[cut : cut + WINDOW]
    whole, a, b = _ids(tokenizer, [left + right, left, right])
    return whole == a + b


def cuts(tokenizer, text: str) -> list[int]:
    """Where to cut `text` (0, then line starts, then len(text)): about every CHUNK_CHARS characters, each cut one
    the tokenizer gives the same ids across."""
    out, mark = [0], CHUNK_CHARS
    while mark < len(text) - WINDOW:
        for n, match in enumerate(_LINE_START.finditer(text, mark)):
            cut = match.end()
            if n >= _TRIES or cut > len(text) - WINDOW:
                break
            if _keeps_ids(tokenizer, text, cut):
                out.append(cut)
                break
        mark = max(mark, out[-1]) + CHUNK_CHARS
    return [*out, len(text)]


def encode_texts(tokenizer, texts: list[str], source: str) -> list[array]:
    """The ids of each text (no special tokens added), as one tokenizer call per text would give them, as int32
    arrays (array("i"))."""
    total = sum(len(t) for t in texts)
    say = total >= PROGRESS_CHARS
    step, done, next_say = max(1, total // 10), 0, 0
    out: list[array] = []
    batch: list[tuple[int, str]] = []  # (text index, piece)
    size = 0

    def flush() -> None:
        if not batch:
            return
        for (i, _), ids in zip(batch, _ids(tokenizer, [p for _, p in batch]), strict=True):
            if i == len(out):
                out.append(array("i", ids))
            else:
                out[i].extend(ids)
        batch.clear()

    for i, text in enumerate(texts):
        bounds = cuts(tokenizer, text) if len(text) > CHUNK_CHARS else [0, len(text)]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            batch.append((i, text[lo:hi]))
            size += hi - lo
            done += hi - lo
            if size >= BATCH_CHARS:
                flush()
                size = 0
            if say and done >= next_say:
                log.info("tokenizing %s: %d of %d MB", source, done >> 20, total >> 20)
                next_say = done + step
    flush()
    return out
