"""The C client for firmware (firmware_bridge/examples/ask.c), built with its
Makefile into a temporary folder and run as a device against a real
mosquitto and the real service, with an observer on the device's topics to
see what it published and what it was answered."""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_slm.engine import Engine, EngineConfig
from firmware_bridge import protocol as p
from firmware_bridge.broker import Mosquitto, free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "firmware_bridge" / "examples"
DEVICE = "pump-7"
QUESTION = "What should I check first when a pump loses pressure?"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ask")
    subprocess.run(["make", "-s", "-C", str(EXAMPLES), f"BUILD={out}", "all", f"{out}/tiny_json_test"],
                   check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def engine(real_model):
    # One slot: the same question twice is then decoded the same way.
    e = Engine(EngineConfig(model=real_model, slots=1, ctx=512, threads=2, max_tokens=16, timeout=60))
    yield e
    e.close()


def ask(build: Path, port: int, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([str(build / "ask"), "-h", "127.0.0.1", "-p", str(port), "-d", DEVICE,
                           "-t", str(timeout), *args], capture_output=True, text=True, timeout=timeout + 10)


class Observer:
    """mosquitto_sub on all of the device's topics: (topic, message) pairs."""

    def __init__(self, broker):
        self.proc = subprocess.Popen(["mosquitto_sub", "-p", str(broker.port), "-t", f"{p.ROOT}/{DEVICE}/#",
                                      "-v", "-W", "60"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # subscribed before the device speaks

    def stop(self) -> list[tuple[str, dict]]:
        time.sleep(0.3)  # the last messages reach it
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return [(topic, json.loads(payload)) for topic, payload in
                (line.split(" ", 1) for line in out.splitlines())]


def answered(seen: list[tuple[str, dict]], question: str) -> tuple[dict, list[dict], dict]:
    """The question as the service received it, its chunks and its one final."""
    (asked,) = [m for t, m in seen if t == p.ask_topic(DEVICE)]
    assert asked["question"] == question and set(asked) == {"id", "question", "stream"}
    answers = [m for t, m in seen if t == p.answer_topic(DEVICE)]
    assert all(m["id"] == asked["id"] for m in answers)
    (final,) = [m for m in answers if m.get("final")]
    return asked, [m for m in answers if "seq" in m], final


class ScriptedPeer:
    """Plays the service's side from a script, to make what the real one
    only does by chance: chunks interleaved with other questions' answers,
    a lost chunk, every string \\u-escaped (json.dumps' default)."""

    def __init__(self, broker):
        self.questions: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="scripted-peer")
        self.client.on_message = lambda c, u, msg: self.questions.put(json.loads(msg.payload))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe(p.ask_topic(DEVICE), qos=1)
        time.sleep(0.3)  # subscribed before the device speaks

    def send(self, answer: dict) -> None:
        self.client.publish(p.answer_topic(DEVICE), json.dumps(answer), qos=1 if answer.get("final") else 0)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def read_until(stream, want: bytes, timeout: float = 10) -> bytes:
    got, deadline = b"", time.monotonic() + timeout
    while want not in got and (left := deadline - time.monotonic()) > 0:
        if select.select([stream], [], [], left)[0]:
            piece = os.read(stream.fileno(), 4096)
            if not piece:
                break
            got += piece
    return got


def test_the_json_reader_passes_its_checks(build):
    run = subprocess.run([str(build / "tiny_json_test")], capture_output=True, text=True, timeout=10)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(", 0 failed") and int(run.stdout.split()[1]) >= 70


def test_a_question_answered_whole_then_streamed_prints_the_same_text(build, service, mosquitto):
    watch = Observer(mosquitto)
    whole = ask(build, mosquitto.port, QUESTION)
    streamed = ask(build, mosquitto.port, "-s", QUESTION)
    seen = watch.stop()
    assert whole.returncode == 0 and streamed.returncode == 0, (whole.stderr, streamed.stderr)
    assert whole.stderr == streamed.stderr == ""

    first, second = [m for t, m in seen if t == p.ask_topic(DEVICE)]
    assert first["stream"] is False and second["stream"] is True and first["id"] != second["id"]
    by_id = {rid: [m for t, m in seen if t == p.answer_topic(DEVICE) and m["id"] == rid]
             for rid in (first["id"], second["id"])}
    (final,) = by_id[first["id"]]
    assert final["final"] is True and final["status"] == p.OK and final["text"].strip()
    assert whole.stdout == final["text"] + "\n"

    chunks = [m for m in by_id[second["id"]] if not m.get("final")]
    assert len(chunks) >= 2 and by_id[second["id"]][-1]["text"] == final["text"]
    assert streamed.stdout == whole.stdout


def test_a_question_that_needs_escaping_arrives_intact(build, service, mosquitto):
    question = 'He wrote "Druck 5 bar – prüfen" \\ then:\nnext line\ta tab \x1f and 😀?'
    watch = Observer(mosquitto)
    run = ask(build, mosquitto.port, "-s", question)
    asked, chunks, final = answered(watch.stop(), question)
    assert run.returncode == 0, run.stderr
    assert asked["stream"] is True and final["status"] == p.OK
    assert run.stdout == "".join(c["text"] for c in chunks) + "\n" == final["text"] + "\n"


@pytest.mark.parametrize("lost", [False, True], ids=["in-order", "chunk-lost"])
def test_chunks_are_printed_as_they_arrive_and_only_ours(build, mosquitto, lost):
    peer = ScriptedPeer(mosquitto)
    proc = subprocess.Popen([str(build / "ask"), "-p", str(mosquitto.port), "-d", DEVICE, "-s", "-t", "20",
                             QUESTION], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rid = peer.questions.get(timeout=10)["id"]
        peer.send({"id": "someone-else", "seq": 0, "text": "NOT OURS "})
        peer.send({"id": rid, "seq": 0, "text": "Prüf "})
        # Shown before anything else is sent: not held back until the final.
        assert read_until(proc.stdout, "Prüf ".encode()) == "Prüf ".encode()
        peer.send({"id": rid, "seq": 2 if lost else 1, "text": "den Druck"})
        peer.send({"id": "someone-else", "final": True, "status": "busy", "text": ""})
        peer.send({"text": "not an answer", "final": True, "status": "ok"})
        peer.send({"id": rid, "final": True, "status": "ok", "text": "Prüf den Druck 😀",
                   "model": {"id": "nested", "status": "error"}, "note": '"id": "x", "final": true'})
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        peer.close()
    assert proc.returncode == 0, err
    if lost:
        assert err == b"ask: a streamed chunk was lost; the whole answer follows\n"
        assert out.decode() == "den Druck\nPrüf den Druck 😀\n"
    else:
        assert err == b"" and out.decode() == "den Druck 😀\n"


@pytest.mark.parametrize("question, error", [
    ("   ", "question is empty"),
    # Refused before its id could be read: the final's id is null.
    ("x" * (p.MAX_PAYLOAD + 100), f"bytes, more than {p.MAX_PAYLOAD}"),
], ids=["empty", "oversized"])
def test_a_refused_question_exits_1_with_the_status(build, service, mosquitto, question, error):
    run = ask(build, mosquitto.port, question)  # refused without running the model
    assert run.returncode == 1 and run.stdout == "\n"
    assert run.stderr.startswith(f"status: {p.BAD_REQUEST}: ") and error in run.stderr
    assert len(run.stderr.splitlines()) == 1


def test_no_service_is_a_timeout_exit_2(build, mosquitto):
    run = ask(build, mosquitto.port, QUESTION, timeout=1)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "ask: no final answer (is edge-slm serve running?) within 1 s\n"


def test_no_broker_is_exit_2_with_one_line(build):
    run = ask(build, free_port(), QUESTION)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("ask: cannot reach the broker at 127.0.0.1:") and "refused" in run.stderr
    assert len(run.stderr.splitlines()) == 1


@pytest.mark.parametrize("password, line", [
    ("s3cret", "ask: no final answer (is edge-slm serve running?) within 1 s"),
    ("wrong", "refused the connection: Connection Refused: not authorised."),
], ids=["right", "wrong"])
def test_the_user_and_password_reach_the_broker(build, tmp_path, password, line):
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "passwd"), DEVICE, "s3cret"], check=True,
                   timeout=10)
    with Mosquitto(tmp_path / "broker", extra_config=f"password_file {tmp_path / 'passwd'}") as broker:
        run = ask(build, broker.port, "-u", DEVICE, "-P", password, QUESTION, timeout=1)
    assert run.returncode == 2 and run.stderr.endswith(line + "\n") and len(run.stderr.splitlines()) == 1
