"""Engine settings from the config file, the environment and options."""

from __future__ import annotations

import os

import pytest
from test_cli import assert_one_line, edge_slm

from edge_slm.config import load_engine_config
from edge_slm.errors import EdgeSlmError
from edge_slm.memory import MIB


@pytest.fixture
def no_config_file(tmp_path, monkeypatch):
    """No $EDGE_SLM_CONFIG, and nothing at the default place under $EDGE_SLM_HOME."""
    monkeypatch.setenv("EDGE_SLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDGE_SLM_CONFIG", raising=False)


def test_file_then_environment_then_options(tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engine]\nmemory_budget = "300M"\nslots = 3\nkv_type = "q8_0"\n')
    monkeypatch.delenv("EDGE_SLM_MEMORY_BUDGET", raising=False)
    assert load_engine_config(path=cfg).memory_budget == 300 * MIB
    monkeypatch.setenv("EDGE_SLM_MEMORY_BUDGET", "256M")
    monkeypatch.setenv("EDGE_SLM_SLOTS", "2")
    c = load_engine_config(path=cfg)
    assert (c.memory_budget, c.slots, c.kv_type) == (256 * MIB, 2, "q8_0")
    c = load_engine_config({"slots": 1, "memory_budget": None}, path=cfg)
    assert (c.memory_budget, c.slots) == (256 * MIB, 1)


def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch, no_config_file):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[engine]\nslotz = 3\n")
    with pytest.raises(EdgeSlmError, match="unknown engine setting.*slotz"):
        load_engine_config(path=cfg)
    cfg.write_text("[engine\n")
    with pytest.raises(EdgeSlmError, match=str(cfg)):
        load_engine_config(path=cfg)
    monkeypatch.setenv("EDGE_SLM_SLOTS", "many")
    with pytest.raises(EdgeSlmError, match="slots"):
        load_engine_config()


@pytest.mark.parametrize("setting", [
    'kv_type = "q4"', "prefill_chunk = 0", "keep_tokens = -1", "min_ctx = 0", "ctx = 0",
    "memory_budget = -1", "memory_budget = true", "memory_budget = 0.5", 'memory_budget = "0"',
    "slots = 2.5", "threads = true", "timeout = 0", "max_tokens = 0", "queue_size = -1",
    'overflow = "drop"', "model = 5", 'kv_type = ["f16"]', "backend = 5", "threads = 100000",
    'memory_budget = "99999999999999999999G"', "slots = 100000", "max_batch = 100000"])
def test_settings_out_of_range_are_refused_by_name(tmp_path, monkeypatch, setting):
    for name in ("EDGE_SLM_MEMORY_BUDGET", "EDGE_SLM_SLOTS", "EDGE_SLM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[engine]\n{setting}\n")
    with pytest.raises(EdgeSlmError) as err:
        load_engine_config(path=cfg)
    message = str(err.value)
    assert message.startswith(f"setting {setting.split()[0]}:") and "\n" not in message


def test_settings_in_range_are_kept(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engine]\nqueue_size = 0\nkeep_tokens = 0\ntimeout = 5\nkv_type = "q8_0"\n')
    c = load_engine_config(path=cfg)
    assert (c.queue_size, c.keep_tokens, c.timeout, c.kv_type) == (0, 0, 5, "q8_0")


def test_engine_must_be_a_table(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("engine = 5\n")
    with pytest.raises(EdgeSlmError, match="engine must be a table"):
        load_engine_config(path=cfg)


def test_empty_environment_variables_are_unset(monkeypatch, no_config_file):
    monkeypatch.setenv("EDGE_SLM_CTX", "")
    monkeypatch.setenv("EDGE_SLM_MEMORY_BUDGET", "")
    c = load_engine_config()
    assert c.ctx is None and c.memory_budget is None


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(b"\xff\xfe[engine]\n")
    with pytest.raises(EdgeSlmError, match="config.toml"):
        load_engine_config(path=cfg)


def test_a_settings_file_named_but_missing_is_refused_by_path(tmp_path, monkeypatch):
    """A typo in $EDGE_SLM_CONFIG would otherwise run with none of its settings."""
    absent = tmp_path / "absent.toml"
    monkeypatch.setenv("EDGE_SLM_CONFIG", str(absent))
    with pytest.raises(EdgeSlmError, match=f"{absent}: no such settings file"):
        load_engine_config()
    with pytest.raises(EdgeSlmError, match=f"{absent}: no such settings file"):
        load_engine_config(path=absent)


def test_no_settings_file_at_the_default_place_is_fine(monkeypatch, no_config_file):
    monkeypatch.delenv("EDGE_SLM_SLOTS", raising=False)
    assert load_engine_config().slots == 4


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_settings_file_that_is_not_a_regular_file_is_refused_unread(kind, tiny_model, tmp_path):
    """Reading a FIFO would block for ever: refused before it is opened."""
    path = tmp_path / "config.toml"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    proc = edge_slm("info", str(tiny_model), env={"EDGE_SLM_CONFIG": str(path)}, timeout=60)
    assert_one_line(proc, 1, str(path), "not a regular file")


def test_more_cpus_than_the_thread_ceiling_still_configures(monkeypatch):
    from edge_slm.engine import MAX_THREADS, EngineConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(MAX_THREADS + 128)))
    assert EngineConfig().threads == MAX_THREADS
