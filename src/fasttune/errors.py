"""The one exception type users see: a clear, one-line message with the fix, printed without a traceback."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message for a one-line error: its whitespace runs one space each, cut at `limit` characters
    (when given), and the exception's type name when the message is empty."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


class FasttuneError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with `exit_code` (no traceback
    unless --debug). The message names the file, line or option at fault and what to do about it."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(FasttuneError):
    """A config value is invalid: the message names the option and its valid values."""


class DataError(FasttuneError):
    """A dataset cannot be read or used: the message names the file (and line/record) and the fix."""


class Stopped(FasttuneError):
    """Not a mistake: the run stopped on request (Ctrl-C, SIGTERM) after saving. The CLI prints the message as a
    notice (no `error:` prefix) and exits with `exit_code` (130 / 143)."""


class PeerFailed(FasttuneError):
    """Under torchrun: rank 0 stopped before the run started and printed why; the other ranks exit with its code
    without a message of their own."""
