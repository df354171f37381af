"""A conversation through the engine: each turn submits the whole history,
rendered with the chat template. The engine finds the earlier turns in a
slot's KV cache and computes only what is new; when the history outgrows
the context, the oldest exchanges after the kept start are dropped, and the
engine re-rotates the cached keys that follow instead of recomputing them."""

from __future__ import annotations

from collections.abc import Callable

from .engine import Engine, Result
from .errors import ContextOverflow, EdgeSlmError
from .sampler import SamplingConfig


class Conversation:
    def __init__(self, engine: Engine, system: str | None = None, keep_turns: int = 0,
                 max_tokens: int | None = None, sampling: SamplingConfig | None = None,
                 stop: tuple[str, ...] = ()):
        self.engine = engine
        self.system = [{"role": "system", "content": system}] if system else []
        self.keep_turns = keep_turns  # opening exchanges never dropped
        self.max_tokens = max_tokens or engine.cfg.max_tokens
        self.sampling = sampling
        self.stop = stop
        self.turns: list[dict[str, str]] = []
        self.dropped = 0  # exchanges dropped so far to fit the context

    def _fitting_prompt(self) -> list[int]:
        """The whole history as ids, the oldest droppable exchanges dropped
        until it leaves room for the answer. What can never be dropped (the
        system prompt, the opening turns, the question) is first judged by
        its length alone, so a history of megabytes is never rendered."""
        tok, limit = self.engine.tokenizer, self.engine.prompt_limit(self.max_tokens)
        first = 2 * self.keep_turns
        fixed = self.system + self.turns[:first] + self.turns[-1:]
        ids = None
        if not tok.surely_over(sum(len(m["content"]) for m in fixed), limit):
            ids = tok.encode_within(tok.render_chat(self.system + self.turns), limit)
            while ids is None and len(self.turns) > first + 1:
                del self.turns[first:first + 2]  # the oldest droppable question and answer
                self.dropped += 1
                ids = tok.encode_within(tok.render_chat(self.system + self.turns), limit)
        if ids is None:
            raise ContextOverflow(
                f"the conversation is over {max(limit, 0)} tokens even with its droppable turns "
                f"dropped: with room for a {self.max_tokens}-token answer the context "
                f"({self.engine.plan.n_ctx}) holds {max(limit, 0)}")
        return ids

    def ask(self, text: str, on_text: Callable[[str], None] | None = None,
            timeout: float | None = None) -> Result:
        """Ask and wait for the answer, streaming it to `on_text`. An answer
        cut short (timeout, cancel) stays in the history as far as it got."""
        self.turns.append({"role": "user", "content": text})
        try:
            ids = self._fitting_prompt()
        except EdgeSlmError:  # a question that cannot be asked leaves no trace
            self.turns.pop()
            raise
        req = self.engine.submit(prompt_ids=ids, max_tokens=self.max_tokens, sampling=self.sampling,
                                 stop=self.stop, timeout=timeout)
        for piece in req.stream():
            if on_text:
                on_text(piece)
        result = req.result()
        if result.tokens:
            self.turns.append({"role": "assistant", "content": result.text})
        else:
            self.turns.pop()
        return result
