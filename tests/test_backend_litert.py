"""The LiteRT backend on the committed tiny export (tests/fixtures/litert,
made by scripts/make_litert_fixture.py): LiteRT's interpreter beside our C
kernels on the GGUF it came from, slots run in turn and interleaved, the
engine's statuses over it, bad files refused in one line, memory flat.
No torch here: the export's toolchain is only in the reference tests.

The export's weights are the GGUF's dequantized and quantized again to int8
per channel, and XNNPACK quantizes activations its own way, so logits agree
closely, not exactly: the checks follow the margin, as test_parity's do."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from edge_slm.backends import load_source
from edge_slm.backends.litert import LiteRtSource, load_litert
from edge_slm.backends.sidecar import sidecar_path
from edge_slm.engine import OK, Engine, EngineConfig
from edge_slm.errors import EdgeSlmError, ModelError
from edge_slm.memory import current_rss
from edge_slm.model import RuntimeOptions, load_model
from edge_slm.pull import sha256_file
from edge_slm.sampler import SamplingConfig

FIXTURES = Path(__file__).parent / "fixtures" / "litert"
TFLITE, GGUF = FIXTURES / "tiny.tflite", FIXTURES / "tiny.gguf"
KV_LEN = 128
DECISIVE = 1.0     # top-2 margin (of our logits) at which the choice must be the same
LEAST_CORR = 0.99  # per-position logit correlation, each position


def opts(**kw) -> RuntimeOptions:
    return RuntimeOptions(**{"n_threads": 2, "n_ctx": KV_LEN, "n_slots": 3, "max_batch": 128,
                             "kv_type": "f32", **kw})


@pytest.fixture(scope="module")
def source() -> LiteRtSource:
    return load_litert(TFLITE)


@pytest.fixture(scope="module")
def runtime(source):
    return source.runtime(opts())


@pytest.fixture(scope="module")
def ours():
    """Our C kernels on the GGUF the fixture was exported from."""
    return load_model(GGUF).runtime(RuntimeOptions(n_threads=2, n_ctx=KV_LEN, max_batch=KV_LEN))


def ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def last_logits(rt, seq: list[int], slot: int = 0, start: int = 0) -> np.ndarray:
    """One call for the run, logits of its last token only (prefill, then decode)."""
    want = np.zeros(len(seq), np.uint8)
    want[-1] = 1
    return rt.forward(np.array(seq, np.int32), np.arange(start, start + len(seq), dtype=np.int32),
                      np.full(len(seq), slot, np.int32), want)[0].copy()


def check_close(theirs: np.ndarray, mine: np.ndarray, what: str) -> tuple[int, float]:
    """Decisive positions must agree, every position correlate; returns (decisive, least correlation)."""
    theirs, mine = np.atleast_2d(theirs), np.atleast_2d(mine)
    top2 = np.sort(mine, axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= DECISIVE
    same = theirs.argmax(1) == mine.argmax(1)
    assert same[decisive].all(), f"{what}: decisive positions {np.flatnonzero(decisive & ~same).tolist()} differ"
    corr = np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(theirs, mine)])
    assert corr.min() >= LEAST_CORR, f"{what}: a position's logits correlate {corr.min():.4f}"
    return int(decisive.sum()), float(corr.min())


# ---------------------------------------------------------------- the file

def test_fixture_names_its_source_and_settings(source):
    doc = json.loads(sidecar_path(TFLITE).read_text())
    assert doc["source"]["sha256"] == sha256_file(GGUF)
    assert doc["settings"]["kv_len"] == KV_LEN and doc["settings"]["weights"] == "int8"
    assert TFLITE.stat().st_size < 1 << 20
    assert source.kind == "litert" and source.kv_types == ("f32",)
    assert source.config.context_length == KV_LEN  # the export's cache, not the GGUF's 256
    assert source.config == dataclasses.replace(load_model(GGUF).config, context_length=KV_LEN)
    assert source.describe()[0][0] == "file" and "LiteRT" in source.describe()[0][1]


def test_chosen_by_its_suffix():
    assert load_source(TFLITE).kind == "litert"
    with pytest.raises(ModelError, match="backend gguf was asked for"):
        load_source(TFLITE, "gguf")


def test_state_is_counted_from_the_shapes(source):
    """A slot's cache is the export's kv_len long whatever the context asked for."""
    cfg = source.config
    row = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 4
    assert source.state_bytes(100, 64, 2, "f32") == (KV_LEN * row, 0)
    assert source.state_bytes(KV_LEN, 64, 2, "f32") == (KV_LEN * row, 0)
    paged = cfg.vocab * cfg.dim + KV_LEN * KV_LEN * 4  # the embedding's int8 rows, the causal mask
    assert source.resident_weights == source.loaded_bytes - KV_LEN * row + paged > paged


def test_runs_without_torch():
    code = ("import sys, numpy as np; from edge_slm.backends import load_source;"
            "from edge_slm.model import RuntimeOptions as O;"
            f"rt = load_source({str(TFLITE)!r}).runtime(O(n_ctx=64, kv_type='f32', max_batch=64));"
            "rt.prefill([1, 2, 3]); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- the numbers

def test_decode_logits_agree_with_our_kernels(runtime, ours, parity_report):
    """Every position through decode, token by token, beside our one batched pass."""
    seq = ids(KV_LEN, seed=1)
    theirs = runtime.prefill(seq, slot=0, all_logits=True)
    mine = ours.prefill(seq, all_logits=True)
    decisive, least = check_close(theirs, mine, "decode")
    parity_report.append(f"litert tiny: {KV_LEN} positions token by token, {decisive} decisive agree, "
                         f"least correlation {least:.4f}")


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 40, 113, 127, 128])
def test_prefill_then_decode_agrees(runtime, ours, n):
    """A run of n tokens: prefill in calls of 16 (the last padded), the
    final token through decode; near the cache's end, where a padded call
    would write past it, token by token."""
    seq = ids(KV_LEN, seed=2)
    mine = ours.prefill(seq, all_logits=True)
    check_close(last_logits(runtime, seq[:n], slot=1), mine[n - 1], f"prefill of {n}")


def test_slots_interleaved_match_slots_alone(source):
    """Two slots in one call, prompt chunks beside decode tokens, as the
    engine steps them: each slot's logits as when it runs alone."""
    a, b = ids(60, seed=3), ids(45, seed=4)
    alone = source.runtime(opts())
    solo = {name: [last_logits(alone, seq[:k]) for k in (20, 21, 22, 40, 41)]
            for name, seq in (("a", a), ("b", b))}
    del alone
    rt = source.runtime(opts())
    got = {"a": [], "b": []}
    steps = [((0, 20), (0, 20)), ((20, 21), (20, 21)), ((21, 22), (21, 22)), ((22, 40), (22, 40)),
             ((40, 41), (40, 41))]
    for (alo, ahi), (blo, bhi) in steps:
        tokens = a[alo:ahi] + b[blo:bhi]
        pos = list(range(alo, ahi)) + list(range(blo, bhi))
        slot = [0] * (ahi - alo) + [2] * (bhi - blo)
        want = np.zeros(len(tokens), np.uint8)
        want[ahi - alo - 1] = want[-1] = 1
        out = rt.forward(np.array(tokens, np.int32), np.array(pos, np.int32), np.array(slot, np.int32), want)
        got["a"].append(out[0].copy())
        got["b"].append(out[1].copy())
    for name in "ab":
        np.testing.assert_allclose(np.array(got[name]), np.array(solo[name]), rtol=0, atol=1e-4)


