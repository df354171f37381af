"""`edge-slm export --to onnx`: the exported decoder run by ONNX Runtime
beside our C forward pass on the same tokens, in one call and token by token
with the KV fed back; the weights carried bit-exactly; the folder's files as
onnxruntime-genai and Hugging Face read them; bad input refused in one line.

ONNX Runtime quantizes MatMulNBits' input to int8 blocks (accuracy_level 4),
as our kernels quantize activations, each its own way: the logits agree
closely, not exactly, so the checks follow the margin, as test_parity's do."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from arch_models import ARCH_MODELS, write_arch_model
from reference import reference_logits
from tiny_models import TinySpec

import edge_slm.export.onnx as export
from edge_slm.backends.sidecar import read_sidecar
from edge_slm.export.onnx_weights import BLOCK, nbits_weight, pack_ggml_nibbles
from edge_slm.formats import TensorType
from edge_slm.model import RuntimeOptions, TensorView, load_model

FIXTURES = Path(__file__).parent / "fixtures"
DECISIVE = 1.0  # top-2 margin (of our logits) at which the choice must be the same


class Decoder:
    """An exported model in an InferenceSession, fed as onnxruntime-genai feeds it."""

    def __init__(self, folder: Path, threads: int = 2):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), so,
                                            providers=["CPUExecutionProvider"])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.kv_names = [i.name for i in past]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.kv_names}

    def run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
            past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        out = self.session.run(None, {**{k: v.astype(np.int64) for k, v in feed.items()}, **past})
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(self.outputs[1:], out[1:])}
        return out[0], present

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] in one call from position 0."""
        n = len(ids)
        return self.run(np.array([ids]), np.arange(n)[None], np.ones((1, n)), self.empty())[0][0]

    def incremental(self, ids: list[int], first: int) -> np.ndarray:
        """The first `first` ids in one call, then one id per call with the KV fed back."""
        rows, past = [], self.empty()
        for lo, hi in [(0, first)] + [(i, i + 1) for i in range(first, len(ids))]:
            logits, past = self.run(np.array([ids[lo:hi]]), np.arange(lo, hi)[None], np.ones((1, hi)), past)
            rows.extend(logits[0])
        return np.array(rows)


def ours(path: Path, ids: list[int]) -> np.ndarray:
    rt = load_model(path).runtime(RuntimeOptions(n_threads=2, n_ctx=max(64, len(ids)), max_batch=128))
    return rt.prefill(ids, all_logits=True)


def exported(path: Path, out: Path, **options) -> Path:
    export.export_onnx(load_model(path), out, **options)
    return out


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])


def compare(theirs: np.ndarray, mine: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Decisive positions that agree, decisive positions, per-position correlation."""
    top2 = np.sort(mine, axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= DECISIVE
    same = theirs.argmax(1) == mine.argmax(1)
    return int(same[decisive].sum()), int(decisive.sum()), correlations(theirs, mine)


def assert_close(theirs: np.ndarray, mine: np.ndarray, least_corr: float, what: str) -> None:
    agree, decisive, corr = compare(theirs, mine)
    assert agree == decisive, f"{what}: {decisive - agree} of {decisive} decisive positions differ"
    assert corr.min() >= least_corr, f"{what}: a position's logits correlate {corr.min():.5f}"


# ---------------------------------------------------------------- the weights

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_carried_bit_exact(qtype):
    """MatMulNBits on the identity (float path, accuracy_level 0) gives back
    every weight bit for bit as gguf-py dequantizes the block."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    N, K = 24, 96
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize((rng.standard_normal((N, K)) * 0.1).astype(np.float32), t)
    expected = gguf.quants.dequantize(raw, t).reshape(N, K)
    w = nbits_weight(TensorView(raw, TensorType[qtype], N, K))
    assert w.inexact == 0
    inits = [numpy_helper.from_array(w.codes, "B"), numpy_helper.from_array(w.scales, "S")]
    nodes = [helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N,
                              bits=w.bits, block_size=BLOCK, accuracy_level=0)]
    out = "Y"
    if w.offsets is not None:  # as the exporter adds Q4_1's m + 8d
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.offsets.T), "O"),
                  numpy_helper.from_array(np.array([-1, K // BLOCK, BLOCK]), "shape"),
                  numpy_helper.from_array(np.array([-1]), "axis")]
        nodes += [helper.make_node("Reshape", ["X", "shape"], ["XB"]),
                  helper.make_node("ReduceSum", ["XB", "axis"], ["XS"], keepdims=0),
                  helper.make_node("MatMul", ["XS", "O"], ["XO"]),
                  helper.make_node("Add", ["Y", "XO"], ["Z"])]
        out = "Z"
    graph = helper.make_graph(nodes, "w", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [K, K])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [K, N])], inits)
    model = helper.make_model(graph, ir_version=export.IR_VERSION, opset_imports=[
        helper.make_opsetid("", export.OPSET), helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"X": np.eye(K, dtype=np.float32)})[0]
    assert np.array_equal(got.T, expected)


