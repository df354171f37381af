"""A GGUF header checked as a stream, before a model from a bundle is
stored: every count and length it gives is checked against the bytes the
signed manifest says the file holds, and every tensor's data must lie inside
them. A header that lies about its size is refused here, not by the loader
after the file has been written to a slot."""

from __future__ import annotations

import struct
from collections.abc import Callable

import gguf

from ..model import MAX_ARRAY_DEPTH, MAX_METADATA_KEYS, MAX_TENSORS
from .bundle import BundleError

_SCALARS = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.UINT16: 2,
            gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4,
            gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.BOOL: 1, gguf.GGUFValueType.UINT64: 8,
            gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}
MAX_DIMS = 4


class _Stream:
    def __init__(self, read: Callable[[int], bytes], size: int):
        self.read_at, self.size, self.pos = read, size, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise BundleError(f"model.gguf: its header runs past the {self.size} bytes the manifest gives")
        data = self.read_at(n)
        if len(data) != n:
            raise BundleError("model.gguf: cut short inside its header")
        self.pos += n
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def skip(self, n: int) -> None:
        self.take(n)  # read, not seeked: the reader is a stream


def check_header(read: Callable[[int], bytes], size: int) -> None:
    """Check the GGUF header read by `read(n)` (sequential) against `size`."""
    s = _Stream(read, size)
    if s.take(4) != b"GGUF":
        raise BundleError("model.gguf: not a GGUF file")
    if s.u32() not in (2, 3):
        raise BundleError("model.gguf: a GGUF version this edge-slm does not read")
    n_tensors, n_kv = s.u64(), s.u64()
    if n_tensors > MAX_TENSORS or n_kv > MAX_METADATA_KEYS:
        raise BundleError(f"model.gguf: its header counts {n_tensors} tensors and {n_kv} metadata keys")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = s.take(s.u64())
        kind = s.u32()
        if key == b"general.alignment" and kind == gguf.GGUFValueType.UINT32:
            alignment = s.u32()
            if not 1 <= alignment <= 1 << 16 or alignment & (alignment - 1):
                raise BundleError(f"model.gguf: alignment {alignment}")
        else:
            _skip_value(s, kind, 0)
    extents = []
    for _ in range(n_tensors):
        s.skip(s.u64())  # name
        n_dims = s.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise BundleError(f"model.gguf: a tensor of {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= s.u64()
        kind, offset = s.u32(), s.u64()
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise BundleError(f"model.gguf: tensor type {kind} is unknown") from None
        if elements % block:
            raise BundleError("model.gguf: a tensor's size is not whole blocks of its type")
        extents.append((offset, elements // block * type_size))
    start = -(-s.pos // alignment) * alignment
    for offset, nbytes in extents:
        if start + offset + nbytes > size:
            raise BundleError(f"model.gguf: its header places tensor data past the {size} bytes the "
                              "file holds")


def _skip_value(s: _Stream, kind: int, depth: int) -> None:
    if kind in _SCALARS:
        s.skip(_SCALARS[kind])
    elif kind == gguf.GGUFValueType.STRING:
        s.skip(s.u64())
    elif kind == gguf.GGUFValueType.ARRAY and depth < MAX_ARRAY_DEPTH:
        item, count = s.u32(), s.u64()
        if item in _SCALARS:
            s.skip(_SCALARS[item] * count)
        else:
            for _ in range(count):
                _skip_value(s, item, depth + 1)
    else:
        raise BundleError(f"model.gguf: a metadata value of type {kind}")
