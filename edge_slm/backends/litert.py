"""The LiteRT backend: a .tflite decoder with KV-cache signatures (`prefill`
or `prefill_<P>`, and `decode`, as litert-torch's generative converter and
`edge-slm export --to litert` write them), run by ai-edge-litert's
CompiledModel on its CPU accelerator (XNNPACK), with --threads threads.

The signatures take the whole cache as inputs and return it, updated, as
outputs (edge_slm/export/litert.py). The cache is held without copies: each
slot has its own tensor buffers (LiteRT's TensorBuffer, one per layer for K
and one for V, [1, kv_len, kv_heads, head_dim] float32, zeroed once), and a
call binds the same buffers as the cache's inputs and as its outputs, so the
graph's dynamic_update_slice writes the new rows in place; prefill and decode
share them. Only tokens, positions and the logits row cross between numpy
and LiteRT. (The older Interpreter API cannot bind buffers of ours: its
SignatureRunner copies the whole cache in and out on every call, 47 MB each
way per token for the reference model at 1024 positions, and its default
XNNPACK delegate packs the weights once per signature.)

XNNPACK's weight cache is on, in memory: prefill and decode then share one
packing of the weights (without it the reference model's weights were
resident twice, ~200 MB more).

A run of a slot's tokens goes through prefill (padded to the signature's
length; prefill gives no logits) where no logits are wanted, and token by
token through decode where they are: a prompt chunk is prefill up to its
last token, then decode. Slots run one after another (the signatures have
batch 1): "batching" here is sequential. The cache cannot shift (the graph
writes rows at positions only), and a slot holds at most the export's
kv_len positions, the config's context_length here, so that the engine's
plan never asks for more.

Memory: each slot's buffers are the whole kv_len, whatever n_ctx. Loading
makes the model, one slot's buffers and a first call of each signature
(XNNPACK packs the weights on it) and measures the resident growth, LiteRT's
library, mapped model pages and arena included: less that slot's buffers,
and with the file's pages a run reads by token and position (paged_bytes),
it is what the plan counts as weights."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeSlmError, ModelError
from ..memory import MIB, current_rss, release_free_memory
from ..model import ModelConfig, RuntimeOptions
from .sidecar import SidecarMetadata, read_sidecar, sidecar_path

log = logging.getLogger(__name__)

KV_TYPES = ("f32",)
DECODE = "decode"
PREFILL = re.compile(r"prefill(?:_(\d+))?")
TOKENS, POSITIONS, LOGITS = "tokens", "input_pos", "logits"
KV_NAMES = ("kv_cache_k_{}", "kv_cache_v_{}")
WEIGHT_CACHE = ":memory:"  # XNNPACK's name for a weight cache held in memory, not in a file


def _reason(e: BaseException) -> str:
    lines = [ln.strip(" └") for ln in str(e).strip().splitlines() if ln.strip(" └")]
    return lines[-1] if lines else type(e).__name__


def _whole(settings: dict[str, Any], key: str, where: Path, least: int) -> int:
    value = settings.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ModelError(f"{where}: settings.{key} is {value!r}, not a whole number >= {least}")
    return value


@dataclass
class _Signature:
    """One signature and its own small buffers (the cache's are the slots')."""

    name: str
    length: int              # tokens per call
    tokens: Any              # TensorBuffer, int32 [1, length]
    positions: Any           # TensorBuffer, int32 [length]
    logits: Any | None       # TensorBuffer, float32 [1, 1, vocab] (decode only)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """LiteRT's C++ side logs INFO and WARNING lines straight to file
    descriptor 2 as it finds accelerators (some 15 lines a model, and as many
    at exit), with no switch in its Python API: they would bury the CLI's
    own output. What goes wrong reaches us as an exception, said in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _silence_native_stderr_at_exit() -> None:
    """At exit LiteRT's accelerators are torn down after Python has had its
    say, each with a log line: silenced once our own output is done."""
    sys.stderr.flush()
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)


_ENVIRONMENT: list[Any] = []  # LiteRT's, one a process: made once, torn down at exit


def _environment(environment: Any, options: Any) -> Any:
    """The process's LiteRT environment. Kept to the end, so that its
    accelerators' teardown (and the lines it logs) comes after our output."""
    if not _ENVIRONMENT:
        _ENVIRONMENT.append(environment.create(options=options))
        atexit.register(_silence_native_stderr_at_exit)
    return _ENVIRONMENT[0]


