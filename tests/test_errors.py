"""fasttune.errors.one_line: the one way an exception's text becomes part of a one-line message."""

import pytest

from fasttune.errors import one_line


@pytest.mark.parametrize(
    ("error", "kwargs", "expected"),
    [
        (ValueError("a\n  b\tc "), {}, "a b c"),
        (ValueError("abcdef"), {"limit": 3}, "abc"),
        (ValueError(""), {}, "ValueError"),
        (ValueError("  \n "), {"limit": 3}, "ValueError"),
        (OSError("\n  cause here \nadvice below"), {"line": 0}, "cause here"),
        (OSError("cause\nadvice"), {}, "cause advice"),
        (OSError(""), {"line": 0}, "OSError"),
        (RuntimeError("Error(s):\n\tsize mismatch for w\n\n"), {"line": -1}, "size mismatch for w"),
        (RuntimeError("one line"), {"line": 1}, "RuntimeError"),
        (KeyError("x y"), {"typed": True}, "KeyError: 'x y'"),
        (RuntimeError(""), {"typed": True}, "RuntimeError"),
        (RuntimeError("abc\ndef"), {"typed": True, "line": 0, "limit": 16}, "RuntimeError: ab"),
    ],
)
def test_one_line(error, kwargs, expected):
    assert one_line(error, **kwargs) == expected
