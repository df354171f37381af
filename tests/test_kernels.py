"""Every kernel table against numpy, and every SIMD table against the scalar one.

Each test runs once per table usable on this CPU (`_core.backends()`). Shapes
sweep the sizes where SIMD code changes path: one block, a few, odd counts
and the model's widths (576, 1536); weight and activation rows around the
tile sizes; float vectors at 8 and 16 lanes, plus and minus one. The block
types' matmuls run twice: over the file's layout and, repacked, over the
x8 layout the model multiplies by (whole groups of 8 rows, then a tail).

Weights are made by gguf-py's quantizers and read back by its dequantizers,
so the numpy side never shares code with the kernels; gguf-py cannot make
the K-quants or IQ4_NL, whose weights are random blocks. The last
block-format tests hold the kernels to ggml's own quantizers, readers and
dot products, when llama-cpp-python is installed. Tolerances are
normalised mean squared errors, sum((a - b)^2) / sum(b^2), against float64
references. Each bound sits one to three orders of magnitude above what
correct kernels reach (measured values below) and far below what a bug
gives: a wrong lane, block or tail is an O(1) error on the outputs it
touches, an NMSE of 1e-4 or more even when pooled over a whole sweep.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_slm import _core
from edge_slm.formats import BLOCK_SIZES, WEIGHT_TYPES, TensorType

T = TensorType
GGML = {t: gguf.GGMLQuantizationType[t.name] for t in TensorType}
# The activation format each weight type is dotted with, as in the kernel tables.
ACT_TYPE = {T.F32: T.F32, T.F16: T.F32, T.Q4_0: T.Q8_0, T.Q4_1: T.Q8_1, T.Q5_0: T.Q8_0,
            T.Q5_1: T.Q8_1, T.Q8_0: T.Q8_0, T.Q4_K: T.Q8_K, T.Q5_K: T.Q8_K, T.Q6_K: T.Q8_K,
            T.IQ4_NL: T.Q8_0}

FLOAT_TYPES = (T.F32, T.F16)
X8_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0)  # the block types with an x8 layout
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)  # super-blocks of 256
RANDOM_BLOCK_TYPES = K_QUANTS + (T.IQ4_NL,)  # gguf-py reads them but cannot make them
BLOCK_COLS = (32, 64, 96, 160, 576, 1536)
K_COLS = (256, 512, 768, 1536, 2304)
ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 17, 33)
NX = (1, 2, 3, 4, 5, 8, 9)
# The x8 layout packs groups of 8 rows and leaves a tail of 1..7 in the
# file's layout: whole groups alone, a tail alone and both, with every
# activation-row count up to a tile and one past it.
X8_ROWS = (1, 7, 8, 9, 16, 17, 24, 31, 33)
X8_NX = (1, 2, 3, 4, 5, 6, 7, 8, 9)
FLOAT_NS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 100, 257, 576)
# F16 and F32 rows may have any length: these also reach the 8-wide loops' tails.
FLOAT_COLS = (1, 7, 9, 33, 100) + BLOCK_COLS

def block_cols(t: TensorType) -> tuple[int, ...]:
    """Row lengths that are whole blocks of t (any length for the float types: FLOAT_COLS)."""
    return K_COLS if t in K_QUANTS else BLOCK_COLS


MATMUL_CASES = [
    (t, cols, x8)
    for t in WEIGHT_TYPES
    for cols in (FLOAT_COLS if t in FLOAT_TYPES else block_cols(t))
    for x8 in ((False, True) if t in X8_TYPES else (False,))
]
KV_CASES = [(T.F16, d) for d in (8, 32, 40, 64, 100, 128)] + [(T.Q8_0, d) for d in (32, 64, 128)]

# matmul against float64 on exactly what its gemm sees (weights dequantized,
# activations after the 8-bit rounding, emulated here), and every table
# against "ref": only float32 summation order differs. Measured <= 5e-13
# pooled over a sweep (<= 1.2e-11 for one output cancelling to near zero).
NMSE_MATMUL = 1e-10
# Quantized matmul against the exact product of the dequantized weights and
# the unrounded activations: rounding to 8 bits costs d^2 / 12 per element,
# d = max|x| / 127 over a block, about 2.5e-5 for Gaussian data (measured
# 2.2e-5 to 4.4e-5). Dropping one block of 48 costs 2e-2.
NMSE_ACT_ROUNDING = 1e-4
# rmsnorm, rope, silu_mul, softmax against float64: measured <= 6e-13 (the
# float32 sum of 576 exponentials). An exp off by 4e-5 (one Taylor term
# short) fails it.
NMSE_FLOAT = 1e-11
# attention in float32 against float64: measured <= 1.4e-12. A weight lost
# or a scale off by 1% costs 1e-4.
NMSE_ATTENTION = 1e-10

# 31 exact ties (x.5) and 127, which makes the scale exactly 1: roundf sends
# ties away from zero, round-to-even (the SIMD default) would not.
TIE_BLOCK = np.concatenate([[127.0], np.arange(-15, 16) + 0.5])
Q8_1_BLOCK = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])


@pytest.fixture(scope="session", params=_core.backends())
def backend(request) -> str:
    return request.param


def has_kernel(backend: str, t: TensorType) -> bool:
    """Whether backend's table has an entry for weight type t (SIMD tables
    gain the newer types one at a time; the reference has them all)."""
    try:
        elems, nbytes = BLOCK_SIZES[t]
        _core.dequantize(backend, int(t), bytes(nbytes), np.empty(elems, np.float32))
    except ValueError as e:
        if "no kernel" in str(e):
            return False
        raise
    return True


def require_kernel(backend: str, t: TensorType) -> None:
    if not has_kernel(backend, t):
        pytest.skip(f"{backend} has no {t.name} kernel yet")


def case_id(v) -> str:
    return getattr(v, "name", str(v))


# ---- numpy references ----


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(b * b), np.finfo(np.float64).tiny))


def sq_err(a, b) -> float:
    return float(np.sum((np.asarray(a, np.float64) - b) ** 2))


def encode(values: np.ndarray, t: TensorType) -> np.ndarray:
    """Values in GGUF layout, rows kept: bytes for block types, F16/F32 arrays otherwise."""
    return quantize(np.ascontiguousarray(values, np.float32), GGML[t])


def decode(data: np.ndarray, t: TensorType) -> np.ndarray:
    return dequantize(data, GGML[t]).astype(np.float64)


# Typical |sc * q| of a random K-quant element, in units of d (sc the 6-bit
# scale, or Q6_K's signed 8-bit one, times a random quant), and of |mn| in
# units of dmin: d set to a block's RMS over it gives values of that size.
# IQ4_NL's is the RMS of its grid of 16 values.
RANDOM_SPREAD = {T.Q4_K: (32 * 8, 32), T.Q5_K: (32 * 16, 32), T.Q6_K: (64 * 16, None),
                 T.IQ4_NL: (67, None)}
# Where d and dmin are in each block (bytes).
SCALES_AT = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, None), T.IQ4_NL: (0, None)}


def random_blocks(rng: np.random.Generator, values: np.ndarray, t: TensorType) -> np.ndarray:
    """Rows of t blocks shaped like values (a row, or rows): every bit random
    (quants, sub-block scales and mins) but the f16 (super-)block scales, set
    so each block is about as large as values are there (zero where they
    are, f16 subnormal where they are tiny)."""
    values = np.asarray(values, np.float32)
    elems, nbytes = BLOCK_SIZES[t]
    n_blocks = values.size // elems
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    rms = np.sqrt(np.mean(values.reshape(n_blocks, elems).astype(np.float64) ** 2, axis=1))
    (d_spread, dmin_spread), (d_at, dmin_at) = RANDOM_SPREAD[t], SCALES_AT[t]
    for at, spread in ((d_at, d_spread), (dmin_at, dmin_spread)):
        if at is not None:
            blocks[:, at:at + 2] = (rms / spread).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*values.shape[:-1], -1)


def weights(rng: np.random.Generator, values: np.ndarray, t: TensorType) -> np.ndarray:
    """Weights of type t in GGUF layout, from values where gguf-py can quantize t."""
    return random_blocks(rng, values, t) if t in RANDOM_BLOCK_TYPES else encode(values, t)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf, in float64 where x + 0.5 is exact for these magnitudes."""
    v = np.asarray(v, np.float64)
    return np.copysign(np.floor(np.abs(v) + 0.5), v)