def test_nibble_repacking():
    """ggml's byte j holds elements j and j + 16; MatMulNBits' byte i holds 2i and 2i + 1."""
    codes = np.arange(32, dtype=np.uint8) % 16  # element e has code e mod 16
    ggml = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    packed = pack_ggml_nibbles(ggml)
    unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)
    assert np.array_equal(unpacked, codes)


# ---------------------------------------------------------------- the decoder

SPECS = {
    "q4_1-gqa-tied-q8_0": TinySpec(),
    "q4_0-mha-untied-f16": TinySpec(weight_type="Q4_0", embd_type="F16", tied=False, n_kv_head=4),
    "q8_0-mqa-f32": TinySpec(weight_type="Q8_0", embd_type="F32", n_head=2, n_kv_head=1, hidden_dim=160),
    "f16-untied-q4_1": TinySpec(weight_type="F16", embd_type="Q4_1", tied=False, n_layer=3),
}


@pytest.fixture(scope="module")
def tiny_export(tiny_model_factory, tmp_path_factory):
    made: dict[str, tuple[Path, Path]] = {}

    def make(name: str) -> tuple[Path, Path]:
        if name not in made:
            path = tiny_model_factory(SPECS[name])
            made[name] = path, exported(path, tmp_path_factory.mktemp("onnx") / name)
        return made[name]

    return make


@pytest.mark.parametrize("name", SPECS)
def test_graph_is_the_model(name, tiny_model_factory, tmp_path):
    """With MatMulNBits on its float path, the graph computes the float
    forward pass of tests/reference.py to rounding: every weight type, tied
    or not, grouped-query or not."""
    path = tiny_model_factory(SPECS[name])
    ids = list(np.random.default_rng(1).integers(0, 259, size=24))
    got = Decoder(exported(path, tmp_path / "out", accuracy_level=0)).logits(ids)
    ref = reference_logits(load_model(path), ids)
    assert np.sum((got - ref) ** 2) / np.sum(ref ** 2) < 1e-10


@pytest.mark.parametrize("name", SPECS)
def test_logits_match_our_runtime(name, tiny_export):
    path, folder = tiny_export(name)
    ids = list(np.random.default_rng(2).integers(0, 259, size=40))
    mine = ours(path, ids)
    dec = Decoder(folder)
    at_once = dec.logits(ids)
    assert_close(at_once, mine, 0.998, f"{name}, one call")
    step = dec.incremental(ids, first=7)
    assert_close(step, mine, 0.998, f"{name}, token by token")
    assert np.corrcoef(step.ravel(), at_once.ravel())[0, 1] > 0.9999


def test_batch_with_left_padding(tiny_export):
    """Two sequences of different lengths in one batch, the shorter padded on
    the left (attention_mask 0, positions from its first real token): each
    row's logits are its own sequence's, alone."""
    _, folder = tiny_export("q4_1-gqa-tied-q8_0")
    dec = Decoder(folder)
    a, b = [5, 17, 99, 3, 250, 7, 42], [42, 8, 160]
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])
    positions = np.array([list(range(len(a))), [0] * pad + list(range(len(b)))])
    logits, past = dec.run(ids, positions, mask, dec.empty(2))
    np.testing.assert_allclose(logits[0], dec.logits(a), atol=1e-3)
    np.testing.assert_allclose(logits[1, pad:], dec.logits(b), atol=1e-3)
    # and one more token each, on the batch's KV
    mask = np.concatenate([mask, [[1], [1]]], axis=1)
    more, _ = dec.run(np.array([[11], [12]]), positions[:, -1:] + 1, mask, past)
    np.testing.assert_allclose(more[0, 0], dec.logits(a + [11])[-1], atol=1e-3)
    np.testing.assert_allclose(more[1, 0], dec.logits(b + [12])[-1], atol=1e-3)


