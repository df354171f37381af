"""The model's own copy of the weights on the reference model: the matrices
repacked into the x8 layout, the file mapping's pages handed back once they
are copied, the per-op profile, and a second runtime over the same mapping.

The reference model ties its output projection to token_embd (Q8_0) and
holds every layer matrix as Q4_1, so the model copies every tensor."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from edge_slm.formats import TensorType
from edge_slm.memory import MIB
from edge_slm.model import (LoadedModel, RuntimeOptions, TensorView, Transformer,
                            _one_read_only_map, load_model)

OPTS = RuntimeOptions(n_threads=2, n_ctx=128, max_batch=16)
# Token ids, not text: building the tokenizer would read the metadata from
# the mapping these tests measure.
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 2114]
ALIGN_SLACK = 64  # each tensor of the model's copy starts on a cache line


@pytest.fixture
def model(real_model) -> LoadedModel:
    """A fresh load for each test: its own mapping, none of its pages touched."""
    return load_model(real_model)


def matrices(m: LoadedModel) -> dict[str, int]:
    """Bytes of the matrices the pass multiplies by, by tensor name."""
    return {name: t.nbytes for name, t in m.tensors.items() if t.rows > 1}


def decode_steps(rt, steps: int, start: int, first: int) -> list[int]:
    """Greedy one-token runs from position start; the tokens fed."""
    fed, tok = [], first
    for i in range(steps):
        fed.append(tok)
        logits = rt.forward(np.array([tok]), np.array([start + i]), np.array([0]), np.ones(1, np.uint8))
        tok = int(np.argmax(logits[0]))
    return fed


# ---- what the model holds ----


def test_weight_bytes_are_the_tensors_copied(model):
    rt = model.runtime(OPTS)
    held = rt._model.weight_bytes
    total = model.weight_bytes
    assert held >= sum(matrices(model).values())
    assert held >= total, "the tied model copies every tensor, token_embd once"
    assert held <= total + ALIGN_SLACK * len(model.tensors)
    assert abs(held - total) < 4 * MIB


# ---- the mapping handed back ----


def file_rss(m: LoadedModel) -> int:
    """Resident bytes of the file mapping holding m's tensors, from /proc/self/smaps."""
    at = next(iter(m.tensors.values())).data.ctypes.data
    inside, path = False, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                lo, hi = (int(a, 16) for a in head[0].split("-"))
                inside = lo <= at < hi
                path = " ".join(head[5:]) if inside else None
            elif inside and head[0] == "Rss:":
                assert path == str(m.path), f"the tensors lie in {path!r}, not the model file"
                assert head[2] == "kB"
                return int(head[1]) * 1024
    raise AssertionError("no mapping holds the tensors")


def touch(m: LoadedModel) -> int:
    """Reads every tensor byte through the mapping (faulting its pages in)."""
    return sum(int(t.data.view(np.uint8).sum()) for t in m.tensors.values())


def test_the_mapping_is_handed_back(model):
    file_bytes = model.path.stat().st_size
    assert model.weight_bytes > 90 * MIB  # the ~94 MiB of tensors, of a ~94 MiB file
    touch(model)
    # the check can fail: read through the map, the tensors are resident there
    assert file_rss(model) > 0.9 * model.weight_bytes
    assert file_rss(model) <= file_bytes + 4096

    rt = model.runtime(OPTS)
    after_creation = file_rss(model)
    rt.prefill(PROMPT)
    decode_steps(rt, 4, len(PROMPT), PROMPT[-1])
    after_decoding = file_rss(model)
    assert after_creation < 8 * MIB, f"{after_creation / MIB:.1f} MiB of the map still resident"
    assert after_decoding < 8 * MIB, f"decoding faulted {after_decoding / MIB:.1f} MiB of the map in"


def test_creation_hands_back_a_mapping_never_touched(model):
    """Copying reads every tensor (and fault-around maps its neighbours in):
    creating the runtime must not leave those pages behind."""
    before = file_rss(model)
    rt = model.runtime(OPTS)
    assert file_rss(model) < 8 * MIB
    assert file_rss(model) <= before + 4 * MIB
    rt.prefill(PROMPT)
    assert file_rss(model) < 8 * MIB


# ---- the profile ----


