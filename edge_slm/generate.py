"""Turning generated token ids into text: streamed as it becomes safe to
show (never half a character or the start of a stop string), and checking
what a caller supplies: token ids, stop strings, chat messages."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np

from .errors import EdgeSlmError

# A request's stop strings: each is matched against every character generated.
MAX_STOPS, MAX_STOP_CHARS = 16, 256


def _borders(s: str) -> list[int]:
    """Knuth-Morris-Pratt's table: for each prefix of s, the length of the
    longest proper prefix of s that is also a suffix of it."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return table


class TextStream:
    """Turns generated token ids into text to show, holding back any tail
    that might be the start of a stop string. Each stop string is matched
    incrementally, so each character costs a constant time per stop string
    however long it is."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self._decoder = tokenizer.stream_decoder()
        self._stop = [s for s in stop if s]
        self._borders = [_borders(s) for s in self._stop]
        self._matched = [0] * len(self._stop)  # how much of each stop string the text ends with
        self.text = ""      # everything emitted so far
        self._pending = ""  # decoded but held back
        self.stopped = False

    def feed(self, token: int) -> str:
        """Returns the text that can be shown now; sets .stopped on a stop string."""
        if self.stopped:
            return ""
        piece = self._decoder.feed(token)
        start = len(self._pending)
        self._pending += piece
        for end, c in enumerate(piece, start + 1):
            cut = None  # where the earliest-starting stop string ending here starts
            for i, s in enumerate(self._stop):
                k = self._matched[i]
                while k and s[k] != c:
                    k = self._borders[i][k - 1]
                k = self._matched[i] = k + 1 if s[k] == c else 0
                if k == len(s):
                    cut = min(end - k, cut if cut is not None else end)
            if cut is not None:
                self.stopped = True
                return self._emit(self._pending[:cut])
        return self._emit(self._pending[:len(self._pending) - max(self._matched, default=0)])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self._pending + self._decoder.flush())

    def _emit(self, piece: str) -> str:
        self._pending = self._pending[len(piece):] if not self.stopped else ""
        self.text += piece
        return piece


def check_ids(ids: Any, vocab: int) -> list[int]:
    """Token ids given by a caller, as ints, each inside the vocabulary: a
    sequence of whole numbers (a numpy integer array will do), not text or floats."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"prompt_ids must be a 1-D array of integers, not {ids.ndim}-D {ids.dtype}")
    elif isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise TypeError(f"prompt_ids must be a sequence of integers, not {type(ids).__name__}")
    else:
        bad = next((i for i in ids if not isinstance(i, Integral) or isinstance(i, bool)), None)
        if bad is not None:
            raise TypeError(f"prompt_ids must be integers, not {type(bad).__name__} ({bad!r})")
    ids = [int(i) for i in ids]
    if not ids:
        raise EdgeSlmError("no token ids given")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise EdgeSlmError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return ids


def check_stop(stop: str | Sequence[str]) -> tuple[str, ...]:
    """A request's stop strings: a string or a sequence of them, within MAX_STOPS and MAX_STOP_CHARS."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise TypeError("stop must be strings")
    if len(stop) > MAX_STOPS:
        raise EdgeSlmError(f"{len(stop)} stop strings: at most {MAX_STOPS} are allowed")
    longest = max(stop, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise EdgeSlmError(f"a stop string of {len(longest):,} characters: at most {MAX_STOP_CHARS} "
                           f"are allowed ({longest[:20]!r}...)")
    return stop


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages given by a caller: a list of dicts, each with a role and
    content that are text (before a template, which would blame the model)."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"message {i} is {type(m).__name__}, not a dict with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"message {i} has no {key}")
            if not isinstance(m[key], str):
                raise TypeError(f"message {i}: {key} must be text, not {type(m[key]).__name__}")
    return list(messages)
