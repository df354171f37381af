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


def grounded_messages(messages: list[dict[str, str]], hits: list[Hit], count_tokens: Callable[[str], int],
                      budget_tokens: int) -> tuple[list[dict[str, str]], list[Hit]]:
    """A conversation (ending with the user's question) grounded: the
    instruction put first in its system message, and as many of `hits` (best
    first) as fit in `budget_tokens` put before the question in its last
    message. `count_tokens` counts the messages' text (the chat template's
    few tokens per message are the caller's margin). Returns the messages
    and the hits used, always a prefix of `hits`, so passage [n] in the
    prompt is used[n-1]. Earlier turns are left as they were."""
    *history, last = messages
    system = DEFAULT_SYSTEM
    if history and history[0]["role"] == "system":
        # the caller's instruction (answer briefly, say) still holds, after ours
        system = f"{DEFAULT_SYSTEM}\n\n{history.pop(0)['content']}"
    question = last["content"]
    room = budget_tokens - sum(count_tokens(m["content"]) for m in history) - count_tokens(system)
    used: list[Hit] = []
    blocks: list[str] = []
    for hit in hits:
        block = f"[{len(used) + 1}] ({source_label(hit)})\n{hit.text}"
        # The whole text is counted again: tokens do not add across a join.
        if count_tokens(_user_text(question, [*blocks, block])) > room:
            break
        blocks.append(block)
        used.append(hit)
    return [{"role": "system", "content": system}, *history,
            {"role": "user", "content": _user_text(question, blocks)}], used


def _user_text(question: str, blocks: list[str]) -> str:
    passages = "\n\n".join(blocks) if blocks else "(no passages)"
    return f"Passages:\n\n{passages}\n\nQuestion: {question}"
