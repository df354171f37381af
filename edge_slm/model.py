"""Load a Llama-architecture GGUF and run it with the C forward pass.

The file is memory-mapped by gguf-py's reader; tensors reach the C side as
views of that map, so loading copies no weights."""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .errors import EdgeSlmError, ModelError, UnsupportedModel
from .formats import KV_TYPES, WEIGHT_TYPES, TensorType, row_bytes
from .memory import release_free_memory

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama model, read from GGUF metadata."""

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

    def core(self) -> dict[str, Any]:
        """The fields the C model takes."""
        d = asdict(self)
        d.pop("context_length")
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


@functools.cache
def _lean_reader_class() -> type:
    import gguf  # imported here so `edge-slm --help` stays fast

    STRING, ARRAY = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY

    class LeanReader(gguf.GGUFReader):
        """gguf-py's reader with metadata arrays decoded straight to Python lists.

        The stock reader keeps a numpy view per element of every metadata
        array (two per string): ~160 MB for a 49k-token vocabulary and its
        merges, more than a whole 256 MB budget leaves. Here each array
        becomes one list as the header is walked; gguf-py still reads the
        scalars, the tensor descriptions and the tensor data."""

        def _build_fields(self, offs: int, count: int) -> int:
            self.values: dict[str, Any] = {}
            view = memoryview(self.data)
            order = sys.byteorder if self.byte_order == "I" else {"little": "big", "big": "little"}[sys.byteorder]

            def u(at: int, size: int) -> int:
                if at + size > len(view):
                    raise ValueError("metadata runs past the end of the file")
                return int.from_bytes(view[at:at + size], order)

            def string(at: int) -> tuple[str, int]:
                n = u(at, 8)
                end = at + 8 + n
                if end > len(view):
                    raise ValueError("a metadata string runs past the end of the file")
                return str(view[at + 8:end], "utf-8"), end

            def array(at: int) -> tuple[list[Any], int]:
                itype, n = gguf.GGUFValueType(u(at, 4)), u(at + 4, 8)
                at += 12
                if itype in (STRING, ARRAY):
                    items = []
                    for _ in range(n):
                        item, at = string(at) if itype == STRING else array(at)
                        items.append(item)
                    return items, at
                values = self._get(at, self.gguf_scalar_to_np[itype], n)
                if len(values) < n:
                    raise ValueError("a metadata array runs past the end of the file")
                return values.tolist(), at + int(values.nbytes)

            for _ in range(count):
                start = offs
                key, offs = string(offs)
                if key in self.values:  # older gguf-py only warns
                    raise ValueError(f"duplicate metadata key {key}")
                vtype = gguf.GGUFValueType(u(offs, 4))
                offs += 4
                if vtype == ARRAY:
                    value, offs = array(offs)
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
    """A GGUF file's metadata (as Python values) and tensors (as views of the
    memory map), read once; only the map stays."""

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

    def forget_lists(self, prefix: str) -> None:
        """Drop the large list values under prefix once they have been used."""
        for key in [k for k, v in self.metadata.items() if k.startswith(prefix) and isinstance(v, list)]:
            del self.metadata[key]
        gc.collect()
        release_free_memory()

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelError(f"{self.path}: metadata {key} is missing")
        return value

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
            cols, rows = ne[0], int(np.prod(ne[1:])) if len(ne) > 1 else 1
            out[name] = TensorView(data, ttype, rows, cols)
        return out


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _number(f: GGUFFile, key: str, kind: type, default: Any = None) -> Any:
    """A numeric setting, required unless a default is given; must be positive."""
    raw = f.require(key) if default is None else f.get(key, default)
    try:
        value = kind(raw)
    except (TypeError, ValueError, OverflowError):
        raise ModelError(f"{f.path}: metadata {key} is {raw!r}, not a number") from None
    if not value > 0 or (kind is float and not math.isfinite(value)):
        raise ModelError(f"{f.path}: metadata {key} is {raw!r}; it must be positive")
    return value


def read_config(f: GGUFFile) -> ModelConfig:
    arch = f.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(f"{f.path}: architecture {arch!r} is not supported (supported: llama)")
    scaling = f.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedModel(f"{f.path}: RoPE scaling {scaling!r} is not supported")
    n_head = _number(f, f"{arch}.attention.head_count", int)
    dim = _number(f, f"{arch}.embedding_length", int)
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = f.get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ModelError(f"{f.path}: vocabulary size is missing")
    cfg = ModelConfig(
        n_layer=_number(f, f"{arch}.block_count", int),
        dim=dim,
        hidden_dim=_number(f, f"{arch}.feed_forward_length", int),
        n_head=n_head,
        n_kv_head=_number(f, f"{arch}.attention.head_count_kv", int, n_head),
        head_dim=_number(f, f"{arch}.attention.key_length", int, max(1, dim // n_head)),
        vocab=int(vocab),
        norm_eps=_number(f, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_base=_number(f, f"{arch}.rope.freq_base", float, 10000.0),
        context_length=_number(f, f"{arch}.context_length", int, 2048),
    )
    if cfg.n_head % cfg.n_kv_head:
        raise ModelError(f"{f.path}: {cfg.n_head} attention heads cannot share "
                         f"{cfg.n_kv_head} KV heads evenly")
    if cfg.head_dim % 2:
        raise ModelError(f"{f.path}: head size {cfg.head_dim} is odd; RoPE rotates pairs")
    return cfg


def check_tensors(path: Path, cfg: ModelConfig, tensors: dict[str, TensorView]) -> None:
    """Every tensor the forward pass needs is present with the right shape."""
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {"attn_norm": (1, cfg.dim), "attn_q": (q_dim, cfg.dim), "attn_k": (kv_dim, cfg.dim),
              "attn_v": (kv_dim, cfg.dim), "attn_output": (cfg.dim, q_dim), "ffn_norm": (1, cfg.dim),
              "ffn_gate": (cfg.hidden_dim, cfg.dim), "ffn_up": (cfg.hidden_dim, cfg.dim),
              "ffn_down": (cfg.dim, cfg.hidden_dim)}
    expected = {"token_embd.weight": (cfg.vocab, cfg.dim), "output_norm.weight": (1, cfg.dim)}
    if "output.weight" in tensors:
        expected["output.weight"] = (cfg.vocab, cfg.dim)
    for i in range(cfg.n_layer):
        for part, shape in shapes.items():
            expected[f"blk.{i}.{part}.weight"] = shape
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            raise ModelError(f"{path}: tensor {name} is missing")
        if (t.rows, t.cols) != shape:
            raise ModelError(f"{path}: tensor {name} is {t.rows}x{t.cols}, expected {shape[0]}x{shape[1]}")
        if t.data.nbytes != t.rows * row_bytes(t.type, t.cols):
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

    @property
    def logits_rows(self) -> int:
        return self.max_logits or self.max_batch


class Transformer:
    """The C model plus the numpy buffers it writes into, allocated once.

    forward() is serialised by a lock: one run state, one caller at a time."""

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
        core_tensors = {name: (t.data, int(t.type), t.rows, t.cols) for name, t in tensors.items()}
        try:
            self._model = _core.Model(
                cfg.core(), core_tensors, n_threads=opts.n_threads, n_slots=opts.n_slots,
                n_ctx=opts.n_ctx, max_batch=opts.max_batch, kv_type=int(KV_TYPES[opts.kv_type]),
                backend=opts.backend,
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
        if not ids:
            raise ValueError("nothing to evaluate")
        B = min(self.opts.max_batch, len(self._logits)) if all_logits else self.opts.max_batch
        rows = []
        last = None
        for lo in range(0, len(ids), B):
            chunk = np.asarray(ids[lo:lo + B], dtype=np.int32)
            n = len(chunk)
            want = np.ones(n, np.uint8) if all_logits else np.zeros(n, np.uint8)
            if lo + n == len(ids):
                want[-1] = 1
            out = self.forward(chunk, np.arange(start + lo, start + lo + n, dtype=np.int32),
                               np.full(n, slot, np.int32), want)
            if all_logits:
                rows.append(out.copy())
            elif lo + n == len(ids):
                last = out[-1].copy()
        return np.concatenate(rows) if all_logits else last

    def kv_shift(self, slot: int, keep: int, n_drop: int, n_used: int) -> None:
        with self._lock:
            self._model.kv_shift(slot, keep, n_drop, n_used)

    def kv_copy(self, src: int, dst: int, n: int) -> None:
        with self._lock:
            self._model.kv_copy(src, dst, n)


@dataclass
class LoadedModel:
    """A GGUF file with everything needed to talk to it."""

    path: Path
    file: GGUFFile
    config: ModelConfig
    tensors: dict[str, TensorView]
    _tokenizer: Any = None

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def runtime(self, opts: RuntimeOptions) -> Transformer:
        if opts.n_ctx > self.config.context_length:
            log.warning("context %d exceeds the model's trained context %d", opts.n_ctx,
                        self.config.context_length)
        try:
            return Transformer(self.config, self.tensors, opts)
        except ModelError as e:
            raise ModelError(f"{self.path}: {e}") from None

    def tokenizer(self):
        """Built once; the vocabulary lists it was built from are then
        dropped from the metadata, as nothing else needs them."""
        from .tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf(self.file)
            self.file.forget_lists("tokenizer.ggml.")
        return self._tokenizer


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    f = GGUFFile(path)
    cfg = read_config(f)
    tensors = f.tensors()
    check_tensors(f.path, cfg, tensors)
    return LoadedModel(f.path, f, cfg, tensors)
