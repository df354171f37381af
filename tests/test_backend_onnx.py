"""The onnx backend (edge_slm/backends/onnx.py) on a tiny random model
exported with `edge-slm export --to onnx`: chosen by the folder, logits
beside our C kernels' with several slots in one call, the KV buffers
written in place and rotated, the engine streaming from it, its memory
figures against what it holds, and bad folders refused in one line."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_export_onnx import DECISIVE, assert_close
from tiny_models import TinySpec

from edge_slm.backends import load_source
from edge_slm.backends.onnx import ARENA_BASE, activation_bytes
from edge_slm.engine import OK, Engine, EngineConfig
from edge_slm.errors import EdgeSlmError, ModelError
from edge_slm.export.onnx import export_onnx
from edge_slm.memory import MIB, current_rss, peak_rss
from edge_slm.model import RuntimeOptions, load_model

PROMPTS = ["hello there", "the pump", "valve 7 is stuck", "abc"]


def onnx_options(**kw) -> RuntimeOptions:
    opts = dict(n_threads=2, n_ctx=128, n_slots=2, max_batch=32, kv_type="f32")
    opts.update(kw)
    return RuntimeOptions(**opts)


@pytest.fixture(scope="module")
def exports(tiny_model_factory, tmp_path_factory):
    """Tiny models' exports, made once per spec: (the GGUF, its ONNX folder)."""
    made: dict[TinySpec, tuple[Path, Path]] = {}

    def make(spec: TinySpec = TinySpec()) -> tuple[Path, Path]:
        if spec not in made:
            path = tiny_model_factory(spec)
            out = tmp_path_factory.mktemp("onnx") / "model"
            export_onnx(load_model(path), out)
            made[spec] = path, out
        return made[spec]

    return make


@pytest.fixture(scope="module")
def tiny(exports) -> tuple[Path, Path]:
    return exports()


def c_logits(path: Path, ids: list[int]) -> np.ndarray:
    rt = load_model(path).runtime(RuntimeOptions(n_threads=2, n_ctx=256, max_batch=128))
    return rt.prefill(ids, all_logits=True)


def one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


# ---------------------------------------------------------------- the source

def test_the_folder_is_an_onnx_model(tiny):
    path, folder = tiny
    gguf = load_model(path)
    src = load_source(folder)
    assert src.kind == "onnx" and src.kv_types == ("f32",)
    assert src.config == gguf.config and src.name == folder.name
    for text in ["hello there", "<|im_start|>user\nhi<|im_end|>"]:
        assert src.tokenizer().encode(text) == gguf.tokenizer().encode(text)
    assert src.tokenizer() is src.tokenizer()
    assert src.sha256() == hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    label, text = src.describe()[0]
    assert label == "file" and "ONNX" in text and "Q4_1 as MatMulNBits bits=4" in text
    assert 0 < src.resident_weights == src.loaded_bytes < 200 * MIB
    assert load_source(folder / "model.onnx").config == src.config  # the file names its folder


def test_the_gguf_path_never_imports_onnxruntime(tiny):
    path, _ = tiny
    code = ("import sys; from edge_slm.backends import load_source; import edge_slm.backends.onnx, "
            "edge_slm.engine; m = load_source(sys.argv[1]); m.tokenizer(); "
            "assert 'onnxruntime' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- the runtime

def test_slots_in_one_call_match_our_c_kernels(tiny):
    """Two slots prefilled in one call, then decoded together a token each
    per call, as the engine batches them: each slot's logits are its own
    sequence's, as our C kernels compute them."""
    path, folder = tiny
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 259, 30).tolist(), rng.integers(0, 259, 24).tolist()
    rt = load_source(folder).runtime(onnx_options(max_logits=32))
    first_a, first_b = 10, 7
    rows = rt.forward(np.array(a[:first_a] + b[:first_b]), np.r_[0:first_a, 0:first_b],
                      np.r_[[0] * first_a, [1] * first_b], np.ones(first_a + first_b, np.uint8)).copy()
    got_a, got_b = list(rows[:first_a]), list(rows[first_a:])
    for i in range(len(a) - first_a):
        toks, pos, slots = [a[first_a + i]], [first_a + i], [0]
        if first_b + i < len(b):
            toks, pos, slots = toks + [b[first_b + i]], pos + [first_b + i], slots + [1]
        out = rt.forward(np.array(toks), np.array(pos), np.array(slots), np.ones(len(toks), np.uint8))
        got_a.append(out[0].copy())
        if len(toks) == 2:
            got_b.append(out[1].copy())
    assert_close(np.array(got_a), c_logits(path, a), 0.998, "slot 0")
    assert_close(np.array(got_b), c_logits(path, b), 0.998, "slot 1")


