"""Text out of token ids, one token at a time, with OpenAI's stop strings.

Pure code: the worker thread of an engine that has no stop-string support of its own feeds
it the ids generated so far and emits what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Detokenizer:
    """Emits text as soon as it is certain: never half a UTF-8 character, never the start of
    what may turn out to be a stop string, never the stop string itself."""

    __slots__ = ("_decode", "_longest", "_stops", "emitted", "text")

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.emitted = 0  # characters of `text` already given out
        self.text = ""

    def push(self, ids: Sequence[int]) -> tuple[str, bool]:
        """New text that is safe to send for the ids generated so far, and whether a stop
        string ended the generation."""
        text = self._decode(ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return "", False
        self.text = text
        safe = len(text)
        if self._stops:
            start = max(0, self.emitted - self._longest + 1)
            hits = [i for i in (text.find(s, start) for s in self._stops) if i != -1]
            if hits:
                end = min(hits)
                out = text[self.emitted:end]
                self.emitted = end
                return out, True
            safe -= self._held(text)
        if safe <= self.emitted:
            return "", False
        out = text[self.emitted:safe]
        self.emitted = safe
        return out, False

    def flush(self) -> str:
        """What was held back, once the generation ended for another reason."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
