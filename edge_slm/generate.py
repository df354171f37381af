"""Generating a continuation for one sequence: prefill, then sample and
decode token by token, streaming text and stopping on end-of-generation
tokens, stop strings, the token limit or the context's end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import ContextOverflow, EdgeSlmError
from .model import Transformer
from .sampler import Sampler, SamplingConfig


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    stop: tuple[str, ...] = ()   # strings that end the answer (not included in it)
    ignore_eos: bool = False     # keep going past end-of-generation tokens (parity runs)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length" (max tokens or context)
    n_cached: int       # leading tokens of prompt + tokens now held in the KV cache


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


def check_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt >= n_ctx:
        raise ContextOverflow(
            f"the prompt is {n_prompt} tokens but the context holds {n_ctx} "
            f"(one more is needed for the answer)")


def generate(runtime: Transformer, tokenizer, prompt: Sequence[int], cfg: GenerationConfig,
             on_text: Callable[[str], None] | None = None, slot: int = 0,
             cached: int = 0) -> Completion:
    """Continue prompt. The first `cached` prompt tokens are already in the
    slot's KV cache (a conversation's earlier turns) and are not recomputed."""
    prompt = list(prompt)
    n_ctx = runtime.opts.n_ctx
    check_fits(len(prompt), n_ctx)
    cached = max(0, min(cached, len(prompt) - 1))
    sampler = Sampler(cfg.sampling)
    stream = TextStream(tokenizer, cfg.stop)
    logits = runtime.prefill(prompt[cached:], start=cached, slot=slot)
    n_cached = len(prompt)
    history = list(prompt)
    tokens: list[int] = []
    finish = "length"
    while len(tokens) < cfg.max_tokens:
        tok = sampler.sample(logits, history)
        if tokenizer.is_eog(tok) and not cfg.ignore_eos:
            finish = "stop"
            break
        tokens.append(tok)
        history.append(tok)
        piece = stream.feed(tok)
        if piece and on_text:
            on_text(piece)
        if stream.stopped:
            finish = "stop"
            break
        pos = len(history) - 1
        if pos >= n_ctx or len(tokens) == cfg.max_tokens:
            break
        logits = runtime.prefill([tok], start=pos, slot=slot)
        n_cached += 1
    tail = stream.flush()
    if tail and on_text:
        on_text(tail)
    return Completion(prompt, tokens, stream.text, finish, n_cached)