def test_only_wanted_rows_come_back(tiny):
    path, folder = tiny
    ids = np.random.default_rng(8).integers(0, 259, 20).tolist()
    rt = load_source(folder).runtime(onnx_options(max_logits=2))
    want = np.zeros(20, np.uint8)
    want[[6, 19]] = 1
    out = rt.forward(np.array(ids), np.arange(20), np.zeros(20), want)
    full = load_source(folder).runtime(onnx_options(max_logits=32)).prefill(ids, all_logits=True)
    np.testing.assert_array_equal(out, full[[6, 19]])
    with pytest.raises(ValueError, match="at most 2"):
        rt.forward(np.array(ids[:3]), np.arange(3), np.zeros(3), np.ones(3))


def test_kv_buffers_are_bound_in_place_and_rotate(tiny):
    """ONNX Runtime reads the past from the slot's buffer and writes present
    into the spare, both ours (its outputs are our memory, not copies); the
    spare then holds the slot's cache, with the values a plain session.run
    returns; no buffer is ever allocated again."""
    _, folder = tiny
    rt = load_source(folder).runtime(onnx_options())
    kv, base = rt._kv, rt._kv.ctypes.data
    ids = [5, 17, 99, 3, 250, 7]
    spare = rt._spare
    rt.forward(np.array(ids), np.arange(6), np.zeros(6), np.ones(6, np.uint8))
    assert rt._owner[0] == spare  # the slot's cache is where present was written
    outs = dict(zip([*rt._present_names, "logits"], rt._binding.get_outputs()))  # in binding order
    cfg = rt.cfg
    per = cfg.n_kv_head * 6 * cfg.head_dim
    for j, name in enumerate(rt._present_names):
        assert outs[name].data_ptr() == kv[spare, j].ctypes.data
    plain = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, cfg.n_kv_head, 0, cfg.head_dim), np.float32)
    names = [o.name for o in plain.get_outputs()]
    ref = dict(zip(names, plain.run(None, {
        "input_ids": np.array([ids]), "position_ids": np.arange(6)[None], "attention_mask": np.ones((1, 6), np.int64),
        **{n: empty for n in rt._past_names}})))
    for j, name in enumerate(rt._present_names):
        np.testing.assert_allclose(kv[spare, j, :per].reshape(ref[name].shape), ref[name], atol=1e-5)
    for i in range(40):  # decode: the buffers swap roles, the pool stays the same memory
        rt.forward(np.array([i]), np.array([6 + i]), np.zeros(1), np.ones(1, np.uint8))
        assert rt._kv is kv and rt._kv.ctypes.data == base
    assert sorted(rt._owner + [rt._spare]) == [0, 1, 2]


def test_a_slot_continues_from_a_kept_start_or_a_copy(tiny):
    """A new request keeping the start of a slot's cache, and kv_copy, give
    the logits of the whole sequence computed afresh."""
    _, folder = tiny
    rng = np.random.default_rng(9)
    a, other = rng.integers(0, 259, 24).tolist(), rng.integers(0, 259, 12).tolist()
    src = load_source(folder)
    fresh = src.runtime(onnx_options(max_logits=32))
    want_a = fresh.prefill(a, all_logits=True)[12:]
    want_b = fresh.prefill(a[:12] + other, slot=1, all_logits=True)[12:]
    rt = src.runtime(onnx_options(max_logits=32))
    rt.prefill(a, slot=0)
    rt.kv_copy(0, 1, 12)
    np.testing.assert_allclose(rt.prefill(a[12:], start=12, slot=1, all_logits=True), want_a, atol=1e-4)
    # slot 0 starts again at position 12: its cache keeps a[:12]
    np.testing.assert_allclose(rt.prefill(other, start=12, slot=0, all_logits=True), want_b, atol=1e-4)
    rt.kv_copy(1, 1, 5)  # onto itself: the first 5 kept
    np.testing.assert_allclose(rt.prefill(a[5:], start=5, slot=1, all_logits=True),
                               fresh.prefill(a, slot=0, all_logits=True)[5:], atol=1e-4)


