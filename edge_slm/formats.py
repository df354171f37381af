"""GGUF formats, declared once: tensor types and the kinds of metadata
values the loader reads. Tensor type ids are GGUF's;
kernels/include/edge_kernels.h mirrors them and tests/test_formats.py checks
the two (and gguf-py) agree."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, IntEnum
from numbers import Integral, Real
from typing import Any

from .errors import ModelError


class TensorType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9  # activations only; our block keeps d and s in f32 (40 bytes)
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15  # activations only, paired with the K-quants
    IQ4_NL = 20  # 4-bit indices into ggml's fixed non-linear grid of 16 values


# (elements per block, bytes per block); the K-quants' blocks are super-blocks of 256
BLOCK_SIZES: dict[TensorType, tuple[int, int]] = {
    TensorType.F32: (1, 4),
    TensorType.F16: (1, 2),
    TensorType.Q4_0: (32, 18),
    TensorType.Q4_1: (32, 20),
    TensorType.Q5_0: (32, 22),
    TensorType.Q5_1: (32, 24),
    TensorType.Q8_0: (32, 34),
    TensorType.Q8_1: (32, 40),
    TensorType.Q4_K: (256, 144),
    TensorType.Q5_K: (256, 176),
    TensorType.Q6_K: (256, 210),
    TensorType.Q8_K: (256, 292),
    TensorType.IQ4_NL: (32, 18),
}

# Types a weight matrix may have in a file we load.
WEIGHT_TYPES = (TensorType.F32, TensorType.F16, TensorType.Q4_0, TensorType.Q4_1, TensorType.Q5_0,
                TensorType.Q5_1, TensorType.Q8_0, TensorType.Q4_K, TensorType.Q5_K, TensorType.Q6_K,
                TensorType.IQ4_NL)

# KV cache element types, by the name users give them.
KV_TYPES: dict[str, TensorType] = {"f16": TensorType.F16, "q8_0": TensorType.Q8_0}


def row_bytes(t: TensorType, n: int) -> int:
    elems, nbytes = BLOCK_SIZES[t]
    if n % elems:
        raise ValueError(f"{n} elements is not a whole number of {t.name} blocks")
    return n // elems * nbytes



# ---- metadata values ----

class MetaKind(Enum):
    """What a metadata value the loader reads must be, named as messages name it."""

    INT = "an integer"
    NUMBER = "a number"
    TEXT = "text"
    BOOL = "a boolean"
    INTS = "an array of integers"
    NUMBERS = "an array of numbers"
    TEXTS = "an array of strings"


# The types a value (or each item of an array) of a kind may have, by
# _type_of: gguf-py gives int for every integer type, float for both float types.
_TYPES: dict[MetaKind, set[type]] = {
    MetaKind.INT: {int}, MetaKind.NUMBER: {int, float}, MetaKind.TEXT: {str}, MetaKind.BOOL: {bool},
    MetaKind.INTS: {int}, MetaKind.NUMBERS: {int, float}, MetaKind.TEXTS: {str},
}
_ARRAYS = (MetaKind.INTS, MetaKind.NUMBERS, MetaKind.TEXTS)
_NAMES = {bool: ("a boolean", "booleans"), int: ("an integer", "integers"), float: ("a float", "floats"),
          str: ("text", "strings"), list: ("an array", "arrays")}


def _is_array(value: object) -> bool:
    return isinstance(value, list) or hasattr(value, "item_type")


def _type_of(x: object) -> type:
    """bool, int, float, str or list, whatever class of those (an IntEnum, numpy's) it is."""
    if isinstance(x, bool):
        return bool
    if isinstance(x, Integral):
        return int
    if isinstance(x, Real):
        return float
    return list if _is_array(x) else type(x)


def _item_types(value: Any) -> set[type]:
    return {value.item_type} if hasattr(value, "item_type") else {_type_of(x) for x in value}


def _describe(value: Any) -> str:
    """A found value as a message names it: its kind, and the value itself if short."""
    if _is_array(value):
        types = _item_types(value)
        items = _NAMES.get(types.pop(), ("", "values"))[1] if len(types) == 1 else "mixed values"
        return f"an array of {len(value)} {items}"
    shown = repr(value)
    kind = _NAMES.get(_type_of(value), (type(value).__name__,))[0]
    return f"{kind} {shown[:40]}{'...' if len(shown) > 40 else ''}"


def metadata_value(meta: Mapping[str, Any], key: str, kind: MetaKind, source: str, *,
                   required: bool = False, default: Any = None) -> Any:
    """meta[key] if it is of `kind`; default when absent (ModelError if
    required). Any other value is a ModelError naming the key, what it holds
    and what it should. An array is a list, or an array read lazily (with
    `item_type`, the Python type of its items, and a length)."""
    value = meta.get(key)
    if value is None:
        if required:
            raise ModelError(f"{source}: metadata {key} is missing")
        return default
    allowed = _TYPES[kind]
    if kind in _ARRAYS:
        ok = _is_array(value) and (len(value) == 0 or _item_types(value) <= allowed)
    else:
        ok = _type_of(value) in allowed
    if not ok:
        raise ModelError(f"{source}: metadata {key} is {_describe(value)}, expected {kind.value}")
    return value