def q8_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x as 32-element blocks, each block's f32 scale max|x| / 127 and its
    reciprocal (0 for a zero block), computed as the quantizers do."""
    blocks = np.asarray(x, np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    return blocks, d, inv


def q8_K(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x as Q8_K, computed as ggml's quantize_row_q8_K_ref does (and ours;
    tests/test_kquants.py checks this against ggml's bytes): per 256, the
    element of largest magnitude, sign kept, sets iscale = -127 / max, quants
    round half to even, d = 1 / iscale; an all-zero block has d = 0.
    Returns (d [blocks, 1] float32, quants [blocks, 256] int8)."""
    blocks = np.asarray(x, np.float32).reshape(-1, 256)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
    with np.errstate(divide="ignore"):
        iscale = np.where(peak == 0, np.float32(0), np.float32(-127) / peak)
        d = np.where(peak == 0, np.float32(0), np.float32(1) / iscale)
    return d.astype(np.float32), np.rint(blocks * iscale).astype(np.int8)


def activations_as_seen(x: np.ndarray, wtype: TensorType) -> np.ndarray:
    """x as the gemm of wtype sees it: after its activation quantizer."""
    act = ACT_TYPE[wtype]
    if act == T.F32:
        return x.astype(np.float64)
    if act == T.Q8_0:  # gguf-py's Q8_0 is bit-exact with ggml's, as ours is (tested below)
        return decode(encode(x, T.Q8_0), T.Q8_0)
    if act == T.Q8_K:
        d, q = q8_K(x)
        return (q.astype(np.float64) * d).reshape(x.shape)
    blocks, d, inv = q8_scales(x)  # Q8_1 keeps the f32 scale
    return (round_half_away(blocks * inv) * d).reshape(x.shape)


