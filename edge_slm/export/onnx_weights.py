"""GGUF weight blocks as ONNX Runtime's `MatMulNBits` takes them.

MatMulNBits (com.microsoft) holds a matrix W [N, K] as uint8 codes in blocks
of `block_size` along K, one float scale per block, and optional zero points:
w = (code - zero_point) * scale, the zero point defaulting to 2^(bits - 1).
A 4-bit block is 16 bytes, element 2i in the low nibble of byte i and 2i + 1
in the high one. ggml's 32-element blocks map onto block_size 32:

  Q4_0  w = d * (q - 8)   the codes as they are, d as the scale, the default
                          zero point 8: exact.
  Q8_0  w = d * q         q (int8) + 128 as the code, the default zero point
                          128 (bits = 8): exact.
  Q4_1  w = d * q + m     no zero point MatMulNBits takes is exact: uint8 zero
                          points are whole codes (0..15), and a float one would
                          be -m / d, rounded (59 % of weights then differ in the
                          last bit, and ONNX Runtime 1.31's CPU kernel leaves its
                          int8 path for a dequantize-and-multiply one, ~100x
                          slower). So the codes go in as Q4_0's do, with the
                          default zero point 8 (d * (q - 8), exact), and the
                          rest, m + 8d per block, is added as its own product:
                          that offset times the sum of the block's inputs.
                          m + 8d is exact in float32 unless d and m lie more
                          than 2^13 apart, which the export checks and counts
                          (`inexact`). (Zero point 0 with m alone would be
                          exact always, but ONNX Runtime's int8 path with
                          explicit zero points was 8x less accurate here.)

Every repacking here is bitwise: no code passes through a float. d and m are
float16 in the file and float32 in the graph, which holds them exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import BLOCK_SIZES, TensorType
from ..model import TensorView

BLOCK = 32  # ggml's block, and the block_size given to MatMulNBits


@dataclass
class NBitsWeight:
    """One matrix [rows (N), cols (K)] in MatMulNBits' layout."""

    bits: int
    codes: np.ndarray                  # uint8 [N, K / 32, 32 * bits / 8], MatMulNBits' B
    scales: np.ndarray                 # float32 [N, K / 32]
    offsets: np.ndarray | None = None  # float32 [N, K / 32]: Q4_1's m + 8d
    inexact: int = 0                   # blocks whose offset is rounded

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1] * BLOCK


def _blocks(t: TensorView) -> np.ndarray:
    """The tensor's bytes as uint8 [rows, blocks, bytes per block]."""
    elems, nbytes = BLOCK_SIZES[t.type]
    return np.asarray(t.data).reshape(-1).view(np.uint8).reshape(t.rows, t.cols // elems, nbytes)


def _half(raw: np.ndarray) -> np.ndarray:
    """Two bytes per entry (little-endian float16, as GGUF stores it) -> float16."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0]


def pack_ggml_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit order -> MatMulNBits': uint8 [..., 16] -> uint8 [..., 16].

    In ggml, byte j of a block holds element j (low nibble) and element
    j + 16 (high nibble); MatMulNBits wants elements 2i and 2i + 1 in byte i."""
    lo, hi = qs & 0x0F, qs >> 4  # elements 0..15, 16..31
    return np.concatenate([lo[..., 0::2] | (lo[..., 1::2] << 4),
                           hi[..., 0::2] | (hi[..., 1::2] << 4)], axis=-1)


def nbits_weight_type(t: TensorType) -> int | None:
    """The bits of MatMulNBits' form of this type, or None if it has none."""
    return {TensorType.Q4_0: 4, TensorType.Q4_1: 4, TensorType.Q8_0: 8}.get(t)


def nbits_weight(t: TensorView) -> NBitsWeight | None:
    """The matrix in MatMulNBits' layout, or None if its type has none."""
    if t.type == TensorType.Q4_0:
        b = _blocks(t)
        return NBitsWeight(4, pack_ggml_nibbles(b[..., 2:]), _half(b[..., 0:2]).astype(np.float32))
    if t.type == TensorType.Q4_1:
        b = _blocks(t)
        d, m = _half(b[..., 0:2]).astype(np.float32), _half(b[..., 2:4]).astype(np.float32)
        offsets = m + np.float32(8) * d
        inexact = int(np.count_nonzero(offsets.astype(np.float64) != m.astype(np.float64) + 8.0 * d))
        return NBitsWeight(4, pack_ggml_nibbles(b[..., 4:]), d, offsets, inexact)
    if t.type == TensorType.Q8_0:
        b = _blocks(t)
        return NBitsWeight(8, b[..., 2:] ^ np.uint8(0x80), _half(b[..., 0:2]).astype(np.float32))
    return None


def float_weight(t: TensorView) -> np.ndarray:
    """The matrix [rows, cols] as floats: F32 and F16 as stored, any other
    type dequantized to float32 by gguf-py (the values ggml's dequantization
    gives)."""
    if t.type in (TensorType.F32, TensorType.F16):
        return np.asarray(t.data).reshape(t.rows, t.cols)
    from gguf.quants import dequantize

    return np.asarray(dequantize(np.asarray(t.data), int(t.type)), np.float32).reshape(t.rows, t.cols)


def float_vector(t: TensorView) -> np.ndarray:
    """A norm's or bias's values as float32 [cols]."""
    return np.asarray(float_weight(t), np.float32).reshape(-1)
