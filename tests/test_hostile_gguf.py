"""Hostile model files: a header that lies about its counts, metadata of the
wrong type, sizes that overflow, a vocabulary that does not match its
embedding, settings that would plan absurd memory. Each gives one line (an
EdgeSlmError, or the CLI's exit code 1 and one line on stderr) within a time
and a memory bound; a fuzz test puts any value of any GGUF type under every
key the loader reads."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_model_errors import rewrite
from tiny_models import TinySpec, write_tiny_model

from edge_slm.engine import EngineConfig
from edge_slm.errors import EdgeSlmError
from edge_slm.memory import MIB, Fixed, peak_rss, status_bytes
from edge_slm.model import GGUFFile, RuntimeOptions, load_model
from edge_slm.tokenizer import Tokenizer

V = gguf.GGUFValueType
ARRAY, STR, U8, U32, U64, I32, F32 = V.ARRAY, V.STRING, V.UINT8, V.UINT32, V.UINT64, V.INT32, V.FLOAT32
EDGE_SLM = [sys.executable, "-m", "edge_slm"]
# A child may map this much address space: the CLI at work needs about 500 MiB,
# the unchecked header of old grew by gigabytes.
ADDRESS_SPACE = 1536 * MIB


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_mib: float  # the child's own high-water resident size


# Runs the CLI as its own child and reports that child's peak. A child forked
# from pytest directly inherits pytest's high-water mark in its ru_maxrss
# (the kernel carries the old address space's peak across exec), so in a
# long test session every child would look as large as the session; forked
# from this small launcher it starts from the launcher's few MiB instead.
LAUNCHER = """
import resource, subprocess, sys
limit, out, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
code = subprocess.run(cmd).returncode
with open(out, "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_cli(*args: str, env: dict | None = None, seconds: float = 60) -> Run:
    """edge-slm in a child process, killed after `seconds`, with its own peak RSS."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ADDRESS_SPACE), peak.name,
                                 *EDGE_SLM, *args], stdout=out, stderr=err,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            code = proc.wait(seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the CLI under it
            code = proc.wait()
        elapsed = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        kib = peak.read()
        return Run(code, out.read(), err.read(), elapsed, int(kib) / 1024 if kib else float("inf"))


def assert_refused(run: Run, *needles: str, seconds: float = 30, mib: float = 250) -> None:
    """One line on stderr naming what was wrong, exit code 1, within the bounds."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.code == 1 and "Traceback" not in run.stderr and len(lines) == 1, run.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert run.seconds < seconds, f"took {run.seconds:.1f} s"
    assert run.peak_mib < mib, f"peak RSS {run.peak_mib:.0f} MiB"


@dataclass
class Outcome:
    kind: str      # "ok", "refused" (an EdgeSlmError) or "crashed" (anything else)
    text: str      # the error's type and message, or what fn returned
    seconds: float
    peak_mib: float  # growth of the peak RSS while fn ran


def bounded(fn: Callable[[], object], seconds: int = 20, mib: int = 1024) -> Outcome:
    """fn() in a forked child that may map `mib` MiB more and run `seconds`:
    a loader that regresses fails the test, not the machine."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and exit without running the parent's cleanup
        try:
            os.close(r)
            most = status_bytes("VmSize") + mib * MIB
            resource.setrlimit(resource.RLIMIT_AS, (most, most))
            signal.alarm(seconds)
            Path("/proc/self/clear_refs").write_text("5")  # the peak RSS from here
            before, start = peak_rss(), time.monotonic()
            try:
                kind, text = "ok", repr(fn())
            except EdgeSlmError as e:
                kind, text = "refused", f"{type(e).__name__}: {e}"
            except BaseException:
                kind, text = "crashed", traceback.format_exc()
            os.write(w, json.dumps([kind, text, time.monotonic() - start,
                                    (peak_rss() - before) / MIB]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    assert report, f"the child died ({os.WTERMSIG(status) if os.WIFSIGNALED(status) else 'no'} signal)"
    return Outcome(*json.loads(report))


def assert_model_error(fn: Callable[[], object], message: str, seconds: float = 10, mib: float = 64) -> None:
    """fn() raises ModelError matching `message` (a regex), in one line, within the bounds."""
    out = bounded(fn)
    assert out.kind == "refused" and out.text.startswith(("ModelError: ", "UnsupportedModel: ")), out.text
    assert re.search(message, out.text) and "\n" not in out.text, out.text
    assert out.seconds < seconds and out.peak_mib < mib, (out.seconds, out.peak_mib)


def patched(src: Path, dst: Path, marker: bytes, skip: int, value: int) -> Path:
    """A copy of src with the 8-byte count `skip` bytes after `marker` replaced:
    what gguf's writer cannot write, a header that lies."""
    data = bytearray(src.read_bytes())
    at = data.index(marker) + len(marker) + skip if marker else skip
    data[at:at + 8] = value.to_bytes(8, "little")
    dst.write_bytes(bytes(data))
    return dst


# ---- a header's counts are checked against the file before anything is sized by them ----

@pytest.fixture(scope="module")
def lying_blocks(real_model, tmp_path_factory) -> Path:
    """The reference model saying it has 2^31 - 1 blocks (it holds 30)."""
    return rewrite(real_model, tmp_path_factory.mktemp("lying") / "blocks.gguf",
                   {"llama.block_count": (2**31 - 1, U32)})


@pytest.mark.parametrize("command", [["info"], ["ask", "hi", "--memory-budget", "256M", "--model"]])
def test_a_block_count_beyond_the_tensors_is_refused_at_once(lying_blocks, command):
    assert_refused(run_cli(*command, str(lying_blocks)),
                   "blocks.gguf", "block_count is 2147483647", "tensors for 30 blocks")


@pytest.mark.parametrize("key,value,message", [
    ("llama.block_count", 2**31, "block_count is 2147483648; it must be positive and at most 2147483647"),
    ("llama.block_count", 1000, "block_count is 1000, but the file holds tensors for 2 blocks"),
    ("llama.embedding_length", 2**30, "token_embd.weight is 259x128, expected 259x1073741824"),
    ("llama.feed_forward_length", 2**31 - 1, "ffn_gate.weight is 96x128, expected 2147483647x128"),
    ("llama.attention.head_count", 2**30, "head size 1 is odd"),
    ("llama.attention.head_count_kv", 2**31 - 1, "4 attention heads cannot share 2147483647 KV heads"),
    ("llama.attention.key_length", 2**30, "attn_q.weight is 128x128, expected 4294967296x128"),
    ("llama.vocab_size", 2**31 - 1, "ggml.tokens holds 259 tokens, llama.vocab_size says 2147483647"),
])
def test_sizes_in_the_header_must_agree_with_the_tensors(tiny_model, tmp_path, key, value, message):
    p = rewrite(tiny_model, tmp_path / "big.gguf", {key: (value, U64)})
    assert_model_error(lambda: load_model(p), message)


@pytest.mark.parametrize("what,marker,skip,value,message", [
    ("tensor count", b"", 8, 2**40, "header counts 1099511627776 tensors"),
    ("metadata key count", b"", 16, 2**40, "header counts 1099511627776 metadata keys"),
    ("vocabulary length", b"tokenizer.ggml.tokens", 8, 2**60, "array of 1152921504606846976 items runs past"),
    ("a token's length", b"tokenizer.ggml.tokens", 16, 2**62, "runs past the end of the file"),
    ("an embedding dimension", b"token_embd.weight", 12, 2**40, "not a readable GGUF file"),
])
def test_counts_beyond_the_file_are_refused_at_once(tiny_model, tmp_path, what, marker, skip, value,
                                                    message):
    p = patched(tiny_model, tmp_path / "lies.gguf", marker, skip, value)
    assert_model_error(lambda: load_model(p), message)
    assert_refused(run_cli("info", str(p)), "lies.gguf", message, seconds=20, mib=150)


@pytest.fixture(scope="module")
def huge_vocabulary(tiny_model, tmp_path_factory) -> Path:
    """A million tokens (15 MB of the file) over an embedding of 259 rows."""
    return rewrite(tiny_model, tmp_path_factory.mktemp("vocab") / "huge.gguf",
                   {"tokenizer.ggml.tokens": ([f"t{i}" for i in range(10**6)], ARRAY, STR),
                    "llama.vocab_size": None})


@pytest.mark.parametrize("command", [["info"], ["tokenize", "hi", "--model"]])
def test_a_vocabulary_longer_than_the_embedding_is_refused_before_it_is_read(huge_vocabulary, command):
    # Building its million strings (and their types) took over 120 MiB; refused, under 60.
    assert_refused(run_cli(*command, str(huge_vocabulary)),
                   "holds 1000000 tokens, token_embd.weight has 259 rows", mib=90)


# ---- every key the loader reads has one type ----

@pytest.mark.parametrize("key,value,vtype,sub,message", [
    ("tokenizer.ggml.eos_token_id", "2", STR, None, "is text '2', expected an integer"),
    ("tokenizer.chat_template", 7, U32, None, "is an integer 7, expected text"),
    ("tokenizer.ggml.scores", "high", STR, None, "is text 'high', expected an array of numbers"),
    ("tokenizer.ggml.merges", [1, 2, 3], ARRAY, I32,
     "is an array of 3 integers, expected an array of strings"),
    ("llama.vocab_size", "259", STR, None, "is text '259', expected an integer"),
    ("tokenizer.ggml.tokens", 5, U32, None, "is an integer 5, expected an array of strings"),
    ("tokenizer.ggml.token_type", ["1"] * 259, ARRAY, STR,
     "is an array of 259 strings, expected an array of integers"),
    ("tokenizer.ggml.add_bos_token", 1, U8, None, "is an integer 1, expected a boolean"),
    ("tokenizer.ggml.add_space_prefix", "yes", STR, None, "is text 'yes', expected a boolean"),
    ("tokenizer.ggml.model", ["gpt2"], ARRAY, STR, "is an array of 1 strings, expected text"),
    ("tokenizer.ggml.pre", 3, U32, None, "is an integer 3, expected text"),
    ("tokenizer.ggml.bos_token_id", 1.0, F32, None, "is a float 1.0, expected an integer"),
    ("llama.rope.freq_base", "fast", STR, None, "is text 'fast', expected a number"),
    ("llama.rope.scaling.type", 1, U32, None, "is an integer 1, expected text"),
    ("llama.block_count", 2.5, F32, None, "is a float 2.5, expected an integer"),
    ("llama.context_length", [256], ARRAY, U32, "is an array of 1 integers, expected an integer"),
])
def test_metadata_of_the_wrong_type_is_named(tiny_model, tmp_path, key, value, vtype, sub, message):
    p = rewrite(tiny_model, tmp_path / "typed.gguf", {key: (value, vtype, sub)})
    assert_model_error(lambda: load_model(p).tokenizer(), f"typed.gguf: metadata {key} {re.escape(message)}")


@pytest.mark.parametrize("key,value,vtype,sub", [
    ("tokenizer.ggml.eos_token_id", "2", STR, None), ("tokenizer.chat_template", 7, U32, None),
    ("tokenizer.ggml.scores", "high", STR, None), ("tokenizer.ggml.merges", [1, 2], ARRAY, I32),
    ("llama.vocab_size", "259", STR, None),
])
def test_the_cli_names_metadata_of_the_wrong_type_in_one_line(tiny_model, tmp_path, key, value, vtype, sub):
    p = rewrite(tiny_model, tmp_path / "typed.gguf", {key: (value, vtype, sub)})
    assert_refused(run_cli("info", str(p)), "typed.gguf", f"metadata {key} is", "expected")


# ---- sizes that would overflow ----

def test_a_trained_context_beyond_32_bits_is_refused(tiny_model, tmp_path):
    p = rewrite(tiny_model, tmp_path / "ctx.gguf", {"llama.context_length": (2**62, U64)})
    assert_refused(run_cli("info", str(p), "--ctx", "1048576"),
                   "context_length is 4611686018427387904; it must be positive and at most 2147483647")


@pytest.mark.parametrize("budget", [[], ["--memory-budget", "256M"]])
def test_a_context_beyond_the_plan_is_refused(tiny_model, tmp_path, budget):
    p = rewrite(tiny_model, tmp_path / "ctx.gguf", {"llama.context_length": (2**31 - 1, U32)})
    # past --ctx's own range, so asked through the environment
    assert_refused(run_cli("info", str(p), *budget, env={"EDGE_SLM_CTX": "4294967296"}),
                   "a context of 2147483647 tokens is more than 1048576")


def test_planning_a_long_context_for_many_slots_is_quick(tiny_model, tmp_path):
    """The longest context that fits is found by bisection, not by trying
    each of 4096 steps for each of 256 slot counts."""
    p = rewrite(tiny_model, tmp_path / "long.gguf", {"llama.context_length": (2**20, U32)})
    run = run_cli("info", str(p), "--ctx", str(2**20), "--slots", "256", "--memory-budget", "100M")
    assert run.code == 0 and run.seconds < 20, (run.seconds, run.stderr)
    assert "plan          " in run.stdout


# ---- numbers the forward pass would compute nonsense from ----

@pytest.mark.parametrize("key,extra,message", [
    ("llama.rope.freq_base", {}, "freq_base is 1e-300; it must be positive and at most 3.4e+38 (and at least 1.18e-38)"),
    ("llama.attention.layer_norm_rms_epsilon", {}, "epsilon is 1e-300; it must be positive"),
    ("llama.rope.scaling.factor", {"llama.rope.scaling.type": ("linear", STR)},
     "scaling.factor is 1e-300; it must be positive and at most 3.4e+38 (and at least 1.18e-38)"),
])
def test_a_number_that_is_zero_or_infinite_in_float32_is_refused(tiny_model, tmp_path, key, extra, message):
    """1e-300 is positive, but 0 in float32: a RoPE base of 0 (or a scale of
    1e300) makes infinite angles and NaN logits."""
    p = rewrite(tiny_model, tmp_path / "tiny.gguf", {key: (1e-300, V.FLOAT64), **extra})
    assert_model_error(lambda: load_model(p), re.escape(message))


def poisoned(src: Path, dst: Path, tensor: str, value: float) -> Path:
    """A copy of src with every element of an F32 tensor set to value."""
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == tensor)
    data = bytearray(src.read_bytes())
    data[t.data_offset:t.data_offset + t.n_bytes] = np.full(t.n_elements, value, np.float32).tobytes()
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("temperature", ["0", "0.7"])
def test_a_model_that_computes_nan_fails_its_requests_in_one_line(tiny_model, tmp_path, temperature):
    """Greedy took the first NaN for the best token; sampling raised numpy's
    "Probabilities contain NaN" with a traceback."""
    p = poisoned(tiny_model, tmp_path / "nan.gguf", "output_norm.weight", float("nan"))
    assert_refused(run_cli("ask", "hi", "--temperature", temperature, "--model", str(p)),
                   "the model computed logits that are not finite (nan)")


