"""The tensor formats are declared three times: edge_slm/formats.py, the C
header (seen through _core.type_sizes()) and gguf-py. They must agree."""

from __future__ import annotations

import gguf
import pytest

from edge_slm import _core
from edge_slm.formats import BLOCK_SIZES, KV_TYPES, WEIGHT_TYPES, TensorType, row_bytes


def test_block_sizes_match_the_c_header():
    # both directions: neither side knows a type the other lacks
    assert {int(t): size for t, size in BLOCK_SIZES.items()} == _core.type_sizes()


@pytest.mark.parametrize("t", TensorType, ids=lambda t: t.name)
def test_type_ids_are_gguf_ids(t):
    assert int(t) == int(gguf.GGMLQuantizationType[t.name])


@pytest.mark.parametrize("t", WEIGHT_TYPES, ids=lambda t: t.name)
def test_weight_block_sizes_match_gguf(t):
    assert BLOCK_SIZES[t] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.name]]


def test_q8_1_is_our_own_activation_layout():
    """Our Q8_1 keeps d and s in f32 (4 + 4 + 32 bytes) and never reaches a
    file. ggml's block_q8_1 is 36 bytes (d and s in f16); gguf-py's table
    still lists the older 40, so it is pinned here rather than compared."""
    assert BLOCK_SIZES[TensorType.Q8_1] == (32, 4 + 4 + 32)
    assert TensorType.Q8_1 not in WEIGHT_TYPES


def test_q8_K_is_ggml_activation_layout():
    """Q8_K (d in f32, 256 quants, 16 sums of 16) is ggml's own layout, so
    gguf-py's size applies; like Q8_1 it is an activation format only."""
    assert BLOCK_SIZES[TensorType.Q8_K] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    assert BLOCK_SIZES[TensorType.Q8_K] == (256, 4 + 256 + 2 * 16)
    assert TensorType.Q8_K not in WEIGHT_TYPES


def test_kv_types_are_the_cache_formats():
    assert KV_TYPES == {"f16": TensorType.F16, "q8_0": TensorType.Q8_0}


def test_row_bytes():
    assert row_bytes(TensorType.Q4_0, 64) == 2 * 18
    assert row_bytes(TensorType.F16, 7) == 14
    assert row_bytes(TensorType.Q6_K, 1536) == 6 * 210
    with pytest.raises(ValueError, match="48 elements"):
        row_bytes(TensorType.Q4_1, 48)
    with pytest.raises(ValueError, match="576 elements is not a whole number of Q4_K blocks"):
        row_bytes(TensorType.Q4_K, 576)
