"""`edge-slm serve` and `edge-slm mqtt-ask` as a user runs them: the private
broker, the demo question, SIGTERM, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGE_SLM = str(Path(sys.executable).with_name("edge-slm"))


def run(*args, timeout=60, **kw):
    return subprocess.run([EDGE_SLM, *args], capture_output=True, text=True, timeout=timeout, **kw)


def one_line_error(proc, code):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture
def served(real_model, tmp_path):
    """`edge-slm serve --demo` with its private mosquitto; yields (process, port, stderr so far)."""
    proc = subprocess.Popen([EDGE_SLM, "serve", "--demo", "--model", str(real_model), "--slots", "2",
                             "--max-tokens", "48", "--memory-budget", "256M",
                             "--state-dir", str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err, port = [], None
    deadline = time.monotonic() + 90
    for line in proc.stderr:  # the demo ends with the paste-able commands, then "Ctrl-C stops."
        err.append(line)
        if m := re.search(r"private mosquitto on 127\.0\.0\.1:(\d+)", line):
            port = int(m.group(1))
        if "Ctrl-C stops." in line or time.monotonic() > deadline:
            break
    assert port, "".join(err)
    yield proc, port, "".join(err)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_demo_then_mqtt_ask_then_sigterm(served):
    proc, port, err = served
    assert "demo-pump asks over MQTT" in err and "[ok:" in err, err
    assert f"mosquitto_pub -h 127.0.0.1 -p {port}" in err
    broker = f"mqtt://127.0.0.1:{port}"
    asked = run("mqtt-ask", "--broker", broker, "--device", "press-3", "--max-tokens", "8", "Name a tool.")
    assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
    streamed = run("mqtt-ask", "--broker", broker, "--stream", "--mqtt311", "--json", "--max-tokens", "8", "Hi")
    assert streamed.returncode == 0 and '"status": "ok"' in streamed.stdout, streamed.stderr
    status = json.loads(subprocess.run(
        ["mosquitto_sub", "-p", str(port), "-t", "edge-slm/v1/_runtime/+/status", "-C", "1", "-W", "5"],
        capture_output=True, text=True, timeout=10).stdout)
    plan = status["memory_plan"]
    assert status["memory_budget"] == plan["budget"] == 256 << 20 and plan["front_ends"] > 1 << 20
    assert plan["total"] <= plan["budget"]
    with open(f"/proc/{proc.pid}/status") as f:  # the whole process, broker client and store included
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    assert peak <= plan["budget"], (peak, plan)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=40) == 0
    rest = proc.stderr.read()
    assert "draining" in rest
    with pytest.raises(OSError):  # the private broker went with it
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    out = proc.stdout.read()
    assert out.strip(), "the demo's answer goes to stdout"


def test_ctrl_c_stops_the_demo_cleanly(served):
    proc, port, err = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=40) == 0
    rest = proc.stderr.read()
    assert "Traceback" not in err + rest and "stopped: status offline" in rest, rest
    with pytest.raises(OSError):  # the private broker went with it
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_mqtt_ask_with_no_runtime_times_out_in_one_line(mosquitto):
    proc = run("mqtt-ask", "--broker", mosquitto.url, "--timeout", "1", "hello")
    assert "no final answer" in one_line_error(proc, 1)


@pytest.mark.parametrize("args, code, words", [
    (["serve", "--broker", "http://x:1"], 2, "expected mqtt://HOST:PORT"),
    (["serve", "--broker", "mqtt://x:99999"], 2, "port"),
    (["serve", "--broker", "mqtt://x:1883/path"], 2, "expected mqtt://HOST:PORT"),
    (["serve", "--broker", "mqtt://nowhere.invalid:1883"], 1, "nowhere.invalid"),
    (["serve", "--runtime-id", "a/b"], 2, "--runtime-id"),
    (["serve", "--share-group", "#"], 2, "--share-group"),
    (["serve", "--max-payload", "10"], 2, "--max-payload"),
    (["mqtt-ask", "--broker", "mqtt://127.0.0.1:1", "--timeout", "2", "hi"], 1, "broker"),
    (["mqtt-ask", "--device", "bad/id", "hi"], 1, "device id"),
    (["serve", "--password-file", "/nonexistent"], 2, "--password-file"),
])
def test_bad_options_are_one_line(args, code, words):
    assert words in one_line_error(run(*args), code)


def test_password_comes_from_a_file_or_the_environment(tmp_path):
    from firmware_bridge.commands import PASSWORD_ENV, password

    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    assert password(f) == "s3cret"
    os.environ[PASSWORD_ENV] = "from-env"
    try:
        assert password(None) == "from-env"
    finally:
        del os.environ[PASSWORD_ENV]
    assert password(None) is None


def test_serve_settings_from_the_file_then_the_environment_then_options(tmp_path, monkeypatch):
    from edge_slm.config import load_settings
    from edge_slm.errors import EdgeSlmError
    from firmware_bridge.service import ServiceConfig

    conf = tmp_path / "config.toml"
    conf.write_text('[serve]\nbroker = "mqtt://site:1883"\ndevice_rate = 0.5\nha_discovery = true\n'
                    'device_concurrency = 2\nstate_dir = "/var/lib/edge-slm"\n')
    monkeypatch.setenv("EDGE_SLM_CONFIG", str(conf))
    monkeypatch.setenv("EDGE_SLM_DEVICE_CONCURRENCY", "3")
    monkeypatch.setenv("EDGE_SLM_HA_DISCOVERY", "off")
    cfg = load_settings(ServiceConfig, "serve", {"device_rate": 4.0, "share_group": None,
                                                 "password": "pw"}, private=("password",))
    assert (cfg.broker, cfg.device_rate, cfg.device_concurrency, cfg.ha_discovery, cfg.password) == (
        "mqtt://site:1883", 4.0, 3, False, "pw")
    assert cfg.state_dir == Path("/var/lib/edge-slm")
    conf.write_text('[serve]\npassword = "in the file"\n')
    with pytest.raises(EdgeSlmError, match="unknown serve setting"):
        load_settings(ServiceConfig, "serve", private=("password",))
    monkeypatch.setenv("EDGE_SLM_DEVICE_RATE", "fast")
    conf.write_text("")
    with pytest.raises(EdgeSlmError, match="device_rate"):
        load_settings(ServiceConfig, "serve", private=("password",))


@pytest.mark.parametrize("field, value", [("device_rate", 0), ("device_burst", 2.5), ("receive_maximum", 0),
                                          ("max_payload", True), ("runtime_id", "a/b"),
                                          ("reply_scope", "edge-slm/v1/+/answer"), ("ha_discovery", "yes")])
def test_service_settings_are_range_checked(field, value):
    from edge_slm.errors import EdgeSlmError
    from firmware_bridge.service import ServiceConfig

    with pytest.raises(EdgeSlmError, match=field):
        ServiceConfig(**{field: value})
