"""`edge-slm serve` under faults, as a real process: kill -9 and restart, the
broker stopped or killed mid-stream, the state directory full or unusable,
SIGTERM's drain. A real mosquitto, the real model, devices as real MQTT 5
clients. What is checked is what the delivery guarantees promise: every
accepted question gets its final answer, none is computed twice, nothing is
acknowledged before it is on disk."""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware_bridge import protocol as p
from firmware_bridge.broker import Mosquitto
from firmware_bridge.client import DeviceClient
from firmware_bridge.service import ServiceConfig, make_client

EDGE_SLM = str(Path(sys.executable).parent / "edge-slm")
RUNTIME = "rt-faults"
QUESTIONS = ["What should I check first when a pump loses pressure?", "Name one valve type.",
             "How do I bleed air from a hydraulic line?", "Why does a motor overheat?"]
STORY = "Write a long story about a pump."
STORY_TOKENS = 400  # long enough to outlive a pause, a kill or a broker outage on a busy machine
# ... and a broker outage on a quiet fast one too: the restart and paho's 1 s
# before reconnecting take ~1.5 s, 400 tokens on one slot of a Zen 5 core ~0.9 s
OUTAGE_TOKENS = 1500

Answers = list[tuple[dict, mqtt.MQTTMessage]]


