"""Tensor formats, declared once. Ids are GGUF's; kernels/include/edge_kernels.h
mirrors them and tests/test_formats.py checks the two (and gguf-py) agree."""

from __future__ import annotations

from enum import IntEnum


class TensorType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q8_1 = 9  # activations only; our block keeps d and s in f32 (40 bytes)


# (elements per block, bytes per block)
BLOCK_SIZES: dict[TensorType, tuple[int, int]] = {
    TensorType.F32: (1, 4),
    TensorType.F16: (1, 2),
    TensorType.Q4_0: (32, 18),
    TensorType.Q4_1: (32, 20),
    TensorType.Q8_0: (32, 34),
    TensorType.Q8_1: (32, 40),
}

# Types a weight matrix may have in a file we load.
WEIGHT_TYPES = (TensorType.F32, TensorType.F16, TensorType.Q4_0, TensorType.Q4_1, TensorType.Q8_0)

# KV cache element types, by the name users give them.
KV_TYPES: dict[str, TensorType] = {"f16": TensorType.F16, "q8_0": TensorType.Q8_0}


def row_bytes(t: TensorType, n: int) -> int:
    elems, nbytes = BLOCK_SIZES[t]
    if n % elems:
        raise ValueError(f"{n} elements is not a whole number of {t.name} blocks")
    return n // elems * nbytes
