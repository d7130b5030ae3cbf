"""Ctrl-C and SIGTERM during training: a flag the loop checks between steps (a step is never cut in half), and the
stop that follows its checkpoint."""

from __future__ import annotations

import contextlib
import signal

from tqdm.auto import tqdm

from fasttune.errors import Stopped


class Interrupted(Stopped):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and stopped; exit code 130 (SIGINT) or 143 (SIGTERM)."""


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half. `say`: print that the
    run stops after this step (rank 0 alone: torchrun forwards Ctrl-C to every rank, and each printed the line)."""

    def __init__(self, say: bool = True):
        self.signum: int | None = None
        self.say = say
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if self.signum is not None:  # SIGTERM again (torchrun forwards what a scheduler also sent): keep saving
            return
        self.signum = signum
        if self.say:
            tqdm.write("stopping after this step (Ctrl-C again to abort without saving)...")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Terminated(BaseException):
    """SIGTERM inside `sigterm_raises` (as Ctrl-C raises KeyboardInterrupt)."""


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated inside, once (a second one, e.g. torchrun forwarding what a scheduler also sent,
    is ignored while the first is handled): for what is written after the last step, where there is no step to
    stop after and the default action killed the process without a word."""
    raised = []

    def handle(signum, frame):
        if not raised:
            raised.append(signum)
            raise Terminated

    try:
        old = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
