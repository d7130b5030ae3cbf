"""Stop strings (`--stop`), with lm-evaluation-harness `until` semantics: an answer is its text before the first
occurrence of any stop string (the stop string is not part of it), and a row stops generating once its decoded new
text contains one.

The same decoded text decides on every path: `StopStrings.find` (where an answer stops, from its tokens: the same
whichever step a path noticed it at), `StopOnText` (HF `generate`'s stopping criterion, checked every step; the fast
path checks at its host syncs) and `StopStream` (streamed text, held back while it could be the start of a stop
string).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria


class StopStrings:
    """Stop strings and the tokenizer that decodes the new tokens (special tokens skipped, as answers are decoded)."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]

    def __bool__(self) -> bool:
        return bool(self.stops)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def hit(self, ids: list[int]) -> bool:
        """Whether the text of these new tokens contains a stop string."""
        text = self.text(ids)
        return any(s in text for s in self.stops)

    def cut(self, text: str) -> tuple[str, str | None]:
        """The text before the first stop string, and that stop string (None: no stop string in it)."""
        found = [(text.find(s), s) for s in self.stops if s in text]
        if not found:
            return text, None
        at, stop = min(found)
        return text[:at], stop

    def find(self, ids: list[int]) -> int | None:
        """The number of new tokens up to and including the one whose text completes the first stop string; None when
        the text of `ids` has none. The fewest tokens whose text has one (a binary search: decoded text grows)."""
        if not self.stops or not self.hit(ids):
            return None
        lo, hi = 1, len(ids)  # hit(ids[:hi]) holds
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.hit(ids[:mid]) else (mid + 1, hi)
        return hi


class StopOnText(StoppingCriteria):
    """HF `generate` stopping criterion: a row is done once the text of its new tokens (after `prompt_len`, the padded
    prompt) contains a stop string; rows found done are not decoded again."""

    def __init__(self, stops: StopStrings, prompt_len: int):
        self.stops, self.prompt_len = stops, prompt_len
        self.done: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :].tolist()
        for row, ids in enumerate(new):
            if row not in self.done and self.stops.hit(ids):
                self.done.add(row)
        done_B = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done_B[sorted(self.done)] = True
        return done_B


class StopStream:
    """Streamed text with stop strings: text is passed on once no stop string can start in it, nothing from the
    first stop string on; `close()` passes on what was held back at the end."""

    def __init__(self, stops: StopStrings, on_text: Callable[[str], None]):
        self.stops, self.on_text = stops, on_text
        self.text, self.sent, self.stopped = "", 0, False

    def write(self, text: str) -> None:
        if self.stopped:
            return
        self.text += text
        cut, stop = self.stops.cut(self.text)
        if stop is not None:
            self.stopped = True
            self._send(len(cut))
            return
        self._send(len(self.text) - self._open_tail())

    def close(self) -> None:
        if not self.stopped:
            self._send(len(self.text))

    def _open_tail(self) -> int:
        """Length of the longest end of the text that a stop string starts with (it may complete later)."""
        return max((k for s in self.stops.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.on_text(self.text[self.sent : upto])
            self.sent = upto