class _Model:
    """A CompiledModel over the file, its signatures checked against the
    sidecar's shape."""

    def __init__(self, path: Path, cfg: ModelConfig, kv_len: int, n_threads: int):
        import ai_edge_litert
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.environment import Environment, EnvironmentOptions
        from ai_edge_litert.options import Options

        here = os.path.dirname(ai_edge_litert.__file__)
        # The CPU only: NPU compiler plugins and dispatch libraries are looked
        # for in a folder that is not there (an empty path would send LiteRT
        # through every vendor's, loading some and failing on others).
        nowhere = os.path.join(here, "edge-slm-no-npu-plugins")
        try:
            env = _environment(Environment, EnvironmentOptions(
                runtime_path=here, compiler_plugin_path=nowhere, dispatch_library_path=nowhere))
            self.model = CompiledModel.from_file(str(path), environment=env, options=Options(
                cpu_options=CpuOptions(num_threads=n_threads, xnnpack_weight_cache_path=WEIGHT_CACHE)))
            names = self.model.get_signature_list()
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"{path}: not a readable LiteRT model ({_reason(e)})") from None
        self.path, self.threads, self.vocab = path, n_threads, cfg.vocab
        self.kv_names = [p.format(i) for i in range(cfg.n_layer) for p in KV_NAMES]
        self.kv_shape = [1, kv_len, cfg.n_kv_head, cfg.head_dim]
        prefills = sorted((int(m.group(1) or 0), n) for n in names if (m := PREFILL.fullmatch(n)))
        if DECODE not in names or not prefills:
            raise ModelError(f"{path}: signatures {', '.join(sorted(names)) or 'none'}; a decoder for "
                             f"edge-slm has `decode` and `prefill` (or prefill_N) signatures")
        self.decode = self._bind(DECODE, logits=True)
        self.prefills = sorted((self._bind(n, logits=False) for _, n in prefills), key=lambda s: s.length)

    def _bind(self, name: str, logits: bool) -> _Signature:
        m, path = self.model, self.path
        inputs, outputs = m.get_input_tensor_details(name), m.get_output_tensor_details(name)
        want_out = set(self.kv_names) | ({LOGITS} if logits else set())
        if set(inputs) != {TOKENS, POSITIONS, *self.kv_names} or not want_out <= set(outputs):
            raise ModelError(f"{path}: signature {name} takes {sorted(inputs)} and gives {sorted(outputs)}; "
                             f"expected {TOKENS}, {POSITIONS} and the cache of the sidecar's "
                             f"{len(self.kv_names) // 2} layers ({self.kv_names[0]} ...)")
        for part in self.kv_names:
            for where, d in (("input", inputs[part]), ("output", outputs[part])):
                if list(d["shape"]) != self.kv_shape or d["dtype"] != "float32":
                    raise ModelError(f"{path}: signature {name}'s {where} {part} is {d['dtype']} "
                                     f"{list(d['shape'])}; the sidecar says float32 {self.kv_shape}")
        tokens, positions = list(inputs[TOKENS]["shape"]), list(inputs[POSITIONS]["shape"])
        length = tokens[-1] if tokens else 0
        if tokens != [1, length] or positions != [length] or length < 1:
            raise ModelError(f"{path}: signature {name}'s {TOKENS} and {POSITIONS} are {tokens} and {positions}")
        if logits and (list(outputs[LOGITS]["shape"]) != [1, 1, self.vocab] or length != 1):
            raise ModelError(f"{path}: signature {name} gives logits {list(outputs[LOGITS]['shape'])} "
                             f"for {length} token(s); the sidecar's vocabulary is {self.vocab}")
        return _Signature(name, length, m.create_input_buffer_by_name(name, TOKENS),
                          m.create_input_buffer_by_name(name, POSITIONS),
                          m.create_output_buffer_by_name(name, LOGITS) if logits else None)

    def slot_buffers(self) -> list[Any]:
        """A slot's cache: K and V of each layer, zeroed (rows past what a slot
        has written are masked, but must be finite: -inf plus NaN is NaN)."""
        zeros = np.zeros(self.kv_shape, np.float32)
        buffers = [self.model.create_input_buffer_by_name(DECODE, n) for n in self.kv_names]
        for b in buffers:
            b.write(zeros)
        return buffers

    @property
    def slot_bytes(self) -> int:
        return len(self.kv_names) * int(np.prod(self.kv_shape)) * 4

    def run(self, sig: _Signature, kv: dict[str, Any]) -> None:
        """One call, the slot's cache (kv: name -> buffer) bound as input and output alike."""
        extra = {LOGITS: sig.logits} if sig.logits is not None else {}
        self.model.run_by_name(sig.name, {TOKENS: sig.tokens, POSITIONS: sig.positions, **kv}, {**kv, **extra})

    def warm(self, kv: dict[str, Any]) -> None:
        """A first call of each signature: XNNPACK packs the weights and sizes its workspace on it."""
        for sig in [*self.prefills, self.decode]:
            sig.tokens.write(np.zeros((1, sig.length), np.int32))
            sig.positions.write(np.arange(sig.length, dtype=np.int32))
            self.run(sig, kv)


