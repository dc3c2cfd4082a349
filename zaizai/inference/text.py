"""Streaming text: token ids to text pieces as they are generated, and stop strings that end the text.

:class:`IncrementalDecoder` turns ids into text one at a time (a byte-level tokenizer may need several ids
for one character); :func:`decode_stream` yields the pieces and holds back text that could still become
a stop string, so a stop string is never partly shown.
"""

from __future__ import annotations

from collections.abc import Iterator


class IncrementalDecoder:
    """Turns token ids into text one id at a time, for streaming.

    ``push(id)`` returns the new text (possibly "" while a character is incomplete, which a byte-level
    tokenizer can produce; the char tokenizer never does) and ``flush()`` whatever is left at the end.
    Special tokens render as ``special_text[id]``, "" by default. Each push decodes only a few recent ids,
    so a long stream costs O(1) per token.
    """

    def __init__(self, tokenizer, special_text: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.special_ids.values())
        self.special_text = special_text or {}
        self.ids: list[int] = []  # plain (non-special) ids since the last special token
        self.prefix = 0  # ids[prefix:read] decode to text already returned, kept as left context
        self.read = 0

    def push(self, token: int) -> str:
        if token in self.special_ids:
            return self.flush() + self.special_text.get(token, "")
        self.ids.append(token)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next id
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])[len(done):]
        self.ids, self.prefix, self.read = [], 0, 0
        return text


class TextPieces:
    """Token ids in, text pieces out, one id at a time (what the server's worker pushes, and what
    :func:`decode_stream` pulls through). Incomplete characters wait for their next ids; text that could still grow
    into a stop string is held back until it cannot; ``stopped`` once one appeared (the text ends before it)."""

    def __init__(self, decoder: IncrementalDecoder, stop: list[str] | None = None):
        self.decoder = decoder
        self.stops = [s for s in (stop or []) if s]
        self.pending = ""  # decoded, not yet shown: at most the longest stop string's length - 1
        self.stopped = False

    def push(self, token: int) -> str:
        """The text to show after ``token`` ("" for none yet)."""
        self.pending += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, at the end of the generation."""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            text, self.pending = self.pending[:min(hits)], ""
            return text
        hold = 0 if final else longest_stop_prefix(self.pending, self.stops)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text


def decode_stream(tokens: Iterator[int], decoder: IncrementalDecoder, stop: list[str] | None = None) -> Iterator[str]:
    """Decode ``tokens`` into text pieces; the first of the ``stop`` strings to appear ends the text there.

    Text that could still grow into a stop string is held back until it cannot, so a stop string is never
    partly shown. Ending early closes ``tokens`` (no further forward passes).
    """
    pieces = TextPieces(decoder, stop)
    try:
        for token in tokens:
            text = pieces.push(token)
            if text:
                yield text
            if pieces.stopped:
                return
        text = pieces.finish()
        if text:
            yield text
    finally:
        if hasattr(tokens, "close"):
            tokens.close()


def longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (and not a whole one)."""
    for n in range(min(len(text), max((len(s) for s in stops), default=0) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0
