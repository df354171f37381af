"""ONNX Runtime over a decoder folder made by `edge-slm export --to onnx`
(edge_slm/export/onnx.py): a Source and Runtime pair behind the engine.

  FOLDER/model.onnx      input_ids, attention_mask, position_ids,
                         past_key_values.N.key / .value  ->  logits, present.N.key / .value
  FOLDER/edge-slm.json   the sidecar (edge_slm/backends/sidecar.py): shape, tokenizer, template

The graph concatenates a call's past KV with its new positions into present
(past + n positions), so each slot's cache is held in float32 buffers
allocated once and bound with IOBinding, never allocated per call:

  kv [n_slots + 1, 2 * n_layer, kv_heads * n_ctx * head_dim]

Row j of a buffer is layer j // 2's key (j even) or value; the first
kv_heads * used * head_dim floats of it are the contiguous tensor [1,
kv_heads, used, head_dim] that ONNX Runtime reads as past (a slice of a
[kv_heads, n_ctx, head_dim] layout would not be contiguous). present is
bound to the spare buffer's first kv_heads * (used + n) * head_dim floats;
after the call the spare holds the slot's cache and the slot's old buffer
becomes the spare: the buffers rotate, nothing is copied back.

What this backend does not do: batch slots together (each slot's tokens are
one session call of batch 1: caches of different lengths would have to be
copied into one padded tensor every call), shift a full context (the graph
has no op to re-rotate cached keys: an answer ends at the context instead),
or hold its cache in anything but float32. On CUDA or TensorRT the buffers
stay in host memory, so ONNX Runtime copies the KV to the device each call."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeSlmError, ModelError
from ..memory import MIB, current_rss, release_free_memory
from ..model import ModelConfig, RuntimeOptions
from . import EXECUTION_PROVIDERS, prefill_in_chunks
from .sidecar import SidecarMetadata, read_sidecar

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
KV_PARTS = ("key", "value")
FLOAT = 4  # bytes of a float32: the cache's and the logits' element
ARENA_BASE = 4 * MIB  # ONNX Runtime's arena's first region and its threads' buffers (measured ~2 MiB)
# ONNX Runtime's providers for each --execution-provider, in order of
# preference: nodes the first cannot run fall back to the next.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
# The exception types ONNX Runtime's bindings raise (none derives from another).
ORT_ERROR_NAMES = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
                   "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise EdgeSlmError("the onnx backend needs ONNX Runtime: pip install 'edge-slm[onnx]'") from None
    return onnxruntime


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, n) for n in ORT_ERROR_NAMES if hasattr(state, n)) + (RuntimeError,)


def _first_line(e: BaseException) -> str:
    """ONNX Runtime's message without its status prefix, first line only."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", lines[0])


