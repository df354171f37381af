"""Model runtimes behind the engine: our C kernels over a GGUF file, ONNX
Runtime over an ONNX decoder folder, LiteRT over a .tflite file.

The engine talks to two objects, whichever format the model is in:

  a Source    the model as loaded: its shape (ModelConfig), its tokenizer,
              what its weights and per-slot state will cost (for the memory
              plan, before anything big is allocated), its name and sha256;
              runtime(opts) makes the Runtime
  a Runtime   forward() over a batch of tokens from any slots, logits out;
              a KV cache per slot held between calls; what it can do with a
              slot's cache (shift, copy, reuse)

edge_slm.model.LoadedModel / Transformer are the C kernels' pair; the
others live in onnx.py and litert.py, which import their library only when
a model in their format is loaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import EdgeSlmError, ModelError
from ..model import ModelConfig, RuntimeOptions

# The choices of --backend: "auto" goes by the file.
BACKENDS = ("auto", "gguf", "onnx", "litert")
# Where each backend can run its products, by --execution-provider; the C
# kernels and LiteRT (XNNPACK) run on the CPU only.
EXECUTION_PROVIDERS = ("cpu", "cuda", "tensorrt")
FORMAT_NAMES = {"gguf": "GGUF file", "onnx": "ONNX model", "litert": "LiteRT (.tflite) model"}


class Runtime(Protocol):
    """A model made to run: weights resident, a KV cache for each slot."""

    backend: str          # what runs it, for logs and benches: a kernel table, "onnxruntime cpu", ...
    weight_bytes: int     # weights it holds resident
    kv_ring: int          # positions a sliding-window layer keeps per slot (0: the whole context)
    can_shift: bool       # kv_shift works: a full context drops its oldest half and goes on

    def forward(self, tokens: np.ndarray, pos: np.ndarray, slot: np.ndarray,
                want: np.ndarray) -> np.ndarray:
        """Evaluate tokens[i] at position pos[i] of slot[i] (int32 arrays; a
        slot's tokens in order, continuing its cache); returns float32 logits
        rows for want[i] != 0, in order, as a view of a reused buffer."""

    def kv_shift(self, slot: int, keep: int, n_drop: int, n_used: int) -> None: ...

    def kv_copy(self, src: int, dst: int, n: int) -> None: ...

    def kv_usable(self, slot: int, n: int) -> int: ...


class Source(Protocol):
    """A model file (or folder) read far enough to plan and run it."""

    path: Path
    file: Any                 # its metadata, read by key: .get(key, default), .path
    config: ModelConfig
    kind: str                 # "gguf", "onnx", "litert"
    kv_types: tuple[str, ...]  # KV element types it can hold, the first its default
    loaded_bytes: int         # resident since loading began that is the weights' (a session
                              # made at load), so not counted again as the tokenizer's

    @property
    def name(self) -> str: ...

    @property
    def resident_weights(self) -> int:
        """Bytes its weights will hold resident once the runtime is made."""

    def sha256(self) -> str: ...

    def state_bytes(self, n_ctx: int, max_batch: int, n_threads: int, kv_type: str) -> tuple[int, int]:
        """(KV cache bytes of one slot, run-state bytes) at these sizes."""

    def tokenizer(self) -> Any: ...

    def runtime(self, opts: RuntimeOptions) -> Runtime: ...

    def describe(self) -> list[tuple[str, str]]:
        """What `edge-slm info` says of it beyond the model's shape: (label, text)
        lines, the first ("file") naming the path, its size and format."""


def detect(path: Path) -> str:
    """The backend a path's format calls for: a folder holding model.onnx is
    ONNX, a .tflite file LiteRT, anything else is read as GGUF."""
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return "onnx"
        raise ModelError(f"{path}: a folder, but no model.onnx in it (an ONNX model is a folder "
                         f"holding model.onnx; a GGUF or .tflite model is one file)")
    if path.suffix.lower() == ".tflite":
        return "litert"
    if path.suffix.lower() == ".onnx" and path.is_file():
        return "onnx"
    return "gguf"


def resolve(path: str | os.PathLike[str], backend: str = "auto") -> str:
    """The backend that runs the model at path: the one asked for, which must
    fit the file, or its format's."""
    path = Path(path)
    if backend not in BACKENDS:
        raise EdgeSlmError(f"backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if not path.exists():
        raise ModelError(f"{path}: no such model file or folder")
    found = detect(path)
    kind = found if backend == "auto" else backend
    if kind != found:
        raise ModelError(f"{path}: backend {kind} was asked for, but this is a {FORMAT_NAMES[found]} "
                         f"(use --backend {found} or auto)")
    return kind


def load_source(path: str | os.PathLike[str], backend: str = "auto") -> Source:
    """Read the model at path with the backend asked for (or its format's)."""
    kind = resolve(path, backend)
    loaders: dict[str, Callable[[Path], Source]] = {"gguf": _load_gguf, "onnx": _load_onnx,
                                                    "litert": _load_litert}
    return loaders[kind](Path(path))


def _load_gguf(path: Path) -> Source:
    from ..model import load_model

    return load_model(path)


def _load_onnx(path: Path) -> Source:
    from .onnx import load_onnx

    return load_onnx(path)


def _load_litert(path: Path) -> Source:
    from .litert import load_litert

    return load_litert(path)


def check_provider(name: str, kind: str) -> None:
    """Execution providers other than the CPU are ONNX Runtime's alone, and
    only where its build has them: checked before a model is loaded."""
    if name not in EXECUTION_PROVIDERS:
        raise EdgeSlmError(f"execution provider {name!r}: choose from {', '.join(EXECUTION_PROVIDERS)}")
    if name != "cpu" and kind != "onnx":
        raise EdgeSlmError(f"execution provider {name}: only the onnx backend runs on one; "
                           f"the {kind} backend runs on the CPU")
    if name != "cpu":
        from .onnx import check_available

        check_available(name)


def prefill_in_chunks(runtime: Runtime, ids: list[int], max_batch: int, start: int = 0, slot: int = 0,
                      all_logits: bool = False) -> np.ndarray:
    """Feed ids at positions start.. of slot in chunks of max_batch through
    runtime.forward; returns the last row of logits (or every row,
    [len(ids), vocab], when all_logits)."""
    if not ids:
        raise ValueError("nothing to evaluate")
    rows = []
    last = None
    for lo in range(0, len(ids), max_batch):
        chunk = np.asarray(ids[lo:lo + max_batch], dtype=np.int32)
        n = len(chunk)
        want = np.ones(n, np.uint8) if all_logits else np.zeros(n, np.uint8)
        if lo + n == len(ids):
            want[-1] = 1
        out = runtime.forward(chunk, np.arange(start + lo, start + lo + n, dtype=np.int32),
                              np.full(n, slot, np.int32), want)
        if all_logits:
            rows.append(out.copy())
        elif lo + n == len(ids):
            last = out[-1].copy()
    return np.concatenate(rows) if all_logits else last
