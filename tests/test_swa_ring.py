"""Sliding-window layers keep a ring of their window, not the whole context.

A tiny Gemma 3 (window 8, five sliding layers and one global) is run twice
on the same chunks: with a small max_batch its sliding layers keep a ring
of window + max_batch - 1 positions, with a max_batch as large as the
context they keep every position. Everything the runtime and the engine do
with a cache (prefill, decode, the context shift, the prefix copy, reuse of
a cached prefix) must give the same logits either way, and what the ring
has overwritten must be refused, not read."""

from __future__ import annotations

import numpy as np
import pytest
from arch_models import ARCH_MODELS, write_arch_model

from edge_slm import _core
from edge_slm.engine import OK, Engine, EngineConfig
from edge_slm.model import KV_TYPES, RuntimeOptions, load_model

SPEC = ARCH_MODELS["gemma3"]
WINDOW = SPEC.sliding_window
CTX = 256
RING_BATCH = 4  # ring of 8 + 4 - 1 = 11 positions, 18 rows with the mirror
CHUNK = 4


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return load_model(write_arch_model(tmp_path_factory.mktemp("ring") / "gemma3.gguf", SPEC))


def runtimes(model, n_slots=1, kv_type="f16"):
    ring = model.runtime(RuntimeOptions(n_ctx=CTX, max_batch=RING_BATCH, n_slots=n_slots, kv_type=kv_type))
    full = model.runtime(RuntimeOptions(n_ctx=CTX, max_batch=CTX, n_slots=n_slots, kv_type=kv_type))
    assert ring.kv_ring == WINDOW + RING_BATCH - 1 and full.kv_ring == 0
    return ring, full


def feed(rt, ids, start=0, slot=0):
    """Every position's logits, evaluated CHUNK tokens a call."""
    rows = []
    for lo in range(0, len(ids), CHUNK):
        chunk = np.asarray(ids[lo:lo + CHUNK], np.int32)
        n = len(chunk)
        out = rt.forward(chunk, np.arange(start + lo, start + lo + n, dtype=np.int32),
                         np.full(n, slot, np.int32), np.ones(n, np.uint8))
        rows.append(out.copy())
    return np.concatenate(rows)


def sequence(n, seed=7):
    return np.random.default_rng(seed).integers(3, 200, n).tolist()  # inside the tiny vocabulary


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_ring_gives_the_logits_of_the_whole_cache(gemma, kv_type):
    ring, full = runtimes(gemma, kv_type=kv_type)
    ids = sequence(120)  # the ring wraps about ten times
    np.testing.assert_array_equal(feed(ring, ids), feed(full, ids))


def test_what_the_ring_overwrote_is_refused(gemma):
    ring, full = runtimes(gemma)
    ids = sequence(100)
    feed(ring, ids)
    feed(full, ids)
    # the window before 100 is held; before 50 it is long gone
    assert ring.kv_usable(0, 100) == 100 and ring.kv_usable(0, 97) == 97
    assert ring.kv_usable(0, 50) == 0 and ring.kv_usable(0, 5) == 0
    assert full.kv_usable(0, 50) == 50 and full.kv_usable(0, 120) == 100  # capped at what was evaluated
    with pytest.raises(IndexError, match="no longer hold the window"):
        feed(ring, [5], start=50)
    # starting the slot again from position 0 needs nothing it held
    np.testing.assert_array_equal(feed(ring, ids[:20]), feed(full, ids[:20]))


def test_context_shift_in_the_ring(gemma):
    """The kept start is gone from the ring, but the window after the cut lies
    within what moved, so the shifted cache continues as the whole one does."""
    ring, full = runtimes(gemma)
    ids, more = sequence(100), sequence(12, seed=8)
    for rt in (ring, full):
        feed(rt, ids)
        rt.kv_shift(0, 4, 40, 100)
    assert ring.kv_usable(0, 60) == 60
    np.testing.assert_allclose(feed(ring, more, start=60), feed(full, more, start=60), rtol=1e-5, atol=1e-5)


