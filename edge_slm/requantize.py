"""A model in other weight types, made by llama.cpp's own quantizer.

`edge-slm bench --types` and tests/test_parity_requantized.py compare the
two runtimes on one model in several weight types. Only the reference model
(Q4_1) is pinned; its other types are derived from it with llama.cpp's
quantizer (llama-cpp-python's llama_model_quantize), so each is the file a
llama.cpp user would make, type mixes included: llama.cpp's Q4_K_M of
SmolLM2 is mostly Q5_0, since rows of 576 are not whole K-quant
super-blocks. A derived file is kept beside the pulled model with a record
of what it was made from, and reused while the source's sha256 is the one
recorded and the file itself has not changed since it was made."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeSlmError
from .formats import MetaKind
from .paths import default_model_path, output_file
from .pull import file_sha256

log = logging.getLogger(__name__)

# llama.cpp's llama_ftype ids (llama.h), which a GGUF file declares as
# general.file_type, by the names its quantize tool takes, in lower case.
FILE_TYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25,
}

# (done, total) tensors, called while llama.cpp writes a file.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelVariant:
    """One weight type of a model: the file given, or one derived from it."""

    type: str                          # a FILE_TYPES name, or AS_GIVEN
    path: Path
    made_from: dict[str, Any] | None   # the record of a derived file (see requantize); None: as given


# The label of a file as given that declares no type we name.
AS_GIVEN = "as given"


def file_type(path: Path) -> str | None:
    """The weight type a GGUF file declares (general.file_type), by name;
    None where it declares none, or one not in FILE_TYPES."""
    from .model import GGUFFile

    ftype = GGUFFile(path).value("general.file_type", MetaKind.INT)
    return next((name for name, v in FILE_TYPES.items() if v == ftype), None)


def variant(source: Path, type_name: str, progress: Progress | None = None) -> ModelVariant:
    """`source` in weight type `type_name`: the file itself if it declares that
    type (or type_name is AS_GIVEN), else its requantized copy (made now, or reused)."""
    if type_name == AS_GIVEN or file_type(source) == type_name:
        return ModelVariant(type_name, source, None)
    if type_name not in FILE_TYPES:
        raise EdgeSlmError(f"weight type {type_name!r}: choose from {', '.join(FILE_TYPES)}")
    path, record = requantize(source, type_name, progress)
    return ModelVariant(type_name, path, record)


def requantized_path(source: Path, type_name: str) -> Path:
    """Where the copy of `source` in `type_name` is kept: beside the pulled model."""
    return default_model_path().parent / f"{source.stem}.requantized-{type_name.upper()}.gguf"


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".source.json")


def requantize(source: Path, type_name: str, progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """The copy of `source` in `type_name` and its record, made by llama.cpp's
    quantizer unless one made from the same bytes is there, unchanged."""
    dest = requantized_path(source, type_name)
    source_sha256 = file_sha256(source)
    current = _current_record(dest, source_sha256, type_name)
    if current is not None:
        log.info("%s: reusing %s", type_name, dest)
        return dest, current
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed once whole, so a failed or
    # interrupted run never leaves a file that looks finished.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        quantizer = llama_cpp_quantize(source, tmp, type_name, progress)
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the model from the service's user
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = dest.stat()
    record = {"source": str(source), "source_sha256": source_sha256, "type": type_name,
              "quantizer": quantizer, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with output_file(_record_path(dest)) as f:
        f.write((json.dumps(record, indent=2) + "\n").encode())
    return dest, record


def _current_record(dest: Path, source_sha256: str, type_name: str) -> dict[str, Any] | None:
    """dest's record if dest was made from these bytes in this type and has
    not changed since (same size and mtime); else None."""
    try:
        record = json.loads(_record_path(dest).read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    same = (record.get("source_sha256") == source_sha256 and record.get("type") == type_name
            and record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns)
    return record if same else None


# ---- llama.cpp's quantizer ----

# ggml_log_level (ggml.h) -> logging. Its warnings while quantizing only say
# which tensors fell back to another type (rows of 576 are not whole K-quant
# super-blocks), which the file's tensor types show: they are logged as info.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_LOG_CONT = 5
# llama.cpp starts each tensor's line with "[  12/ 272] name ..."
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
llama_log = logging.getLogger("edge_slm.llama_cpp")


class _LlamaLog:
    """Where llama.cpp's log goes while edge-slm drives it in this process:
    to Python logging, and its per-tensor lines to a progress callback.

    ctypes calls the callback on the thread that called into llama.cpp, so
    the state below needs no lock. The callback object must outlive every
    call llama.cpp may make to it, hence one per process, never freed."""

    def __init__(self, llama_cpp: Any):
        self.progress: Progress | None = None
        self.errors: list[str] = []
        self._level = logging.DEBUG
        self._callback = llama_cpp.llama_log_callback(self._log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != _LOG_CONT:
            self._level = _LOG_LEVELS.get(level, logging.DEBUG)
        line = text.decode(errors="replace").rstrip("\n")
        llama_log.log(self._level, "%s", line)
        if self._level >= logging.ERROR:
            self.errors.append(line)
        m = _TENSOR_LINE.match(line)
        if m and self.progress is not None:
            self.progress(int(m.group(1)), int(m.group(2)))


_llama_log: _LlamaLog | None = None


def llama_cpp_quantize(source: Path, dest: Path, type_name: str, progress: Progress | None) -> str:
    """Write `source` requantized to `type_name` at `dest` with llama.cpp's
    quantizer; returns what made it (for the record)."""
    global _llama_log
    try:
        import llama_cpp
    except ImportError:
        raise EdgeSlmError(f"making the {type_name} copy of {source.name} needs llama-cpp-python, "
                           "whose quantizer makes it (`make bench` installs it)") from None
    if _llama_log is None:
        _llama_log = _LlamaLog(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[type_name]
    params.allow_requantize = True  # the source is already quantized
    _llama_log.progress, _llama_log.errors = progress, []
    try:
        rc = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(dest), ctypes.byref(params))
    finally:
        _llama_log.progress = None
    if rc != 0:
        why = _llama_log.errors[-1] if _llama_log.errors else f"exit code {rc}"
        raise EdgeSlmError(f"llama.cpp could not requantize {source} to {type_name}: {why}")
    return f"llama.cpp's quantizer (llama-cpp-python {llama_cpp.__version__})"
