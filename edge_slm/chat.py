"""A conversation held in one KV slot: each turn re-renders the chat
template, reuses the cached tokens it shares with the last turn, and drops
the oldest exchanges when the context would overflow."""

from __future__ import annotations

from collections.abc import Callable

from .errors import ContextOverflow
from .generate import Completion, GenerationConfig, generate
from .model import Transformer


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, runtime: Transformer, tokenizer, cfg: GenerationConfig,
                 system: str | None = None, slot: int = 0):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.slot = slot
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []
        self._cache: list[int] = []  # tokens whose keys and values the slot holds
        self.shifted = 0  # cached tokens dropped by the last context shift

    def prompt_ids(self) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render_chat(self.system + self.turns))

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        self.turns.append({"role": "user", "content": text})
        budget = self.runtime.opts.n_ctx - self.cfg.max_tokens
        ids = self.prompt_ids()
        self.shifted = 0
        while len(ids) > budget and len(self.turns) > 1:
            del self.turns[:2]  # the oldest question and its answer
            ids = self._drop_from_cache(ids, self.prompt_ids())
        if len(ids) > budget:
            self.turns.pop()
            raise ContextOverflow(
                f"the question needs {len(ids)} tokens; with room for a {self.cfg.max_tokens}-token "
                f"answer the context ({self.runtime.opts.n_ctx}) holds {max(budget, 0)}")
        result = generate(self.runtime, self.tokenizer, ids, self.cfg, on_text=on_text,
                          slot=self.slot, cached=common_prefix(self._cache, ids))
        self._cache = (ids + result.tokens)[:result.n_cached]
        self.turns.append({"role": "assistant", "content": result.text})
        return result

    def _drop_from_cache(self, before: list[int], after: list[int]) -> list[int]:
        """The conversation lost its oldest exchange: `after` is `before` minus
        one span. Where the cache holds that span and what follows, drop it
        there and re-rotate the later keys rather than recompute them."""
        keep = common_prefix(before, after)
        span = len(before) - len(after)
        cached = common_prefix(self._cache, before)
        if span > 0 and before[:keep] + before[keep + span:] == after and cached > keep + span:
            self.runtime.kv_shift(self.slot, keep, span, cached)
            self._cache = after[:cached - span]
            self.shifted += span
        else:
            self._cache = self._cache[:common_prefix(self._cache, after)]
        return after