def test_profile_counts_the_decode_steps(model):
    rt = model.runtime(OPTS)
    core = rt._model
    rt.prefill(PROMPT)  # not profiled
    mats = matrices(model)
    q4_1 = sum(b for name, b in mats.items() if model.tensors[name].type == TensorType.Q4_1)
    q8_0 = sum(b for name, b in mats.items() if model.tensors[name].type == TensorType.Q8_0)
    assert q8_0 == model.tensors["token_embd.weight"].nbytes  # the tied output projection
    assert q4_1 + q8_0 == sum(mats.values())  # nothing else is multiplied by

    steps = 5
    core.profile(True)
    t0 = time.perf_counter()
    fed = decode_steps(rt, steps, len(PROMPT), PROMPT[-1])
    wall = time.perf_counter() - t0
    p = core.profile(False)

    assert p["runs"] == steps and p["tokens"] == steps
    ops = p["ops"]
    names = {"embed", "norm", "quantize", "rope_kv", "attention", "ffn_act", "add", "dispatch"}
    gemms = {f"gemm:{int(TensorType.Q4_1)}", f"gemm:{int(TensorType.Q8_0)}"}
    assert set(ops) == names | gemms
    assert ops[f"gemm:{int(TensorType.Q4_1)}"][1] == steps * q4_1
    assert ops[f"gemm:{int(TensorType.Q8_0)}"][1] == steps * q8_0
    for name in names:
        assert ops[name][1] == 0, f"{name} counts weight bytes"
    for name, (seconds, _) in ops.items():
        assert seconds >= 0, f"{name}: {seconds} s"
    for name in gemms:
        assert ops[name][0] > 0
    total = sum(seconds for seconds, _ in ops.values())
    assert 0 < total <= wall, f"{total:.4f} s profiled in {wall:.4f} s"

    # off: a step now is not counted, and the data was handed over and cleared
    decode_steps(rt, 1, len(PROMPT) + steps, fed[-1])
    empty = core.profile(False)
    assert empty["runs"] == 0 and empty["tokens"] == 0
    assert set(empty["ops"]) == names  # no gemm ran while profiled
    assert all(v == (0.0, 0.0) for v in empty["ops"].values())


def test_profile_on_restarts_the_count(model):
    rt = model.runtime(OPTS)
    core = rt._model
    core.profile(True)
    rt.prefill(PROMPT[:3])
    restarted = core.profile(True)  # hands over 1 run of 3 tokens, keeps profiling
    assert (restarted["runs"], restarted["tokens"]) == (1, 3)
    rt.prefill(PROMPT[:5])
    p = core.profile(False)
    assert (p["runs"], p["tokens"]) == (1, 5)


# ---- two runtimes over one mapping ----


def test_a_second_runtime_over_a_handed_back_mapping(model):
    first = model.runtime(OPTS)
    want = first.prefill(PROMPT, all_logits=True)
    assert np.isfinite(want).all()
    # the first runtime handed the mapping's pages back: the second reads them from the file again
    second = model.runtime(OPTS)
    np.testing.assert_array_equal(second.prefill(PROMPT, all_logits=True), want)
    np.testing.assert_array_equal(first.prefill(PROMPT, all_logits=True), want)
    del first
    gc.collect()
    np.testing.assert_array_equal(second.prefill(PROMPT, all_logits=True), want)
    third = model.runtime(OPTS)
    np.testing.assert_array_equal(third.prefill(PROMPT, all_logits=True), want)


def test_weights_not_from_one_read_only_map_are_never_handed_back(real_model):
    """A runtime over a tensor that lives on the heap (a copy, not a view of
    the file's map) must not be told its weights are mapped: releasing that
    span's pages would zero memory the model does not own."""
    model = load_model(real_model)
    tensors = dict(model.tensors)
    name = "blk.0.ffn_norm.weight"
    heap = np.array(tensors[name].data)  # an ordinary, writable copy
    before = heap.copy()
    tensors[name] = TensorView(heap, tensors[name].type, tensors[name].rows, tensors[name].cols)
    assert not _one_read_only_map(tensors)
    assert _one_read_only_map(model.tensors)
    rt = Transformer(model.config, tensors, RuntimeOptions(n_threads=1, n_ctx=32, max_batch=4))
    assert rt.weight_bytes > 0
    assert np.array_equal(heap, before)