@dataclass
class LiteRtSource:
    """A .tflite decoder and its sidecar, read far enough to plan and run it
    (edge_slm.backends.Source)."""

    path: Path
    file: SidecarMetadata
    config: ModelConfig       # the sidecar's, context_length the export's kv_len
    settings: dict[str, Any]  # the export's (sidecar "settings")
    loaded_bytes: int         # resident growth of loading: the model, its library, one slot's cache
    _loaded: tuple[_Model, list[Any]] | None  # the model made at load and the slot it warmed
    _tokenizer: Any = None

    kind = "litert"
    kv_types = KV_TYPES

    @property
    def name(self) -> str:
        return str(self.file.get("general.name", self.path.stem))

    @property
    def kv_len(self) -> int:
        return self.config.context_length

    @property
    def slot_bytes(self) -> int:
        """One slot's cache: K and V of every layer at kv_len positions, float32."""
        cfg = self.config
        return 2 * cfg.n_layer * self.kv_len * cfg.n_kv_head * cfg.head_dim * 4

    @property
    def paged_bytes(self) -> int:
        """What the graph reads from the mapped file by token and by position,
        faulted in as a run meets new ones (measured: the reference model grew
        ~35 MiB over its first thousand positions): the embedding's int8 rows
        and the converter's causal mask, [kv_len, kv_len] float32. Counted
        whole."""
        cfg = self.config
        return cfg.vocab * cfg.dim + self.kv_len * self.kv_len * 4

    @property
    def resident_weights(self) -> int:
        """Measured at load (what loading grew, less the slot's cache it made:
        XNNPACK's packed weights, the mapped pages read so far, LiteRT's
        library and arena), and the pages a run will read yet."""
        return max(0, self.loaded_bytes - self.slot_bytes) + self.paged_bytes

    def sha256(self) -> str:
        from ..pull import file_sha256

        return file_sha256(self.path)

    def state_bytes(self, n_ctx: int, max_batch: int, n_threads: int, kv_type: str) -> tuple[int, int]:
        """(one slot's cache, run state): the cache is the export's kv_len long
        whatever n_ctx; LiteRT's arena is in the measured weights."""
        return self.slot_bytes, 0

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf(self.file)
        return self._tokenizer

    def runtime(self, opts: RuntimeOptions) -> LiteRtRuntime:
        if opts.n_ctx > self.kv_len:
            raise EdgeSlmError(f"{self.path}: a context of {opts.n_ctx} tokens is more than the "
                               f"{self.kv_len} positions its KV cache was exported with "
                               f"(edge-slm export --kv-len)")
        if opts.kv_type not in KV_TYPES:
            raise EdgeSlmError(f"KV type {opts.kv_type}: the litert backend holds its cache in "
                               f"{', '.join(KV_TYPES)} only")
        loaded, self._loaded = self._loaded, None  # a runtime owns its model
        if loaded is None or loaded[0].threads != opts.n_threads:
            del loaded  # XNNPACK takes its thread pool when the model is made
            gc.collect()
            with _native_stderr_silenced():  # where LiteRT sets up its accelerators, lazily
                model = _Model(self.path, self.config, self.kv_len, opts.n_threads)
                slots = [model.slot_buffers() for _ in range(opts.n_slots)]
        else:
            model, first = loaded
            with _native_stderr_silenced():
                slots = [first] + [model.slot_buffers() for _ in range(opts.n_slots - 1)]
        return LiteRtRuntime(model, slots, self, opts)

    def describe(self) -> list[tuple[str, str]]:
        s = self.settings
        return [("file", f"{self.path} ({self.path.stat().st_size / MIB:.1f} MiB, LiteRT)"),
                ("export", f"{s.get('weights', '?')} weights ({s.get('recipe', '?')}), KV cache of "
                           f"{self.kv_len} positions (f32), prefill of {s.get('prefill_len', '?')}, "
                           f"by {s.get('converter', '?')}")]