def test_kv_copy_continues_as_the_source(runtime):
    seq = ids(30, seed=5)
    last_logits(runtime, seq[:20], slot=0)
    runtime.kv_copy(0, 2, 20)
    np.testing.assert_array_equal(last_logits(runtime, seq[20:], slot=2, start=20),
                                  last_logits(runtime, seq[20:], slot=0, start=20))
    assert runtime.kv_usable(2, 30) == 30


def test_a_slot_restarts_at_a_shorter_prefix(runtime, ours):
    seq, other = ids(50, seed=6), ids(50, seed=7)
    last_logits(runtime, seq, slot=0)
    check_close(last_logits(runtime, other[10:30], slot=0, start=10),
                ours.prefill(seq[:10] + other[10:30]), "restart at 10")


def test_calls_it_cannot_run_are_refused(source):
    runtime = source.runtime(opts())
    one = (np.array([1], np.int32), np.array([1], np.uint8))
    with pytest.raises(ValueError, match="gap"):
        runtime.forward(one[0], np.array([5], np.int32), np.array([1], np.int32), one[1])
    runtime.prefill(ids(KV_LEN - 5), slot=1)
    with pytest.raises(ValueError, match="past its context"):
        runtime.prefill(ids(10), start=KV_LEN - 5, slot=1)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        runtime.forward(one[0], np.array([0], np.int32), np.array([3], np.int32), one[1])
    with pytest.raises(EdgeSlmError, match="cannot shift"):
        runtime.kv_shift(0, 4, 10, 40)
    assert not runtime.can_shift and runtime.kv_ring == 0
    for bad, match in ((opts(n_ctx=KV_LEN + 1), "more than the 128 positions"), (opts(kv_type="f16"), "f32 only")):
        with pytest.raises(EdgeSlmError, match=match) as e:
            source.runtime(bad)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the engine