def test_prefix_copy_in_the_ring(gemma):
    ring, full = runtimes(gemma, n_slots=2)
    ids, more = sequence(90), sequence(9, seed=9)
    for rt in (ring, full):
        feed(rt, ids)
        rt.kv_copy(0, 1, 90)
    np.testing.assert_array_equal(feed(ring, more, start=90, slot=1), feed(full, more, start=90, slot=1))


def test_plan_counts_the_ring(gemma):
    cfg = gemma.config.core()
    pos_bytes = SPEC.n_kv_head * SPEC.head_dim * 2  # f16
    sliding = sum(1 for layer in range(SPEC.n_layer) if (layer + 1) % 6)
    kv, _ = _core.model_bytes(cfg, n_slots=1, n_ctx=4096, max_batch=64, n_threads=1,
                              kv_type=int(KV_TYPES["f16"]))
    rows = (SPEC.n_layer - sliding) * 4096 + sliding * (WINDOW + 63 + WINDOW - 1)
    assert kv == 2 * rows * pos_bytes
    # a context no longer than the ring keeps every position
    kv_short, _ = _core.model_bytes(cfg, n_slots=1, n_ctx=64, max_batch=64, n_threads=1,
                                    kv_type=int(KV_TYPES["f16"]))
    assert kv_short == 2 * SPEC.n_layer * 64 * pos_bytes


def engine(path, max_batch, ctx=CTX):
    return Engine(EngineConfig(model=path, slots=1, ctx=ctx, min_ctx=ctx, threads=2, timeout=60.0,
                               max_batch=max_batch, prefill_chunk=CHUNK, keep_tokens=4))


def answer(e, ids, n=12):
    r = e.submit(prompt_ids=ids, max_tokens=n, ignore_eos=True).result(timeout=60)
    assert r.status == OK, r.error
    return r


def test_engine_reuses_only_what_the_ring_holds(gemma):
    """A second question sharing the first one's opening: with the whole cache
    the opening is reused; in the ring it was overwritten, so the engine
    computes it again, and both answer alike."""
    first, opening = sequence(60), sequence(40, seed=10)
    second = opening + sequence(10, seed=11)
    first = opening + first[40:]
    with engine(gemma.path, RING_BATCH) as e_ring, engine(gemma.path, CTX) as e_full:
        assert e_ring.runtime.kv_ring and not e_full.runtime.kv_ring
        for ids in (first, second):
            a, b = answer(e_ring, ids), answer(e_full, ids)
            assert a.tokens == b.tokens
        assert b.cached_tokens == 40 and a.cached_tokens == 0
        # a conversation that goes on from the whole cached answer keeps it in the ring too
        follow = second + b.tokens + sequence(5, seed=12)
        a, b = answer(e_ring, follow), answer(e_full, follow)
        assert a.tokens == b.tokens and a.cached_tokens == b.cached_tokens > 40


def test_engine_shifts_the_context_in_the_ring(gemma):
    ctx = 64  # the ring (18 rows) is still smaller than the context
    with engine(gemma.path, RING_BATCH, ctx) as e_ring, engine(gemma.path, ctx, ctx) as e_full:
        assert e_ring.runtime.kv_ring and not e_full.runtime.kv_ring
        a, b = answer(e_ring, sequence(10), 150), answer(e_full, sequence(10), 150)
        assert e_ring.status()["context_shifts"] >= 2
        assert a.tokens == b.tokens


def test_info_says_what_the_sliding_layers_cache(gemma):
    from click.testing import CliRunner

    from edge_slm.cli import main

    out = CliRunner().invoke(main, ["info", str(gemma.path), "--ctx", "256"])
    assert out.exit_code == 0, out.output
    assert f"each caching a ring of {WINDOW + 64 - 1} positions" in out.output  # the default batch of 64
