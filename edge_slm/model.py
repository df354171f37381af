"""Load a GGUF model (Llama, Qwen2, Qwen3, Gemma 3) and run it with the C
forward pass. The families differ in a few declared ways (Architecture
below), read once at load; the pass itself is one.

The file is memory-mapped by gguf-py's reader (read-only); tensors reach the
C side as views of that map. Making a runtime copies them into memory of its
own, the matrices repacked into the layout decoding streams (see
kernels/include/edge_kernels.h, "the x8 layout"), and hands the map's pages
back as it goes, so the weights are resident once (and decoding faults no
page of the file in, but an untied embedding's rows) — provided the tensors
are views of one read-only map, which Transformer checks."""

from __future__ import annotations

import collections
import functools
import gc
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .errors import EdgeSlmError, ModelError, UnsupportedModel
from .formats import KV_TYPES, WEIGHT_TYPES, MetaKind, TensorType, metadata_value, row_bytes
from .memory import release_free_memory

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Architecture:
    """How a family differs from Llama, as llama.cpp runs it: the tensors a
    layer has beyond Llama's, and what the forward pass does differently."""

    required: tuple[str, ...] = ()  # layer tensors (after "blk.N.") beyond Llama's
    optional: tuple[str, ...] = ()  # layer tensors used when present
    rope_freqs: bool = False        # Llama 3's rope_freqs.weight may divide the angles
    rope_neox: bool = False         # RoPE pairs element i with i + head_dim / 2
    gelu: bool = False              # the FFN's gate is GELU (tanh form), not SiLU
    embd_scale_sqrt_dim: bool = False  # embeddings times sqrt(dim)
    sliding_window: bool = False    # has sliding-window layers (attention.sliding_window)
    swa_pattern: int = 0            # then every swa_pattern-th layer is global
    rope_base_swa: float = 0.0      # the sliding layers' RoPE base (llama.cpp's, not in the file)