def mixed_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    """n float32 values in 32-element blocks at scales 1e-4..1e2 (a Q8_0 scale
    from f16-subnormal to large); where n has room, blocks 1-3 are the awkward
    ones: all zero (scale 0), constant (Q4_1 range 0) and TIE_BLOCK."""
    n_blocks = -(-n // 32)
    v = rng.standard_normal((n_blocks, 32)) * 10.0 ** rng.uniform(-4, 2, (n_blocks, 1))
    for i, block in enumerate((np.zeros(32), np.full(32, 0.37), TIE_BLOCK), start=1):
        if i < n_blocks:
            v[i] = block
    return v.ravel()[:n].astype(np.float32)


def random_values(rng, shape, exponent: int, zero_blocks: bool, outliers: bool) -> np.ndarray:
    """Gaussian values times 10**exponent; optionally a quarter of the 32-element
    blocks zeroed and one value in 64 made 30x larger (it sets its block's scale)."""
    v = rng.standard_normal(shape) * 10.0**exponent
    if zero_blocks:
        blocks = v.reshape(-1, 32)
        blocks[rng.random(len(blocks)) < 0.25] = 0
    if outliers:
        v.flat[rng.choice(v.size, size=max(1, v.size // 64), replace=False)] *= 30
    return v.astype(np.float32)


def matmul(backend: str, wtype: TensorType, w: np.ndarray, x: np.ndarray,
           x8: bool = False) -> np.ndarray:
    """x @ w.T by the table's gemm; with x8, w repacked and by its x8 gemm."""
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    _core.matmul(backend, int(wtype), w.shape[0], x.shape[1], w, x, y, x8)
    return y


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def rope_cs(pos: int, head_dim: int, base: float = 10000.0) -> np.ndarray:
    angles = pos * base ** (-np.arange(0, head_dim, 2) / head_dim)
    cs = np.empty(head_dim, np.float32)
    cs[0::2], cs[1::2] = np.cos(angles), np.sin(angles)
    return cs


def attention64(q, k, v, scale) -> np.ndarray:
    """softmax(scale * k @ q) @ v in float64."""
    return softmax64(k @ np.asarray(q, np.float64) * np.float64(np.float32(scale))) @ v


class SweepError:
    """NMSE pooled over a sweep of shapes, remembering the shape that erred most.

    Pooled because one output's NMSE is unbounded: a random dot product lands
    within a tenth of its typical size of zero one time in ten, and the same
    absolute rounding is then a large relative error. A bug on any one shape
    still dominates the pooled sum."""

    def __init__(self) -> None:
        self.got: dict[tuple, np.ndarray] = {}
        self.want: dict[tuple, np.ndarray] = {}

    def add(self, shape: tuple, got: np.ndarray, want: np.ndarray) -> None:
        self.got[shape], self.want[shape] = np.ravel(got), np.ravel(want)

    @property
    def nmse(self) -> float:
        return nmse(np.concatenate([*self.got.values()]), np.concatenate([*self.want.values()]))

    def worst(self) -> tuple:
        return max(self.got, key=lambda shape: sq_err(self.got[shape], self.want[shape]))


# ---- block formats ----


@pytest.mark.parametrize("wtype", WEIGHT_TYPES, ids=case_id)
def test_dequantize_matches_gguf_exactly(backend, wtype):
    require_kernel(backend, wtype)
    rng = np.random.default_rng(int(wtype))
    for n in FLOAT_NS if wtype in FLOAT_TYPES else block_cols(wtype):
        data = weights(rng, mixed_blocks(rng, n), wtype)
        out = np.empty(n, np.float32)
        _core.dequantize(backend, int(wtype), data, out)
        want = dequantize(data, GGML[wtype])
        np.testing.assert_array_equal(out, want, err_msg=f"{backend} n={n}")


def assert_within_half_step(x, decoded, q, d_rounded, d_stored, where: str) -> None:
    """Each decoded value lies within half a step of x. The step is the f32
    scale q was rounded with (x * 1/d in float32 adds < 1e-4 of a step); a
    stored scale rounded to f16 adds its own error times |q|."""
    x = np.asarray(x, np.float64).reshape(-1, 32)
    bound = d_rounded * (0.5 + 1e-4) + np.abs(d_stored - d_rounded) * np.abs(q)
    err = np.abs(np.asarray(decoded, np.float64).reshape(-1, 32) - x)
    assert np.all(err <= bound), f"{where}: off by {np.max(err - bound):.3g} beyond half a step"


def assert_q8_0_within_half_step(x, data, decoded, where: str) -> None:
    """assert_within_half_step for Q8_0 bytes `data` quantized from x, read back as `decoded`."""
    blocks = np.asarray(data, np.uint8).reshape(-1, 34)
    d16 = blocks[:, :2].copy().view(np.float16).astype(np.float64)
    q = blocks[:, 2:].view(np.int8).astype(np.float64)
    assert_within_half_step(x, decoded, q, q8_scales(x)[1].astype(np.float64), d16, where)


@pytest.mark.parametrize("n", BLOCK_COLS)
def test_quantize_q8_0_matches_gguf_and_rounds_to_nearest(backend, n):
    x = mixed_blocks(np.random.default_rng(n), n)
    out = np.empty(n // 32 * 34, np.uint8)
    _core.quantize(backend, int(T.Q8_0), x, out)
    assert out.tobytes() == encode(x, T.Q8_0).tobytes(), f"{backend} n={n}: differs from gguf-py"
    assert_q8_0_within_half_step(x, out, decode(out, T.Q8_0), f"{backend} n={n}")


@pytest.mark.parametrize("n", BLOCK_COLS)
def test_quantize_q8_1_matches_its_definition(backend, n):
    x = mixed_blocks(np.random.default_rng(n), n)
    out = np.empty(n // 32, Q8_1_BLOCK)
    _core.quantize(backend, int(T.Q8_1), x, out)
    blocks, d, inv = q8_scales(x)
    q = out["qs"].astype(np.float64)
    np.testing.assert_array_equal(out["d"], d[:, 0], err_msg=f"{backend} n={n}: scale")
    np.testing.assert_array_equal(
        q, round_half_away(blocks * inv), err_msg=f"{backend} n={n}: quants"
    )
    # s = d * sum(q), one float32 product, so the Q4_1 offset costs m * s
    np.testing.assert_array_equal(out["s"], d[:, 0] * q.sum(axis=1).astype(np.float32))
    d64 = d.astype(np.float64)
    assert_within_half_step(x, d64 * q, q, d64, d64, f"{backend} n={n}")


# ---- matmul ----


def matmul_case_id(v) -> str:
    return ("x8" if v else "file") if isinstance(v, bool) else case_id(v)


@pytest.mark.parametrize("wtype, cols, x8", MATMUL_CASES, ids=matmul_case_id)
def test_matmul_sweep(backend, wtype, cols, x8):
    require_kernel(backend, wtype)
    all_rows, all_nx = (X8_ROWS, X8_NX) if x8 else (ROWS, NX)
    rng = np.random.default_rng([int(wtype), cols])
    w = weights(rng, rng.standard_normal((max(all_rows), cols), dtype=np.float32), wtype)
    x = rng.standard_normal((max(all_nx), cols), dtype=np.float32)
    w_seen, x_seen = decode(w, wtype), activations_as_seen(x, wtype)
    vs_seen, vs_exact, vs_ref = SweepError(), SweepError(), SweepError()
    for rows in all_rows:  # prefixes of one matrix: a tile mixing up rows shows
        for nx in all_nx:
            y = matmul(backend, wtype, w[:rows], x[:nx], x8)
            vs_seen.add((rows, nx), y, x_seen[:nx] @ w_seen[:rows].T)
            vs_exact.add((rows, nx), y, x[:nx].astype(np.float64) @ w_seen[:rows].T)
            # the x8 path against ref's gemm over the file's layout: the packing too is checked
            vs_ref.add((rows, nx), y, matmul("ref", wtype, w[:rows], x[:nx]))
    where = f"{backend} {wtype.name} cols={cols}{' x8' if x8 else ''}"
    assert vs_seen.nmse < NMSE_MATMUL, (
        f"{where}: NMSE {vs_seen.nmse:.3g} vs float64, worst at (rows, nx) = {vs_seen.worst()}"
    )
    assert vs_ref.nmse < NMSE_MATMUL, (
        f"{where}: NMSE {vs_ref.nmse:.3g} vs ref, worst at (rows, nx) = {vs_ref.worst()}"
    )
    if ACT_TYPE[wtype] != T.F32:
        assert vs_exact.nmse < NMSE_ACT_ROUNDING, (
            f"{where}: NMSE {vs_exact.nmse:.3g} vs unrounded activations, "
            f"worst at (rows, nx) = {vs_exact.worst()}"
        )


@settings(deadline=None, max_examples=100)
@given(
    wtype=st.sampled_from(WEIGHT_TYPES),
    rows=st.integers(1, 40),
    n_blocks=st.integers(1, 24),  # of 32 (the K-quants: rounded up to whole super-blocks)
    short_by=st.integers(0, 31),  # F16/F32 only: rows of any length
    nx=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    w_exponent=st.integers(-3, 2),  # 1e2 * 4 sigma * 30 stays inside f16
    x_exponent=st.integers(-3, 3),
    zero_blocks=st.booleans(),
    outliers=st.booleans(),
)
def test_matmul_random(
    backend, wtype, rows, n_blocks, short_by, nx, seed, w_exponent, x_exponent, zero_blocks,
    outliers,
):
    # at least 16 outputs, so their NMSE is not one output near zero (see SweepError)
    assume(rows * nx >= 16)
    assume(has_kernel(backend, wtype))
    rng = np.random.default_rng(seed)
    if wtype in K_QUANTS:
        n_blocks = -(-n_blocks // 8) * 8
    cols = 32 * n_blocks - (short_by if wtype in FLOAT_TYPES else 0)
    w = random_values(rng, (rows, 32 * n_blocks), w_exponent, zero_blocks, outliers)
    w = weights(rng, w[:, :cols], wtype)
    x = random_values(rng, (nx, 32 * n_blocks), x_exponent, zero_blocks, outliers)
    x = np.ascontiguousarray(x[:, :cols])
    want = activations_as_seen(x, wtype) @ decode(w, wtype).T
    ref = matmul("ref", wtype, w, x)
    for x8 in (False, True) if wtype in X8_TYPES else (False,):
        y = matmul(backend, wtype, w, x, x8)
        assert nmse(y, want) < NMSE_MATMUL, f"x8={x8}"
        assert nmse(y, ref) < NMSE_MATMUL, f"x8={x8}"


def test_default_backend_is_the_best():
    w = encode(np.random.default_rng(0).standard_normal((5, 64)), T.Q4_1)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    assert _core.best_backend() in _core.backends()
    best = matmul(_core.best_backend(), T.Q4_1, w, x)
    np.testing.assert_array_equal(matmul(None, T.Q4_1, w, x), best)


# ---- against ggml's own C code ----
# The blocks ggml's quantizers really make, read by its own readers, the
# Q8_K activations llama.cpp's K-quant dot products see, and those dot
# products: from the peer's libggml-base and libggml-cpu (llama-cpp-python,
# installed by `make bench`); skipped without it.

NEW_TYPES = (T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL)
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
# ggml's Q8_1 keeps d and s in f16 (ours in f32): its Q5_1 dots differ from
# ours by those roundings, up to 2^-11 of each term (measured 3.6e-7; the
# other types agree to float summation order, measured <= 7e-14).
NMSE_GGML_Q8_1 = 1e-5


def ggml_library(name: str) -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = Path(llama_cpp.__file__).parent / "lib" / name
    if not path.exists():
        pytest.skip(f"no {path}")
    return ctypes.CDLL(str(path))


@pytest.fixture(scope="module")
def ggml() -> ctypes.CDLL:
    return ggml_library("libggml-base.so")


@pytest.fixture(scope="module")
def ggml_cpu() -> ctypes.CDLL:
    lib = ggml_library("libggml-cpu.so")
    lib.ggml_cpu_init()  # its f16 tables, before any dot product
    return lib


def ggml_call(ggml: ctypes.CDLL, name: str, src: np.ndarray, out: np.ndarray, n: int) -> None:
    """ggml's row functions all take (source, destination, elements)."""
    fn = getattr(ggml, name)
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    fn(src.ctypes.data, out.ctypes.data, n)


def ggml_name(t: TensorType) -> str:
    return t.name.lower().replace("_k", "_K")  # q5_0, q4_K, iq4_nl


def ggml_quantize(ggml: ctypes.CDLL, values: np.ndarray, t: TensorType) -> np.ndarray:
    """values quantized to t by ggml's reference quantizer, rows kept. The
    output starts zeroed: for an all-zero block ggml leaves Q8_K's sums unset."""
    x = np.ascontiguousarray(values, np.float32)
    elems, nbytes = BLOCK_SIZES[t]
    out = np.zeros(x.size // elems * nbytes, np.uint8)
    ggml_call(ggml, f"quantize_row_{ggml_name(t)}_ref", x, out, x.size)
    return out.reshape(*x.shape[:-1], -1)


def ggml_dequantize(ggml: ctypes.CDLL, data: np.ndarray, t: TensorType) -> np.ndarray:
    elems, nbytes = BLOCK_SIZES[t]
    out = np.empty(data.size // nbytes * elems, np.float32)
    ggml_call(ggml, f"dequantize_row_{ggml_name(t)}", np.ascontiguousarray(data), out, out.size)
    return out


def q8_K_cases(rng: np.random.Generator, n: int) -> np.ndarray:
    """n values in super-blocks at scales 1e-4..1e2; where n has room,
    super-blocks 1-4 are the awkward ones: all zero, a negative peak, a
    peak of 127 with every other element a tie (x.5), and two peaks of
    equal magnitude and opposite sign (the first sets the sign)."""
    v = rng.standard_normal((n // 256, 256)) * 10.0 ** rng.uniform(-4, 2, (n // 256, 1))
    negative_peak, opposite_peaks = rng.standard_normal((2, 256))  # |x| < 5 or so
    negative_peak[17] = -10.0
    opposite_peaks[3], opposite_peaks[200] = 10.0, -10.0
    ties = np.concatenate([[127.0], np.arange(255) % 64 - 31.5])
    for i, block in enumerate((np.zeros(256), negative_peak, ties, opposite_peaks), start=1):
        if i < len(v):
            v[i] = block
    return v.ravel().astype(np.float32)


@pytest.mark.parametrize("wtype", NEW_TYPES, ids=case_id)
def test_dequantize_matches_ggml_on_its_own_blocks(ggml, backend, wtype):
    """Our reader, ggml's and gguf-py's agree exactly on blocks ggml made."""
    require_kernel(backend, wtype)
    rng = np.random.default_rng(int(wtype) + 100)
    for n in block_cols(wtype):
        data = ggml_quantize(ggml, mixed_blocks(rng, n), wtype)
        out = np.empty(n, np.float32)
        _core.dequantize(backend, int(wtype), data, out)
        np.testing.assert_array_equal(out, ggml_dequantize(ggml, data, wtype), err_msg=f"n={n}")
        np.testing.assert_array_equal(out, dequantize(data, GGML[wtype]), err_msg=f"n={n}")


@pytest.mark.parametrize("n", K_COLS)
def test_q8_K_as_ggml_makes_it(ggml, n):
    """q8_K, the Q8_K the sweeps above hold our K-quant gemms to, is ggml's
    to the bit: scale, quants and the sums of each 16."""
    x = q8_K_cases(np.random.default_rng(n), n)
    blocks = ggml_quantize(ggml, x, T.Q8_K).view(Q8_K_BLOCK)
    d, q = q8_K(x)
    np.testing.assert_array_equal(d[:, 0], blocks["d"])
    np.testing.assert_array_equal(q, blocks["qs"])
    sums = q.reshape(-1, 16, 16).sum(axis=2, dtype=np.int16)
    np.testing.assert_array_equal(sums, blocks["bsums"])


@pytest.mark.parametrize("n", K_COLS)
def test_quantize_q8_K_matches_ggml(ggml, backend, n):
    x = q8_K_cases(np.random.default_rng(n), n)
    out = np.empty(n // 256 * 292, np.uint8)
    try:
        _core.quantize(backend, int(T.Q8_K), x, out)
    except ValueError as e:
        if "no activation quantizer" in str(e):
            pytest.skip("the binding has no Q8_K quantizer (kernels/python/module.c)")
        raise
    assert out.tobytes() == ggml_quantize(ggml, x, T.Q8_K).tobytes(), f"{backend} n={n}"


@pytest.mark.parametrize("wtype", NEW_TYPES, ids=case_id)
def test_matmul_on_ggml_blocks(ggml, backend, wtype):
    """The sweeps' random blocks, again with the blocks ggml's quantizers make
    of Gaussian rows (scales fitted, quants clustered as in real files)."""
    require_kernel(backend, wtype)
    rng = np.random.default_rng(int(wtype) + 200)
    err = SweepError()
    for cols in block_cols(wtype):
        w = ggml_quantize(ggml, rng.standard_normal((9, cols)), wtype)
        x = rng.standard_normal((5, cols)).astype(np.float32)
        want = activations_as_seen(x, wtype) @ decode(w, wtype).T
        err.add((cols,), matmul(backend, wtype, w, x), want)
    where = f"{backend} {wtype.name}"
    assert err.nmse < NMSE_MATMUL, f"{where}: NMSE {err.nmse:.3g}, worst at {err.worst()}"


@pytest.mark.parametrize("wtype", NEW_TYPES, ids=case_id)
def test_matmul_matches_llama_cpp_dot_products(ggml, ggml_cpu, backend, wtype):
    """Each output against llama.cpp's own dot product of the same weight
    row with its own quantization of the activations (ggml_vec_dot_*, as
    built for this machine): what "runs like llama.cpp" means per matmul."""
    require_kernel(backend, wtype)
    act = ACT_TYPE[wtype]
    ggml_act_bytes = 36 if act == T.Q8_1 else BLOCK_SIZES[act][1]  # ggml's Q8_1: f16 d and s
    dot = getattr(ggml_cpu, f"ggml_vec_dot_{ggml_name(wtype)}_{ggml_name(act)}")
    # (n, &out, stride, weight row, stride, activations, stride, rows: 1)
    size, ptr = ctypes.c_size_t, ctypes.c_void_p
    dot.argtypes = [ctypes.c_int, ptr, size, ptr, size, ptr, size, ctypes.c_int]
    rng = np.random.default_rng(int(wtype) + 300)
    err = SweepError()
    for cols in block_cols(wtype):
        w = ggml_quantize(ggml, rng.standard_normal((9, cols)), wtype)
        x = rng.standard_normal((3, cols)).astype(np.float32)
        want = np.empty((3, 9), np.float32)
        for j in range(3):
            xq = np.zeros(cols // BLOCK_SIZES[act][0] * ggml_act_bytes, np.uint8)
            ggml_call(ggml_cpu, f"quantize_row_{ggml_name(act)}", x[j], xq, cols)
            for i in range(9):
                out = np.empty(1, np.float32)
                dot(cols, out.ctypes.data, 0, w[i].ctypes.data, 0, xq.ctypes.data, 0, 1)
                want[j, i] = out[0]
        err.add((cols,), matmul(backend, wtype, w, x), want)
    bound = NMSE_GGML_Q8_1 if act == T.Q8_1 else NMSE_MATMUL
    where = f"{backend} {wtype.name}"
    assert err.nmse < bound, f"{where}: NMSE {err.nmse:.3g}, worst at {err.worst()}"


# ---- float kernels ----


@pytest.mark.parametrize("n", FLOAT_NS)
def test_rmsnorm(backend, n):
    rng = np.random.default_rng(n)
    w = rng.standard_normal(n).astype(np.float32)
    for scale in (1e-3, 1.0, 1e3):  # at 1e-3, mean(x^2) is near eps: eps goes inside the root
        for eps in (1e-5, 1e-6):
            x = (rng.standard_normal(n) * scale).astype(np.float32)
            out = np.empty(n, np.float32)
            _core.rmsnorm(backend, x, w, eps, out)
            x64 = x.astype(np.float64)
            want = x64 / np.sqrt(np.mean(x64 * x64) + np.float32(eps)) * w
            assert nmse(out, want) < NMSE_FLOAT, f"{backend} n={n} scale={scale} eps={eps}"
            _core.rmsnorm(backend, x, w, eps, x)  # out may alias x
            np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("head_dim", (2, 4, 6, 8, 10, 16, 18, 32, 64, 128))
def test_rope(backend, head_dim):
    rng = np.random.default_rng(head_dim)
    for n_heads in (1, 2, 3, 8):
        for pos in (0, 1, 7, 100, 4095):
            cs = rope_cs(pos, head_dim)
            x = rng.standard_normal(n_heads * head_dim).astype(np.float32)
            pairs = x.astype(np.float64).reshape(n_heads, -1)
            a, b = pairs[:, 0::2], pairs[:, 1::2]
            c, s = cs[0::2].astype(np.float64), cs[1::2].astype(np.float64)
            want = np.empty((n_heads, head_dim))
            want[:, 0::2], want[:, 1::2] = a * c - b * s, a * s + b * c
            _core.rope(backend, x, n_heads, head_dim, cs)
            assert nmse(x, want.ravel()) < NMSE_FLOAT, f"{backend} heads={n_heads} pos={pos}"


@pytest.mark.parametrize("n", FLOAT_NS)
def test_silu_mul(backend, n):
    rng = np.random.default_rng(n)
    up = rng.standard_normal(n).astype(np.float32)
    # gates up to about +-60: exp(-gate) spans 1e-26..1e26, still inside float32
    for scale in (1.0, 4.0, 16.0):
        gate = (rng.standard_normal(n) * scale).astype(np.float32)
        out = np.empty(n, np.float32)
        _core.silu_mul(backend, gate, up, out)
        g = gate.astype(np.float64)
        want = g / (1 + np.exp(-g)) * up
        assert nmse(out, want) < NMSE_FLOAT, f"{backend} n={n} scale={scale}"
        _core.silu_mul(backend, gate, up, gate)  # out may alias gate
        np.testing.assert_array_equal(gate, out)


@pytest.mark.parametrize("n", FLOAT_NS)
def test_softmax(backend, n):
    rng = np.random.default_rng(n)
    for scale in (1.0, 30.0):
        for offset in (0.0, 1e4, -1e4):  # exp(1e4) overflows unless the max is subtracted
            x = (rng.standard_normal(n) * scale + offset).astype(np.float32)
            want = softmax64(x)
            _core.softmax(backend, x)
            assert nmse(x, want) < NMSE_FLOAT, f"{backend} n={n} scale={scale} offset={offset}"


@settings(deadline=None, max_examples=100)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 300),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_softmax_extreme_values(backend, x):
    """Any finite float32: differences overflow to -inf, exponentials underflow.
    Hypothesis also finds many equal values, whose float32 running sum rounds
    the same way at every step: off by up to n * 2^-24 rather than the
    sqrt(n) * 2^-24 of random values, and every output shares that error."""
    want = softmax64(x)
    _core.softmax(backend, x)
    assert nmse(x, want) < NMSE_FLOAT + (x.size * 2.0**-24) ** 2


# ---- KV cache and attention ----


def kv_store(backend: str, kv_type: TensorType, src: np.ndarray) -> np.ndarray:
    dst = np.empty(src.size // 32 * 34 if kv_type == T.Q8_0 else src.size * 2, np.uint8)
    _core.kv_store(backend, int(kv_type), src, dst)
    return dst


@pytest.mark.parametrize("kv_type", (T.F16, T.Q8_0), ids=case_id)
def test_kv_store_matches_gguf_and_round_trips(backend, kv_type):
    rng = np.random.default_rng(int(kv_type))
    for n in BLOCK_COLS if kv_type == T.Q8_0 else FLOAT_NS:
        src = mixed_blocks(rng, n)
        stored = kv_store(backend, kv_type, src)
        assert stored.tobytes() == encode(src, kv_type).tobytes(), f"{backend} n={n}"
        back = np.empty(n, np.float32)
        _core.dequantize(backend, int(kv_type), stored, back)
        if kv_type == T.F16:
            np.testing.assert_array_equal(back, src.astype(np.float16).astype(np.float32))
        else:
            assert_q8_0_within_half_step(src, stored, back, f"{backend} n={n}")


@pytest.mark.parametrize("kv_type, head_dim", KV_CASES, ids=case_id)
def test_attention(backend, kv_type, head_dim):
    rng = np.random.default_rng([int(kv_type), head_dim])
    for n_pos in (1, 2, 3, 17, 100):
        for sharpness in (1.0, 8.0):  # near-uniform weights, then a few positions dominating
            scale = sharpness / np.sqrt(head_dim)
            q = rng.standard_normal(head_dim).astype(np.float32)
            k = encode(rng.standard_normal((n_pos, head_dim)), kv_type)
            v = encode(rng.standard_normal((n_pos, head_dim)), kv_type)
            out = np.empty(head_dim, np.float32)
            _core.attention(backend, q, k, v, int(kv_type), n_pos, head_dim, scale, out)
            want = attention64(q, decode(k, kv_type), decode(v, kv_type), scale)
            where = f"{backend} n_pos={n_pos} sharpness={sharpness}"
            assert nmse(out, want) < NMSE_ATTENTION, where


@pytest.mark.parametrize("kv_type, head_dim", KV_CASES, ids=case_id)
def test_attention_reads_back_what_kv_store_wrote(backend, kv_type, head_dim):
    """Keys of equal length, a query equal to one of them and a scale that
    puts every other score over 1000 lower: softmax weights are exactly 1 and
    0, so the output is that position's value as stored, bit for bit."""
    rng = np.random.default_rng([int(kv_type), head_dim, 1])
    n_pos = 17
    keys = rng.standard_normal((n_pos, head_dim))
    keys *= np.sqrt(head_dim) / np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.standard_normal((n_pos, head_dim)).astype(np.float32)
    k = np.stack([kv_store(backend, kv_type, row) for row in keys.astype(np.float32)])
    v = np.stack([kv_store(backend, kv_type, row) for row in values])
    k_stored, v_stored = decode(k, kv_type), decode(v, kv_type)
    for t in (0, 5, n_pos - 1):
        q = k_stored[t]
        gaps = q @ q - np.delete(k_stored, t, axis=0) @ q
        assert gaps.min() > 0, "test keys: another key outscores the query's own"
        scale = 1000.0 / gaps.min()
        for seen in (1, n_pos):  # the first position alone, then the whole cache
            if t >= seen:
                continue
            out = np.empty(head_dim, np.float32)
            q32, kv = q.astype(np.float32), int(kv_type)
            _core.attention(backend, q32, k[:seen], v[:seen], kv, seen, head_dim, scale, out)
            np.testing.assert_array_equal(out, v_stored[t], err_msg=f"{backend} t={t} of {seen}")


# ---- argument checking at the binding ----

_F = np.ones(64, np.float32)  # one row of 64
_W = encode(np.ones((2, 64)), T.Q4_0)  # two Q4_0 rows of 64
_KV = encode(np.ones((2, 64)), T.Q8_0)  # two cached Q8_0 positions of 64
_W_F16 = encode(np.ones((2, 64)), T.F16)  # two F16 rows of 64
_W_F32 = np.ones((2, 64), np.float32)


def _out(n: int) -> np.ndarray:
    return np.empty(n, np.float32)


# name: (what the message must name, the call with the backend under test)
BAD_CALLS = {
    "matmul weights one byte short": (
        "weights has",
        lambda b: _core.matmul(b, 2, 2, 64, _W.tobytes()[:-1], _F, _out(2)),
    ),
    "matmul y too small": (
        "y has",
        lambda b: _core.matmul(b, 2, 2, 64, _W, _F, _out(1)),
    ),
    "matmul x not whole rows": (
        "x has",
        lambda b: _core.matmul(b, 2, 2, 64, _W, _out(65), _out(2)),
    ),
    "matmul cols not a multiple of 32": (
        "multiple of 32",
        lambda b: _core.matmul(b, 2, 2, 48, _W, _out(48), _out(2)),
    ),
    "matmul Q8_1 weights": (
        "tensor type 9",
        lambda b: _core.matmul(b, 9, 2, 64, _W, _F, _out(2)),
    ),
    "matmul unknown type": (
        "tensor type 5",
        lambda b: _core.matmul(b, 5, 2, 64, _W, _F, _out(2)),
    ),
    "matmul x8 F16 weights": (
        "no x8 layout",
        lambda b: _core.matmul(b, 1, 2, 64, _W_F16, _F, _out(2), True),
    ),
    "matmul x8 F32 weights": (
        "no x8 layout",
        lambda b: _core.matmul(b, 0, 2, 64, _W_F32, _F, _out(2), True),
    ),
    "quantize to a weight format": (
        "no activation quantizer",
        lambda b: _core.quantize(b, 2, _F, bytearray(36)),
    ),
    "quantize 48 elements": (
        "multiple of 32",
        lambda b: _core.quantize(b, 8, _out(48), bytearray(51)),
    ),
    "quantize output too small": (
        "output has",
        lambda b: _core.quantize(b, 8, _F, bytearray(67)),
    ),
    "dequantize input too small": (
        "input has",
        lambda b: _core.dequantize(b, 2, _W.tobytes()[:-1], _out(128)),
    ),
    "rmsnorm w too short": (
        "w has",
        lambda b: _core.rmsnorm(b, _F, _out(63), 1e-5, _out(64)),
    ),
    "rope odd head size": (
        "even head size",
        lambda b: _core.rope(b, _out(63), 1, 63, _out(63)),
    ),
    "rope cs too short": (
        "cs has",
        lambda b: _core.rope(b, _out(64), 2, 32, _out(30)),
    ),
    "silu_mul up too short": (
        "up has",
        lambda b: _core.silu_mul(b, _F, _out(63), _out(64)),
    ),
    "softmax of nothing": (
        "empty",
        lambda b: _core.softmax(b, _out(0)),
    ),
    "attention k one position short": (
        "k has",
        lambda b: _core.attention(b, _F, _KV[:1], _KV, 8, 2, 64, 0.1, _out(64)),
    ),
    "attention F32 cache": (
        "F16 or Q8_0",
        lambda b: _core.attention(b, _F, _F, _F, 0, 1, 64, 0.1, _out(64)),
    ),
    "attention Q8_0 head of 48": (
        "multiple of 32",
        lambda b: _core.attention(b, _out(48), _KV, _KV, 8, 1, 48, 0.1, _out(48)),
    ),
    "kv_store Q4_0 cache": (
        "F16 or Q8_0",
        lambda b: _core.kv_store(b, 2, _F, bytearray(36)),
    ),
    "kv_store dst too small": (
        "dst has",
        lambda b: _core.kv_store(b, 8, _F, bytearray(67)),
    ),
}

# Every kernel entry, valid but for its backend name.
BACKEND_CALLS = {
    "quantize": lambda b: _core.quantize(b, 8, _F, bytearray(68)),
    "dequantize": lambda b: _core.dequantize(b, 2, _W, _out(128)),
    "matmul": lambda b: _core.matmul(b, 2, 2, 64, _W, _F, _out(2)),
    "rmsnorm": lambda b: _core.rmsnorm(b, _F, _F, 1e-5, _out(64)),
    "rope": lambda b: _core.rope(b, _out(64), 2, 32, _out(32)),
    "silu_mul": lambda b: _core.silu_mul(b, _F, _F, _out(64)),
    "softmax": lambda b: _core.softmax(b, _out(64)),
    "attention": lambda b: _core.attention(b, _F, _KV, _KV, 8, 2, 64, 0.1, _out(64)),
    "kv_store": lambda b: _core.kv_store(b, 8, _F, bytearray(68)),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_arguments_raise_value_error(backend, name):
    message, call = BAD_CALLS[name]
    with pytest.raises(ValueError, match=message):
        call(backend)


# Typed arguments must have the element type the kernel reads.
WRONG_TYPES = {
    "matmul float64 x": lambda b: _core.matmul(b, 2, 2, 64, _W, _F.astype(np.float64), _out(2)),
    "rmsnorm int32 weights": lambda b: _core.rmsnorm(b, _F, _F.astype(np.int32), 1e-5, _out(64)),
    "rope float16 cs": lambda b: _core.rope(b, _out(64), 2, 32, np.zeros(32, np.float16)),
    "softmax bytes": lambda b: _core.softmax(b, bytearray(256)),
    "silu_mul strided": lambda b: _core.silu_mul(b, _out(128)[::2], _F, _out(64)),
}


@pytest.mark.parametrize("name", WRONG_TYPES)
def test_wrong_element_type_raises(backend, name):
    with pytest.raises((TypeError, BufferError, ValueError), match="float32|contiguous"):
        WRONG_TYPES[name](backend)


@pytest.mark.parametrize("name", BACKEND_CALLS)
def test_unknown_backend_raises_value_error(backend, name):
    BACKEND_CALLS[name](backend)  # the call is otherwise valid
    with pytest.raises(ValueError, match="'no-such-backend' is unknown"):
        BACKEND_CALLS[name]("no-such-backend")
