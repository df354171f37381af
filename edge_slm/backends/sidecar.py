"""The sidecar an export writes beside a model in another format: the GGUF's
metadata (shape, family, tokenizer, chat template), where the source came
from, and the export's own settings. ONNX and .tflite files hold the graph
and weights only; with the sidecar the engine runs them exactly as it runs
the GGUF they came from, tokenizer and template included.

  ONNX   FOLDER/edge-slm.json
  LiteRT NAME.tflite -> NAME.edge-slm.json beside it"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ModelError
from ..formats import MetaKind, metadata_value
from ..model import GGUFFile, ModelConfig, read_config

SIDECAR_VERSION = 1
# Metadata arrays not worth carrying: none of them is read outside the GGUF
# loader. Tokenizer arrays (tokens, merges, types, scores) are carried.
SKIPPED_PREFIXES = ("general.", )
KEPT_GENERAL = ("general.architecture", "general.name", "general.license")
MAX_SIDECAR_BYTES = 64 << 20  # a vocabulary of a million tokens fits; a bigger file is not ours


def sidecar_path(model: Path) -> Path:
    return model / "edge-slm.json" if model.is_dir() else model.with_suffix(".edge-slm.json")


def _plain(value: Any) -> Any:
    """A metadata value as JSON holds it (arrays read lazily become lists)."""
    if hasattr(value, "item_type") or isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value.item() if hasattr(value, "item") else value


def sidecar(source: GGUFFile, fmt: str, source_sha256: str, **settings: Any) -> dict[str, Any]:
    """The sidecar of an export of `source` to format `fmt`."""
    meta = {k: _plain(v) for k, v in source.metadata.items()
            if not k.startswith(SKIPPED_PREFIXES) or k in KEPT_GENERAL}
    return {"edge_slm_sidecar": SIDECAR_VERSION, "format": fmt, "made_by": f"edge-slm {__version__}",
            "source": {"name": source.path.name, "sha256": source_sha256},
            "settings": settings, "metadata": meta}


def write_sidecar(model: Path, doc: dict[str, Any]) -> Path:
    path = sidecar_path(model)
    path.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


class SidecarMetadata:
    """A sidecar's metadata, read as GGUFFile's is (get, value, path), so
    that read_config and Tokenizer.from_gguf take it unchanged."""

    def __init__(self, path: Path, metadata: dict[str, Any]):
        self.path = path
        self.metadata = metadata

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key)
        return default if value is None else value

    def value(self, key: str, kind: MetaKind, *, required: bool = False, default: Any = None) -> Any:
        return metadata_value(self.metadata, key, kind, str(self.path), required=required, default=default)


def read_sidecar(model: Path, fmt: str) -> tuple[dict[str, Any], SidecarMetadata, ModelConfig]:
    """The sidecar of a model in format `fmt`: (the document, its metadata, the
    model's shape). A missing, damaged or foreign one is a ModelError in one line."""
    path = sidecar_path(model)
    if not path.is_file():
        raise ModelError(f"{model}: no {path.name} beside it; edge-slm runs {fmt} models made by "
                         f"`edge-slm export --to {fmt}`, which writes it")
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise ModelError(f"{path}: {path.stat().st_size} bytes, too big to be an edge-slm sidecar")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable sidecar ({e})") from None
    if not isinstance(doc, dict) or doc.get("edge_slm_sidecar") != SIDECAR_VERSION:
        raise ModelError(f"{path}: not an edge-slm sidecar of version {SIDECAR_VERSION}")
    if doc.get("format") != fmt:
        raise ModelError(f"{path}: describes a {doc.get('format')!r} model, not {fmt}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(doc.get("settings", {}), dict):
        raise ModelError(f"{path}: its metadata is not an object")
    source = SidecarMetadata(path, meta)
    return doc, source, read_config(source)  # type: ignore[arg-type]
