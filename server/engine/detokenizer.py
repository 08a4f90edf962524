"""Incremental detokenization and stop strings, on the engine thread.

Decoding the whole output at every step is quadratic; instead we decode a
short window (`prefix:` against `prefix:read`) and emit the difference,
holding back text that ends in an incomplete UTF-8 sequence. Stop strings
are searched in the text as it grows; the text that could still become a
stop string is held back from the stream until it cannot.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], include_stop: bool = False):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""  # all text produced so far (truncated at a stop string once found)
        self.emitted = 0  # len(text) already handed to the client
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.include_stop = include_stop
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Appends one token; sets `stopped` when a stop string appeared."""
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        cur = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(cur) > len(prev) and not cur.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += cur[len(prev) :]
            self.prefix, self.read = self.read, len(self.ids)
            if self.stop:
                self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        start = max(0, old_len - self.hold)
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        """Text not yet emitted that can be emitted now (all of it when final or stopped)."""
        limit = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : limit]
        self.emitted = limit
        return out
