"""The memory plan: how many conversations (slots) and how much context fit
in a budget, counting everything the process holds.

The budget bounds the resident size (VmRSS) of the whole process, and the
plan counts each part of it:

  interpreter      resident before the model is read: Python, numpy, our
                   modules and the libraries loaded so far (measured)
  metadata and     what reading the metadata and building the tokenizer left
  tokenizer        resident: the metadata, the vocabulary, the tokenizers
                   library and its tables (measured)
  weights          the tensors, copied from the mapped file when the model is
                   made (its matrices repacked for decoding, kernels/repack.c)
                   and the map's pages handed back: resident once
  run state        activations, quantized copies, logits rows (exact, from C)
  KV cache         slots x context (exact, from C)
  requests         each queued or running request: its objects, its prompt's
                   token ids, its answer and the pieces streamed to its caller
  callers          up to SUBMITTERS threads submitting at once: each one's
                   stack and state, and the tokenizer's work memory while it
                   encodes a prompt on that thread (encodes run in parallel,
                   outside the GIL)
  grounding        the manuals' index, when requests are grounded: SQLite and
                   the open index (measured), its page cache and a query's work
                   memory
  front ends       what a front end declares it holds beside the engine
                   (EngineConfig.front_end_bytes): the MQTT service's
                   questions in flight, its outgoing queue, SQLite's cache
  headroom         allocator slack and fragmentation, the engine's own
                   per-step objects

What it does not cover: memory a caller holds itself (its prompt text
before submit() returns, results it keeps), and more than SUBMITTERS
threads submitting at the same moment. Sizes beyond MAX_CTX tokens,
MAX_QUEUE waiting requests or a plan of MAX_PLAN bytes are refused as
typos, not planned."""

from __future__ import annotations

import bisect
import ctypes
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import EdgeSlmError
from .formats import KV_TYPES

MIB = 1024 * 1024
# Allocator slack and the engine's per-step objects (a logits copy per
# sampled row, pieces of text): kept free so the ceiling holds under
# traffic, not only at start. Measured: one caller at a time ends ~10 MiB
# above the rest of the plan.
HEADROOM = 16 * MIB
# Threads the plan holds submitting at once, and what each costs: its stack
# and state (~25 KiB touched), per-thread allocator caches, and its share of
# the tokenizer's work memory (~300-900 bytes a character of the text being
# encoded, 1-4 MiB for one span of tokenizer.SPAN_CHARS). Measured: 50 threads
# submitting together held ~230 KiB each beyond one thread's use.
SUBMITTERS = 64
SUBMITTER_BYTES = 256 * 1024
# A request's own objects: events, its stream queue, its sampler's generator (~5 KiB).
REQUEST_BYTES = 8 * 1024
# Contexts are planned in steps of this many tokens.
CTX_STEP = 256
# Token ids held per request: 4 bytes in a queued request's array; in a
# slot, a Python int (28) referenced from its sequence and its cache (8 + 8).
QUEUED_ID_BYTES = 4
SLOT_ID_BYTES = 44
# An answer token: its id in the answer (36), its share of the text, and its
# piece in the stream queue until the caller reads it (~70); measured at
# ~100 for English and ~130 for Chinese, with the result's copy of the ids.
ANSWER_TOKEN_BYTES = 160
# Beyond these a setting is a typo on any board: a context (the CLI's --ctx
# stops here too), waiting requests, a plan's total.
MAX_CTX = 1 << 20
MAX_QUEUE = 4096
MAX_PLAN = 1 << 40


class BudgetError(EdgeSlmError):
    """The model cannot run within the memory budget."""