class LiteRtRuntime:
    """The model run as edge_slm.backends.Runtime: each run of a slot's tokens
    through prefill and decode on that slot's buffers. forward() is
    serialised by a lock, as the C model's is."""

    can_shift = False
    kv_ring = 0

    def __init__(self, model: _Model, slots: list[list[Any]], source: LiteRtSource, opts: RuntimeOptions):
        self._m = model
        self.opts = opts
        self.backend = f"litert xnnpack ({opts.n_threads} threads)"
        self.weight_bytes = source.resident_weights
        self.n_ctx, self.kv_len = opts.n_ctx, source.kv_len
        self._slots = [dict(zip(model.kv_names, buffers)) for buffers in slots]
        self._filled = [0] * len(slots)  # positions of each slot's cache written
        self._logits = np.zeros((opts.logits_rows, source.config.vocab), np.float32)
        self._lock = threading.Lock()

    def _decode(self, token: int, slot: int, position: int) -> Any:
        sig = self._m.decode
        sig.tokens.write(np.array([[token]], np.int32))
        sig.positions.write(np.array([position], np.int32))
        self._m.run(sig, self._slots[slot])
        return sig.logits

    def _prefill(self, tokens: np.ndarray, slot: int, start: int) -> None:
        """tokens at positions start.., no logits: in calls of the longest
        prefill, the rest in the shortest that holds it; positions a padded
        call would put past the cache go through decode."""
        done = 0
        while done < len(tokens):
            left, at = len(tokens) - done, start + done
            sig = next((s for s in self._m.prefills if s.length >= left), self._m.prefills[-1])
            if left == 1 or at + sig.length > self.kv_len:  # padding would write past the cache's end
                for k in range(done, len(tokens)):
                    self._decode(int(tokens[k]), slot, start + k)
                return
            n = min(left, sig.length)
            padded = np.zeros((1, sig.length), np.int32)
            padded[0, :n] = tokens[done:done + n]
            sig.tokens.write(padded)
            sig.positions.write(np.arange(at, at + sig.length, dtype=np.int32))
            self._m.run(sig, self._slots[slot])  # the padding's rows are overwritten as the slot goes on
            done += n

    def forward(self, tokens: np.ndarray, pos: np.ndarray, slot: np.ndarray,
                want: np.ndarray) -> np.ndarray:
        """Evaluate tokens[i] at pos[i] of slot[i], each slot's run in turn;
        logits rows for want[i] != 0, in order, in a reused buffer."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        pos = np.ascontiguousarray(pos, dtype=np.int32)
        slot = np.ascontiguousarray(slot, dtype=np.int32)
        want = np.ascontiguousarray(want, dtype=np.uint8)
        n = len(tokens)
        if not (len(pos) == len(slot) == len(want) == n) or n == 0:
            raise ValueError(f"tokens, pos, slot and want must be of one length, not 0 "
                             f"({n}, {len(pos)}, {len(slot)}, {len(want)})")
        if n > self.opts.max_batch:
            raise ValueError(f"{n} tokens in one call, at most {self.opts.max_batch}")
        n_out = int(np.count_nonzero(want))
        if n_out > len(self._logits):
            raise ValueError(f"{n_out} logits rows asked for, at most {len(self._logits)}")
        if slot.min() < 0 or slot.max() >= len(self._slots):
            raise ValueError(f"slot {int(slot.max())} out of range (0..{len(self._slots) - 1})")
        if ((tokens < 0) | (tokens >= self._logits.shape[1])).any():
            raise ValueError(f"a token id out of range (vocabulary {self._logits.shape[1]})")
        out = self._logits[:n_out]
        with self._lock:
            row, lo = 0, 0
            while lo < n:
                hi = lo + 1
                while hi < n and slot[hi] == slot[lo]:
                    hi += 1
                row = self._run(tokens[lo:hi], pos[lo:hi], int(slot[lo]), want[lo:hi], out, row)
                lo = hi
        return out

    def _run(self, tokens: np.ndarray, pos: np.ndarray, slot: int, want: np.ndarray,
             out: np.ndarray, row: int) -> int:
        """One slot's run: spans without logits through prefill, each wanted token through decode."""
        start = int(pos[0])
        if not np.array_equal(pos, np.arange(start, start + len(pos))):
            raise ValueError(f"slot {slot}: positions {pos.tolist()} are not consecutive")
        if start > self._filled[slot]:
            raise ValueError(f"slot {slot}: position {start} leaves a gap after its "
                             f"{self._filled[slot]} cached positions")
        if start + len(tokens) > self.n_ctx:
            raise ValueError(f"slot {slot}: positions up to {start + len(tokens) - 1}, "
                             f"past its context of {self.n_ctx}")
        vocab = self._logits.shape[1]
        lo = 0
        for i in np.flatnonzero(want):
            if i > lo:
                self._prefill(tokens[lo:i], slot, start + lo)
            out[row] = self._decode(int(tokens[i]), slot, start + int(i)).read(vocab, np.float32)
            row, lo = row + 1, int(i) + 1
        if lo < len(tokens):
            self._prefill(tokens[lo:], slot, start + lo)
        self._filled[slot] = start + len(tokens)  # what lay past it belonged to a sequence this one left
        return row

    def prefill(self, ids: list[int], start: int = 0, slot: int = 0, all_logits: bool = False) -> np.ndarray:
        from . import prefill_in_chunks

        batch = min(self.opts.max_batch, len(self._logits)) if all_logits else self.opts.max_batch
        return prefill_in_chunks(self, ids, batch, start, slot, all_logits)

    # ---- what the engine may do with a slot's cache

    def kv_shift(self, slot: int, keep: int, n_drop: int, n_used: int) -> None:
        raise EdgeSlmError("the litert backend cannot shift a full context (its graph writes the cache "
                           "at positions only); a full slot ends its answer")

    def kv_copy(self, src: int, dst: int, n: int) -> None:
        """dst's cache becomes src's first n positions (through numpy: LiteRT
        has no buffer-to-buffer copy; the engine does not call this today)."""
        with self._lock:
            if not 0 <= n <= self._filled[src]:
                raise ValueError(f"slot {src} holds {self._filled[src]} positions, not {n}")
            count = int(np.prod(self._m.kv_shape))
            for name in self._m.kv_names:
                self._slots[dst][name].write(self._slots[src][name].read(count, np.float32))
            self._filled[dst] = n

    def kv_usable(self, slot: int, n: int) -> int:
        return n  # every position is kept