def test_what_the_runtime_refuses(tiny):
    _, folder = tiny
    rt = load_source(folder).runtime(onnx_options(n_ctx=16))
    rt.prefill([1, 2, 3, 4])
    assert not rt.can_shift and rt.kv_ring == 0 and rt.kv_usable(0, 4) == 4
    with pytest.raises(ModelError, match="do not continue its cache of 4"):
        rt.forward(np.array([9]), np.array([5]), np.zeros(1), np.ones(1))  # a gap
    with pytest.raises(ModelError, match="do not continue"):
        rt.forward(np.array([9, 9]), np.array([4, 6]), np.zeros(2), np.ones(2))
    with pytest.raises(ModelError, match="past the context of 16"):
        rt.prefill(list(range(13)), start=4)
    with pytest.raises(EdgeSlmError, match="cannot shift"):
        rt.kv_shift(0, 2, 1, 4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        rt.kv_copy(0, 1, 5)
    src = load_source(folder)
    with pytest.raises(EdgeSlmError, match="f32 only"):
        src.runtime(onnx_options(kv_type="f16"))
    with pytest.raises(EdgeSlmError, match="trained context, 256"):
        src.runtime(onnx_options(n_ctx=512))


def test_rss_stays_flat_over_200_decode_steps(tiny):
    """Once a slot has run to a full context (the allocator has seen every
    size a call asks for, which the plan counts), a new request keeping its
    first 20 positions decodes 200 tokens without RSS growing."""
    _, folder = tiny
    rt = load_source(folder).runtime(onnx_options(n_ctx=256, n_slots=1))
    step = [np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.uint8)]

    def decode(start: int, n: int) -> None:
        for i in range(n):
            step[0][0], step[1][0] = (7 * i) % 250, start + i
            rt.forward(*step)

    rt.prefill(list(range(20)))
    decode(20, 236)
    before = current_rss()
    decode(20, 200)
    grown = current_rss() - before
    assert grown < 128 * 1024, f"RSS grew {grown / 1024:.0f} KiB over 200 decode steps"
    with pytest.raises(ValueError, match="outside the vocabulary of 259"):
        rt.forward(np.array([259]), np.array([220]), np.zeros(1), np.ones(1))


def prefill_peak_growth(rt, ids: list[int]) -> int:
    """How far prefilling ids raises the process's peak RSS above what it holds now."""
    before = current_rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    rt.prefill(ids)
    return peak_rss() - before


def test_activation_bytes_bound_a_full_context_call(exports):
    """The plan's figure for ONNX Runtime's activations holds the peak RSS
    growth of calls of max_batch tokens up to a full context, and is not far
    above it (the model is wide enough that its activations dwarf the noise)."""
    _, folder = exports(TinySpec(context_length=2048, n_layer=1))
    src = load_source(folder)
    n, n_ctx = 64, 2048
    rt = src.runtime(onnx_options(n_ctx=n_ctx, n_slots=1, max_batch=n))
    grown = prefill_peak_growth(rt, np.random.default_rng(3).integers(0, 259, n_ctx).tolist())
    planned = activation_bytes(src.config, n, n_ctx, src.fused_attention)
    assert grown <= planned, f"calls grew RSS by {grown / MIB:.1f} MiB, the plan holds {planned / MIB:.1f}"
    assert planned <= 2.5 * grown + ARENA_BASE, f"planned {planned / MIB:.1f} MiB, measured {grown / MIB:.1f}"


# ---------------------------------------------------------------- the engine

def onnx_engine(folder: Path, **kw) -> Engine:
    opts = dict(model=folder, slots=2, ctx=256, min_ctx=64, threads=2, timeout=30.0)
    opts.update(kw)
    return Engine(EngineConfig(**opts))


def first_near_tie(path: Path, prompt: list[int], answer: list[int]) -> int:
    """Answer tokens our C kernels choose by a margin of at least DECISIVE
    before their first near-tie."""
    logits = c_logits(path, prompt + answer)[len(prompt) - 1:]
    top2 = np.sort(logits, axis=1)[:, -2:]
    undecided = np.flatnonzero(top2[:, 1] - top2[:, 0] < DECISIVE)
    return int(undecided[0]) if len(undecided) else len(answer)


