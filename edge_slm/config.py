"""Engine settings from three places, later ones winning: the config file
($EDGE_SLM_CONFIG, which must exist, or config.toml under $EDGE_SLM_HOME, if
there is one), environment
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

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def config_path() -> Path | None:
    """The settings file named by $EDGE_SLM_CONFIG, else the default one if it is there."""
    env = os.environ.get("EDGE_SLM_CONFIG")
    if env:
        return Path(env)
    default = home() / "config.toml"
    return default if os.path.lexists(default) else None


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """A setting from the file or the environment (where everything is text)
    as its field's type; the dataclass checks the ranges."""
    name, kind = field.name, str(field.type)
    if name == "memory_budget":
        if value in (None, "", "none"):
            return None
        try:
            return parse_size(value)
        except EdgeSlmError as e:
            raise EdgeSlmError(f"setting memory_budget: {e}") from None
    if "Path" in kind or "PathLike" in kind:
        if value in (None, ""):
            return None
        return Path(value) if isinstance(value, (str, os.PathLike)) else value  # the rest refused
    if isinstance(value, str):
        try:
            if kind.startswith("bool"):
                if value.lower() not in _TRUE + _FALSE:
                    raise ValueError
                return value.lower() in _TRUE
            if "int" in kind:
                return int(value)
            if "float" in kind:
                return float(value)
        except ValueError:
            raise EdgeSlmError(f"setting {name}: {value!r} is not a {kind.split()[0]}") from None
    return value


def _table(path: Path, name: str) -> dict[str, Any]:
    # Checked before opening, so that a FIFO cannot block the read.
    if not path.is_file():
        raise EdgeSlmError(f"{path}: no such settings file" if not path.exists()
                           else f"{path}: the settings file is not a regular file")
    try:
        table = tomllib.loads(path.read_text()).get(name, {})
    except OSError as e:
        raise EdgeSlmError(f"{path}: cannot read the settings file ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgeSlmError(f"{path}: {e}") from None
    if not isinstance(table, dict):
        raise EdgeSlmError(f"{path}: {name} must be a table ([{name}])")
    return table


def load_settings(cls: type, table: str, overrides: dict[str, Any] | None = None,
                  path: Path | None = None, private: tuple[str, ...] = ()):
    """A settings dataclass from the [table] of `path` (which must exist) or
    config_path(), then EDGE_SLM_<NAME> variables, then `overrides` that
    are not None. Fields in `private` come from `overrides` only."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in private}
    values: dict[str, Any] = {}
    path = path or config_path()
    if path is not None:
        found = _table(path, table)
        unknown = set(found) - set(fields)
        if unknown:
            raise EdgeSlmError(f"{path}: unknown {table} setting(s) {', '.join(sorted(unknown))}")
        values.update(found)
    for name in fields:
        env = os.environ.get(f"EDGE_SLM_{name.upper()}")
        if env:  # set and not empty
            values[name] = env
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cls(**{k: _coerce(fields[k], v) if k in fields else v for k, v in values.items()})


def load_engine_config(overrides: dict[str, Any] | None = None, path: Path | None = None) -> EngineConfig:
    """The engine's settings, from [engine] of the settings file, the environment and `overrides`."""
    # front_end_bytes is what a front end measures of itself, not a setting
    return load_settings(EngineConfig, "engine", overrides, path, private=("front_end_bytes",))
