"""Incremental detokenization for streamed text, with stop strings.

Each new token re-decodes the whole output and emits only the new suffix (as `inferforge generate`
does), so merges across tokens (a word split in several pieces, a multi-byte character) come out
right. A decode that ends in U+FFFD is an incomplete UTF-8 character: nothing is emitted until the
next token completes it. With stop strings, the last `len(longest stop) - 1` characters are held
back until the next token shows they do not start a stop string; the text ends before the first
stop string found, which is not included (OpenAI's rule).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """`add(token) -> new text`; `stopped` once a stop string matched; `flush()` at the end."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""          # the decoded output so far, cut at a stop string
        self.sent = 0           # characters of `text` already returned
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        for s in self.stop:
            # A stop string cannot start before sent - len(s): it would have matched one token earlier.
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped = text[:at], True
                return self.flush()
        ready = len(text) - self.holdback
        if ready <= self.sent:
            return ""
        new, self.sent = text[self.sent:ready], ready
        return new

    def flush(self) -> str:
        """The rest of the text (held back, or waiting for a character to complete)."""
        if not self.stopped and self.tokens:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        new, self.sent = self.text[self.sent:], len(self.text)
        return new