# ---- a vocabulary must have a row of the embedding for each token ----

@pytest.fixture(scope="module")
def short_vocabulary(real_model, tmp_path_factory) -> Path:
    """The reference model with 49,100 of its tokens over its 49,152-row embedding."""
    r = gguf.GGUFReader(real_model)
    keep = {k: (r.fields[k].contents()[:49_100], ARRAY, t)
            for k, t in (("tokenizer.ggml.tokens", STR), ("tokenizer.ggml.token_type", I32))}
    del r
    return rewrite(real_model, tmp_path_factory.mktemp("short") / "short.gguf", keep)


def test_a_vocabulary_shorter_than_the_embedding_is_refused(short_vocabulary):
    assert_refused(run_cli("info", str(short_vocabulary)),
                   "short.gguf: tokenizer.ggml.tokens holds 49100 tokens, token_embd.weight has 49152 rows")


def test_a_vocabulary_must_match_the_embedding_without_a_vocab_size(tiny_model, tmp_path):
    r = gguf.GGUFReader(tiny_model)
    short = {k: (r.fields[k].contents()[:250], ARRAY, t)
             for k, t in (("tokenizer.ggml.tokens", STR), ("tokenizer.ggml.token_type", I32))}
    p = rewrite(tiny_model, tmp_path / "short.gguf", {**short, "llama.vocab_size": None})
    for load in (load_model, lambda p: Tokenizer.from_gguf(GGUFFile(p))):
        assert_model_error(lambda: load(p), "holds 250 tokens, token_embd.weight has 259 rows")