def check_providers(ort: Any, provider: str) -> list[str]:
    """ONNX Runtime's provider list for --execution-provider `provider`,
    refused in one line when this build of ONNX Runtime lacks it."""
    if provider not in PROVIDERS:
        raise EdgeSlmError(f"execution provider {provider!r}: choose from {', '.join(EXECUTION_PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted[0] not in available:
        raise EdgeSlmError(
            f"execution provider {provider}: this ONNX Runtime ({ort.__version__}) has only "
            f"{', '.join(available)}; {wanted[0]} comes with onnxruntime-gpu (on a Jetson, "
            f"the onnxruntime-gpu wheel built for its JetPack)")
    return [p for p in wanted if p in available]


def check_available(provider: str) -> None:
    """--execution-provider `provider` refused in one line unless this ONNX Runtime has it."""
    check_providers(_ort(), provider)


def make_session(ort: Any, model_file: Path, n_threads: int, provider: str) -> Any:
    """An InferenceSession of model_file on `provider` with n_threads threads;
    a file ONNX Runtime cannot load is a ModelError in one line."""
    providers = check_providers(ort, provider)
    so = ort.SessionOptions()
    so.intra_op_num_threads = n_threads
    so.inter_op_num_threads = 1  # one node at a time: the decoder is a chain
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena stays on: measured on SmolLM2-135M, prefilling 2048 positions in
    # calls of 64 raised peak RSS 26 MiB with it and 273 MiB without it (each
    # node's output malloc'd and freed: glibc's heaps fragment and spike), and
    # it holds what it reached (26.5 MiB after 16 rounds of mixed prefill and
    # decode), which activation_bytes counts.
    so.enable_cpu_mem_arena = True
    # A memory pattern is traced per set of input shapes, and every call's past
    # is one position longer: it is never reused, only stored (+5 MiB measured).
    so.enable_mem_pattern = False
    # Fatal only: its warnings are about the graph, not the user's input, and
    # its errors reach the caller as ModelErrors in one line.
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(str(model_file), so, providers=providers)
    except _ort_errors() as e:
        raise ModelError(f"{model_file}: ONNX Runtime cannot load it: {_first_line(e)}") from None


def _kv_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{layer}.{part}" for layer in range(n_layer) for part in KV_PARTS]
    return past, [n.replace("past_key_values.", "present.", 1) for n in past]


def check_layout(session: Any, cfg: ModelConfig, where: Path) -> None:
    """The graph's inputs and outputs are the export's layout at the sidecar's
    shape (layers, KV heads, head size, vocabulary); a mismatch is refused."""
    sidecar = "edge-slm.json"
    ins = {i.name: i for i in session.get_inputs()}
    outs = {o.name: o for o in session.get_outputs()}
    graph_layers = sum(1 for n in ins if re.fullmatch(r"past_key_values\.\d+\.key", n))
    if graph_layers != cfg.n_layer:
        raise ModelError(f"{where}: the graph caches {graph_layers} layers, {sidecar} says {cfg.n_layer}: "
                         f"the sidecar is not this model's")
    past, present = _kv_names(cfg.n_layer)
    want_in = {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)",
               "position_ids": "tensor(int64)", **{n: "tensor(float)" for n in past}}
    want_out = {"logits": "tensor(float)", **{n: "tensor(float)" for n in present}}
    for kind, have, want in (("input", ins, want_in), ("output", outs, want_out)):
        for name, elem in want.items():
            if name not in have:
                raise ModelError(f"{where}: the graph has no {kind} {name}; edge-slm runs the layout "
                                 f"`edge-slm export --to onnx` writes")
            if have[name].type != elem:
                raise ModelError(f"{where}: {kind} {name} is {have[name].type}, expected {elem}")
        extra = sorted(set(have) - set(want))
        if extra:
            raise ModelError(f"{where}: the graph has an unexpected {kind} {extra[0]}")
    for name in past + present:
        shape = (ins.get(name) or outs[name]).shape
        if len(shape) != 4 or shape[1] != cfg.n_kv_head or shape[3] != cfg.head_dim:
            raise ModelError(f"{where}: {name} is {shape}, {sidecar} says [batch, {cfg.n_kv_head} KV heads, "
                             f"positions, head size {cfg.head_dim}]")
    shape = outs["logits"].shape
    if len(shape) != 3 or shape[2] != cfg.vocab:
        raise ModelError(f"{where}: logits are {shape}, {sidecar} says a vocabulary of {cfg.vocab}")


