"""Token ids to text as they are generated: incremental detokenization and stop strings.

A row's text is released piece by piece as tokens arrive. Two things hold text back:

* a token that ends inside a multi-byte character (the decoded text ends with U+FFFD) waits for the
  next token;
* with stop strings, the last ``max(len(stop)) - 1`` characters wait until it is clear they do not
  start a stop string. When a stop string appears, the text before it is released and the row ends.

Decoding is windowed (the last few tokens, not the whole row each step): ``prefix_offset`` marks where
the window starts, ``read_offset`` how far text was read, as tokenizers that merge spaces need a
little context to decode a token the way the full sequence decodes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one generated row, released as tokens arrive (see the module docstring)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending = ""  # decoded but not yet released (held back for stop strings)
        self.text = ""  # released so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a token; returns the text released by it ("" while text is held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if now.endswith(REPLACEMENT) or len(now) <= len(before):
            return ""  # an incomplete character, or a token with no text of its own yet
        self.pending += now[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        if self.stop:
            hits = [(self.pending.find(s), s) for s in self.stop if s in self.pending]
            if hits:
                at = min(i for i, _ in hits)
                out = self.pending[:at]
                self.pending, self.stopped = "", True
                self.text += out
                return out
            keep = 0 if final else max(len(s) for s in self.stop) - 1
            cut = max(len(self.pending) - keep, 0)
        else:
            cut = len(self.pending)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out

    def finish(self) -> str:
        """The row ended (length, end of sequence): release what was held back."""
        if self.stopped:
            return ""
        tail = self._decode(self.ids[self.prefix_offset:])
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if len(tail) > len(before):  # a token that decoded only to an incomplete character at the end
            self.pending += tail[len(before):]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)


def token_text(tokenizer: Any, token: int) -> str:
    """One token's text for logprobs (its decoded piece; special tokens by their name)."""
    text = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if text == "" or REPLACEMENT in text:
        name: Optional[str] = tokenizer.convert_ids_to_tokens(token)
        return name if isinstance(name, str) else text
    return text


__all__ = ["TextStream", "token_text"]
