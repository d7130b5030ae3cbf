"""Output that survives its reader going away: `fasttune train ... | head`, or `| tee log` and a Ctrl-C (tee dies
with the Ctrl-C). A write to a pipe whose reader has exited raises BrokenPipeError (Python ignores SIGPIPE); left
alone it ended a training run mid-way without its final checkpoint, or turned a saved Ctrl-C (130) into exit 1.

`surviving_closed_output()` wraps sys.stdout and sys.stderr for one command: the first write or flush that meets a
broken pipe points that stream's file descriptor at os.devnull (the recipe of the Python signal docs' "Note on
SIGPIPE") and the command carries on with the same exit code; the run folder's metrics.jsonl keeps the numbers.
Every writer reads sys.stdout / sys.stderr when it writes (print, tqdm, rich, the logging handler set up after the
wrap), so this one place covers them all.
"""

from __future__ import annotations

import contextlib
import os
import sys


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