def parse_size(text: str | int) -> int:
    """'256M', '1.5G', '300MiB', '65536' -> bytes; a size must be positive."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
        if not m or isinstance(text, (bool, float)):
            raise EdgeSlmError(f"memory size {text!r}: expected a number with K, M or G, e.g. 256M")
        scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
        number = float(m.group(1))
        if number * scale > 1 << 50:  # a petabyte: a typo, and float would overflow further on
            raise EdgeSlmError(f"memory size {text!r}: far more than any device has")
        size = int(number * scale)
    if size < 1:
        raise EdgeSlmError(f"memory size {text!r}: must be more than zero")
    return size


def release_free_memory() -> None:
    """Hand memory freed by Python back to the system (glibc keeps it
    otherwise), so a burst of temporary objects does not raise RSS for good."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own arena, each holding on
    to its freed memory; a server with many client threads then grows with
    traffic. Two arenas bound that."""
    M_ARENA_MAX = -8
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, n)
    except (OSError, AttributeError):
        pass


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory figure from /proc/PID/status (this process by default), in
    bytes; 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def current_rss() -> int:
    """Resident bytes of this process now."""
    return status_bytes("VmRSS")


def peak_rss() -> int:
    """High-water resident bytes of this process."""
    return status_bytes("VmHWM")


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    interpreter: int   # resident before the model: Python, numpy, our modules
    tokenizer: int
    weights: int       # the model's own copy of its tensors
    run_state: int     # activations, quantized copies, logits rows
    kv_per_slot: int
    headroom: int
    n_slots: int
    n_ctx: int
    kv_type: str
    requests: int = 0  # queued and running requests: objects, token ids, answers
    callers: int = 0   # threads submitting at once, and their tokenizing
    front_ends: int = 0  # what front ends hold beside the engine (the MQTT service's buffers)
    grounding: int = 0   # the manuals' index: SQLite, its page cache, a query's work memory

    @property
    def kv_cache(self) -> int:
        return self.kv_per_slot * self.n_slots

    @property
    def total(self) -> int:
        return (self.interpreter + self.tokenizer + self.weights + self.run_state + self.kv_cache
                + self.requests + self.callers + self.front_ends + self.grounding + self.headroom)

    def as_dict(self) -> dict[str, int | str]:
        return {"budget": self.budget, "interpreter": self.interpreter, "tokenizer": self.tokenizer,
                "weights": self.weights, "run_state": self.run_state, "kv_cache": self.kv_cache,
                "requests": self.requests, "callers": self.callers, "front_ends": self.front_ends,
                "grounding": self.grounding, "headroom": self.headroom, "total": self.total, "n_slots": self.n_slots,
                "n_ctx": self.n_ctx, "kv_type": self.kv_type}

    def describe(self) -> str:
        rows = [("interpreter", self.interpreter), ("metadata and tokenizer", self.tokenizer),
                ("weights (copied)", self.weights), ("run state", self.run_state),
                (f"KV cache {self.n_slots} x {self.n_ctx} ({self.kv_type})", self.kv_cache),
                ("requests and their answers", self.requests),
                (f"callers ({SUBMITTERS} threads submitting)", self.callers),
                *([("grounding (index of manuals)", self.grounding)] if self.grounding else []),
                *([("front ends", self.front_ends)] if self.front_ends else []),
                ("headroom", self.headroom), ("total", self.total)]
        if self.budget:
            rows.append(("budget", self.budget))
        return "\n".join(f"  {name:<34} {n / MIB:8.1f} MiB" for name, n in rows)

    def summary(self) -> str:
        return (f"{self.n_slots} slot(s) x {self.n_ctx} tokens ({self.kv_type} KV), "
                f"{self.total / MIB:.0f} of {self.budget / MIB:.0f} MiB")


DEFAULT_CTX = 2048  # positions per slot unless asked otherwise: room for a manual passage


def default_ctx(trained: int, asked: int | None = None) -> int:
    """The context a slot gets: as asked, else DEFAULT_CTX, never past what the model was trained for."""
    return min(asked or DEFAULT_CTX, trained)


def check_ctx(n_ctx: int) -> None:
    if n_ctx > MAX_CTX:
        raise EdgeSlmError(f"a context of {n_ctx} tokens is more than {MAX_CTX}")


@dataclass(frozen=True)
class Fixed:
    """What the plan does not choose: the model and the measured process."""

    cfg: object          # ModelConfig
    budget: int
    weights: int
    interpreter: int
    tokenizer: int
    n_threads: int
    max_batch: int       # tokens per forward call
    queue_size: int = 0  # requests that may wait beyond the slots
    max_tokens: int = 0  # the longest answer a slot may hold
    front_ends: int = 0  # bytes front ends declare they hold beside the engine
    grounding: int = 0   # bytes the manuals' index holds (measured when opened)
    # (KV bytes of one slot, run-state bytes) at (n_ctx, max_batch, n_threads,
    # kv_type): the backend's own figures (Source.state_bytes); None, the C kernels'
    state_bytes: Callable[[int, int, int, str], tuple[int, int]] | None = None
    kv_types: tuple[str, ...] = tuple(KV_TYPES)  # what the backend can hold

    def plan(self, n_slots: int, n_ctx: int, kv_type: str) -> MemoryPlan:
        check_ctx(n_ctx)
        if self.queue_size > MAX_QUEUE:
            raise EdgeSlmError(f"a queue of {self.queue_size} requests is more than {MAX_QUEUE}")
        if self.state_bytes is None:
            from . import _core  # here, so reading RSS alone (bench children) loads no extension

            kv, state = _core.model_bytes(self.cfg.core(), n_slots=1, n_ctx=n_ctx,
                                          max_batch=self.max_batch, n_threads=self.n_threads,
                                          kv_type=int(KV_TYPES[kv_type]))
        else:
            kv, state = self.state_bytes(n_ctx, self.max_batch, self.n_threads, kv_type)
        logits = n_slots * self.cfg.vocab * 4  # one row per slot per step
        # the free slots' next requests queue too, beyond queue_size
        held = self.queue_size + 2 * n_slots
        requests = (n_ctx * ((self.queue_size + n_slots) * QUEUED_ID_BYTES + n_slots * SLOT_ID_BYTES)
                    + n_slots * self.max_tokens * ANSWER_TOKEN_BYTES + held * REQUEST_BYTES)
        plan = MemoryPlan(self.budget, self.interpreter, self.tokenizer, self.weights,
                          state + logits, kv, HEADROOM, n_slots, n_ctx, kv_type, requests,
                          SUBMITTERS * SUBMITTER_BYTES, self.front_ends, self.grounding)
        if plan.total > MAX_PLAN:
            part, size = max((("KV cache", plan.kv_cache), ("run state", plan.run_state),
                              ("requests and their answers", plan.requests)), key=lambda p: p[1])
            raise EdgeSlmError(f"{n_slots} slot(s) x {n_ctx} tokens would need {plan.total / MIB:.0f} MiB "
                               f"({part} {size / MIB:.0f} MiB), more than any device has; "
                               f"check slots, ctx, queue_size and max_tokens")
        return plan


def plan_memory(fixed: Fixed, *, kv_type: str = "f16", slots: int | None = None,
                ctx: int | None = None, min_ctx: int = 512) -> MemoryPlan:
    """Fit slots x context into the budget. Concurrency comes first: the
    requested slots at the longest context that fits (down to min_ctx), then
    fewer slots; if one slot at min_ctx does not fit, refuse, saying what it
    would need."""
    want_slots = slots or 4
    want_ctx = default_ctx(fixed.cfg.context_length, ctx)
    check_ctx(want_ctx)  # before listing the contexts below it
    min_ctx = min(min_ctx, want_ctx)
    contexts = [want_ctx] + [c for c in range(want_ctx - want_ctx % CTX_STEP, min_ctx - 1, -CTX_STEP)
                             if min_ctx <= c < want_ctx]
    if contexts[-1] != min_ctx:
        contexts.append(min_ctx)
    contexts.sort()
    for n_slots in range(want_slots, 0, -1):
        # a plan grows with its context: the longest that fits, found by bisection
        fit = bisect.bisect_left(contexts, True,
                                 key=lambda c, n=n_slots: fixed.plan(n, c, kv_type).total > fixed.budget)
        if fit:
            return fixed.plan(n_slots, contexts[fit - 1], kv_type)
    need = fixed.plan(1, min_ctx, kv_type)
    hint = ""
    if kv_type != "q8_0" and "q8_0" in fixed.kv_types:
        hint = f"; with --kv-type q8_0 it needs {fixed.plan(1, min_ctx, 'q8_0').total / MIB:.0f} MiB"
    parts = ", ".join(f"{name} {n / MIB:.0f}" for name, n in (
        ("weights", need.weights), ("interpreter", need.interpreter), ("tokenizer", need.tokenizer),
        ("KV", need.kv_cache), ("run state", need.run_state), ("requests and answers", need.requests),
        ("callers", need.callers), ("grounding", need.grounding), ("front ends", need.front_ends),
        ("headroom", need.headroom)) if n)
    answers = fixed.max_tokens * ANSWER_TOKEN_BYTES
    if answers > need.kv_cache:
        hint += f"; answers of up to {fixed.max_tokens} tokens (max_tokens) take {answers / MIB:.0f} MiB a slot"
    raise BudgetError(
        f"memory budget {fixed.budget / MIB:.0f} MiB is too small: one slot at the minimum context "
        f"({min_ctx} tokens) needs {need.total / MIB:.0f} MiB ({parts}){hint}")
