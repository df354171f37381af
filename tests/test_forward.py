"""The C forward pass on tiny random models: against the numpy reference,
batched against one token at a time, slots apart, and the context shift."""

from __future__ import annotations

import numpy as np
import pytest
from reference import reference_logits
from tiny_models import TinySpec

from edge_slm import _core
from edge_slm.model import RuntimeOptions, load_model

BACKENDS = _core.backends()


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a.astype(np.float64) - b) ** 2) / np.sum(b.astype(np.float64) ** 2))


def runtime(path, backend, **kw):
    opts = dict(n_threads=2, n_ctx=128, max_batch=32, backend=backend)
    opts.update(kw)
    return load_model(path).runtime(RuntimeOptions(**opts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [
    TinySpec(),
    TinySpec(weight_type="Q4_0", embd_type="F16", tied=False, n_kv_head=4),
    TinySpec(weight_type="Q8_0", embd_type="F32", n_head=2, n_kv_head=1, hidden_dim=160),
    TinySpec(weight_type="F16", embd_type="Q4_1", tied=False, n_layer=3),
], ids=["q4_1-gqa", "q4_0-mha", "q8_0-mqa", "f16-untied"])
def test_forward_matches_numpy_reference(tiny_model_factory, spec, backend):
    path = tiny_model_factory(spec)
    ids = list(np.random.default_rng(1).integers(0, 259, size=40))
    ours = runtime(path, backend).prefill(ids, all_logits=True)
    ref = reference_logits(load_model(path), ids)
    # Activations are rounded to 8-bit blocks before quantized products and
    # K/V are held in f16, so ours is close to, not equal to, the float pass.
    bound = 1e-8 if spec.weight_type == "F16" and spec.embd_type != "Q4_1" else 2e-3
    assert nmse(ours, ref) < max(bound, 1e-6)
    for row_ours, row_ref in zip(ours, ref):
        assert np.corrcoef(row_ours, row_ref)[0, 1] > 0.998


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_q8_0_close_to_f16(tiny_model, backend):
    ids = list(range(3, 60))
    f16 = runtime(tiny_model, backend).prefill(ids, all_logits=True)
    q8 = runtime(tiny_model, backend, kv_type="q8_0").prefill(ids, all_logits=True)
    assert 0 < nmse(q8, f16) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batched_equals_one_token_at_a_time(tiny_model, backend, threads):
    ids = list(np.random.default_rng(2).integers(0, 259, size=45))
    batched = runtime(tiny_model, backend, n_threads=threads, max_batch=16).prefill(ids, all_logits=True)
    one = runtime(tiny_model, backend, n_threads=threads, max_batch=1)
    single = np.stack([one.prefill([t], start=i) for i, t in enumerate(ids)])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slots_are_independent(tiny_model, backend):
    a = [5, 17, 99, 3, 250, 7]
    b = [42, 42, 8, 160]
    alone_a = runtime(tiny_model, backend).prefill(a, all_logits=True)
    alone_b = runtime(tiny_model, backend).prefill(b, all_logits=True)
    rt = runtime(tiny_model, backend, n_slots=3)
    # Interleave both sequences in one batch, b in slot 2.
    order = [(0, i) for i in range(len(a))] + [(2, i) for i in range(len(b))]
    order.sort(key=lambda x: (x[1], x[0]))
    toks = np.array([(a if s == 0 else b)[i] for s, i in order], np.int32)
    pos = np.array([i for _, i in order], np.int32)
    slot = np.array([s for s, _ in order], np.int32)
    out = rt.forward(toks, pos, slot, np.ones(len(order), np.uint8)).copy()
    rows_a = out[[k for k, (s, _) in enumerate(order) if s == 0]]
    rows_b = out[[k for k, (s, _) in enumerate(order) if s == 2]]
    np.testing.assert_allclose(rows_a, alone_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows_b, alone_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_kv_shift_matches_recomputation(tiny_model_factory, backend, kv_type):
    # With one layer, cached keys and values depend only on token and
    # position, so after the shift the cache must equal a fresh computation
    # of the shortened sequence: any error is in the re-rotation.
    tiny_model = tiny_model_factory(TinySpec(n_layer=1))
    keep, drop = [1, 2, 3, 4], list(range(10, 30))
    rest = [40, 41, 42, 43, 44, 45]
    nxt = 77
    rt = runtime(tiny_model, backend, kv_type=kv_type)
    seq = keep + drop + rest
    rt.prefill(seq)
    rt.kv_shift(0, len(keep), len(drop), len(seq))
    shifted = rt.prefill([nxt], start=len(keep) + len(rest))
    direct = runtime(tiny_model, backend, kv_type=kv_type).prefill(keep + rest + [nxt])
    assert nmse(shifted, direct) < 1e-4
    # and the dropped tokens really are gone: the unshifted cache differs
    full = runtime(tiny_model, backend, kv_type=kv_type).prefill(seq + [nxt])
    assert nmse(full, direct) > 10 * nmse(shifted, direct)


def test_kv_copy_shares_a_prefix(tiny_model):
    rt = runtime(tiny_model, None, n_slots=2)
    prefix = [9, 8, 7, 6, 5]
    rt.prefill(prefix, slot=0)
    rt.kv_copy(0, 1, len(prefix))
    got = rt.prefill([100], start=len(prefix), slot=1)
    want = runtime(tiny_model, None).prefill(prefix + [100])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_forward_rejects_out_of_range(tiny_model):
    rt = runtime(tiny_model, None, n_ctx=16, n_slots=2)
    one = np.ones(1, np.uint8)
    with pytest.raises(IndexError):
        rt.forward(np.array([1]), np.array([16]), np.array([0]), one)
    with pytest.raises(IndexError):
        rt.forward(np.array([1]), np.array([0]), np.array([2]), one)
    with pytest.raises(ValueError):
        rt.forward(np.array([100000]), np.array([0]), np.array([0]), one)
    with pytest.raises(ValueError):
        rt.forward(np.arange(33), np.arange(33), np.zeros(33), np.ones(33, np.uint8))
    with pytest.raises(TypeError, match="int32"):  # the binding checks element types
        rt._model.forward(np.array([1], np.int64), np.array([0], np.int32), np.array([0], np.int32),
                          one, np.empty((1, rt._logits.shape[1]), np.float32))
    with pytest.raises(ValueError):  # two tokens for one cache cell
        rt.forward(np.array([1, 2]), np.array([3, 3]), np.array([0, 0]), np.ones(2, np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_does_not_change_a_bit(tiny_model, backend):
    """Threads claim pieces of every op in whatever order they run; each
    piece is computed the same way whoever takes it, so the logits must be
    identical at any thread count (a piece skipped or done twice would not be)."""
    ids = list(np.random.default_rng(5).integers(0, 259, size=40))
    runs = [runtime(tiny_model, backend, n_threads=t, max_batch=16).prefill(ids, all_logits=True)
            for t in (1, 2, 3, 5)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


def test_oversubscribed_pool_loses_no_work(tiny_model):
    """Six threads on a smaller machine are descheduled all the time: workers
    reach an op after others took its chunks, or a run after every op is
    done. One run per token, hundreds of runs; every logit must still equal
    the single-thread pass."""
    ids = list(np.random.default_rng(9).integers(0, 259, size=120))
    one = runtime(tiny_model, None, n_threads=1, max_batch=1).prefill(ids, all_logits=True)
    crowded = runtime(tiny_model, None, n_threads=6, max_batch=1)
    for _ in range(3):
        np.testing.assert_array_equal(crowded.prefill(ids, all_logits=True), one)
