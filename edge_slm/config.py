"""Engine settings from three places, later ones winning: the config file
($EDGE_SLM_CONFIG, or config.toml under $EDGE_SLM_HOME), environment
variables (EDGE_SLM_MEMORY_BUDGET and the like), and command-line options.

    # config.toml
    [engine]
    memory_budget = "256M"
    slots = 4
    kv_type = "q8_0"
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6's Ubuntu 22.04)
    import tomli as tomllib

from .engine import EngineConfig
from .errors import EdgeSlmError
from .memory import parse_size
from .paths import home

FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def config_path() -> Path:
    env = os.environ.get("EDGE_SLM_CONFIG")
    return Path(env) if env else home() / "config.toml"


def _coerce(name: str, value: Any) -> Any:
    """A setting from the file or the environment (where everything is text)
    as its field's type; EngineConfig checks the ranges."""
    if name == "memory_budget":
        if value in (None, "", "none"):
            return None
        try:
            return parse_size(value)
        except EdgeSlmError as e:
            raise EdgeSlmError(f"setting memory_budget: {e}") from None
    if name == "model":
        if value in (None, ""):
            return None
        return Path(value) if isinstance(value, (str, os.PathLike)) else value  # the rest refused
    if isinstance(value, str):
        kind = str(FIELDS[name].type)
        try:
            if "int" in kind:
                return int(value)
            if "float" in kind:
                return float(value)
        except ValueError:
            raise EdgeSlmError(f"setting {name}: {value!r} is not a number") from None
    return value


def load_engine_config(overrides: dict[str, Any] | None = None, path: Path | None = None) -> EngineConfig:
    values: dict[str, Any] = {}
    path = path or config_path()
    if path.exists():
        try:
            table = tomllib.loads(path.read_text()).get("engine", {})
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as e:
            raise EdgeSlmError(f"{path}: {e}") from None
        if not isinstance(table, dict):
            raise EdgeSlmError(f"{path}: engine must be a table ([engine])")
        unknown = set(table) - set(FIELDS)
        if unknown:
            raise EdgeSlmError(f"{path}: unknown engine setting(s) {', '.join(sorted(unknown))}")
        values.update(table)
    for name in FIELDS:
        env = os.environ.get(f"EDGE_SLM_{name.upper()}")
        if env:  # set and not empty
            values[name] = env
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return EngineConfig(**{k: _coerce(k, v) for k, v in values.items()})
