from __future__ import annotations

import sys
import time
import uuid
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


@pytest.fixture
def service_factory(engine, mosquitto, tmp_path):
    """Starts in-process `edge-slm serve`s on the test's broker over the test
    module's `engine` fixture, each connected and subscribed, each with its
    own state directory; stops them at the end."""
    from firmware_bridge.service import Service, ServiceConfig

    made = []

    def make(**settings) -> Service:
        settings.setdefault("runtime_id", f"rt-{uuid.uuid4().hex[:6]}")
        settings.setdefault("status_interval_s", 0.5)
        cfg = ServiceConfig(broker=mosquitto.url, state_dir=tmp_path / f"state-{len(made)}", **settings)
        service = Service(engine, cfg).start()
        made.append(service)
        assert service.wait_connected(10)
        time.sleep(0.2)  # its subscriptions reach the broker
        return service

    yield make
    for service in made:
        service.stop()


@pytest.fixture
def service(service_factory):
    """One in-process service with the default settings."""
    return service_factory()
