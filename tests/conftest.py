from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TinySpec, write_tiny_model  # noqa: E402

from edge_slm.paths import default_model_path  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than the 15-minute `make test` budget allows")


_REPORT: list[str] = []


@pytest.fixture(scope="session")
def parity_report() -> list[str]:
    """Figures tests want shown in the run's summary (parity, agreement)."""
    return _REPORT


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("edge-slm figures")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    made: dict[TinySpec, Path] = {}

    def make(spec: TinySpec) -> Path:
        if spec not in made:
            made[spec] = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model.gguf", spec)
        return made[spec]

    return make


@pytest.fixture(scope="session")
def real_model() -> Path:
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"the reference model is missing at {path}: run `make setup` (edge-slm pull)")
    return path


@pytest.fixture
def mosquitto(tmp_path):
    """A real broker on a free loopback port, with persistence, for one test."""
    from firmware_bridge.broker import Mosquitto

    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()