def engine(**kw) -> Engine:
    cfg = dict(model=TFLITE, slots=2, threads=2, timeout=30.0, grounding=False, max_tokens=24, min_ctx=64)
    return Engine(EngineConfig(**{**cfg, **kw}))


def test_engine_streams_two_requests_at_once():
    greedy = SamplingConfig(temperature=0.0)
    with engine() as e:
        assert e.plan.n_ctx == KV_LEN and e.plan.kv_type == "f32"
        alone = [e.submit(prompt_ids=p, sampling=greedy, ignore_eos=True).result(60)
                 for p in (ids(12, 8), ids(30, 9))]
        streamed: list[list[str]] = [[], []]
        reqs = [e.submit(prompt_ids=p, sampling=greedy, ignore_eos=True, on_text=streamed[i].append)
                for i, p in enumerate((ids(12, 8), ids(30, 9)))]
        results = [r.result(60) for r in reqs]
    for r, solo, pieces in zip(results, alone, streamed):
        assert r.status == OK and r.finish_reason == "length" and len(r.tokens) == 24
        assert r.tokens == solo.tokens  # batched steps, each slot as when alone
        assert "".join(pieces) == r.text


def test_a_full_context_ends_the_answer():
    with engine(slots=1, max_tokens=256) as e:
        r = e.submit(prompt_ids=ids(90, 10), ignore_eos=True).result(60)  # the longest it takes: 96
    assert r.status == OK and r.finish_reason == "length"
    assert r.prompt_tokens + len(r.tokens) == KV_LEN + 1  # the last token sampled is never fed back


def test_a_budget_too_small_is_refused_saying_what_it_needs():
    with pytest.raises(EdgeSlmError, match="too small") as e:
        engine(memory_budget=1 << 20)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- memory

def test_decoding_allocates_nothing_per_token_and_rss_stays_flat(source):
    rt = source.runtime(opts(n_slots=1))
    rt.prefill(ids(10, 11))
    cfg = source.config
    one_tensor = KV_LEN * cfg.n_kv_head * cfg.head_dim * 4  # one layer's K

    def decode(k: int) -> None:
        rt.forward(np.array([k % 256], np.int32), np.array([k], np.int32), np.zeros(1, np.int32),
                   np.ones(1, np.uint8))

    for k in range(10, 20):
        decode(k)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    decode(20)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    # a runner that copied the cache out (the Interpreter's SignatureRunner does) would allocate
    # every layer's K and V
    assert peak < one_tensor, f"one decode allocated {peak} bytes"
    before = current_rss()
    for k in range(21, 120):
        decode(k)
    assert current_rss() - before < 1 << 20


# ---------------------------------------------------------------- bad files