# ---- settings that would plan absurd memory ----

def test_a_queue_beyond_reason_is_refused(tiny_model):
    with pytest.raises(EdgeSlmError, match="setting queue_size: 100000000000 is more than 4096"):
        EngineConfig(queue_size=10**11)
    assert_refused(run_cli("info", str(tiny_model), env={"EDGE_SLM_QUEUE_SIZE": str(10**11)}),
                   "queue_size: 100000000000 is more than 4096")
    cfg = load_model(tiny_model).config
    with pytest.raises(EdgeSlmError, match="a queue of 100000000000 requests is more than 4096"):
        Fixed(cfg, 0, MIB, MIB, MIB, 1, 64, queue_size=10**11).plan(1, 256, "f16")


def test_a_plan_beyond_any_device_is_refused(tiny_model):
    cfg = load_model(tiny_model).config
    with pytest.raises(EdgeSlmError, match=r"1 slot\(s\) x 256 tokens would need \d+ MiB "
                                           r"\(requests and their answers \d+ MiB\), more than any device"):
        Fixed(cfg, 0, MIB, MIB, MIB, 1, 64, max_tokens=10**10).plan(1, 256, "f16")
    assert_refused(run_cli("info", str(tiny_model), env={"EDGE_SLM_MAX_TOKENS": str(10**10)}),
                   "more than any device has")


