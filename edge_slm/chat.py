"""A conversation through the engine: each turn submits the whole history,
rendered with the chat template. The engine finds the earlier turns in a
slot's KV cache and computes only what is new; when the history outgrows
the context, the oldest exchanges after the kept start are dropped, and the
engine re-rotates the cached keys that follow instead of recomputing them."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .engine import ERROR, OK, Engine, Result
from .errors import ContextOverflow, is_whole
from .generate import check_stop
from .grounding.ground import GROUNDED, NOT_COVERED_TEXT
from .sampler import SamplingConfig

log = logging.getLogger(__name__)


class Conversation:
    def __init__(self, engine: Engine, system: str | None = None, keep_turns: int = 0,
                 max_tokens: int | None = None, sampling: SamplingConfig | None = None,
                 stop: tuple[str, ...] = ()):
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be text, not {type(system).__name__}")
        if not is_whole(keep_turns, 0):
            raise ValueError(f"keep_turns must be a whole number >= 0, not {keep_turns!r}")
        if max_tokens is not None and not is_whole(max_tokens, 1):
            raise ValueError(f"max_tokens must be a whole number >= 1, not {max_tokens!r}")
        self.engine = engine
        self.system = [{"role": "system", "content": system}] if system else []
        self.keep_turns = keep_turns  # opening exchanges dropped last
        self.max_tokens = min(max_tokens or engine.cfg.max_tokens, engine.cfg.max_tokens)
        self.sampling = sampling
        self.stop = check_stop(stop)
        self.turns: list[dict[str, str]] = []
        self.dropped = 0  # exchanges dropped so far to fit the context

    def _fitting_prompt(self, system: list[dict[str, str]],
                        turns: list[dict[str, str]]) -> tuple[list[int], list[dict[str, str]]]:
        """`system` and the history `turns` (ending with the new question) as ids, the
        oldest exchanges after the first `keep_turns` dropped until it leaves
        room for the answer, and those too if it still does not; returns the
        ids and the turns kept. The system prompt and question, which are
        never dropped, are judged by length first, so a history of megabytes
        is never rendered."""
        tok, limit = self.engine.tokenizer, self.engine.prompt_limit(self.max_tokens)
        ids = None
        if not tok.messages_surely_over(system + turns[-1:], limit):
            while (ids := tok.encode_within(tok.chat_prompt(system + turns), limit)) is None \
                    and len(turns) > 1:
                first = 2 * self.keep_turns if len(turns) > 2 * self.keep_turns + 1 else 0
                if first == 0 and self.keep_turns:
                    log.info("the opening exchange(s) make way: the question does not fit with them")
                turns = turns[:first] + turns[first + 2:]  # the oldest droppable question and answer
        if ids is None:
            raise ContextOverflow(
                f"the system prompt and question alone are over {max(limit, 0)} tokens: the "
                f"context ({self.engine.plan.n_ctx}) keeps {self.engine.plan.n_ctx - limit} for the answer")
        return ids, turns

    def ask(self, text: str, on_text: Callable[[str], None] | None = None,
            timeout: float | None = None, ground: bool | None = None,
            collection: str | None = None) -> Result:
        """Ask and wait for the answer, streaming it to `on_text`. An answer
        cut short (timeout) stays in the history as far as it got; a question
        that gets no answer at all leaves the history as it was. If `on_text`
        raises (or the wait is interrupted), the request is cancelled. A
        blank question is an ERROR result, as the engine gives a blank prompt.

        The question is grounded as the engine grounds chat requests
        (`ground`, `collection`: see Engine.submit); the passages go with
        this question only, and the history keeps the question as asked."""
        if not isinstance(text, str):
            raise TypeError(f"the question must be text, not {type(text).__name__}")
        if not text.strip():
            return Result(ERROR, error="the prompt is empty: the question is blank")
        question = {"role": "user", "content": text}
        # the question before goes too, so a follow-up ("and how do I fix it?") is searched with it
        before = [t for t in self.turns if t["role"] == "user"][-1:]
        g = self.engine.ground(self.system + before + [question], ground=ground, collection=collection,
                               max_tokens=self.max_tokens)
        if g is not None and g.messages is None:  # declined: the manuals do not cover it
            if on_text:
                on_text(NOT_COVERED_TEXT)
            return Result(OK, text=NOT_COVERED_TEXT, finish_reason="not_covered", grounding=g.label)
        system, asked = self.system, question
        if g is not None and g.label == GROUNDED:
            system, asked = g.messages[:1], g.messages[-1]
        ids, turns = self._fitting_prompt(system, self.turns + [asked])
        req = self.engine.submit(prompt_ids=ids, max_tokens=self.max_tokens, sampling=self.sampling,
                                 stop=self.stop, timeout=timeout)
        try:
            for piece in req.stream():
                if on_text:
                    on_text(piece)
        except BaseException:
            req.cancel()
            raise
        result = req.result()
        if g is not None:
            result.grounding, result.sources = g.label, list(g.sources)
        if result.tokens:
            self.dropped += (len(self.turns) + 1 - len(turns)) // 2
            self.turns = turns[:-1] + [question, {"role": "assistant", "content": result.text}]
        return result