def load_litert(path: Path) -> LiteRtSource:
    """Read a .tflite decoder and its sidecar, make its model (at the
    engine's default threads: runtime() reuses it when they match) and
    measure what that holds. A damaged, foreign or mismatched file is a
    ModelError in one line."""
    path = Path(path)
    doc, meta, cfg = read_sidecar(path, "litert")
    settings = doc.get("settings", {})
    kv_len = _whole(settings, "kv_len", sidecar_path(path), 2)
    size = settings.get("tflite_bytes")
    if size is not None and size != path.stat().st_size:
        raise ModelError(f"{path}: {path.stat().st_size} bytes, but its sidecar describes an export of "
                         f"{size} bytes: a sidecar of another model, or a truncated file")
    cfg = dataclasses.replace(cfg, context_length=kv_len)
    from ..engine import default_threads

    release_free_memory()
    before = current_rss()
    try:
        import ai_edge_litert.compiled_model  # noqa: F401  (its library is measured with the model)
    except ImportError:
        raise EdgeSlmError("running .tflite models needs ai-edge-litert: pip install 'edge-slm[litert]'") from None
    with _native_stderr_silenced():  # where LiteRT sets up its accelerators, lazily
        model = _Model(path, cfg, kv_len, default_threads())
        slot = model.slot_buffers()
        try:
            model.warm(dict(zip(model.kv_names, slot)))
        except RuntimeError as e:
            raise ModelError(f"{path}: LiteRT cannot run it ({_reason(e)})") from None
    grown = max(0, current_rss() - before)
    log.info("%s: LiteRT holds %.1f MiB after a first call of each signature (%.1f MiB of it one slot's "
             "cache)", path.name, grown / MIB, model.slot_bytes / MIB)
    return LiteRtSource(path, meta, cfg, settings, grown, (model, slot))