# The families whose attention is GroupQueryAttention; the others' (per-head
# Q/K norms, a sliding window) is written in standard ops.
FUSED_ATTENTION = {"llama": True, "llama3": True, "qwen2": True, "qwen3": False, "gemma3": False}


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2", "qwen3", "gemma3"])
def test_architectures(name, tmp_path):
    """Each family the runtime runs (tests/arch_models.py, F32): Llama 3's
    RoPE factors, Qwen2's biases, Qwen3's and Gemma 3's Q/K norms, Gemma 3's
    post-norms, GELU, scaled embedding and sliding window (8 positions, so a
    40-token sequence leaves it); fused attention where the family allows it,
    as the model's metadata says."""
    path = write_arch_model(tmp_path / "model.gguf", ARCH_MODELS[name])
    ids = list(np.random.default_rng(4).integers(0, 512, size=40))
    folder = exported(path, tmp_path / "out")
    proto = onnx.load(str(folder / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    fused = FUSED_ATTENTION[name]
    assert ("GroupQueryAttention" in ops, "Softmax" in ops) == (fused, not fused)
    assert "SkipSimplifiedLayerNormalization" in ops
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["attention"] == ("GroupQueryAttention" if fused else "standard")
    dec = Decoder(folder)
    mine = ours(path, ids)
    assert_close(dec.logits(ids), mine, 0.9999, f"{name}, one call")
    assert_close(dec.incremental(ids, first=5), mine, 0.9999, f"{name}, token by token")


@pytest.mark.parametrize("name", ["llama-Q4_0", "llama-Q4_1", "llama-Q5_1", "llama-Q6_K", "qwen3-Q4_K_M",
                                  "gemma3-Q4_K_M"])
def test_llama_cpp_quantizations(name, tmp_path, parity_report):
    """llama.cpp's own quantizations (tests/fixtures/arch): its Q4_0 and Q4_1
    blocks through MatMulNBits, the types without a MatMulNBits form (Q5_1,
    K-quants) dequantized to float, mixed in one file."""
    path = FIXTURES / "arch" / f"{name}.gguf"
    ids = list(np.random.default_rng(5).integers(0, 512, size=40))
    done = export.export_onnx(load_model(path), tmp_path / "out")
    dec = Decoder(done.folder)
    mine = ours(path, ids)
    assert_close(dec.logits(ids), mine, 0.995, name)
    how = "; ".join(f"{k} as {v}" for k, v in sorted(done.weight_types.items()))
    parity_report.append(f"onnx export {name}: {how}")


# ---------------------------------------------------------------- the folder

def test_folder_for_genai_and_hugging_face(tiny_export):
    from tokenizers import Tokenizer as HfTokenizer

    path, folder = tiny_export("q4_1-gqa-tied-q8_0")
    model = load_model(path)
    cfg, tok = model.config, model.tokenizer()
    assert sorted(p.name for p in folder.iterdir()) == [
        "edge-slm.json", "genai_config.json", "model.onnx", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    side, _, side_cfg = read_sidecar(folder, "onnx")  # what edge-slm's onnx backend runs it by
    assert side_cfg == cfg and side["source"]["sha256"] == model.sha256()
    assert side["settings"] == {"accuracy_level": export.ACCURACY_LEVEL}
    doc = json.loads((folder / "genai_config.json").read_text())
    dec = doc["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dim)
    assert doc["model"]["type"] == "llama" and doc["model"]["context_length"] == cfg.context_length
    eos = doc["model"]["eos_token_id"]  # every end-of-generation token, EOS first
    assert eos[0] == tok.eos_id and set(eos) == tok.vocab.eog_ids and doc["model"]["bos_token_id"] == tok.bos_id
    assert doc["search"]["past_present_share_buffer"] is False
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in proto.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    hf = HfTokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ["Hello, world!", "<|im_start|>user\nhi<|im_end|>", "2.5 bar  \ttabs\n", "泵的压力 ✅"]:
        ids = hf.encode(text).ids
        assert ids == tok.encode(text)
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)


def test_sentencepiece_vocabulary_noted(tmp_path):
    path = write_arch_model(tmp_path / "model.gguf", ARCH_MODELS["llama"])  # llama-spm vocabulary
    done = export.export_onnx(load_model(path), tmp_path / "out")
    assert "tokenizer.model" in done.files and "tokenizer.json" not in done.files
    assert "onnxruntime-genai" in done.note


# ---------------------------------------------------------------- the command

def edge_slm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_slm", *args], capture_output=True, text=True,
                          timeout=120)


def test_export_command(tiny_model, tmp_path):
    out = tmp_path / "made"
    out.mkdir()  # an empty folder is taken
    proc = edge_slm("export", str(tiny_model), "--to", "onnx", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "model.onnx" in proc.stdout and "Q4_1: MatMulNBits bits=4" in proc.stdout
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _truncated(tiny_model: Path, tmp_path: Path) -> Path:
    p = tmp_path / "truncated.gguf"
    p.write_bytes(tiny_model.read_bytes()[:5000])
    return p


def _other_arch(tiny_model: Path, tmp_path: Path) -> Path:
    p = tmp_path / "phi.gguf"
    data = tiny_model.read_bytes()
    # the architecture's value, same length, so the file stays well-formed
    length = (5).to_bytes(8, "little")
    p.write_bytes(data.replace(length + b"llama", length + b"phi_3", 1))
    return p


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such model file"),
    ("not-gguf", "not a readable GGUF file"),
    ("truncated", "not a readable GGUF file"),
    ("architecture", "architecture 'phi_3' is not supported"),
    ("type", "has type Q2_K"),
    ("out-not-empty", "folder is not empty"),
    ("out-is-file", "exists and is not a folder"),
])
def test_bad_input_refused_in_one_line(case, needle, tiny_model, tiny_model_factory, tmp_path):
    model, out = tiny_model, tmp_path / "out"
    if case == "missing":
        model = tmp_path / "nothing.gguf"
    elif case == "not-gguf":
        model = tmp_path / "text.gguf"
        model.write_text("hello\n" * 100)
    elif case == "truncated":
        model = _truncated(tiny_model, tmp_path)
    elif case == "architecture":
        model = _other_arch(tiny_model, tmp_path)
    elif case == "type":
        model = tiny_model_factory(TinySpec(down_type="Q2_K"))
    elif case == "out-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out-is-file":
        out.write_text("mine")
    proc = edge_slm("export", str(model), "--to", "onnx", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr
    if case == "out-not-empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------- the reference model

@pytest.fixture(scope="module")
def reference_export(real_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-ref") / "SmolLM2-135M"
    t0 = time.perf_counter()
    done = export.export_onnx(load_model(real_model), out)
    return done, time.perf_counter() - t0


@pytest.fixture(scope="module")
def parity_arrays() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "parity.npz"))


@pytest.fixture(scope="module")
def parity_sequences(parity_arrays) -> list[tuple[list[int], int]]:
    """The parity fixtures' prompts with llama.cpp's greedy continuations:
    (ids, prompt length), in the fixture's order."""
    a, n = parity_arrays, len(json.loads((FIXTURES / "parity.json").read_text())["prompts"])
    po = a["prompt_offsets"]
    return [(a["prompt_ids"][po[i]:po[i + 1]].tolist() + a["generated_ids"][i].tolist(),
             int(po[i + 1] - po[i])) for i in range(n)]


def test_reference_model(real_model, reference_export, parity_sequences, parity_arrays, parity_report):
    """SmolLM2-135M Q4_1 exported: along the parity sequences, ONNX Runtime's
    logits beside our C kernels', in one call per sequence, and token by
    token for two of them; and beside llama.cpp's (the fixtures'), reported."""
    done, seconds = reference_export
    model = load_model(real_model)
    rt = model.runtime(RuntimeOptions(n_threads=2, n_ctx=512, max_batch=128))
    dec = Decoder(done.folder)
    agree = decisive = 0
    corrs, step_corrs, step_agree, step_decisive = [], [], 0, 0
    lc = parity_arrays
    lc_corrs, lc_misses, lc_decisive = [], 0, 0
    for k, (ids, prompt) in enumerate(parity_sequences):
        mine = rt.prefill(ids, all_logits=True)
        theirs = dec.logits(ids)
        a, d, c = compare(theirs, mine)
        agree, decisive = agree + a, decisive + d
        corrs.append(c)
        rows = slice(*lc["position_offsets"][k:k + 2])
        lc_corrs.append(correlations(theirs[:, lc["subset_ids"]], lc["subset_logits"][rows]))
        sure = lc["margin"][rows] >= DECISIVE
        lc_decisive += int(sure.sum())
        lc_misses += int((theirs.argmax(1) != lc["top_ids"][rows, 0])[sure].sum())
        if k < 2:
            a, d, c = compare(dec.incremental(ids, prompt), mine)
            step_agree, step_decisive = step_agree + a, step_decisive + d
            step_corrs.append(c)
    corrs, step_corrs, lc_corrs = np.concatenate(corrs), np.concatenate(step_corrs), np.concatenate(lc_corrs)
    gguf_mib = real_model.stat().st_size / 2**20
    parity_report.append(
        f"onnx export of {real_model.name}: {seconds:.1f} s, {done.bytes / 2**20:.1f} MiB "
        f"(GGUF {gguf_mib:.1f} MiB); vs our C kernels over {len(corrs)} positions: decisive argmax "
        f"{agree}/{decisive}, correlation min {corrs.min():.4f} median {np.median(corrs):.5f}; token by token "
        f"({len(step_corrs)} positions): decisive {step_agree}/{step_decisive}, correlation min "
        f"{step_corrs.min():.4f} median {np.median(step_corrs):.5f}; vs llama.cpp: decisive argmax "
        f"{lc_decisive - lc_misses}/{lc_decisive}, correlation min {lc_corrs.min():.4f} median "
        f"{np.median(lc_corrs):.5f}")
    assert agree == decisive and step_agree == step_decisive
    assert corrs.min() >= 0.99 and np.median(corrs) >= 0.999
    assert step_corrs.min() >= 0.99


@pytest.mark.slow
def test_onnxruntime_genai_runs_the_export(real_model, reference_export, parity_sequences, parity_report):
    """onnxruntime-genai loads our folder (genai_config.json, tokenizer.json)
    and its greedy search gives our C kernels' greedy tokens up to our first
    near-tie (margin under 1.0)."""
    import onnxruntime_genai as og
    from reference import GenerationConfig, generate

    done, _ = reference_export
    model = load_model(real_model)
    tok = model.tokenizer()
    gmodel = og.Model(str(done.folder))
    gtok = og.Tokenizer(gmodel)
    for text in ["Hello, world!", "The pump runs at 2.5 bar; 1234 hours.", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert list(gtok.encode(text)) == tok.encode(text)
    rt = model.runtime(RuntimeOptions(n_threads=2, n_ctx=512, max_batch=64))
    same = required = equal = total = 0
    for ids, prompt in parity_sequences[:6]:
        n = len(ids) - prompt
        mine = generate(rt, tok, ids[:prompt], GenerationConfig(max_tokens=n, ignore_eos=True))
        params = og.GeneratorParams(gmodel)
        params.set_search_options(max_length=len(ids), do_sample=False)
        gen = og.Generator(gmodel, params)
        gen.append_tokens(ids[:prompt])
        theirs = []
        while len(theirs) < len(mine.tokens) and not gen.is_done():
            gen.generate_next_token()
            theirs.append(int(gen.get_next_tokens()[0]))
        # where our own greedy choice was decisive, genai's must be the same
        logits = rt.prefill(ids[:prompt] + mine.tokens, all_logits=True)[prompt - 1:]
        top2 = np.sort(logits, axis=1)[:, -2:]
        undecided = np.flatnonzero(top2[:, 1] - top2[:, 0] < DECISIVE)
        first_tie = int(undecided[0]) if len(undecided) else len(mine.tokens)
        differ = [i for i, (x, y) in enumerate(zip(theirs, mine.tokens)) if x != y]
        first_diff = differ[0] if differ else min(len(theirs), len(mine.tokens))
        assert first_diff >= min(first_tie, len(theirs)), (first_diff, first_tie)
        same, required = same + first_diff, required + min(first_tie, len(theirs))
        equal += sum(x == y for x, y in zip(theirs, mine.tokens))
        total += len(mine.tokens)
    parity_report.append(f"onnxruntime-genai on the export, 6 prompts: greedy identical to our C kernels for "
                         f"{same} tokens up to the first difference ({required} required, up to our first "
                         f"near-tie); {equal}/{total} tokens equal overall")