def activation_bytes(cfg: ModelConfig, n: int, total: int, fused_attention: bool = False) -> int:
    """What ONNX Runtime's arena reaches, besides the bound buffers, over
    calls of n tokens up to `total` positions (past + n). From the graph:
      the lm_head's [n, vocab] product (then copied into the bound logits);
      attention scores [n_head, n, total]: with GroupQueryAttention
      (`fused_attention`) one set of them at most (it holds less: measured on
      SmolLM2-135M at n = 64, the whole growth was 17.5, 17.7, 18.3 and 18.8
      MiB at 512, 1024, 2048 and 4096 positions, against 19.9, 21.1, 23.3 and
      27.8 here); in standard ops, the product, the masked copy
      (Where writes it in two passes) and Softmax's, ~3.5 of them live at
      once (measured with every allocation returned to the system), and the
      arena, extended in doubling regions, touches up to ~1.7 times that:
      6 in all; the masks, bool [n, total]; the key transposed for Q @ K^T
      [kv_heads, head_dim, total];
      the FFN's gate, up and product [n, hidden], Q, K, V [n, ...], the
      residual stream and normed copies [n, dim], int8 copies of MatMulNBits'
      inputs; and ARENA_BASE, its first region and the threads' buffers.
    Measured on SmolLM2-135M at n = 64: 20.1, 22.6, 25.8 and 53.0 MiB at
    512, 1024, 2048 and 4096 positions, against 26.0, 33.3, 47.7 and 76.6 here;
    the tests check it against a measurement."""
    hd, kvh = cfg.head_dim, cfg.n_kv_head
    logits = n * cfg.vocab * FLOAT
    if fused_attention:
        attention = cfg.n_head * n * total * FLOAT
    else:
        attention = 6 * cfg.n_head * n * total * FLOAT + 3 * n * total + kvh * hd * total * FLOAT
    rows = n * (4 * cfg.hidden_dim + 6 * cfg.dim + 2 * (cfg.n_head + 2 * kvh) * hd) * FLOAT
    return logits + attention + rows + ARENA_BASE


@dataclass
class OnnxSource:
    """An exported ONNX folder read far enough to plan and run it (the Source
    of edge_slm.backends). Its session is made at load, so that what the
    weights hold resident is measured, not guessed; the first runtime with
    the same threads and provider takes it over."""

    path: Path                  # the folder
    model_file: Path
    file: SidecarMetadata
    config: ModelConfig
    sidecar: dict[str, Any]
    loaded_bytes: int           # RSS growth over importing ONNX Runtime and making the session
    weight_types: dict[str, str]
    fused_attention: bool       # the graph's attention is GroupQueryAttention (the export's "attention")
    _session: Any = None
    _session_key: tuple[int, str] = (0, "cpu")  # its (threads, provider)
    _tokenizer: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    kind = "onnx"
    kv_types = ("f32",)

    @property
    def name(self) -> str:
        return str(self.file.get("general.name", self.path.name))

    @property
    def resident_weights(self) -> int:
        """What ONNX Runtime holds once the session is made (the weights as it
        packs them, its library), measured at load on the CPU provider."""
        return self.loaded_bytes

    def sha256(self) -> str:
        """Of model.onnx, then model.onnx.data if the weights are beside it."""
        digest = hashlib.sha256()
        for part in (self.model_file, self.model_file.with_name(self.model_file.name + ".data")):
            if part.is_file():
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
        return digest.hexdigest()

    def state_bytes(self, n_ctx: int, max_batch: int, n_threads: int, kv_type: str) -> tuple[int, int]:
        """(KV bytes of one slot, run-state bytes): the run state is the spare
        KV buffer, the logits of a call whose rows are not all wanted, and
        ONNX Runtime's activations for max_batch tokens at a full context."""
        _check_kv_type(kv_type)
        cfg = self.config
        kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * n_ctx * FLOAT
        activations = activation_bytes(cfg, max_batch, n_ctx, self.fused_attention)
        return kv, kv + max_batch * cfg.vocab * FLOAT + activations

    def tokenizer(self) -> Any:
        """Built once, from the sidecar's vocabulary."""
        from ..tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf(self.file)
            gc.collect()  # what building it left, so that its measured cost is what it keeps
            release_free_memory()
        return self._tokenizer

    def runtime(self, opts: RuntimeOptions) -> OnnxRuntime:
        _check_kv_type(opts.kv_type)
        if opts.n_ctx > self.config.context_length:
            # the graph's RoPE tables end there: a later position fails inside the session
            raise EdgeSlmError(f"context {opts.n_ctx}: this ONNX model's position tables stop at its "
                               f"trained context, {self.config.context_length}")
        check_providers(_ort(), opts.execution_provider)  # before the load's session is let go
        key = (opts.n_threads, opts.execution_provider)
        with self._lock:
            session, self._session = self._session, None
        if session is None or self._session_key != key:
            del session  # freed before the next one loads, not beside it
            gc.collect()
            session = make_session(_ort(), self.model_file, *key)
        return OnnxRuntime(session, self.config, opts, self.loaded_bytes)

    def describe(self) -> list[tuple[str, str]]:
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.name.startswith(self.model_file.name))
        types = "; ".join(f"{k} as {v}" for k, v in sorted(self.weight_types.items())) or "not recorded"
        source = self.sidecar.get("source", {})
        settings = ", ".join(f"{k} {v}" for k, v in sorted(self.sidecar.get("settings", {}).items()))
        return [("file", f"{self.model_file} ({size / MIB:.1f} MiB, ONNX, weights: {types})"),
                ("exported", f"from {source.get('name', '?')} (sha256 {str(source.get('sha256', '?'))[:16]}) "
                             f"by {self.sidecar.get('made_by', '?')}" + (f"; {settings}" if settings else "")),
                ("session", f"ONNX Runtime {_ort().__version__}, {self.loaded_bytes / MIB:.1f} MiB resident "
                            f"once loaded (measured)")]


