"""Output that survives its reader going away: `fasttune train ... | head`, or `| tee log` and a Ctrl-C (tee dies
with the Ctrl-C). A write to a pipe whose reader has exited raises BrokenPipeError (Python ignores SIGPIPE); left
alone it ended a training run mid-way without its final checkpoint, or turned a saved Ctrl-C (130) into exit 1.

`surviving_closed_output()` wraps sys.stdout and sys.stderr for one command: the first write or flush that meets a
broken pipe points that stream's file descriptor at os.devnull (the recipe of the Python signal docs' "Note on
SIGPIPE") and the command carries on with the same exit code; the run folder's metrics.jsonl keeps the numbers.
Every writer reads sys.stdout / sys.stderr when it writes (print, tqdm, rich, the logging handler set up after the
wrap), so this one place covers them all.

`printed_above(bar)` keeps the other writers off a live progress bar (training's, bench's): their lines go above it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


class _Surviving:
    """A text stream whose writes and flushes go to os.devnull once its reader has gone; everything else is the
    wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        """The descriptor itself is pointed at os.devnull, so that what is still buffered (and the interpreter's
        flush at exit) drains there instead of failing again."""
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # not a file descriptor (a wrapper of some other tool): replace the stream
            self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        with contextlib.suppress(BrokenPipeError):
            self._stream.flush()  # the buffered text, now into os.devnull

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def surviving_closed_output():
    """sys.stdout and sys.stderr survive a closed pipe while the block runs (see the module docstring); on leaving
    it they are flushed (a broken pipe there goes to os.devnull as well) and restored."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, _Surviving) else _Surviving(s) for s in saved)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        sys.stdout, sys.stderr = saved


class _AboveBar:
    """A text stream whose complete lines are written to `target` with the bar cleared first and redrawn after; a
    partial line waits for its end (written alone, the bar's next redraw would overwrite it)."""

    def __init__(self, bar, target):
        self._bar, self._target, self._pending = bar, target, ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            self._above(lines + "\n")
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def drain(self) -> None:
        """The rest of a partial line, on leaving: written as it is, not lost."""
        if self._pending:
            self._above(self._pending)
            self._pending = ""

    def _above(self, text: str) -> None:
        with type(self._bar).external_write_mode(file=self._bar.fp):  # clears every bar on that stream, redraws it
            self._target.write(text)
            self._target.flush()

    def __getattr__(self, name: str):
        return getattr(self._target, name)


def _console_handlers(streams) -> list[logging.StreamHandler]:
    """The log handlers (root's and fasttune's) that write to one of `streams`: the command line's handler on
    stderr, a script's basicConfig; a log file is not the terminal the bar is drawn on."""
    found = []
    for logger in (logging.getLogger(), logging.getLogger("fasttune")):
        for h in logger.handlers:
            if type(h) is logging.StreamHandler and any(h.stream is s for s in streams) and h not in found:
                found.append(h)
    return found


@contextlib.contextmanager
def printed_above(bar):
    """While a live tqdm `bar` is drawn, what else reaches the terminal goes above it as whole lines: Python warnings
    (warnings.showwarning), fasttune's log lines (the handlers on sys.stderr / sys.stdout) and print() to sys.stdout.
    Written straight to the stream they ended mid-bar ("train: 40%|███ | UserWarning: ...") and the next redraw wrote
    over them. Each keeps its own stream (a piped stdout stays stdout); all is restored on leaving. A disabled bar (not
    a terminal, not the main rank) changes nothing: its lines are already lines.

    sys.stderr itself is left as it is: a bar made inside (the evaluation's) writes its frames there, partial lines
    the line buffering here would hold back."""
    if not hasattr(bar, "external_write_mode"):
        raise TypeError(f"printed_above takes a tqdm progress bar, not {type(bar).__name__}")
    if bar.disable or getattr(bar, "fp", None) is None:
        yield
        return
    out, err = sys.stdout, sys.stderr
    streams = {id(s): _AboveBar(bar, s) for s in (out, err) if s is not None}
    handlers = [(h, h.stream) for h in _console_handlers((out, err))]
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        target = file if file is not None else err
        if id(target) not in streams:  # a file of the caller's own: as Python writes it
            return shown(message, category, filename, lineno, file, line)
        streams[id(target)].write(warnings.formatwarning(message, category, filename, lineno, line))

    for h, stream in handlers:
        h.setStream(streams[id(stream)])
    warnings.showwarning = show
    if out is not None:
        sys.stdout = streams[id(out)]
    try:
        yield
    finally:
        sys.stdout = out
        if warnings.showwarning is show:  # a catch_warnings() left open inside restores its own on leaving
            warnings.showwarning = shown
        for h, stream in handlers:
            h.setStream(stream)
        for stream in streams.values():
            stream.drain()