# ---- fuzz: any value of any type under any key the loader reads ----

LOADER_KEYS = [
    "general.alignment", "llama.block_count", "llama.context_length", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.attention.key_length", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
    "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
]


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    return st.integers(-(1 << bits - 1), (1 << bits - 1) - 1) if signed else st.integers(0, (1 << bits) - 1)


SCALARS: dict[V, st.SearchStrategy] = {
    V.UINT8: _ints(8, False), V.INT8: _ints(8, True), V.UINT16: _ints(16, False), V.INT16: _ints(16, True),
    V.UINT32: _ints(32, False), V.INT32: _ints(32, True),
    V.UINT64: _ints(64, False), V.INT64: _ints(64, True),
    V.FLOAT32: st.floats(width=32), V.FLOAT64: st.floats(), V.BOOL: st.booleans(),
    V.STRING: st.text(max_size=40),
}
TINY_VOCAB = 259  # arrays this long pass the length checks and reach further


def _array(item: V) -> st.SearchStrategy:
    items = SCALARS[item]  # gguf's writer refuses an empty array
    return st.one_of(st.lists(items, min_size=1, max_size=4),
                     st.lists(items, min_size=TINY_VOCAB, max_size=TINY_VOCAB))


VALUES = st.one_of(
    st.none(),  # the key left out
    st.sampled_from(list(SCALARS)).flatmap(lambda t: SCALARS[t].map(lambda v: (v, t, None))),
    st.sampled_from(list(SCALARS)).flatmap(lambda t: _array(t).map(lambda v: (v, ARRAY, t))),
)


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> Path:
    """A one-block model with linear RoPE scaling, so that its factor is read."""
    folder = tmp_path_factory.mktemp("fuzz")
    return rewrite(write_tiny_model(folder / "tiny.gguf", TinySpec(n_layer=1)), folder / "base.gguf",
                   {"llama.rope.scaling.type": ("linear", STR)})


