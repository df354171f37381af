"""Grounding a chat request, as the engine does it for every front end: the
user's last question searched in the index, the best passages put in the
prompt within a token budget, and the sources kept for the answer (taken
from retrieval, never from the model's text). When no passage scores above
the threshold, the request is declined with NOT_COVERED_TEXT, or, if so
configured, answered without passages and labelled UNGROUNDED."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeSlmError
from ..memory import MIB, current_rss
from .index import CACHE_KIB, Hit, Index
from .prompt import grounded_messages
from .retrieve import query_terms

log = logging.getLogger(__name__)

# What a request's answer is, as Result.grounding and every front end report it.
GROUNDED = "grounded"        # passages were in the prompt; the sources are theirs
NOT_COVERED = "not_covered"  # nothing relevant found: declined, the model did not run
UNGROUNDED = "ungrounded"    # nothing relevant found: answered without passages, by setting
NOT_COVERED_TEXT = "The manuals do not cover this question."

# The coverage (Hit.coverage: the share of the question's words, weighted by
# rarity, that a passage holds) which none of the passages found reaching
# means the manuals do not cover a question. Measured on tests/grounding by
# scripts/eval-grounding: 0.36 keeps 100 % of the answerable questions and
# declines 91.7 % of the unanswerable ones. A share, unlike bm25's score, so
# it holds for an index of one manual as for one of thousands.
DEFAULT_THRESHOLD = 0.36
UNCOVERED = ("decline", "answer")  # what a request below the threshold gets
# ChatML's markup around each message, with room to spare: the passages'
# budget is counted over the messages' text alone.
TEMPLATE_TOKENS_PER_MESSAGE = 8
# Words by which a question points back at the one before.
FOLLOW_UP_WORDS = frozenset("it its this that these those they them there".split())
# SQLite's FTS5 work memory for one query (its doclists for 64 terms), beside the page cache.
QUERY_BYTES = 1 * MIB


class NoRoom(EdgeSlmError):
    """A conversation so long that not one passage fits beside it."""


@dataclass(frozen=True)
class Grounded:
    """A request after retrieval: the messages to render (None when
    declined), the passages they hold, what the answer will be, and the
    question's words (what a front end highlights in a source)."""

    messages: list[dict[str, str]] | None
    sources: list[Hit]
    label: str                # GROUNDED, NOT_COVERED or UNGROUNDED
    terms: list[str] = field(default_factory=list)
    top_coverage: float | None = None
    retrieval_s: float = 0.0


class Grounder:
    """The index an engine grounds its requests in. Thread-safe: requests are
    grounded on their submitters' threads, one search at a time (a search
    takes milliseconds, and one connection keeps one page cache)."""

    def __init__(self, index: Index, *, threshold: float = DEFAULT_THRESHOLD, uncovered: str = "decline",
                 passages: int = 3, max_tokens: int = 768):
        self.index = index
        self.threshold = threshold
        self.uncovered = uncovered
        self.passages = passages
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._closed = False
        self.bytes = 0  # what it holds resident, for the memory plan (see open)

    @classmethod
    def open(cls, path: Path | None, required: bool, **settings) -> Grounder | None:
        """The grounder on the index at `path` (None: the default one), or
        None when there is no index and none was asked for by name. Measures
        what opening it and one search leave resident, and adds the page
        cache it may yet fill and a query's work memory."""
        before = current_rss()
        try:
            index = Index.open(path, create=False, shared=True)
        except EdgeSlmError:
            if required:
                raise
            return None
        grounder = cls(index, **settings)
        index.search("warm up")
        grounder.bytes = max(0, current_rss() - before) + CACHE_KIB * 1024 + QUERY_BYTES
        log.info("grounding in %s (%s)", index.path,
                 ", ".join(c.name for c in index.collections()) or "no collections yet")
        return grounder

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.index.close()

    def describe(self) -> dict:
        """For the engine's status: the index, its collections, the policy."""
        with self._lock:
            names = [] if self._closed else [c.name for c in self.index.collections()]
        return {"index": str(self.index.path), "collections": names, "threshold": self.threshold,
                "uncovered": self.uncovered}

    def ground(self, messages: list[dict[str, str]], collection: str | None,
               count_tokens: Callable[[str], int], prompt_tokens: int) -> Grounded:
        """Ground `messages` (checked, the last one the user's) within a
        prompt of `prompt_tokens`. Raises EdgeSlmError for an unknown
        collection."""
        question = messages[-1]["content"]
        # A follow-up ("and how do I fix it?": it points back) is searched with the question before it.
        asked = [m["content"] for m in messages if m["role"] == "user"]
        follow_up = len(asked) > 1 and not FOLLOW_UP_WORDS.isdisjoint(re.findall(r"\w+", question.lower()))
        queries = [question] + ([f"{asked[-2]}\n{question}"] if follow_up else [])
        t0 = time.monotonic()
        for query in queries:
            with self._lock:
                if self._closed:
                    raise EdgeSlmError("engine is shutting down")
                hits = self.index.search(query, collection, self.passages)
            if hits and max(h.coverage for h in hits) >= self.threshold:
                break
        spent = time.monotonic() - t0
        terms = query_terms(query)
        top = max((h.coverage for h in hits), default=None)
        if top is None or top < self.threshold:
            label = NOT_COVERED if self.uncovered == "decline" else UNGROUNDED
            return Grounded(None if label == NOT_COVERED else messages, [], label, terms, top, spent)
        # a passage that covers too little of the question only misleads a small model
        hits = [h for h in hits if h.coverage >= self.threshold]
        margin = TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1)
        conversation = sum(count_tokens(m["content"]) for m in messages)
        budget = min(conversation + self.max_tokens, prompt_tokens - margin)
        grounded, used = grounded_messages(messages, hits, count_tokens, budget)
        if not used:
            raise NoRoom(f"the conversation leaves no room in the prompt ({prompt_tokens} tokens) "
                         "for a passage from the manuals")
        return Grounded(grounded, used, GROUNDED, terms, top, spent)
