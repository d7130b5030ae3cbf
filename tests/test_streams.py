"""streams.printed_above: a warning, a log line or a print() while a live tqdm bar is drawn lands on a line of its
own above the bar, not inside it, and everything is as it was after the bar."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest
from tqdm import tqdm

from fasttune.streams import printed_above


def _lines(text: str) -> list[str]:
    """What a terminal shows of each line: the text after its last carriage return, trailing blanks dropped."""
    return [line.rpartition("\r")[2].rstrip() for line in text.split("\n")]


def test_a_warning_during_the_bar_gets_its_own_line_and_the_bar_is_restored(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        bar = tqdm(total=4, desc="train", file=err, mininterval=0)
        with printed_above(bar):
            bar.update(1)
            warnings.warn("careful now", UserWarning, stacklevel=1)
            bar.update(1)
        bar.close()
        assert warnings.showwarning is shown
    lines = _lines(err.getvalue())
    said = [line for line in lines if "UserWarning: careful now" in line]
    assert len(said) == 1 and said[0].startswith(__file__), lines  # the whole line, not inside the bar
    after = err.getvalue().split("careful now", 1)[1]
    assert "train:  25%" in after  # the bar drawn again below it
    assert sys.stderr is err


def test_log_lines_and_prints_go_above_and_handlers_get_their_streams_back(monkeypatch):
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    handler = logging.StreamHandler(err)
    log = logging.getLogger("fasttune")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)  # not the attribute alone: isEnabledFor caches what an earlier test's level gave
    try:
        bar = tqdm(total=2, desc="bench", file=err, mininterval=0)
        with printed_above(bar):
            log.info("a log line")
            print("a printed", end="")
            print(" line")
            print("half a line", end="")
        bar.close()
        assert handler.stream is err
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert sys.stdout is out
    assert "a log line" in _lines(err.getvalue())
    assert out.getvalue() == "a printed line\nhalf a line"  # stdout stays stdout; the partial line is not lost


def test_a_disabled_bar_changes_nothing_and_another_kind_of_bar_is_refused():
    shown, out = warnings.showwarning, sys.stdout
    bar = tqdm(total=1, disable=True)
    with printed_above(bar):
        assert warnings.showwarning is shown and sys.stdout is out
    with pytest.raises(TypeError, match="^printed_above takes a tqdm progress bar, not object$"):
        with printed_above(object()):
            pass


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal: the commands draw their bars only there."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_warning_while_generate_or_eval_draws_its_bar_gets_its_own_line(command, tmp_path, monkeypatch):
    """`generate --prompts FILE` and `eval --generate`: a warning during a batch lands on a line of its own above the
    bar, and the bar is drawn again below it."""
    from helpers import save_base_model

    from fasttune.cli import main
    from fasttune.generate import generate

    model = save_base_model(tmp_path / "base")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello", "completion": " 1"}\n{"prompt": "Hi there", "completion": " 2"}\n')
    real = generate.generate_ids

    def warned(*args, **kwargs):
        warnings.warn("careful now", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_ids", warned)
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        where = ["--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")] if command == "generate" else [
            "--data", str(prompts), "--generate", "--output-dir", str(tmp_path / "ev")]  # fmt: skip
        assert main([command, "--checkpoint", str(model), *where, "--batch-size", "1", "--max-new-tokens", "2"]) == 0
    lines = _lines(err.getvalue())
    said = [line for line in lines if "UserWarning: careful now" in line]
    assert len(said) == 2 and all(line.startswith(__file__) for line in said), lines
    assert "generate:" in err.getvalue().split("careful now")[-1]  # the bar drawn again below
