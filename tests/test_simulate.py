"""The device simulator against a real mosquitto and the service on the real
model: its counts add up, and every question gets exactly one final."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_slm.engine import Engine, EngineConfig
from edge_slm.errors import EdgeSlmError
from firmware_bridge import protocol as p
from firmware_bridge.service import ServiceConfig
from firmware_bridge.simulate import MALFORMED_MIX, SimConfig, parse_mix, percentile, simulate

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "simulate-devices"


@pytest.fixture(scope="module")
def engine(real_model):
    e = Engine(EngineConfig(model=real_model, slots=2, ctx=512, threads=2, max_tokens=32, timeout=60))
    yield e
    e.close()


# Generous per-device limits: the simulator's devices ask faster than a real
# pump would, and `busy` would hide what is checked here.
FAST_DEVICES = dict(device_rate=100, device_burst=100, device_concurrency=8)


@pytest.fixture
def service(service_factory):
    return service_factory(**FAST_DEVICES)


def check_adds_up(report, service) -> None:
    assert report.sent == sum(report.by_kind.values()) == sum(report.outcomes.values())
    assert report.exactly_once and not report.missing and not report.duplicated and report.strays == 0
    assert report.well_formed_answered_once == report.well_formed
    assert not report.unexpected, report.outcomes
    # The service saw the same outcomes the devices did.
    statuses: dict[str, int] = {}
    for key, n in report.outcomes.items():
        statuses[key.split(":")[1]] = statuses.get(key.split(":")[1], 0) + n
    assert {k: v for k, v in service.stats.items() if k in p.STATUSES} == statuses


def test_closed_loop_mqtt5_with_every_kind(service, mosquitto):
    cfg = SimConfig(devices=3, concurrency=3, count=40, max_tokens=8, timeout=30,
                    mix=parse_mix("ok=30,malformed=25,oversized=15,expired=15,cancel=15"))
    report = simulate(ServiceConfig(broker=mosquitto.url), cfg)
    check_adds_up(report, service)
    assert set(report.by_kind) == {"ok", "malformed", "oversized", "expired", "cancel"}
    assert report.outcomes.get("malformed:bad_request") == report.by_kind["malformed"]
    assert report.outcomes.get("expired:expired") == report.by_kind["expired"]
    assert report.outcomes.get("cancel:cancelled", 0) >= 1
    assert {"oversized:bad_request", "oversized:too_long"} <= set(report.outcomes)
    assert report.well_formed < report.sent
    assert report.answers_per_s > 0 and report.tokens_per_s > 0
    assert report.first_chunk_ms["p50"] <= report.final_ms["p50"] <= report.final_ms["p95"]
    ok = [r for r in report.records if r["status"] == p.OK]
    assert sum(r["answer_tokens"] for r in ok) / report.wall_s == pytest.approx(report.tokens_per_s)


def test_open_loop_mqtt311_through_the_script(service, mosquitto, tmp_path):
    out = tmp_path / "sim.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--broker", mosquitto.url, "--mqtt311",
                           "--devices", "2", "--rate", "10", "--duration", "2", "--max-tokens", "8",
                           "--mix", MALFORMED_MIX, "--seed", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "every question answered exactly once: yes" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["exactly_once"] and doc["sent"] == len(doc["records"]) == sum(doc["outcomes"].values())
    assert 15 <= doc["sent"] <= 21  # 10/s for 2 s
    assert doc["config"]["mqtt5"] is False
    # Malformed ones whose id cannot be read: a 3.1.1 device learns of them only by count.
    assert doc["by_kind"]["malformed"] >= 1
    assert doc["outcomes"]["malformed:bad_request"] == doc["by_kind"]["malformed"]
    assert all(r["finals"] == 1 for r in doc["records"])


def test_a_final_never_sent_is_reported_missing(mosquitto):
    # No service: nobody answers, and the report must say so rather than pass.
    cfg = SimConfig(devices=1, concurrency=2, count=3, timeout=0.5)
    report = simulate(ServiceConfig(broker=mosquitto.url), cfg)
    assert not report.exactly_once and len(report.missing) == 3 and report.outcomes == {"ok:missing": 3}


def test_a_question_answered_twice_is_reported_duplicated(service_factory, mosquitto):
    # Two runtimes on one broker without a share group both take every question.
    service_factory(**FAST_DEVICES), service_factory(**FAST_DEVICES)
    report = simulate(ServiceConfig(broker=mosquitto.url), SimConfig(devices=1, concurrency=1, count=2,
                                                                    max_tokens=4, timeout=30))
    assert not report.exactly_once and sorted(report.duplicated) == sorted(r["id"] for r in report.records)
    assert report.answered_once == 0 and all(r["finals"] == 2 for r in report.records)


def test_mix_and_percentile():
    assert parse_mix("ok=70, cancel=10,ok=5") == {"ok": 75.0, "cancel": 10.0}
    for bad in ("ok", "nonsense=1", "ok=x", "ok=-1", "ok=0"):
        with pytest.raises(EdgeSlmError):
            parse_mix(bad)
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)