def working_model(path: Path) -> str:
    """Load, tokenize, detokenize and run two tokens through the model."""
    model = load_model(path)
    tok = model.tokenizer()
    ids = tok.encode("Why does a pump lose pressure?", add_bos=False)
    text = tok.decode(ids)
    runtime = model.runtime(RuntimeOptions(n_threads=1, n_ctx=16, max_batch=8))
    logits = runtime.prefill(ids[:2] or [0])
    assert np.isfinite(logits).all(), "logits that are not finite"  # a RoPE base of 1e-300 made NaN
    return f"{len(ids)} ids, {text!r}, logits {logits.shape}"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(LOADER_KEYS), value=VALUES)
def test_any_metadata_value_gives_one_line_or_a_working_model(fuzz_base, key, value):
    with tempfile.TemporaryDirectory() as tmp:
        p = rewrite(fuzz_base, Path(tmp) / "fuzz.gguf", {key: value})
        out = bounded(lambda: working_model(p))
    assert out.kind in ("ok", "refused"), out.text
    assert "\n" not in out.text and out.text
    assert out.seconds < 10 and out.peak_mib < 64, (out.seconds, out.peak_mib)

def test_a_byte_token_must_spell_its_byte(tiny_model, tmp_path):
    types = [6] + [1] * 255 + [3] * 3  # token 0, byte 0's stand-in "Ā", typed as a byte token
    p = rewrite(tiny_model, tmp_path / "bytes.gguf", {"tokenizer.ggml.token_type": (types, ARRAY, I32)})
    assert_model_error(lambda: load_model(p).tokenizer(), "bytes.gguf: byte token 'Ā' is not written <0xXX>")