class StatusWatcher:
    """The runtime's retained status topic, read as a monitoring system would."""

    def __init__(self, broker: Mosquitto):
        self.states: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.states.put(json.loads(msg.payload)["state"])
        self.client.on_connect = lambda c, u, f, r, props: c.subscribe(p.status_topic(RUNTIME), qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def wait(self, state: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode} before it was {state}")
            try:
                if self.states.get(timeout=0.2) == state:
                    return
            except queue.Empty:
                pass
        raise AssertionError(f"the runtime's status was not {state} within {timeout} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Serve:
    """`edge-slm serve` as a real process, started again with the same state
    directory and runtime id; each run's stderr goes to its own file."""

    def __init__(self, broker: Mosquitto, state_dir: Path, logs: Path, *options: str, max_tokens: int = 32):
        self.args = [EDGE_SLM, "serve", "--broker", broker.url, "--state-dir", str(state_dir),
                     "--runtime-id", RUNTIME, "--slots", "2", "--max-tokens", str(max_tokens),
                     "--memory-budget", "300M", *options]
        self.state_dir, self.logs = state_dir, logs
        self.watcher = StatusWatcher(broker)
        self.runs = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> Serve:
        self.runs += 1
        with open(self.log_path, "w") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        self.watcher.wait("online", 60, self.proc)
        return self

    @property
    def log_path(self) -> Path:
        return self.logs / f"serve-{self.runs}.log"

    def log(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log() if text in line]

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.lines(text):
            assert time.monotonic() < deadline, f"no {text!r} in serve's log:\n" + "\n".join(self.log())
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.watcher.close()

    def wait_rows(self, check: Callable[[dict], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check(rows := self.rows()):
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)

    def rows(self) -> dict[tuple[str, str], tuple[str, bytes | None, float | None]]:
        """(state, final, finished_at) of each stored question, read from the
        store's file as the next start would read it."""
        db = sqlite3.connect(self.state_dir / "questions.sqlite3")
        try:
            return {(d, i): (s, f, t) for d, i, s, f, t in
                    db.execute("SELECT device, id, state, final, finished_at FROM questions")}
        finally:
            db.close()


@pytest.fixture
def serve_factory(tmp_path, real_model):
    made: list[Serve] = []

    def make(broker: Mosquitto, state_dir: Path | None = None, *options: str, **kw) -> Serve:
        made.append(Serve(broker, state_dir or tmp_path / "state", tmp_path, *options, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def device(broker: Mosquitto, name: str) -> DeviceClient:
    return DeviceClient(ServiceConfig(broker=broker.url), name)


class SessionDevice(DeviceClient):
    """A device as careful firmware is written: a fixed client id and a
    persistent session, so the broker keeps its subscription and queues its
    answers while it is away, through a broker restart too; paho reconnects by
    itself, and the device subscribes again only if its session was lost."""

    def __init__(self, broker: Mosquitto, name: str):
        self.device, self.mqtt5 = name, True
        self.reply_topic = f"{p.answer_topic(name)}/session"
        self._inbox: queue.Queue = queue.Queue()
        self.sessions: queue.Queue = queue.Queue()  # session_present of each connection
        subscribed: queue.Queue = queue.Queue()
        self.client = make_client(f"{name}-session", ServiceConfig(broker=broker.url))
        self.client.manual_ack_set(False)
        self.client.on_message = lambda c, u, msg: self._inbox.put(msg)
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)

        def on_connect(client, userdata, flags, reason, props):
            if not flags.session_present:
                client.subscribe(self.reply_topic, qos=1)
            self.sessions.put(flags.session_present)

        self.client.on_connect = on_connect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.sessions.get(timeout=10) is False
        subscribed.get(timeout=10)


def gather(devices: list[DeviceClient], got: Answers, until: Callable[[Answers], bool], timeout: float) -> None:
    """Read every device's answers into `got` until `until(got)` holds (or
    the time is up: the asserts after say what was missing)."""
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        for d in devices:
            got.extend(d.messages(0.02))


def finals(got: Answers) -> dict[str, list[mqtt.MQTTMessage]]:
    out: dict[str, list[mqtt.MQTTMessage]] = {}
    for answer, msg in got:
        if answer.get("final"):
            out.setdefault(answer["id"], []).append(msg)
    return out


def chunked(got: Answers) -> set[str]:
    return {a["id"] for a, _ in got if not a.get("final")}


def all_final(ids: Iterable[str]) -> Callable[[Answers], bool]:
    return lambda got: set(ids) <= set(finals(got))


def test_kill_9_with_questions_queued_and_running_then_restart(serve_factory, mosquitto):
    """Every accepted question is answered, and each final is computed once:
    a question answered before the kill is not run again after the restart
    (its stored final is what the device gets, and gets again only if the
    broker had not acknowledged it), and every copy a device receives is
    byte for byte the one final in the store. The broker is paused before the
    kill, so some finals are sure to be stored and not yet acknowledged."""
    serve = serve_factory(mosquitto, None, max_tokens=STORY_TOKENS).start()
    devices = [device(mosquitto, f"dev-{n}") for n in range(3)]
    owner = {}
    got: Answers = []
    try:
        for n in range(8):
            d = devices[n % 3]
            owner[f"k{n}"] = d.device
            # The last two are long, so they are still pending when the kill comes.
            d.send({"id": f"k{n}", "question": STORY if n >= 6 else QUESTIONS[n % 4], "stream": True,
                    "max_tokens": STORY_TOKENS if n >= 6 else 16})
        gather(devices, got, lambda g: len(finals(g)) >= 2 and chunked(g) - set(finals(g)), 30)
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            # Acknowledgements the broker sent before it stopped land first, so an
            # "answered" row seen after this stays unacknowledged until the kill.
            time.sleep(0.5)
            serve.wait_rows(lambda rows: {"answered", "pending"} <= {s for s, _, _ in rows.values()}, 20)
            serve.kill()
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        killed_at = time.time()
        serve.watcher.wait("offline", 10)  # the Last Will
        at_kill = {k: v[0] for k, v in serve.rows().items()}
        states = list(at_kill.values())
        assert states.count("delivered") >= 2 and "answered" in states and "pending" in states, at_kill

        for n in range(2):  # the broker keeps these for the runtime's persistent session
            owner[f"down{n}"] = devices[n].device
            devices[n].send({"id": f"down{n}", "question": QUESTIONS[n], "max_tokens": 16})
        gather(devices, got, lambda g: False, 0.3)  # what the broker still had from the first run
        restarted_at = time.time()
        serve.start()
        gather(devices, got, all_final(owner), 60)
        gather(devices, got, lambda g: False, 1.0)  # a second copy would come now
        assert serve.terminate() == 0
    finally:
        for d in devices:
            d.close()

    rows = serve.rows()
    copies = finals(got)
    assert set(copies) == set(owner)
    for rid, msgs in copies.items():
        key = (owner[rid], rid)
        state, stored, finished_at = rows[key]
        assert state == "delivered" and json.loads(stored)["status"] == p.OK
        assert all(m.payload == stored for m in msgs), rid  # one computation, sent as stored
        assert all(m.properties.CorrelationData == rid.encode() for m in msgs)
        if at_kill.get(key) == "delivered":
            assert len(msgs) == 1, rid
        else:  # at least once: again if the broker's acknowledgement was lost in the kill
            assert len(msgs) <= 2, rid
        if at_kill.get(key, "pending") != "pending":
            assert finished_at < killed_at, f"{rid} was answered before the kill and computed again"
        else:
            assert finished_at > restarted_at, rid
    pending = sum(1 for s in at_kill.values() if s == "pending")
    assert serve.lines(f"{pending} question(s) accepted before the restart are answered first")


@pytest.mark.parametrize("crash", [False, True], ids=["stopped", "killed"])
def test_broker_restart_mid_stream(serve_factory, tmp_path, crash):
    """The broker goes away while an answer streams: the service keeps
    generating, reconnects (one log line for the loss, one for the return),
    and the device, whose persistent session the broker kept, gets the rest
    of the stream and its final; then a new question is answered. Killed,
    the broker has only what it last saved; it saves on SIGUSR1, so the
    sessions are in that file and the test does not race its autosave."""
    broker = Mosquitto(tmp_path / "broker").start()
    # Long enough that the stream outlives the outage and paho's 1 s before reconnecting.
    serve = serve_factory(broker, None, max_tokens=OUTAGE_TOKENS).start()
    d = SessionDevice(broker, "pump-1")
    try:
        if crash:
            saved = broker.folder / "mosquitto.db"
            os.kill(broker.proc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not saved.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        d.send({"id": "s1", "question": STORY, "stream": True, "max_tokens": OUTAGE_TOKENS})
        before: Answers = []
        gather([d], before, lambda g: bool(g), 30)
        assert before and not finals(before)
        broker.kill() if crash else broker.stop()
        broker = Mosquitto(broker.folder, port=broker.port).start()
        after: Answers = []
        gather([d], after, all_final(["s1"]), 60)
        assert d.sessions.get(timeout=1) is True  # the broker kept the device's session
        assert d.ask("Name one valve type.", timeout=30)["status"] == p.OK
        assert serve.terminate() == 0
    finally:
        d.close()
        broker.stop()

    (final, _), = [m for m in after if m[0].get("final")]
    assert final["status"] == p.OK
    # Chunks are QoS 0 and not sent while disconnected: the seq numbers show
    # the outage as one gap, with the stream going on after it.
    chunks = [a for a, _ in before + after if not a.get("final")]
    seqs = [c["seq"] for c in chunks]
    gap = next(n for n in range(1, len(seqs) + 1) if n == len(seqs) or seqs[n] != seqs[n - 1] + 1)
    early, late = chunks[:gap], chunks[gap:]
    assert seqs[0] == 0 and late and seqs == sorted(seqs), seqs
    assert seqs[gap:] == list(range(seqs[gap], seqs[gap] + len(late))), seqs
    assert final["text"].startswith("".join(c["text"] for c in early))
    assert final["text"].endswith("".join(c["text"] for c in late))
    assert len(serve.lines("lost the broker")) == 1, serve.log()
    connects = serve.lines("connected to")
    assert len(connects) == 2 and "session resumed" in connects[1], serve.log()


def test_an_answer_finished_while_the_broker_is_away_is_sent_when_it_is_back(serve_factory, tmp_path):
    """The final is computed while there is no broker: it is stored, sent
    once the service has reconnected, and marked delivered when the broker
    acknowledges it."""
    broker = Mosquitto(tmp_path / "broker").start()
    serve = serve_factory(broker, None, max_tokens=96).start()
    d = SessionDevice(broker, "pump-2")
    key = ("pump-2", "o1")
    try:
        d.send({"id": "o1", "question": STORY, "stream": True, "max_tokens": 96})
        gather([d], [], lambda g: bool(g), 30)  # it is running
        broker.stop()
        serve.wait_rows(lambda rows: rows[key][0] == "answered", 30)  # done, and unsent
        broker = Mosquitto(broker.folder, port=broker.port).start()
        after: Answers = []
        gather([d], after, all_final(["o1"]), 60)
        serve.wait_rows(lambda rows: rows[key][0] == "delivered", 10)
        assert serve.terminate() == 0
    finally:
        d.close()
        broker.stop()
    (final, msg), = [m for m in after if m[0].get("final")]
    assert final["status"] == p.OK and msg.payload == serve.rows()[key][1]
    assert len(serve.lines("lost the broker")) == 1 and len(serve.lines("connected to")) == 2, serve.log()


def fill(folder: Path) -> Path:
    """A file that takes every free byte of `folder`'s file system."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def small_state_dir(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


def test_state_dir_full_questions_wait_unacknowledged(serve_factory, mosquitto, small_state_dir):
    """A full state directory: questions are neither acknowledged nor lost,
    and the log says so once. Killed then, the service gets them again from
    the broker (proof they were not acknowledged); left running, it stores
    and answers them once space is freed."""
    serve = serve_factory(mosquitto, small_state_dir).start()
    refused = "cannot store questions"
    with device(mosquitto, "tank-3") as d:
        filler = fill(small_state_dir)
        for rid in ("f0", "f1"):
            d.send({"id": rid, "question": QUESTIONS[0], "max_tokens": 8})
        serve.wait_log(refused, 10)
        assert not d.messages(2.5)  # the service tries again each second, quietly
        assert len(serve.lines(refused)) == 1 and "disk is full" in serve.lines(refused)[0], serve.log()
        serve.kill()
        filler.unlink()
        assert not serve.rows()
        serve.start()
        assert all(m[0]["status"] == p.OK for m in d.messages(30, {"f0", "f1"}) if m[0].get("final"))
        serve.wait_rows(lambda rows: {k[1]: s for k, (s, _, _) in rows.items()}
                        == {"f0": "delivered", "f1": "delivered"}, 10)

        filler = fill(small_state_dir)
        for rid in ("f2", "f3", "f4"):
            d.send({"id": rid, "question": QUESTIONS[1], "max_tokens": 8})
        serve.wait_log(refused, 10)
        assert not d.messages(2.5)
        assert {k[1] for k in serve.rows()} == {"f0", "f1"}
        filler.unlink()
        got = finals(d.messages(30, {"f2", "f3", "f4"}))
    assert serve.terminate() == 0
    assert set(got) == {"f2", "f3", "f4"} and all(len(m) == 1 for m in got.values())
    assert all(json.loads(m[0].payload)["status"] == p.OK for m in got.values())
    assert len(serve.lines(refused)) == 1, serve.log()
    assert len(serve.lines("the state directory is writable again: 3 question(s) stored")) == 1, serve.log()
    assert {s for s, _, _ in serve.rows().values()} == {"delivered"}


def test_state_dir_full_while_answering_then_asked_again(serve_factory, mosquitto, small_state_dir):
    """The disk fills while a question runs: its final still goes out, the
    log says it was not saved, and its row stays pending. Asked again then
    (a firmware retry), it is held with the other questions the full disk
    refused; once space is free, it must not block them: it is on disk
    already, so it is acknowledged and answered with them."""
    serve = serve_factory(mosquitto, small_state_dir).start()
    with device(mosquitto, "tank-4") as d:
        d.send({"id": "r0", "question": STORY, "stream": True})
        gather([d], [], lambda g: bool(g), 30)
        filler = fill(small_state_dir)
        assert d.wait_final("r0", 30)["status"] == p.OK
        serve.wait_log("state not saved", 5)
        d.send({"id": "r1", "question": QUESTIONS[1], "max_tokens": 8})
        d.send({"id": "r0", "question": STORY})
        serve.wait_log("cannot store questions", 10)
        assert not d.messages(0.5)  # both held
        filler.unlink()
        got = finals(d.messages(30, {"r0", "r1"}))
    assert serve.terminate() == 0
    assert set(got) == {"r0", "r1"}, serve.log()
    assert all(json.loads(m[0].payload)["status"] == p.OK for m in got.values())
    assert {k[1]: s for k, (s, _, _) in serve.rows().items()} == {"r0": "delivered", "r1": "delivered"}


def test_an_unusable_state_dir_at_start_is_one_line_and_exit_1(tmp_path, real_model):
    (tmp_path / "a-file").write_text("")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    cases = [tmp_path / "a-file" / "state"]
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                      capture_output=True).returncode == 0:
        cases.append(readonly)  # root writes through permission bits; not through a read-only mount
    try:
        for state_dir in cases:
            run = subprocess.run([EDGE_SLM, "serve", "--broker", "mqtt://127.0.0.1:9", "--state-dir", str(state_dir),
                                  "--slots", "1", "--memory-budget", "300M"],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 1, run.stderr
            line, = run.stderr.splitlines()
            assert line.startswith("edge-slm: ") and str(state_dir) in line, line
    finally:
        subprocess.run(["umount", "-l", str(readonly)], capture_output=True)


@pytest.mark.parametrize("drain_timeout", [20, 0])
def test_sigterm_drains_and_keeps_the_waiting_ones(serve_factory, mosquitto, drain_timeout):
    """SIGTERM: what runs is finished (or, with --drain-timeout 0, cut off and
    kept), what waits stays on disk, a question sent during the drain is left
    to the broker, the status says offline, exit 0; after a restart the kept
    and the late questions are answered. Every question has exactly one
    final, none `cancelled`."""
    serve = serve_factory(mosquitto, None, "--drain-timeout", str(drain_timeout)).start()
    devices = [device(mosquitto, f"dev-{n}") for n in range(2)]
    owner = {f"t{n}": devices[n % 2].device for n in range(6)}
    got: Answers = []
    try:
        for n, rid in enumerate(owner):
            devices[n % 2].send({"id": rid, "question": QUESTIONS[n % 4], "stream": True})
        gather(devices, got, lambda g: len(chunked(g) - set(finals(g))) >= 2, 30)
        running = chunked(got) - set(finals(got))
        done_before = set(finals(got))
        serve.proc.send_signal(signal.SIGTERM)
        serve.wait_log("draining:", 10)
        owner["late"] = devices[0].device
        devices[0].send({"id": "late", "question": QUESTIONS[1], "max_tokens": 8})
        assert serve.proc.wait(60) == 0
        serve.watcher.wait("offline", 5)
        gather(devices, got, lambda g: False, 1.0)  # finals the broker acknowledged before the exit
        drained = set(finals(got))
        rows = serve.rows()
        kept = {k[1] for k, (s, _, _) in rows.items() if s == "pending"}
        assert serve.lines(f"{len(kept)} question(s) kept on disk"), serve.log()
        serve.start()
        gather(devices, got, all_final(owner), 60)
        gather(devices, got, lambda g: False, 1.0)
        assert serve.terminate() == 0
    finally:
        for d in devices:
            d.close()

    if drain_timeout:
        assert running <= drained
    else:
        assert not running & drained
    assert done_before <= drained and "late" not in drained and ("dev-0", "late") not in rows
    assert kept and kept == set(owner) - drained - {"late"}
    copies = finals(got)
    assert set(copies) == set(owner) and all(len(m) == 1 for m in copies.values()), copies
    assert all(json.loads(m[0].payload)["status"] == p.OK for m in copies.values())
