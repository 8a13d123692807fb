"""Incremental detokenization with stop strings, independent of any tokenizer implementation.

Streaming must never emit text it may later take back: a partial UTF-8 character (the decoder shows
U+FFFD until the rest of its bytes arrive) or the beginning of a stop string is held back until
it resolves. Decoding works on a short window of recent tokens so each step is O(1), not O(n).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
_REPLACEMENT = "\ufffd"


def stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in ``text[start:]`` (absolute), or -1."""
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits) if hits else -1


class IncrementalText:
    """Turns a stream of token ids into safe-to-emit text deltas and detects stop strings."""

    def __init__(self, decode: Decode, stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        """All text decoded so far (cut at a stop string once one is found)."""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to emit (may be empty)."""
        windows = self.add(token_id)
        if windows is None:
            return ""
        return self.advance(self._decode(windows[0]), self._decode(windows[1]))

    def add(self, token_id: int) -> tuple[list[int], list[int]] | None:
        """Add one token without decoding; return the two id windows to decode (None once stopped).

        With :meth:`advance` this splits :meth:`push` so a caller can decode the windows of many
        sequences in one batched tokenizer call.
        """
        if self.stopped:
            return None
        self._ids.append(token_id)
        return self._ids[self._prefix_offset : self._read_offset], self._ids[self._prefix_offset :]

    def advance(self, prefix: str, current: str) -> str:
        """Apply the decoded windows returned by :meth:`add`; return the text safe to emit."""
        self._apply(prefix, current, final=False)
        return self._emit()

    def flush(self) -> str:
        """At the end of generation: the rest, including text held back for a possible stop string."""
        if self.stopped:
            return ""
        self._decode_new(final=True)
        held = self._emit()
        return held + self._take(len(self.text)) if not self.stopped else held

    def _decode_new(self, final: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        self._apply(prefix, current, final)

    def _apply(self, prefix: str, current: str, final: bool) -> None:
        if len(current) > len(prefix) and (final or not current.endswith(_REPLACEMENT)):
            self.text += current[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _emit(self) -> str:
        if self._stops:
            hit = find_stop(self.text, self._stops, max(0, self._emitted - self._max_stop))
            if hit >= 0:
                self.text = self.text[:hit]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(len(self.text) - stop_prefix_overlap(self.text, self._stops))
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta
