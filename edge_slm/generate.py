"""Turning generated token ids into text: streamed as it becomes safe to
show (never half a character or the start of a stop string), and checking
token ids a caller supplies."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import EdgeSlmError


class TextStream:
    """Turns generated token ids into text to show, holding back any tail
    that might be the start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self._decoder = tokenizer.stream_decoder()
        self._stop = [s for s in stop if s]
        self.text = ""      # everything emitted so far
        self._pending = ""  # decoded but held back
        self.stopped = False

    def feed(self, token: int) -> str:
        """Returns the text that can be shown now; sets .stopped on a stop string."""
        if self.stopped:
            return ""
        self._pending += self._decoder.feed(token)
        for s in self._stop:
            i = self._pending.find(s)
            if i >= 0:
                self.stopped = True
                return self._emit(self._pending[:i])
        hold = max((k for s in self._stop for k in range(len(s) - 1, 0, -1)
                    if self._pending.endswith(s[:k])), default=0)
        return self._emit(self._pending[:len(self._pending) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self._pending + self._decoder.flush())

    def _emit(self, piece: str) -> str:
        self._pending = self._pending[len(piece):] if not self.stopped else ""
        self.text += piece
        return piece


def check_ids(ids: Sequence[int], vocab: int) -> list[int]:
    """Token ids given by a caller, as ints, each inside the vocabulary."""
    ids = [int(i) for i in ids]
    if not ids:
        raise EdgeSlmError("no token ids given")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise EdgeSlmError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return ids