QKV_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
QK_NORMS = ("attn_q_norm.weight", "attn_k_norm.weight")
LLAMA_LAYER = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
               "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
               "ffn_down.weight")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(optional=QKV_BIASES, rope_freqs=True),
    "qwen2": Architecture(required=QKV_BIASES, rope_neox=True),
    "qwen3": Architecture(required=QK_NORMS, rope_neox=True),
    "gemma3": Architecture(required=QK_NORMS + ("post_attention_norm.weight", "post_ffw_norm.weight"),
                           rope_neox=True, gelu=True, embd_scale_sqrt_dim=True, sliding_window=True,
                           swa_pattern=6, rope_base_swa=10000.0),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a model and its family's differences, read from GGUF metadata."""

    n_layer: int
    dim: int            # residual stream width (embedding_length)
    hidden_dim: int     # FFN width (feed_forward_length)
    n_head: int
    n_kv_head: int      # fewer than n_head for grouped-query attention
    head_dim: int
    vocab: int
    norm_eps: float     # RMSNorm epsilon
    rope_base: float    # RoPE frequency base
    context_length: int  # the longest context the model was trained for
    arch: str = "llama"  # general.architecture, a key of ARCHITECTURES
    rope_neox: bool = False
    rope_scale: float = 1.0      # linear RoPE scaling of the global layers' positions
    ffn_act: int = 0             # 0 SiLU, 1 GELU (kernels/include/edge_model.h, ek_ffn_act)
    embd_scale: float = 0.0      # embeddings times this (0: not scaled)
    attn_scale: float = 0.0      # attention scores times this (0: 1 / sqrt(head_dim))
    swa_window: int = 0          # sliding-window layers see this many positions (0: none)
    swa_pattern: int = 0         # every swa_pattern-th layer is global
    rope_base_swa: float = 0.0   # the sliding-window layers' RoPE base

    @property
    def family(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def sliding_layers(self) -> int:
        """Layers that attend over the sliding window only (ek_layer_slides)."""
        if not self.swa_window:
            return 0
        return sum(1 for i in range(self.n_layer) if not (self.swa_pattern and (i + 1) % self.swa_pattern == 0))

    def core(self) -> dict[str, Any]:
        """The fields the C model takes."""
        d = asdict(self)
        d.pop("context_length")
        d.pop("arch")
        return d


@dataclass
class TensorView:
    data: np.ndarray  # a view of the memory map, never a copy
    type: TensorType
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


# Beyond these a header's count is a lie, or a file no board could run: a
# Llama model has 9 tensors a block (the C side takes at most 1024 blocks)
# and some tens of metadata keys; no key the loader reads is an array of
# arrays, and the format's own arrays of arrays are shallow.
MAX_TENSORS = 1 << 14
MAX_METADATA_KEYS = 1 << 12
MAX_ARRAY_DEPTH = 4
# The C side takes sizes and counts as 32-bit ints and epsilons as float32.
INT32_MAX = (1 << 31) - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


class MetadataArray:
    """A metadata array left in the memory map until it is read.

    Its length and item type are known, and its extent checked against the
    file, without its items being built: a vocabulary of any size claimed
    costs nothing until its length has been checked against the tensors."""

    def __init__(self, where: str, item_type: type, count: int, read: Callable[[], list[Any]]):
        self.where = where          # "file: metadata key", for messages
        self.item_type = item_type  # str, int, float, bool, or list for an array of arrays
        self._count = count
        self._read = read

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        return iter(self.read())

    def read(self) -> list[Any]:
        """The items, built now as one list."""
        try:
            return self._read()
        except UnicodeDecodeError as e:
            raise ModelError(f"{self.where} holds a string that is not UTF-8 ({e.reason})") from None


@functools.cache
def _lean_reader_class() -> type:
    import gguf  # imported here so `edge-slm --help` stays fast

    V = gguf.GGUFValueType
    STRING, ARRAY = V.STRING, V.ARRAY
    ITEM_TYPES = {STRING: str, ARRAY: list, V.BOOL: bool, V.FLOAT32: float, V.FLOAT64: float}

    class LeanReader(gguf.GGUFReader):
        """gguf-py's reader, leaving metadata arrays in the map and checking
        the header's counts against the file before anything is sized by them.

        The stock reader keeps a numpy view per element of every metadata
        array (two per string): ~160 MB for a 49k-token vocabulary and its
        merges, more than a whole 256 MB budget leaves. Here an array is
        walked to find its end and kept as a MetadataArray, built into one
        list only when read. gguf-py still reads the scalars, the tensor
        descriptions and the tensor data."""

        def __init__(self, path: Path, mode: str = "r"):
            self.source = str(path)
            super().__init__(path, mode)

        def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
            if count > MAX_TENSORS:
                raise ValueError(f"the header counts {count} tensors, more than {MAX_TENSORS}")
            return super()._build_tensor_info(offs, count)

        def _build_fields(self, offs: int, count: int) -> int:
            if count > MAX_METADATA_KEYS:
                raise ValueError(f"the header counts {count} metadata keys, more than {MAX_METADATA_KEYS}")
            self.values: dict[str, Any] = {}
            # Only the map and these are kept by the arrays' readers, not the reader.
            data, view = self.data, memoryview(self.data)
            byte_order, scalars = self.byte_order, self.gguf_scalar_to_np
            order = sys.byteorder if byte_order == "I" else {"little": "big", "big": "little"}[sys.byteorder]

            def u(at: int, size: int) -> int:
                if at + size > len(view):
                    raise ValueError("metadata runs past the end of the file")
                return int.from_bytes(view[at:at + size], order)

            def string(at: int) -> tuple[str, int]:
                end = at + 8 + u(at, 8)
                if end > len(view):
                    raise ValueError("a metadata string runs past the end of the file")
                return str(view[at + 8:end], "utf-8"), end

            def item_size(itype: Any) -> int:
                """Bytes of one item, or the least one can take (a string, an array)."""
                return {STRING: 8, ARRAY: 12}.get(itype) or np.dtype(scalars[itype]).itemsize

            def skip(itype: Any, n: int, at: int, depth: int) -> int:
                """Where n items of itype starting at `at` end, building none of them."""
                if n * item_size(itype) > len(view) - at:
                    raise ValueError(f"a metadata array of {n} items runs past the end of the file")
                if itype == STRING:
                    for _ in range(n):
                        at += 8 + u(at, 8)
                elif itype == ARRAY:
                    if depth >= MAX_ARRAY_DEPTH:
                        raise ValueError(f"metadata arrays nest more than {MAX_ARRAY_DEPTH} deep")
                    for _ in range(n):
                        at = skip(V(u(at, 4)), u(at + 4, 8), at + 12, depth + 1)
                else:
                    at += n * item_size(itype)
                if at > len(view):
                    raise ValueError("a metadata string runs past the end of the file")
                return at

            def read(itype: Any, n: int, at: int) -> list[Any]:
                """The n items of itype starting at `at` (skip() has checked they fit)."""
                if itype not in (STRING, ARRAY):
                    dtype = np.dtype(scalars[itype]).newbyteorder(byte_order)
                    return data[at:at + n * dtype.itemsize].view(dtype).tolist()
                items = []
                for _ in range(n):
                    if itype == STRING:
                        item, at = string(at)
                    else:
                        inner, k = V(u(at, 4)), u(at + 4, 8)
                        item, at = read(inner, k, at + 12), skip(inner, k, at + 12, 0)
                    items.append(item)
                return items

            for _ in range(count):
                start = offs
                key, offs = string(offs)
                if key in self.values:  # older gguf-py only warns
                    raise ValueError(f"duplicate metadata key {key}")
                vtype = V(u(offs, 4))
                offs += 4
                if vtype == ARRAY:
                    itype, n = V(u(offs, 4)), u(offs + 4, 8)
                    value = MetadataArray(f"{self.source}: metadata {key}", ITEM_TYPES.get(itype, int), n,
                                          functools.partial(read, itype, n, offs + 12))
                    offs = skip(itype, n, offs + 12, 1)
                    field = gguf.ReaderField(start, key, [], [], [ARRAY])  # no parts: the value is kept here
                else:
                    size, parts, idxs, types = self._get_field_parts(offs, vtype)
                    field = gguf.ReaderField(start, key, parts, idxs, types)
                    value = field.contents()
                    offs += size
                # gguf-py refuses duplicate keys here, and reads general.alignment from its fields
                self._push_field(field, skip_sum=True)
                self.values[key] = value
            return offs

    return LeanReader


class GGUFFile:
    """A GGUF file's metadata (scalars as Python values, arrays as
    MetadataArray) and tensors (as views of the memory map), read once; only
    the map stays."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        try:
            reader = _lean_reader_class()(self.path, "r")
        except Exception as e:  # gguf-py raises many types for a damaged file
            # e.g. numpy's "cannot reshape array" when the tensor data runs short
            raise ModelError(f"{self.path}: not a readable GGUF file, damaged or truncated "
                             f"({_reason(e)})") from None
        self.metadata: dict[str, Any] = reader.values
        self._tensors = [(t.name, t.tensor_type, [int(x) for x in t.shape], t.data)
                         for t in reader.tensors]
        del reader
        gc.collect()
        release_free_memory()
        # Before anything reads the vocabulary (the tokenizer alone, too): it
        # has a row of the embedding for each token, so its size is bounded by
        # the tensor data the file holds.
        tokens = self.value("tokenizer.ggml.tokens", MetaKind.TEXTS)
        rows = next((math.prod(ne[1:]) for name, _, ne, _ in self._tensors if name == "token_embd.weight"),
                    None)
        if tokens is not None and rows is not None and len(tokens) != rows:
            raise ModelError(f"{self.path}: tokenizer.ggml.tokens holds {len(tokens)} tokens, "
                             f"token_embd.weight has {rows} rows")

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key)
        return default if value is None else value

    def value(self, key: str, kind: MetaKind, *, required: bool = False, default: Any = None) -> Any:
        """The metadata value under key, which must be of `kind` (see formats.metadata_value)."""
        return metadata_value(self.metadata, key, kind, str(self.path), required=required, default=default)

    def tensors(self) -> dict[str, TensorView]:
        out: dict[str, TensorView] = {}
        for name, gtype, ne, data in self._tensors:
            try:
                ttype = TensorType(int(gtype))
            except ValueError:
                ttype = None
            if ttype is None or ttype not in WEIGHT_TYPES:
                raise UnsupportedModel(
                    f"{self.path}: tensor {name} has type {gtype.name}, "
                    f"supported: {', '.join(x.name for x in WEIGHT_TYPES)}"
                )
            out[name] = TensorView(data, ttype, math.prod(ne[1:]), ne[0] if ne else 1)
        return out


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _positive(f: GGUFFile, key: str, kind: MetaKind, default: Any = None) -> Any:
    """A size or constant of the model, required unless a default is given:
    positive, and within what the C side takes."""
    value = f.value(key, kind, required=default is None, default=default)
    most = INT32_MAX if kind is MetaKind.INT else FLOAT32_MAX
    # A number below float32's range is 0 there: a RoPE base of 1e-300 made infinite angles
    # and NaN logits (and a scaling factor's reciprocal, the positions' scale, stays finite).
    least = 1 if kind is MetaKind.INT else FLOAT32_TINY
    if not least <= value <= most:  # nan fails too
        raise ModelError(f"{f.path}: metadata {key} is {value!r}; it must be positive "
                         f"and at most {most if kind is MetaKind.INT else f'{most:.3g}'}"
                         + ("" if kind is MetaKind.INT else f" (and at least {least:.3g})"))
    return value


def read_config(f: GGUFFile) -> ModelConfig:
    arch = f.value("general.architecture", MetaKind.TEXT, required=True)
    family = ARCHITECTURES.get(arch)
    if family is None:
        raise UnsupportedModel(f"{f.path}: architecture {arch!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    scaling = f.value(f"{arch}.rope.scaling.type", MetaKind.TEXT)
    if scaling not in (None, "none", "linear"):
        raise UnsupportedModel(f"{f.path}: RoPE scaling {scaling!r} is not supported (supported: linear)")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = 1.0 / float(_positive(f, f"{arch}.rope.scaling.factor", MetaKind.NUMBER, 1.0))
    swa_window = 0
    if family.sliding_window:
        swa_window = _positive(f, f"{arch}.attention.sliding_window", MetaKind.INT)
    n_head = _positive(f, f"{arch}.attention.head_count", MetaKind.INT)
    dim = _positive(f, f"{arch}.embedding_length", MetaKind.INT)
    tokens = f.value("tokenizer.ggml.tokens", MetaKind.TEXTS)
    n_tokens = None if tokens is None else len(tokens)
    vocab = _positive(f, f"{arch}.vocab_size", MetaKind.INT, n_tokens or None)
    if n_tokens is not None and n_tokens != vocab:
        raise ModelError(f"{f.path}: tokenizer.ggml.tokens holds {n_tokens} tokens, "
                         f"{arch}.vocab_size says {vocab}")
    cfg = ModelConfig(
        n_layer=_positive(f, f"{arch}.block_count", MetaKind.INT),
        dim=dim,
        hidden_dim=_positive(f, f"{arch}.feed_forward_length", MetaKind.INT),
        n_head=n_head,
        n_kv_head=_positive(f, f"{arch}.attention.head_count_kv", MetaKind.INT, n_head),
        head_dim=_positive(f, f"{arch}.attention.key_length", MetaKind.INT, max(1, dim // n_head)),
        vocab=vocab,
        norm_eps=float(_positive(f, f"{arch}.attention.layer_norm_rms_epsilon", MetaKind.NUMBER, 1e-5)),
        rope_base=float(_positive(f, f"{arch}.rope.freq_base", MetaKind.NUMBER, 10000.0)),
        context_length=_positive(f, f"{arch}.context_length", MetaKind.INT, 2048),
        arch=arch,
        rope_neox=family.rope_neox,
        rope_scale=rope_scale,
        ffn_act=1 if family.gelu else 0,
        embd_scale=math.sqrt(dim) if family.embd_scale_sqrt_dim else 0.0,
        swa_window=swa_window,
        swa_pattern=family.swa_pattern,
        rope_base_swa=family.rope_base_swa,
    )
    if cfg.n_head % cfg.n_kv_head:
        raise ModelError(f"{f.path}: {cfg.n_head} attention heads cannot share "
                         f"{cfg.n_kv_head} KV heads evenly")
    if cfg.head_dim % 2:
        raise ModelError(f"{f.path}: head size {cfg.head_dim} is odd; RoPE rotates pairs")
    return cfg


# Tensors outside the layers that some family has and we would not use.
OTHER_TENSORS = ("output.bias", "output_norm.bias", "token_embd_norm.weight", "rope_freqs.weight",
                 "rope_factors_long.weight", "rope_factors_short.weight")


def expected_tensors(cfg: ModelConfig, tensors: dict[str, TensorView]) -> dict[str, tuple[int, int]]:
    """The tensors the forward pass reads from this file, by name, with
    their shapes (rows, cols): the family's, and its optional ones present."""
    family = cfg.family
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {"attn_norm.weight": (1, cfg.dim), "attn_q.weight": (q_dim, cfg.dim),
              "attn_k.weight": (kv_dim, cfg.dim), "attn_v.weight": (kv_dim, cfg.dim),
              "attn_output.weight": (cfg.dim, q_dim), "ffn_norm.weight": (1, cfg.dim),
              "ffn_gate.weight": (cfg.hidden_dim, cfg.dim), "ffn_up.weight": (cfg.hidden_dim, cfg.dim),
              "ffn_down.weight": (cfg.dim, cfg.hidden_dim),
              "attn_q.bias": (1, q_dim), "attn_k.bias": (1, kv_dim), "attn_v.bias": (1, kv_dim),
              "attn_q_norm.weight": (1, cfg.head_dim), "attn_k_norm.weight": (1, cfg.head_dim),
              "post_attention_norm.weight": (1, cfg.dim), "post_ffw_norm.weight": (1, cfg.dim)}
    expected = {"token_embd.weight": (cfg.vocab, cfg.dim), "output_norm.weight": (1, cfg.dim)}
    if "output.weight" in tensors:
        expected["output.weight"] = (cfg.vocab, cfg.dim)
    if family.rope_freqs and "rope_freqs.weight" in tensors:
        expected["rope_freqs.weight"] = (1, cfg.head_dim // 2)
    for i in range(cfg.n_layer):
        for part in LLAMA_LAYER + family.required:
            expected[f"blk.{i}.{part}"] = shapes[part]
        for part in family.optional:
            if f"blk.{i}.{part}" in tensors:
                expected[f"blk.{i}.{part}"] = shapes[part]
    return expected


def check_tensors(path: Path, cfg: ModelConfig, tensors: dict[str, TensorView]) -> None:
    """Every tensor the forward pass needs is present with the right shape.

    The header's sizes are believed only as far as the tensors bear them
    out: no table is sized by a block count the file has no tensors for."""
    blocks = {name.split(".")[1] for name in tensors if name.startswith("blk.")}
    if cfg.n_layer > len(blocks):
        raise ModelError(f"{path}: metadata block_count is {cfg.n_layer}, but the file holds tensors "
                         f"for {len(blocks)} blocks")
    expected = expected_tensors(cfg, tensors)
    for name in tensors:
        if name not in expected and (name.startswith("blk.") or name in OTHER_TENSORS):
            raise UnsupportedModel(f"{path}: tensor {name} is not supported for architecture {cfg.arch}")
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            raise ModelError(f"{path}: tensor {name} is missing")
        if (t.rows, t.cols) != shape:
            raise ModelError(f"{path}: tensor {name} is {t.rows}x{t.cols}, expected {shape[0]}x{shape[1]}")
        try:
            size = t.rows * row_bytes(t.type, t.cols)
        except ValueError as e:
            raise ModelError(f"{path}: tensor {name}: {e}") from None
        if t.data.nbytes != size:
            raise ModelError(f"{path}: tensor {name} is truncated")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the C model is sized. Everything here is allocated once, at load."""

    n_threads: int = 2
    n_ctx: int = 2048      # positions per slot
    n_slots: int = 1       # conversations held at once
    max_batch: int = 64    # tokens per forward call (prompt chunk, batched decode)
    kv_type: str = "f16"   # "f16" or "q8_0"
    backend: str | None = None  # kernel table; None = best for this CPU
    max_logits: int | None = None  # logits rows per call (default max_batch)
    execution_provider: str = "cpu"  # ONNX Runtime's (edge_slm.backends); the C kernels run on the CPU

    @property
    def logits_rows(self) -> int:
        return self.max_logits or self.max_batch


def _one_read_only_map(tensors: dict[str, TensorView]) -> bool:
    """Whether every tensor is a view of one read-only file mapping. Only then
    may the C model hand back the pages of the span they cover (it would
    zero memory of any other kind), so it is told so only then."""
    roots = set()
    for t in tensors.values():
        a = t.data
        while isinstance(a.base, np.ndarray):
            a = a.base
        if not isinstance(a, np.memmap) or a.mode != "r" or a.flags.writeable:
            return False
        roots.add(id(a))
    return len(roots) == 1


class Transformer:
    """The C model plus the numpy buffers it writes into, allocated once.

    forward() is serialised by a lock: one run state, one caller at a time."""

    can_shift = True  # kv_shift re-rotates the kept keys in place

    def __init__(self, cfg: ModelConfig, tensors: dict[str, TensorView], opts: RuntimeOptions):
        if opts.kv_type not in KV_TYPES:
            raise ValueError(f"KV cache type {opts.kv_type!r}: choose from {', '.join(KV_TYPES)}")
        self.cfg = cfg
        self.opts = opts
        forced = os.environ.get("EDGE_SLM_BACKEND")
        if opts.backend is None and forced and forced not in _core.backends():
            # the C side would quietly pick the best table instead
            raise EdgeSlmError(f"EDGE_SLM_BACKEND={forced}: no such kernel table on this CPU "
                               f"(available: {', '.join(_core.backends())})")
        core_tensors = {name: (tensors[name].data, int(tensors[name].type), tensors[name].rows,
                               tensors[name].cols) for name in expected_tensors(cfg, tensors)}
        try:
            self._model = _core.Model(
                cfg.core(), core_tensors, n_threads=opts.n_threads, n_slots=opts.n_slots,
                n_ctx=opts.n_ctx, max_batch=opts.max_batch, kv_type=int(KV_TYPES[opts.kv_type]),
                backend=opts.backend, mapped=_one_read_only_map(tensors),
            )
        except (ValueError, KeyError) as e:
            raise ModelError(f"model rejected: {_reason(e)}") from None
        except MemoryError:
            raise EdgeSlmError(f"cannot allocate the KV cache and run state for {opts.n_slots} "
                               f"slot(s) x {opts.n_ctx} tokens, batches of {opts.max_batch}") from None
        self._lock = threading.Lock()
        self._logits = np.zeros((opts.logits_rows, cfg.vocab), dtype=np.float32)

    @property
    def backend(self) -> str:
        return self._model.backend

    def forward(self, tokens: np.ndarray, pos: np.ndarray, slot: np.ndarray,
                want: np.ndarray) -> np.ndarray:
        """Evaluate up to max_batch tokens; returns logits rows for want != 0, in order.

        The returned array is a view of a reused buffer: copy what you keep."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n_out = int(np.count_nonzero(want))
        if n_out > len(self._logits):
            raise ValueError(f"{n_out} logits rows asked for, at most {len(self._logits)}")
        out = self._logits[:n_out]
        with self._lock:
            self._model.forward(tokens, np.ascontiguousarray(pos, dtype=np.int32),
                                np.ascontiguousarray(slot, dtype=np.int32),
                                np.ascontiguousarray(want, dtype=np.uint8), out)
        return out

    def prefill(self, ids: list[int], start: int = 0, slot: int = 0, all_logits: bool = False) -> np.ndarray:
        """Feed ids at positions start.. in chunks; returns the last row of logits
        (or every row, [len(ids), vocab], when all_logits)."""
        from .backends import prefill_in_chunks  # here: backends imports this module

        batch = min(self.opts.max_batch, len(self._logits)) if all_logits else self.opts.max_batch
        return prefill_in_chunks(self, ids, batch, start, slot, all_logits)

    def profile(self, on: bool) -> dict:
        """What the C pass's profile gathered since the last call (wall time and
        weight bytes per kind of op), then profiling on or off: see _core.pyi."""
        with self._lock:
            return self._model.profile(on)

    @property
    def weight_bytes(self) -> int:
        """Weights the C model holds, copied (and repacked) at creation."""
        return self._model.weight_bytes

    def kv_shift(self, slot: int, keep: int, n_drop: int, n_used: int) -> None:
        with self._lock:
            self._model.kv_shift(slot, keep, n_drop, n_used)

    def kv_copy(self, src: int, dst: int, n: int) -> None:
        with self._lock:
            self._model.kv_copy(src, dst, n)

    def kv_usable(self, slot: int, n: int) -> int:
        """How many of slot's first n cached positions a continuation can keep:
        n, or 0 where the sliding-window layers' ring no longer holds the
        window before position n."""
        with self._lock:
            return self._model.kv_usable(slot, n)

    @property
    def kv_ring(self) -> int:
        """Positions each sliding-window layer keeps per slot (0: every layer
        keeps the whole context)."""
        return self._model.kv_ring


@dataclass
class LoadedModel:
    """A GGUF file with everything needed to talk to it: the C kernels'
    Source (edge_slm.backends)."""

    path: Path
    file: GGUFFile
    config: ModelConfig
    tensors: dict[str, TensorView]
    _tokenizer: Any = None

    kind = "gguf"
    kv_types = tuple(KV_TYPES)
    loaded_bytes = 0  # resident at load beyond metadata and tokenizer: the weights are only mapped

    @property
    def name(self) -> str:
        return str(self.file.get("general.name", self.path.stem))

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def resident_weights(self) -> int:
        """The runtime copies (and repacks) the tensors, then hands the map's
        pages back: about the file's size, once."""
        return self.path.stat().st_size

    def sha256(self) -> str:
        from .pull import file_sha256

        return file_sha256(self.path)

    def state_bytes(self, n_ctx: int, max_batch: int, n_threads: int, kv_type: str) -> tuple[int, int]:
        """(KV cache bytes of one slot, run-state bytes), exact, from C."""
        return _core.model_bytes(self.config.core(), n_slots=1, n_ctx=n_ctx, max_batch=max_batch,
                                 n_threads=n_threads, kv_type=int(KV_TYPES[kv_type]))

    def runtime(self, opts: RuntimeOptions) -> Transformer:
        if opts.n_ctx > self.config.context_length:
            log.warning("context %d exceeds the model's trained context %d", opts.n_ctx,
                        self.config.context_length)
        try:
            return Transformer(self.config, self.tensors, opts)
        except ModelError as e:
            raise ModelError(f"{self.path}: {e}") from None

    def tokenizer(self):
        """Built once, from the vocabulary left in the map until now."""
        from .tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf(self.file)
            gc.collect()  # what building it left, so that its measured cost is what it keeps
            release_free_memory()
        return self._tokenizer

    def describe(self) -> list[tuple[str, str]]:
        """What `edge-slm info` says of the file beyond the model's shape: (label, text) lines."""
        types = collections.Counter(t.type.name for t in self.tensors.values())
        type_bytes: collections.Counter[str] = collections.Counter()
        for t in self.tensors.values():
            type_bytes[t.type.name] += t.nbytes
        return [("file", f"{self.path} ({self.path.stat().st_size / (1 << 20):.1f} MiB, GGUF)"),
                ("tensors", f"{len(self.tensors)}: " + ", ".join(
                    f"{n} x {t} ({type_bytes[t] / (1 << 20):.1f} MiB)" for t, n in types.most_common()))]


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    f = GGUFFile(path)
    cfg = read_config(f)
    tensors = f.tensors()
    check_tensors(f.path, cfg, tensors)
    return LoadedModel(f.path, f, cfg, tensors)