@pytest.fixture
def copy(tmp_path):
    """The fixture copied to tmp_path, with its sidecar; changes made by `edit`."""
    def make(name: str = "m.tflite", data: bytes | None = None, edit=None) -> Path:
        out = tmp_path / name
        out.write_bytes(TFLITE.read_bytes() if data is None else data)
        doc = json.loads(sidecar_path(TFLITE).read_text())
        if edit:
            edit(doc)
        sidecar_path(out).write_text(json.dumps(doc))
        return out
    return make


def refused(path: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match) as e:
        load_source(path)
    assert "\n" not in str(e.value) and str(path.with_suffix("")) in str(e.value)


def drop_size(doc):
    del doc["settings"]["tflite_bytes"]


def test_a_truncated_file_is_refused(copy):
    data = TFLITE.read_bytes()
    refused(copy(data=data[:len(data) // 2]), "truncated")
    refused(copy(data=data[:len(data) // 2], edit=drop_size), "not a readable LiteRT model")


def test_a_file_that_is_not_a_model_is_refused(copy):
    refused(copy(data=b"\x00" * 4096, edit=drop_size), "not a readable LiteRT model")
    refused(copy(data=TFLITE.read_bytes()[64:], edit=drop_size), "not a readable LiteRT model")


def test_a_missing_or_foreign_sidecar_is_refused(copy):
    path = copy()
    sidecar_path(path).unlink()
    refused(path, "no m.edge-slm.json beside it")
    refused(copy(edit=lambda d: d.update(format="onnx")), "not litert")


def test_a_sidecar_of_another_shape_is_refused(copy):
    def layers(doc):
        doc["metadata"]["llama.block_count"] = 3
    refused(copy(edit=layers), "3 layers")

    def kv_len(doc):
        doc["settings"]["kv_len"] = 64
    refused(copy(edit=kv_len), r"float32 \[1, 64, 2, 32\]")


def test_a_model_without_the_signatures_is_refused(copy):
    # the same flatbuffer, its decode signature renamed (a string of the same length)
    data = TFLITE.read_bytes().replace(b"decode", b"encode")
    refused(copy(data=data), "signatures encode, prefill_16")


def test_concurrent_forward_calls_are_serialised(source):
    rt = source.runtime(opts())
    seq = ids(40, 12)
    expected = last_logits(rt, seq, slot=0)
    results: dict[int, np.ndarray] = {}

    def run(slot: int) -> None:
        results[slot] = last_logits(rt, seq, slot=slot)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (1, 2):
        np.testing.assert_array_equal(results[s], expected)


# ---------------------------------------------------------------- the export's refusals (before any torch)

@pytest.mark.parametrize("case, needle", [
    ("exists", "exists; choose a new file"),
    ("no folder", "no such folder"),
    ("not .tflite", "a LiteRT model is a .tflite file"),
    ("sidecar exists", "a sidecar of an earlier export"),
    ("weights", "--weights int2: choose from int8, int4"),
    ("kv_len", "--kv-len 512: choose from 2 to the model's context, 256"),
    ("prefill_len", r"--prefill-len 64: choose from 2 to --kv-len \(32\)"),
    ("qwen2", "architecture 'qwen2' is not supported"),
    ("rope factors", "rope_freqs.weight has no place"),
])
def test_export_refuses_in_one_line(case, needle, tmp_path):
    from arch_models import ARCH_MODELS, write_arch_model

    from edge_slm.export.litert import export_litert

    out = tmp_path / "out.tflite"
    source, kw = GGUF, {}
    if case == "exists":
        out.write_bytes(b"")
    elif case == "no folder":
        out = tmp_path / "missing" / "out.tflite"
    elif case == "not .tflite":
        out = tmp_path / "out.onnx"
    elif case == "sidecar exists":
        sidecar_path(out).write_text("{}")
    elif case == "weights":
        kw = {"weights": "int2"}
    elif case == "kv_len":
        kw = {"kv_len": 512}
    elif case == "prefill_len":
        kw = {"kv_len": 32, "prefill_len": 64}
    else:
        source = write_arch_model(tmp_path / "m.gguf", ARCH_MODELS["qwen2" if case == "qwen2" else "llama3"])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(EdgeSlmError, match=needle) as e:
        export_litert(load_model(source), out, **kw)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