def _check_kv_type(kv_type: str) -> None:
    if kv_type != "f32":
        raise EdgeSlmError(f"KV type {kv_type}: the onnx backend holds its cache in f32 only")


def load_onnx(path: Path) -> OnnxSource:
    """An exported ONNX folder (or its model.onnx): its sidecar read and
    checked against the graph, the session made with this machine's default
    threads on the CPU and its resident cost measured."""
    from ..engine import default_threads  # here: the engine imports this package

    path = Path(path)
    folder, model_file = (path.parent, path) if path.is_file() else (path, path / MODEL_FILE)
    doc, meta, cfg = read_sidecar(folder, "onnx")
    if not model_file.is_file():
        raise ModelError(f"{folder}: no {MODEL_FILE} in it")
    # Memory freed earlier but kept by the allocator would be reused by the
    # session unseen: handed back first, so that the growth is the session's.
    gc.collect()
    release_free_memory()
    before = current_rss()
    ort = _ort()
    threads = default_threads()
    session = make_session(ort, model_file, threads, "cpu")
    gc.collect()
    release_free_memory()  # what loading the protobuf left behind, handed back before measuring
    loaded = max(0, current_rss() - before)
    check_layout(session, cfg, model_file)
    props = session.get_modelmeta().custom_metadata_map
    try:
        weight_types = json.loads(props.get("weight_types", "{}"))
    except json.JSONDecodeError:
        weight_types = {}
    log.info("%s: ONNX Runtime %s session, %.1f MiB resident", model_file, ort.__version__, loaded / MIB)
    return OnnxSource(folder, model_file, meta, cfg, doc, loaded,
                      weight_types if isinstance(weight_types, dict) else {},
                      props.get("attention") == "GroupQueryAttention", session, (threads, "cpu"))


