"""Validation of plain text with too few documents to hold whole ones out: the tail pieces of the text are held out,
so one `corpus.txt` gets a validation loss (it held nothing out, and --training.eval-every did nothing, silently)."""

import dataclasses
import json
import logging

from fixtures.tiny_tokenizer import build_tiny_tokenizer
from helpers import tiny_config

from fasttune.config import get_experiment
from fasttune.data.pipeline import build_data

PIECE = 64


def _config(path, val_fraction=0.05):
    cfg = get_experiment("sft")
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=str(path), max_length=PIECE, val_fraction=val_fraction)
    )


def _pieces(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + PIECE] for i in range(0, len(ids), PIECE)]


def _reference(tok, *texts: str) -> list[list[int]]:
    """Each text tokenized with EOS, cut into PIECE-token pieces: what training splits the documents into."""
    return [p for t in texts for p in _pieces(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])]


def test_one_text_file_holds_out_its_last_pieces_and_says_so(tmp_path):
    tok = build_tiny_tokenizer()
    book = tmp_path / "book.txt"
    book.write_text("".join(f"Natalia sold {i} clips to her friends in April and May. " for i in range(300)))
    want = _reference(tok, book.read_text())
    held = round(0.05 * len(want))
    assert held >= 2

    data = build_data(_config(book), tokenizer=tok)
    assert [s["input_ids"] for s in data.train] == want[:-held]  # no piece both trained and validated
    assert [s["input_ids"] for s in data.val] == want[-held:]
    assert all(s["labels"] == s["input_ids"] for s in (*data.train, *data.val))
    assert (data.summary.train_samples, data.summary.val_samples) == (len(want) - held, held)
    assert any(f"validation: the last {held} of {len(want)} pieces of {PIECE} tokens" in line
               for line in data.summary.lines())  # fmt: skip


def test_a_few_text_files_hold_out_the_tail_of_the_last_ones_contiguous(tmp_path):
    """Two files: the pieces to hold out run over the end of the last file into the one before it."""
    tok = build_tiny_tokenizer()
    folder = tmp_path / "books"
    folder.mkdir()
    first = "".join(f"Natalia sold {i} clips to her friends in April. " for i in range(200))
    last = "The capital of France is Paris. "  # one piece: the other held-out pieces are the first file's tail
    (folder / "a.txt").write_text(first)
    (folder / "b.txt").write_text(last)
    want = _reference(tok, first, last)
    held = round(0.2 * len(want))

    data = build_data(_config(folder, val_fraction=0.2), tokenizer=tok)
    assert [s["input_ids"] for s in data.train] == want[:-held]
    assert [s["input_ids"] for s in data.val] == want[-held:]


def test_enough_text_documents_are_still_held_out_whole(tmp_path):
    tok = build_tiny_tokenizer()
    texts = [f"document {i}: Natalia sold {i} clips in April and May." for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = build_data(_config(path, val_fraction=0.2), tokenizer=tok)
    whole = {tuple(p) for p in _reference(tok, *texts)}
    assert len(data.val) > 1 and len(data.train) + len(data.val) == len(texts)
    assert all(tuple(s["input_ids"]) in whole for s in data.val)
    assert not any("validation: the last" in line for line in data.summary.lines())


def test_no_validation_with_eval_every_is_said_once(tmp_path, caplog):
    cfg = tiny_config(tmp_path, max_steps=2, eval_every=1, save_every=0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0))
    caplog.set_level(logging.INFO, logger="fasttune")
    from fasttune.train import loop

    loop.train(cfg)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no validation")]
    assert len(said) == 1 and "data.val_fraction=0," in said[0] and "training.eval_every=1 computes" in said[0]
