"""The engine every front end stands on: a memory plan fixed at start, a
bounded queue, and continuous batching over KV slots.

One thread owns the model. Each step it admits queued requests into free
slots, then runs a single forward pass holding one next token for every
decoding slot plus a chunk of one prefilling prompt, so a long prompt joins
without stalling the answers already streaming. Callers submit, stream,
cancel and read status from any thread.

    engine = Engine(EngineConfig(memory_budget=parse_size("256M")))
    req = engine.submit("Why does a pump lose pressure?", max_tokens=64)
    for piece in req.stream():
        print(piece, end="")
    print(req.result().status)
    engine.close()
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .chat_template import ConversationRejected
from .errors import BadText, EdgeSlmError, ModelError, is_whole
from .formats import KV_TYPES
from .generate import TextStream, check_ids, check_messages, check_stop
from .memory import (MAX_QUEUE, Fixed, MemoryPlan, current_rss, default_ctx, limit_malloc_arenas,
                     plan_memory)
from .backends import BACKENDS, EXECUTION_PROVIDERS, Source, check_provider, load_source, resolve
from .model import RuntimeOptions
from .paths import model_or_default
from .sampler import Sampler, SamplingConfig

if TYPE_CHECKING:
    from .grounding.ground import Grounded, Grounder

log = logging.getLogger(__name__)

# Request outcomes, as the MQTT protocol and the kiosk report them.
OK, BUSY, TOO_LONG, TIMEOUT, CANCELLED, ERROR = "ok", "busy", "too_long", "timeout", "cancelled", "error"


# Beyond these a setting is a typo on any board (the CLI's --threads stops at 256 too).
MAX_THREADS, MAX_SLOTS, MAX_BATCH = 256, 256, 4096


def available_cpus() -> int:
    """The CPUs this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    return min(available_cpus(), MAX_THREADS)


