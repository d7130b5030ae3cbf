"""Plain text is tokenized in bounded pieces (data/longtext.py): the same ids as one tokenizer call on the whole text,
no tokenizer call on much more than CHUNK_CHARS characters, and progress said for large texts."""

from __future__ import annotations

import inspect
import json

import pytest
from fixtures.tiny_tokenizer import build_tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fasttune.data import longtext
from fasttune.data.sft import tokenize_records


def _text() -> str:
    """Python source with blank lines, indentation, CRLF and unicode, then its lines unindented (prose-like: a line
    start every line), 29k characters: where cuts could change tokens."""
    lines = inspect.getsource(json).splitlines()
    return "\r\n".join(lines[:200]) + "\n\n\n  é€ " + "\n".join(lines[200:] + [x.strip() for x in lines]) + "\n"


def _metaspace() -> PreTrainedTokenizerFast:
    """A SentencePiece-like tokenizer: a word-start marker before every text, so a line start cut changes ids."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.train_from_iterator([_text()], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                                           show_progress=False))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(longtext, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(longtext, "BATCH_CHARS", 4000)
    monkeypatch.setattr(longtext, "WINDOW", 128)


def _spy(monkeypatch, tok) -> list[int]:
    """Lengths of the texts each tokenizer call gets, from now on."""
    seen: list[int] = []
    call = type(tok).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(max(len(t) for t in text) if isinstance(text, list) else len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", spy)
    return seen


@pytest.mark.parametrize("make", [build_tiny_tokenizer, _metaspace])
def test_a_long_text_gets_the_ids_of_one_call_in_bounded_calls(small_chunks, monkeypatch, make):
    """The samples of a long text record equal one tokenizer call on the whole text (the reference); with a
    byte-level BPE no call sees more than CHUNK_CHARS + a line (one call on the whole text peaked at 7.1 GB for 20
    MB); a SentencePiece-like tokenizer, which marks every piece's start, is never cut and stays exact."""
    tok, text = make(), _text()
    want = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    records = [{"text": text}, {"text": "short"}, {"text": text[:5000]}]
    seen = _spy(monkeypatch, tok)
    got = tokenize_records(records, "text", tok, source="big.txt")
    longest_call = max(seen)
    assert got[0]["input_ids"] == want and got[0]["labels"] == want
    assert got[1]["input_ids"] == tok("short", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert got[2]["input_ids"][:-1] == tok(text[:5000], add_special_tokens=False)["input_ids"]
    pieces = longtext.cuts(tok, text)
    if make is build_tiny_tokenizer:
        assert len(pieces) > len(text) // 5000 and longest_call < 5000, (pieces, longest_call)
    else:
        assert pieces == [0, len(text)]


def test_a_large_text_says_how_far_tokenizing_is(small_chunks, monkeypatch, caplog):
    monkeypatch.setattr(longtext, "PROGRESS_CHARS", 10_000)
    caplog.set_level("INFO", logger="fasttune")
    text = _text() * 10
    tokenize_records([{"text": text}], "text", build_tiny_tokenizer(), source="big.txt")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing big.txt: ")]
    assert 5 <= len(said) <= 12 and said[-1].endswith(f"of {len(text) >> 20} MB"), said