def _resident(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros written now, so that the pages are resident from the start, as
    the plan counts them (np.zeros maps pages that fill in on first write)."""
    a = np.empty(shape, dtype)
    a.fill(0)
    return a


class OnnxRuntime:
    """An ONNX Runtime session with every slot's KV cache in preallocated
    buffers (see the module's docstring), the Runtime of edge_slm.backends.

    forward() is serialised by a lock: one set of buffers, one caller at a time."""

    can_shift = False  # the graph cannot re-rotate cached keys
    kv_ring = 0        # every layer keeps the whole context

    def __init__(self, session: Any, cfg: ModelConfig, opts: RuntimeOptions, weight_bytes: int):
        self._ort = _ort()
        self._errors = _ort_errors()
        self._session = session
        self.cfg = cfg
        self.opts = opts
        self.weight_bytes = weight_bytes
        self.backend = f"onnxruntime {opts.execution_provider}"
        per_position = cfg.n_kv_head * cfg.head_dim
        self._past_names, self._present_names = _kv_names(cfg.n_layer)
        try:  # [n_slots + 1, 2 * n_layer, kv_heads * n_ctx * head_dim]
            self._kv = _resident((opts.n_slots + 1, 2 * cfg.n_layer, per_position * opts.n_ctx), np.float32)
        except MemoryError:
            raise EdgeSlmError(f"cannot allocate the KV cache for {opts.n_slots} slot(s) (and a spare) x "
                               f"{opts.n_ctx} tokens") from None
        self._owner = list(range(opts.n_slots))  # slot -> its buffer
        self._spare = opts.n_slots
        self._used = [0] * opts.n_slots          # positions each slot's cache holds
        self._ids = np.zeros(opts.max_batch, np.int64)        # [max_batch]: one call's input_ids
        self._positions = np.zeros(opts.max_batch, np.int64)  # [max_batch]: its position_ids
        self._mask = np.ones(opts.n_ctx, np.int64)            # [n_ctx]: attention_mask, sliced
        self._scratch = _resident((opts.max_batch, cfg.vocab), np.float32)  # a call's logits, rows not all wanted
        self._logits = _resident((opts.logits_rows, cfg.vocab), np.float32)  # the rows forward() returns
        self._binding = session.io_binding()
        self._lock = threading.Lock()

    def forward(self, tokens: np.ndarray, pos: np.ndarray, slot: np.ndarray,
                want: np.ndarray) -> np.ndarray:
        """Evaluate up to max_batch tokens, each slot's run of them in one
        session call; returns logits rows for want != 0, in order.

        The returned array is a view of a reused buffer: copy what you keep."""
        tokens, pos, slot = (np.asarray(a, dtype=np.int64) for a in (tokens, pos, slot))
        want = np.asarray(want) != 0
        if not len(tokens) == len(pos) == len(slot) == len(want):
            raise ValueError("tokens, pos, slot and want differ in length")
        if len(tokens) > self.opts.max_batch:
            raise ValueError(f"{len(tokens)} tokens in one call, at most {self.opts.max_batch}")
        if len(tokens) and not (0 <= tokens.min() and tokens.max() < self.cfg.vocab):
            raise ValueError(f"a token id outside the vocabulary of {self.cfg.vocab}")
        n_out = int(np.count_nonzero(want))
        if n_out > len(self._logits):
            raise ValueError(f"{n_out} logits rows asked for, at most {len(self._logits)}")
        out = self._logits[:n_out]
        if not len(tokens):
            return out
        edges = [0, *(np.flatnonzero(np.diff(slot)) + 1).tolist(), len(tokens)]
        with self._lock:
            row = 0
            for lo, hi in zip(edges[:-1], edges[1:]):
                row = self._run(tokens[lo:hi], pos[lo:hi], int(slot[lo]), want[lo:hi], out, row)
        return out

    def _run(self, tokens: np.ndarray, pos: np.ndarray, s: int, want: np.ndarray, out: np.ndarray,
             row: int) -> int:
        """One slot's consecutive tokens through the session; its wanted rows
        into out from `row`; returns the next row."""
        n, start = len(tokens), int(pos[0])
        if not 0 <= s < len(self._used):
            raise ValueError(f"slot {s}: there are {len(self._used)}")
        if start > self._used[s] or (pos != np.arange(start, start + n)).any():
            raise ModelError(f"slot {s}: positions {start}..{int(pos[-1])} do not continue its cache "
                             f"of {self._used[s]} positions")
        total = start + n
        if total > self.opts.n_ctx:
            raise ModelError(f"slot {s}: position {total - 1} is past the context of {self.opts.n_ctx}")
        if start < self._used[s]:  # a new request keeps the start of the slot's cache
            self._keep(s, start)
        self._ids[:n] = tokens
        self._positions[:n] = pos
        b, ov = self._binding, self._ort.OrtValue.ortvalue_from_numpy
        b.bind_ortvalue_input("input_ids", ov(self._ids[:n].reshape(1, n)))
        b.bind_ortvalue_input("position_ids", ov(self._positions[:n].reshape(1, n)))
        b.bind_ortvalue_input("attention_mask", ov(self._mask[:total].reshape(1, total)))
        past, present = self._kv[self._owner[s]], self._kv[self._spare]
        H, D = self.cfg.n_kv_head, self.cfg.head_dim
        for j, name in enumerate(self._past_names):
            b.bind_ortvalue_input(name, ov(past[j, :H * start * D].reshape(1, H, start, D)))
        for j, name in enumerate(self._present_names):
            b.bind_ortvalue_output(name, ov(present[j, :H * total * D].reshape(1, H, total, D)))
        wanted = np.flatnonzero(want)
        direct = len(wanted) == n  # every row wanted: written straight into the result
        logits = out[row:row + n] if direct else self._scratch[:n]
        b.bind_ortvalue_output("logits", ov(logits.reshape(1, n, self.cfg.vocab)))
        try:
            self._session.run_with_iobinding(b)
        except self._errors as e:
            raise ModelError(f"ONNX Runtime failed: {_first_line(e)}") from None
        if not direct:
            out[row:row + len(wanted)] = self._scratch[wanted]
        self._owner[s], self._spare = self._spare, self._owner[s]
        self._used[s] = total
        return row + len(wanted)

    def _copy(self, src: int, dst: int, n: int) -> None:
        """Slot src's first n positions into buffer dst, laid out for n."""
        L2, H, D = 2 * self.cfg.n_layer, self.cfg.n_kv_head, self.cfg.head_dim
        used = self._used[src]
        have = self._kv[self._owner[src], :, :H * used * D].reshape(L2, H, used, D)
        self._kv[dst, :, :H * n * D].reshape(L2, H, n, D)[...] = have[:, :, :n]

    def _keep(self, slot: int, n: int) -> None:
        """Keep the first n positions of slot's cache: repacked into the
        spare, which then becomes the slot's (a shorter cache is laid out
        differently, [H, n, D], so this one case copies)."""
        if n > self._used[slot]:
            raise ValueError(f"slot {slot} holds {self._used[slot]} positions, not {n}")
        self._copy(slot, self._spare, n)
        self._owner[slot], self._spare = self._spare, self._owner[slot]
        self._used[slot] = n

    def prefill(self, ids: list[int], start: int = 0, slot: int = 0, all_logits: bool = False) -> np.ndarray:
        """Feed ids at positions start.. in chunks; returns the last row of logits
        (or every row, [len(ids), vocab], when all_logits)."""
        batch = min(self.opts.max_batch, len(self._logits)) if all_logits else self.opts.max_batch
        return prefill_in_chunks(self, ids, batch, start, slot, all_logits)

    def kv_shift(self, slot: int, keep: int, n_drop: int, n_used: int) -> None:
        raise EdgeSlmError("the onnx backend cannot shift its cache")

    def kv_copy(self, src: int, dst: int, n: int) -> None:
        """Slot src's first n positions become slot dst's whole cache."""
        with self._lock:
            if n > self._used[src]:
                raise ValueError(f"slot {src} holds {self._used[src]} positions, not {n}")
            if src == dst:
                self._keep(src, n)
                return
            self._copy(src, self._owner[dst], n)
            self._used[dst] = n

    def kv_usable(self, slot: int, n: int) -> int:
        return n