@dataclass(frozen=True)
class EngineConfig:
    model: str | os.PathLike[str] | None = None  # GGUF file, ONNX folder or .tflite; None = the pulled default
    model_backend: str = "auto"      # what runs it (edge_slm.backends): "auto" by the file, "gguf", "onnx", "litert"
    execution_provider: str = "cpu"  # where ONNX Runtime runs it: "cpu", "cuda", "tensorrt"
    memory_budget: int | None = None  # bytes for the whole process; None = no ceiling
    slots: int = 4                   # conversations decoded together (fewer if the budget says so)
    ctx: int | None = None           # tokens per slot; None = the most the budget allows
    min_ctx: int = 512               # below this a slot is not useful: refuse to start
    kv_type: str = "f16"             # "f16", or "q8_0" to halve the cache
    threads: int = field(default_factory=default_threads)
    max_batch: int = 64              # tokens per forward pass (decode tokens + a prompt chunk)
    prefill_chunk: int = 32          # prompt tokens per step while others decode
    queue_size: int = 16             # waiting requests beyond the slots; more are refused (busy)
    timeout: float = 120.0           # default seconds from submit to the last token
    max_tokens: int = 256            # answer length: the default, and the most a request may ask
    overflow: str = "refuse"         # over-long prompts: "refuse" (too_long) or "truncate"
    keep_tokens: int = 64            # start of the conversation kept when the context shifts
    backend: str | None = None       # kernel table; None = best for this CPU
    front_end_bytes: int = 0         # held by the front ends beside the engine (the MQTT
                                     # service's buffers): counted in the memory plan
    # Grounding (edge_slm.grounding): chat requests answered from the site's manuals.
    index: str | os.PathLike[str] | None = None  # the index; None = $EDGE_SLM_HOME's, if there is one
    grounding: bool = True           # ground chat requests by default when there is an index
    ground_threshold: float | None = None  # the best passage's coverage of a question (0-1)
                                     # below which the manuals do not cover it; None = measured default
    uncovered: str = "decline"       # then: "decline" to answer, or "answer" labelled ungrounded
    ground_passages: int = 3         # passages searched for, at most, per question
    ground_tokens: int = 768         # prompt tokens the passages may take, at most

    def __post_init__(self) -> None:
        def whole(name: str, least: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if not (is_whole(value, least) or optional and value is None):
                raise EdgeSlmError(f"setting {name}: {value!r} is not a whole number >= {least}")

        for name in ("slots", "min_ctx", "threads", "max_batch", "prefill_chunk", "max_tokens",
                     "ground_passages", "ground_tokens"):
            whole(name, 1)
        whole("queue_size", 0)
        whole("front_end_bytes", 0)
        for name, most in (("threads", MAX_THREADS), ("slots", MAX_SLOTS), ("max_batch", MAX_BATCH),
                           ("queue_size", MAX_QUEUE)):
            if getattr(self, name) > most:
                raise EdgeSlmError(f"setting {name}: {getattr(self, name)} is more than {most}")
        whole("keep_tokens", 0)
        whole("ctx", 1, optional=True)
        whole("memory_budget", 1, optional=True)
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or not self.timeout > 0:
            raise EdgeSlmError(f"setting timeout: {self.timeout!r} is not a number of seconds > 0")
        for name in ("kv_type", "overflow", "backend", "model_backend", "execution_provider"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "backend" and value is None):
                raise EdgeSlmError(f"setting {name}: {value!r} is not text")
        for name in ("model", "index"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise EdgeSlmError(f"setting {name}: {value!r} is not a file path")
        if not isinstance(self.grounding, bool):
            raise EdgeSlmError(f"setting grounding: {self.grounding!r} is not true or false")
        t = self.ground_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1):
            raise EdgeSlmError(f"setting ground_threshold: {t!r} is not a share from 0 to 1")
        if self.uncovered not in ("decline", "answer"):
            raise EdgeSlmError(f"setting uncovered: {self.uncovered!r}, choose 'decline' or 'answer'")
        if self.kv_type not in KV_TYPES:
            raise EdgeSlmError(f"setting kv_type: {self.kv_type!r}, choose from {', '.join(KV_TYPES)}")
        if self.model_backend not in BACKENDS:
            raise EdgeSlmError(f"setting model_backend: {self.model_backend!r}, choose from {', '.join(BACKENDS)}")
        if self.execution_provider not in EXECUTION_PROVIDERS:
            raise EdgeSlmError(f"setting execution_provider: {self.execution_provider!r}, "
                               f"choose from {', '.join(EXECUTION_PROVIDERS)}")
        if self.overflow not in ("refuse", "truncate"):
            raise EdgeSlmError(f"setting overflow: {self.overflow!r}, choose 'refuse' or 'truncate'")


@dataclass
class Result:
    status: str                   # OK, BUSY, TOO_LONG, TIMEOUT, CANCELLED, ERROR
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None  # "stop" or "length" when status is OK
    error: str | None = None          # one line, for anything but OK
    internal: bool = False            # with ERROR: the runtime's fault (a bug, the model's
                                      # template, a shutdown), not the request's
    retry_after: float | None = None  # seconds, with BUSY
    cached_tokens: int = 0            # prompt tokens found in the slot's cache, not recomputed
    queued_s: float = 0.0
    ttft_s: float | None = None       # submit to first token
    total_s: float = 0.0
    grounding: str | None = None      # with grounding: GROUNDED, NOT_COVERED or UNGROUNDED
                                      # (edge_slm.grounding.ground); None when not grounded
    sources: list = field(default_factory=list)  # the passages in the prompt (grounding.Hit),
                                      # from retrieval: what the answer may cite


_DONE = object()

# Re-rotating cached keys past a dropped span pays when at least this many
# tokens are saved from recomputation.
MIN_SHIFT_REUSE = 16
MAX_GAP_CANDIDATES = 256  # bounds the search in a cache of repeated tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Request:
    """A submitted question. Stream its text, wait for its result, or cancel it."""

    def __init__(self, rid: str, prompt: array, max_tokens: int, sampler: Sampler,
                 stop: tuple[str, ...], ignore_eos: bool, timeout: float,
                 on_text: Callable[[str], None] | None,
                 on_done: Callable[[Result], None] | None = None):
        self.id = rid
        self.prompt = prompt  # token ids, after any truncation; 4 bytes each while queued
        self.max_tokens = max_tokens
        self.sampler = sampler  # made at submit, so a bad config fails there and not mid-step
        self.stop = stop
        self.ignore_eos = ignore_eos
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.on_text = on_text
        self.on_done = on_done
        self.grounded = None  # grounding.ground.Grounded, when the request was grounded
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._result: Result | None = None

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the engine's next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        assert self._result is not None
        return self._result

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces as they are generated; ends when the request finishes."""
        while True:
            try:
                piece = self._pieces.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no text from request {self.id} for {timeout} s") from None
            if piece is _DONE:
                return
            yield piece

    def _emit(self, piece: str) -> None:
        if piece:
            self._pieces.put(piece)
            if self.on_text:
                self.on_text(piece)

    def _finish(self, result: Result) -> None:
        result.total_s = time.monotonic() - self.created
        if self.grounded is not None:
            result.grounding, result.sources = self.grounded.label, list(self.grounded.sources)
        self._result = result
        self._pieces.put(_DONE)
        self._done.set()
        if self.on_done:
            try:
                self.on_done(result)
            except Exception:  # the caller's bug must not stop whoever finished the request
                log.exception("on_done callback of request %s failed", self.id)


@dataclass
class Slot:
    """One KV sequence: what it caches, and the request using it (if any)."""

    index: int
    cache: list[int] = field(default_factory=list)  # tokens whose K/V fill positions 0..
    req: Request | None = None
    seq: list[int] = field(default_factory=list)    # prompt + answer so far
    n_prompt: int = 0
    answer: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    text: TextStream | None = None
    started: float = 0.0
    first_token: float | None = None
    keep: int = 0
    reused: int = 0             # prompt tokens the cache already held at admission
    last_used: float = 0.0      # when its last request ended
    chunk: list[int] = field(default_factory=list)  # prompt tokens in this step's batch

    def release(self) -> None:
        self.req = None
        self.sampler = None
        self.text = None
        self.answer = []
        self.seq = []


class Engine:
    def __init__(self, cfg: EngineConfig | None = None):
        cfg = EngineConfig() if cfg is None else cfg
        self.cfg = cfg
        self.model, self.grounder, self.plan = load_and_plan(cfg)
        self.tokenizer = self.model.tokenizer()
        log.info("memory plan: %s\n%s", self.plan.summary(), self.plan.describe())
        self.runtime = self.model.runtime(RuntimeOptions(
            n_threads=cfg.threads, n_ctx=self.plan.n_ctx, n_slots=self.plan.n_slots,
            max_batch=cfg.max_batch, kv_type=self.plan.kv_type, backend=cfg.backend,
            max_logits=self.plan.n_slots,  # a step wants at most one row per slot
            execution_provider=cfg.execution_provider))
        self.slots = [Slot(i) for i in range(self.plan.n_slots)]
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._stats = collections.Counter()
        self._busy_time = 0.0
        self._decode_time = 0.0  # in steps that only decoded (no prompt chunk)
        self._decode_tokens = 0
        self._decode_steps = 0
        self._decode_forward = 0.0  # of that time: in the C pass, and in sampling
        self._decode_sampling = 0.0
        self._clamp_logged = False
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="edge-slm-engine", daemon=True)
        self._thread.start()

    # ---- the API ----

    def submit(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               prompt_ids: Sequence[int] | np.ndarray | None = None, max_tokens: int | None = None,
               sampling: SamplingConfig | None = None, stop: str | Sequence[str] = (),
               ignore_eos: bool = False, timeout: float | None = None,
               on_text: Callable[[str], None] | None = None, request_id: str | None = None,
               on_done: Callable[[Result], None] | None = None, ground: bool | None = None,
               collection: str | None = None) -> Request:
        """Queue a question: raw `prompt` text, chat `messages` rendered with
        the model's template, or token ids. Never blocks: a full queue gives
        a BUSY result; a blank prompt, no messages, a blank last message or a
        template that fails give an ERROR result.

        Raw `prompt` text is tokenized with special tokens parsed: a written
        `<|im_start|>` becomes that control token, for callers who write their
        own markup (never put a user's text there). In `messages` (dicts with
        `role` and `content`, both text) only the template's own markup makes
        control tokens: what the messages hold is always plain text. At most
        MAX_STOPS `stop` strings of at most MAX_STOP_CHARS characters each.

        Chat `messages` are grounded in the manuals' index when the engine
        has one (`ground=False` turns that off; `ground=True` insists, and
        without an index gives an ERROR result), searched in `collection`
        (None: all of them): see ground(). The result then carries its
        `sources` and its `grounding`; a question the manuals do not cover is
        answered NOT_COVERED_TEXT at once, or, by setting, without passages.

        `on_text` runs on the engine thread; keep it short. `on_done(result)`
        runs exactly once, after the result is set, on whichever thread
        finishes the request: the engine's, or the caller's for a refusal
        at submit."""
        if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages and prompt_ids")
        max_tokens = self.cfg.max_tokens if max_tokens is None else max_tokens
        timeout = self.cfg.timeout if timeout is None else timeout
        if not is_whole(max_tokens, 1) or not timeout > 0:
            raise ValueError(f"max_tokens must be a whole number >= 1 and timeout > 0, "
                             f"not {max_tokens!r}, {timeout!r}")
        if max_tokens > self.cfg.max_tokens:  # the plan holds answers only this long
            if not self._clamp_logged:
                log.warning("answers are held to max_tokens = %d (asked for %d)", self.cfg.max_tokens,
                            max_tokens)
                self._clamp_logged = True
            max_tokens = self.cfg.max_tokens
        stop = check_stop(stop)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be text (str), not {type(prompt).__name__}")
        if messages is not None:
            messages = check_messages(messages)
        sampling = SamplingConfig() if sampling is None else sampling
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, not {type(sampling).__name__}")
        req = Request(request_id or f"r{next(self._ids)}", array("i"), max_tokens,
                      Sampler(sampling), stop, ignore_eos, timeout, on_text, on_done)
        refused = None
        if messages is not None:
            messages, refused = self._grounded(req, messages, ground, collection)
        refused = refused or self._prompt(req, prompt, messages, prompt_ids)
        if refused:
            self._count(refused.status)
            req._finish(refused)
            return req
        with self._cond:
            # queue_size counts requests waiting beyond those the free slots take next step
            free = sum(s.req is None for s in self.slots)
            if self._stopping:
                refused = Result(ERROR, prompt_tokens=len(req.prompt), error="engine is shutting down",
                                 internal=True)
            elif len(self._queue) >= self.cfg.queue_size + free:
                refused = Result(BUSY, prompt_tokens=len(req.prompt), retry_after=self._retry_hint(),
                                 error="queue full; retry later")
            else:
                self._queue.append(req)
                self._cond.notify()
                return req
            self._stats[refused.status] += 1
        req._finish(refused)  # outside the lock: on_done is the caller's code
        return req

    def ground(self, messages: list[dict[str, str]], *, ground: bool | None = None,
               collection: str | None = None, max_tokens: int | None = None) -> Grounded | None:
        """Retrieval for a conversation whose last message is the user's
        question: the grounded messages within the prompt that leaves room
        for `max_tokens` of answer, with their sources; or None when it is
        not to be grounded (`ground` False, or None and no index) or is
        too long to be answered at all (submit refuses it). Raises
        EdgeSlmError for grounding asked for without an index and for an
        unknown collection."""
        if ground is False:
            return None
        if self.grounder is None:
            if ground or collection is not None:
                raise EdgeSlmError("grounding asked for, but there is no index of manuals "
                                   "(`edge-slm index DIR` makes one)")
            return None
        limit = self.prompt_limit(min(max_tokens or self.cfg.max_tokens, self.cfg.max_tokens))
        if messages[-1]["role"] != "user" or self.tokenizer.messages_surely_over(messages, limit):
            return None

        def count_tokens(text: str) -> int:
            return len(self.tokenizer.encode(text, add_bos=False, special=False))

        if count_tokens(messages[-1]["content"]) > limit:  # the question alone: too long, not uncovered
            return None
        return self.grounder.ground(messages, collection, count_tokens, limit)

    def _grounded(self, req: Request, messages: list[dict[str, str]], ground: bool | None,
                  collection: str | None) -> tuple[list[dict[str, str]] | None, Result | None]:
        """The messages to render for `req` after grounding them, or the result
        that answers it without the model (declined, or refused)."""
        if self._stopping:  # the index closes with the engine
            return None, Result(ERROR, error="engine is shutting down", internal=True)
        blank = _blank(None, messages)
        if blank:  # nothing to search for either
            return None, Result(ERROR, error=blank)
        try:
            req.grounded = self.ground(messages, ground=ground, collection=collection,
                                       max_tokens=req.max_tokens)
        except EdgeSlmError as e:
            from .grounding.ground import NoRoom
            from .grounding.index import IndexFileError

            # an index that went bad under a running engine is the runtime's fault
            return None, Result(TOO_LONG if isinstance(e, NoRoom) else ERROR, error=str(e),
                                internal=isinstance(e, IndexFileError))
        g = req.grounded
        if g is None or g.messages is not None:
            return (messages if g is None else g.messages), None
        from .grounding.ground import NOT_COVERED_TEXT

        req._emit(NOT_COVERED_TEXT)
        return None, Result(OK, text=NOT_COVERED_TEXT, finish_reason="not_covered")

    def _prompt(self, req: Request, prompt: str | None, messages: list[dict[str, str]] | None,
                prompt_ids: list[int] | None) -> Result | None:
        """Set the request's prompt ids, within the limit (truncated if so
        configured); or the result refusing it. A text far beyond the limit
        is refused without being tokenized whole, whatever its size."""
        limit = self.prompt_limit(req.max_tokens)
        keep = self.cfg.keep_tokens
        truncate = self.cfg.overflow == "truncate" and limit > keep
        refusal = Result(TOO_LONG, error=f"prompt is over {limit} tokens: the context holds "
                                         f"{self.plan.n_ctx}, {limit} with room for the answer")
        if prompt_ids is not None:
            ids = check_ids(prompt_ids, self.model.config.vocab)
            if len(ids) > limit and truncate:
                ids = ids[:keep] + ids[len(ids) - (limit - keep):]
            if len(ids) > limit:
                refusal.prompt_tokens = len(ids)
                return refusal
        else:
            blank = _blank(prompt, messages)
            if blank:
                return Result(ERROR, error=blank)
            try:
                chat = None
                if messages is not None:
                    messages = self._within_reach(messages, limit, truncate)
                    if messages is None:
                        return refusal
                    chat = self.tokenizer.chat_prompt(messages)
                ids = self.tokenizer.encode_within(chat or prompt, limit)
                if ids is None and truncate:
                    ids = self.tokenizer.encode_ends(chat or prompt, keep, limit - keep)
            except (BadText, ConversationRejected) as e:
                return Result(ERROR, error=str(e))
            except ModelError as e:  # the template failed on this conversation
                return Result(ERROR, error=str(e), internal=True)
            if ids is None:
                return refusal
        if not ids:
            return Result(ERROR, error="the prompt is empty")
        req.prompt = array("i", ids)
        return None

    def _within_reach(self, messages: list[dict[str, str]], limit: int,
                      truncate: bool) -> list[dict[str, str]] | None:
        """Messages fit to render: None when their length alone puts them
        over the limit; when truncating, each long content cut to the ends
        that truncation keeps (either end holds more than `limit` tokens)."""
        tok = self.tokenizer
        if not truncate:
            return None if tok.messages_surely_over(messages, limit) else messages
        reach = limit * (tok.max_token_bytes or 0)
        if not reach:
            return messages

        def cut(m: dict[str, str]) -> dict[str, str]:
            c = m.get("content")
            return {**m, "content": c[:reach] + c[-reach:]} if isinstance(c, str) and len(c) > 2 * reach else m

        return [cut(m) for m in messages]

    def prompt_limit(self, max_tokens: int) -> int:
        """Longest prompt accepted: the context minus room for the answer
        (at most a quarter of the context is reserved)."""
        n_ctx = self.plan.n_ctx
        return n_ctx - max(1, min(max_tokens, n_ctx // 4))

    def status(self) -> dict:
        with self._cond:
            busy = sum(s.req is not None for s in self.slots)
            depth = len(self._queue)
            stats = dict(self._stats)
        elapsed = self._busy_time or 1e-9
        return {"slots": len(self.slots), "slots_busy": busy, "queue_depth": depth,
                "queue_size": self.cfg.queue_size, "n_ctx": self.plan.n_ctx,
                "memory_plan": self.plan.as_dict(), "rss": current_rss(),
                "tokens_generated": stats.get("tokens", 0),
                "prompt_tokens_reused": stats.get("reused", 0),
                # all told: prompts, refusals and idle gaps between requests included
                "tokens_per_s": stats.get("tokens", 0) / elapsed,
                # the steps that only decoded (one token per busy slot, sampling included):
                # the batched decode rate
                "decode_tps": self._decode_tokens / (self._decode_time or 1e-9),
                # slots decoded together per such step: how much one weight pass serves
                "mean_decode_batch": self._decode_tokens / (self._decode_steps or 1),
                # where such a step's time goes, ms per token: the C pass, the
                # samplers, and the rest (Python: batching, text, stops)
                "decode_ms_per_token": self._decode_split(),
                "context_shifts": stats.get("shifts", 0),
                "requests": {k: v for k, v in stats.items() if k not in ("tokens", "reused", "shifts")},
                "backend": self.runtime.backend, "uptime_s": time.monotonic() - self._started,
                "grounding": self.grounder.describe() if self.grounder else None}

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self.grounder:
            self.grounder.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine thread ----

    def _decode_split(self) -> dict[str, float]:
        n = self._decode_tokens or 1
        rest = self._decode_time - self._decode_forward - self._decode_sampling
        return {"forward": self._decode_forward / n * 1e3,
                "sampling": self._decode_sampling / n * 1e3, "python": max(0.0, rest) / n * 1e3}

    def _count(self, status: str) -> None:
        with self._cond:
            self._stats[status] += 1

    def _retry_hint(self) -> float:
        done = max(1, self._stats.get(OK, 0))
        per_request = self._busy_time / done if self._busy_time else 1.0
        return round(max(1.0, per_request * (len(self._queue) + 1) / len(self.slots)), 1)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue and not any(s.req for s in self.slots):
                    self._cond.wait()
                if self._stopping:
                    break
            t0 = time.monotonic()
            try:
                with self._cond:
                    stale = self._drop_stale()
                for req, result in stale:  # outside the lock: on_done is the caller's code
                    req._finish(result)
                with self._cond:
                    admitted = self._admit()
                for slot, shared in admitted:  # outside the lock: may re-rotate a cache
                    self._start(slot, shared)
                self._step()
            except Exception as e:  # a bug must not strand callers waiting forever
                log.exception("engine step failed")
                for s in self.slots:
                    if s.req:
                        self._end(s, Result(ERROR, error=f"internal error: {e}", internal=True))
                    s.cache = []
            self._busy_time += time.monotonic() - t0
        # What each request got so far is kept, as cancel() keeps it.
        for s in self.slots:
            if s.req:
                self._end(s, self._partial(s, CANCELLED, "engine shut down"))
        now = time.monotonic()
        while self._queue:
            req = self._queue.popleft()
            self._count(CANCELLED)
            req._finish(Result(CANCELLED, prompt_tokens=len(req.prompt), queued_s=now - req.created,
                               error="engine shut down"))

    def _drop_stale(self) -> list[tuple[Request, Result]]:
        """Take out queued requests that were cancelled or ran out of time, to
        finish at once rather than when a slot frees (the queue is short:
        queue_size); returns each with its result."""
        now = time.monotonic()
        stale = []
        for req in [r for r in self._queue if r.cancelled or now > r.deadline]:
            self._queue.remove(req)
            status = CANCELLED if req.cancelled else TIMEOUT
            self._stats[status] += 1
            stale.append((req, Result(status, prompt_tokens=len(req.prompt), queued_s=now - req.created,
                                      error="cancelled while queued" if req.cancelled
                                      else "timed out in queue")))
        return stale

    def _admit(self) -> list[tuple[Slot, int]]:
        """Move queued requests into free slots, preferring the slot whose
        cache shares the longest prefix (a common system prompt). Returns
        each slot taken, with the prompt tokens its cache shares."""
        admitted = []
        while self._queue:
            free = [s for s in self.slots if s.req is None]
            if not free:
                break
            req = self._queue.popleft()
            # Longest shared prefix first; among equals, the slot with the least
            # cached work to lose (so one-off questions pass through one slot
            # and a conversation's history survives them), then the idlest.
            shared = {s.index: common_prefix(s.cache, req.prompt) for s in free}
            slot = max(free, key=lambda s: (shared[s.index], shared[s.index] - len(s.cache),
                                            -s.last_used))
            slot.req = req
            admitted.append((slot, shared[slot.index]))
        return admitted

    def _start(self, slot: Slot, shared: int) -> None:
        req = slot.req
        prompt = list(req.prompt)
        self._reuse_cache(slot, prompt, shared)
        slot.reused = len(slot.cache)
        with self._cond:
            self._stats["reused"] += slot.reused
        slot.seq = prompt
        slot.n_prompt = len(req.prompt)
        slot.answer = []
        slot.sampler = req.sampler
        slot.text = TextStream(self.tokenizer, req.stop)
        slot.started = time.monotonic()
        slot.first_token = None
        slot.keep = min(self.cfg.keep_tokens, len(req.prompt))

    def _reuse_cache(self, slot: Slot, prompt: list[int], shared: int) -> None:
        """Keep what the slot's cache shares with the prompt. Past the common
        prefix, a conversation that dropped its oldest exchange continues the
        cache after a gap: drop the gap and re-rotate the later keys to their
        new positions instead of recomputing them."""
        cache = slot.cache
        limit = len(prompt) - 1  # the last prompt token is run to get logits
        keep = min(shared, limit)
        best_gap, best_n = 0, 0
        if keep < limit and len(cache) > keep + 1:
            after = np.asarray(cache[keep + 1:], np.int64)
            want = np.asarray(prompt[keep:limit], np.int64)
            for j in np.flatnonzero(after == want[0])[:MAX_GAP_CANDIDATES]:
                n = min(len(after) - j, len(want))
                differ = np.flatnonzero(after[j:j + n] != want[:n])
                n = int(differ[0]) if len(differ) else n
                if n > best_n:
                    best_gap, best_n = int(j) + 1, n
        if best_n >= MIN_SHIFT_REUSE and self.runtime.can_shift:
            self.runtime.kv_shift(slot.index, keep, best_gap, keep + best_gap + best_n)
            slot.cache = prompt[:keep + best_n]
            log.debug("slot %d: reused %d cached tokens after dropping %d", slot.index, best_n, best_gap)
        else:
            slot.cache = cache[:keep]
        # a sliding-window layer's ring may no longer hold the window before it
        del slot.cache[self.runtime.kv_usable(slot.index, len(slot.cache)):]

    def _step(self) -> None:
        # Expire and cancel first, so a freed slot costs no more compute.
        now = time.monotonic()
        for s in self.slots:
            if s.req and s.req.cancelled:
                self._end(s, self._partial(s, CANCELLED, "cancelled"))
            elif s.req and now > s.req.deadline:
                self._end(s, self._partial(s, TIMEOUT, "deadline passed"))
        active = [s for s in self.slots if s.req]
        if not active:
            return
        for s in active:
            if len(s.cache) == self.plan.n_ctx:
                if self.runtime.can_shift:
                    self._shift(s)
                else:  # the backend cannot drop the oldest half: the answer ends here
                    self._end(s, self._partial(s, OK, None, finish="length"))
        active = [s for s in active if s.req]
        if not active:
            return

        t0 = time.perf_counter()
        tokens, pos, slot_ids, want, owners = [], [], [], [], []
        room = self.cfg.max_batch
        decoding = [s for s in active if len(s.cache) == len(s.seq) - 1 and s.answer]
        for s in decoding:
            tokens.append(s.seq[-1])
            pos.append(len(s.cache))
            slot_ids.append(s.index)
            want.append(1)
            owners.append(s)
            room -= 1
        # Prompts are prefilled in chunks, the oldest request first.
        for s in sorted((s for s in active if s not in decoding), key=lambda s: s.req.created):
            if room <= 0:
                break
            start = len(s.cache)
            chunk = s.seq[start:start + min(room, self.cfg.prefill_chunk)]
            for i, t in enumerate(chunk):
                tokens.append(t)
                pos.append(start + i)
                slot_ids.append(s.index)
                last = start + i == len(s.seq) - 1
                want.append(1 if last else 0)
                if last:
                    owners.append(s)
            room -= len(chunk)
            s.chunk = chunk

        t_forward = time.perf_counter()
        logits = self.runtime.forward(np.array(tokens, np.int32), np.array(pos, np.int32),
                                      np.array(slot_ids, np.int32), np.array(want, np.uint8))
        t_forward = time.perf_counter() - t_forward
        sampling = 0.0
        for s in decoding:
            s.cache.append(s.seq[-1])
        for s in active:
            s.cache.extend(s.chunk)
            s.chunk = []
        for row, s in zip(logits, owners):
            try:
                sampling += self._next_token(s, row)
            except ModelError as e:  # the model computed nonsense (the sampler says so): no bug here
                log.info("request %s failed: %s", s.req.id, e)
                result = self._partial(s, ERROR, str(e))
                result.internal = True
                self._end(s, result)
            except Exception as e:  # its sampler or on_text callback: that request alone ends
                log.exception("request %s failed", s.req.id)
                result = self._partial(s, ERROR, f"request failed: {e}")
                result.internal = True  # its sampler or callback, not its text
                self._end(s, result)
        if len(tokens) == len(decoding):
            self._decode_time += time.perf_counter() - t0
            self._decode_forward += t_forward
            self._decode_sampling += sampling
            self._decode_tokens += len(tokens)
            self._decode_steps += 1

    def _next_token(self, s: Slot, logits: np.ndarray) -> float:
        """Samples and files s's next token; returns the seconds sampling took."""
        req = s.req
        t0 = time.perf_counter()
        tok = s.sampler.sample(logits, s.seq)
        sampled = time.perf_counter() - t0
        if s.first_token is None:
            s.first_token = time.monotonic()
        if self.tokenizer.is_eog(tok) and not req.ignore_eos:
            self._end(s, self._partial(s, OK, None, finish="stop"))
            return sampled
        s.answer.append(tok)
        s.seq.append(tok)
        with self._cond:
            self._stats["tokens"] += 1
        req._emit(s.text.feed(tok))
        if s.text.stopped:
            self._end(s, self._partial(s, OK, None, finish="stop"))
        elif len(s.answer) >= req.max_tokens:
            self._end(s, self._partial(s, OK, None, finish="length"))
        return sampled

    def _shift(self, s: Slot) -> None:
        """The slot's context is full: drop the older half after the kept start,
        re-rotating the cached keys instead of recomputing them."""
        n_used = len(s.cache)
        # In a ring, the sliding-window layers may no longer hold the kept
        # start: the window after the cut must lie within what moves.
        window = self.model.config.swa_window if self.runtime.kv_ring else 0
        if window:
            s.keep = min(s.keep, n_used - window)
        n_drop = max(1, (n_used - s.keep) // 2)
        if window:
            n_drop = min(n_drop, n_used - s.keep - window + 1)
        self.runtime.kv_shift(s.index, s.keep, n_drop, n_used)
        del s.cache[s.keep:s.keep + n_drop]
        del s.seq[s.keep:s.keep + n_drop]
        self._count("shifts")
        log.info("slot %d: context full, dropped %d tokens after the first %d", s.index, n_drop, s.keep)

    def _partial(self, s: Slot, status: str, error: str | None, finish: str | None = None) -> Result:
        tail = s.text.flush() if status == OK and s.text else ""
        if tail:
            s.req._emit(tail)
        return Result(status, text=s.text.text if s.text else "", tokens=list(s.answer),
                      prompt_tokens=s.n_prompt, finish_reason=finish, error=error,
                      cached_tokens=s.reused,
                      queued_s=s.started - s.req.created,
                      ttft_s=(s.first_token - s.req.created) if s.first_token else None)

    def _end(self, s: Slot, result: Result) -> None:
        self._count(result.status)
        req = s.req
        s.release()
        s.last_used = time.monotonic()
        req._finish(result)


def _blank(prompt: str | None, messages: list[dict[str, str]] | None) -> str | None:
    """Why a prompt or conversation leaves nothing to answer, if it does."""
    if prompt is not None:
        return None if prompt.strip() else "the prompt is empty"
    if not messages:
        return "the prompt is empty: no messages"
    if not messages[-1]["content"].strip():
        return ("the prompt is empty: the question is blank" if len(messages) == 1
                else f"the prompt is empty: the last message ({len(messages) - 1}) is blank")
    return None


def load_and_plan(cfg: EngineConfig) -> tuple[Source, Grounder | None, MemoryPlan]:
    """Load the model's metadata and tokenizer and open the manuals' index
    (when grounding is on and there is one), measuring what they cost, and
    make the engine's memory plan: within the budget if there is one, else
    as configured. A GGUF's weights are mapped, not read: the runtime copies
    them; other backends measure what their session holds (edge_slm.backends)."""
    limit_malloc_arenas()
    interpreter = current_rss()
    path = model_or_default(cfg.model)
    check_provider(cfg.execution_provider, resolve(path, cfg.model_backend))
    model = load_source(path, cfg.model_backend)
    kv_type = cfg.kv_type
    if kv_type not in model.kv_types:
        if kv_type != EngineConfig.kv_type:  # asked for, not the default
            raise EdgeSlmError(f"KV type {kv_type}: the {model.kind} backend holds its cache in "
                               f"{', '.join(model.kv_types)} only")
        kv_type = model.kv_types[0]
    # A failing or hostile chat template refuses the model here; and Jinja,
    # which it loads, is measured with the tokenizer.
    model.tokenizer().check_chat_template()
    # Metadata, vocabulary and template: all that loading holds besides the
    # weights, whose mapped pages are not touched until the runtime copies them.
    tokenizer = max(0, current_rss() - interpreter - model.loaded_bytes)
    grounder = open_grounder(cfg)
    try:
        fixed = Fixed(model.config, cfg.memory_budget or 0, model.resident_weights, interpreter,
                      tokenizer, cfg.threads, cfg.max_batch, cfg.queue_size, cfg.max_tokens,
                      cfg.front_end_bytes, grounder.bytes if grounder else 0,
                      state_bytes=model.state_bytes, kv_types=model.kv_types)
        if cfg.memory_budget is None:
            plan = fixed.plan(cfg.slots, default_ctx(model.config.context_length, cfg.ctx), kv_type)
        else:
            plan = plan_memory(fixed, kv_type=kv_type, slots=cfg.slots, ctx=cfg.ctx,
                               min_ctx=cfg.min_ctx)
    except BaseException:
        if grounder:
            grounder.close()
        raise
    return model, grounder, plan


def open_grounder(cfg: EngineConfig) -> Grounder | None:
    """The index requests are grounded in: the one configured (which must
    exist), else the default one if it is there; None with grounding off."""
    if not cfg.grounding:
        return None
    from .grounding.ground import DEFAULT_THRESHOLD, Grounder  # SQLite costs nothing unless used

    threshold = DEFAULT_THRESHOLD if cfg.ground_threshold is None else cfg.ground_threshold
    return Grounder.open(None if cfg.index is None else Path(cfg.index), required=cfg.index is not None,
                         threshold=threshold, uncovered=cfg.uncovered, passages=cfg.ground_passages,
                         max_tokens=cfg.ground_tokens)