def test_engine_streams_two_requests_as_the_gguf_engine_answers(tiny):
    path, folder = tiny
    with onnx_engine(folder) as e:
        assert e.status()["backend"] == "onnxruntime cpu" and e.plan.kv_type == "f32"
        with e._cond:  # both queued before the engine admits either: they run together
            reqs = [e.submit(p, max_tokens=24, ignore_eos=True) for p in PROMPTS[:2]]
        streamed = ["".join(r.stream(timeout=30)) for r in reqs]
        theirs = [r.result(timeout=30) for r in reqs]
        assert e.status()["mean_decode_batch"] > 1.5
        more = [e.submit(p, max_tokens=24, ignore_eos=True).result(timeout=30) for p in PROMPTS[2:]]
        held = current_rss()
        assert held <= e.plan.total, f"RSS {held / MIB:.1f} MiB over the plan's {e.plan.total / MIB:.1f}"
    with Engine(EngineConfig(model=path, slots=2, ctx=256, min_ctx=64, threads=2, timeout=30.0)) as e:
        mine = [e.submit(p, max_tokens=24, ignore_eos=True).result(timeout=30) for p in PROMPTS]
    assert [r.status for r in theirs + more] == [OK] * 4
    assert streamed == [r.text for r in theirs]
    decisive = 0
    tok = load_model(path).tokenizer()
    for p, t, m in zip(PROMPTS, theirs + more, mine):
        sure = first_near_tie(path, tok.encode(p), m.tokens)
        assert t.tokens[:sure] == m.tokens[:sure], p
        decisive += sure
    assert decisive >= 20  # the comparison covered enough tokens to mean something


def test_a_full_context_ends_the_answer(tiny):
    _, folder = tiny
    with onnx_engine(folder, slots=1, ctx=64, keep_tokens=4) as e:
        r = e.submit("abcdefghij", max_tokens=150, ignore_eos=True).result(timeout=60)
        assert e.status()["context_shifts"] == 0
    assert r.status == OK and r.finish_reason == "length"
    assert r.prompt_tokens + len(r.tokens) == 64 + 1  # the last token sampled is not cached


# ---------------------------------------------------------------- refusals

def copy_folder(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_a_folder_without_the_sidecar_is_refused(tiny, tmp_path):
    _, folder = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model.onnx", bare / "model.onnx")
    with pytest.raises(ModelError) as e:
        load_source(bare)
    one_line(e, str(bare), "edge-slm export --to onnx")


def test_a_truncated_model_is_refused(tiny, tmp_path):
    _, folder = tiny
    cut = copy_folder(folder, tmp_path / "cut")
    data = (cut / "model.onnx").read_bytes()
    (cut / "model.onnx").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelError) as e:
        load_source(cut)
    one_line(e, str(cut / "model.onnx"), "ONNX Runtime cannot load it")


@pytest.mark.parametrize("spec, needle", [
    (TinySpec(n_layer=3), "the graph caches 2 layers, edge-slm.json says 3"),
    (TinySpec(n_kv_head=4), "4 KV heads"),
])
def test_another_models_sidecar_is_refused(spec, needle, tiny, exports, tmp_path):
    _, folder = tiny
    _, other = exports(spec)
    mixed = copy_folder(folder, tmp_path / "mixed")
    shutil.copy(other / "edge-slm.json", mixed / "edge-slm.json")
    with pytest.raises(ModelError) as e:
        load_source(mixed)
    one_line(e, str(mixed), needle)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this ONNX Runtime has CUDA")
@pytest.mark.parametrize("provider, missing", [("cuda", "CUDAExecutionProvider"),
                                               ("tensorrt", "TensorrtExecutionProvider")])
def test_an_unavailable_execution_provider_is_refused(provider, missing, tiny):
    _, folder = tiny
    with pytest.raises(EdgeSlmError) as e:
        onnx_engine(folder, execution_provider=provider)
    one_line(e, f"execution provider {provider}", "CPUExecutionProvider", f"{missing} comes with onnxruntime-gpu")
