"""The grounded prompt: the best passages that fit a token budget, numbered,
with an instruction to answer from them alone."""

from __future__ import annotations

from collections.abc import Callable

from .index import Hit

DEFAULT_SYSTEM = ("You answer a technician's question using only the numbered passages from the site's "
                  "manuals given with it. If the passages do not answer the question, say that the "
                  "manuals do not cover it; do not guess.")


def source_label(hit: Hit) -> str:
    """Where a passage comes from, as a reader would cite it: file, heading or page."""
    where = [hit.file]
    if hit.heading:
        where.append(hit.heading)
    if hit.page is not None:
        where.append(f"page {hit.page}")
    return ", ".join(where)


def grounded_messages(question: str, hits: list[Hit], count_tokens: Callable[[str], int],
                      budget_tokens: int, system: str | None = None) -> tuple[list[dict], list[Hit]]:
    """Chat messages holding the question and as many of `hits` (best first)
    as fit in `budget_tokens`, counted by `count_tokens` over the messages'
    text (the chat template's few tokens per message are the caller's margin),
    and the hits used. The hits used are always a prefix of `hits`, so
    passage [n] in the prompt is used[n-1]."""
    system = DEFAULT_SYSTEM if system is None else system
    room = budget_tokens - count_tokens(system)
    used: list[Hit] = []
    blocks: list[str] = []
    for hit in hits:
        block = f"[{len(used) + 1}] ({source_label(hit)})\n{hit.text}"
        # The whole text is counted again: tokens do not add across a join.
        if count_tokens(_user_text(question, [*blocks, block])) > room:
            break
        blocks.append(block)
        used.append(hit)
    return [{"role": "system", "content": system},
            {"role": "user", "content": _user_text(question, blocks)}], used


def _user_text(question: str, blocks: list[str]) -> str:
    passages = "\n\n".join(blocks) if blocks else "(no passages)"
    return f"Passages:\n\n{passages}\n\nQuestion: {question}"
