"""Fleet flashing end to end: real `edge-slm serve` boards and the operator's
`edge-fleet`, all as processes, on a real mosquitto.

Each board is `edge-slm serve --trusted-keys ... --group ... --fleet-dir ...`
on its own EDGE_SLM_HOME, started on the stock (reference) model; a test
kills it with SIGKILL and starts it again with the same arguments, as
systemd would. A watcher in the test process records every small fleet
message (offers, needs, results, retained states) and runtime status with
the time it arrived; chunks are counted by mosquitto_sub, so 98 MB of model
never passes through the test's interpreter.

The machine has two cores: boards run with --threads 1, at most three
real-model boards run at once (the wave test), boards whose model does not
matter run a tiny one, and the test of three full flashes is marked slow."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from edge_slm.fleet.bundle import MANIFEST, MODEL, SIGNATURE, Manifest, read_bundle
from edge_slm.fleet.bundle import pack as pack_bundle
from edge_slm.fleet.flash import OFFER_AGAIN_S
from edge_slm.fleet.keys import load_private
from firmware_bridge import protocol as p
from firmware_bridge.broker import Mosquitto
from firmware_bridge.client import DeviceClient
from firmware_bridge.service import ServiceConfig
from test_cli import assert_one_line

EDGE_SLM = Path(sys.executable).with_name("edge-slm")
EDGE_FLEET = Path(sys.executable).with_name("edge-fleet")
NAME = "pump"
WAIT_S = 120.0          # the longest any one step may take on a slow, busy machine
FLASH_TIMEOUT_S = 240   # edge-fleet flash --timeout: a wave, with checks and restarts
QUESTIONS = ("Name a tool.", "What is a pump?", "Say hello.", "Name a colour.", "What is water?")


# ---- processes: boards and the operator's commands ----

def quiet_env(home: Path) -> dict[str, str]:
    # OpenBLAS's spinning threads would take a core from the boards (NOTES.md)
    return {**os.environ, "EDGE_SLM_HOME": str(home), "OPENBLAS_NUM_THREADS": "1"}


class Board:
    """One `edge-slm serve` board process, restartable with the same arguments."""

    def __init__(self, root: Path, name: str, broker: Mosquitto, model: Path, trusted: Path,
                 group: str = "g1"):
        self.name, self.root = name, root
        self.fleet_dir = root / "fleet"
        self.log_path = root / "serve.log"
        root.mkdir(parents=True, exist_ok=True)
        self.args = [str(EDGE_SLM), "serve", "--broker", broker.url, "--device-id", name, "--group", group,
                     "--trusted-keys", str(trusted), "--state-dir", str(root / "state"),
                     "--fleet-dir", str(self.fleet_dir), "--slots", "1", "--max-tokens", "24",
                     "--memory-budget", "320M", "--model", str(model), "--threads", "1"]
        self.env = quiet_env(root / "home")
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> Board:
        self.started = time.time()
        with open(self.log_path, "ab") as log:  # every start's lines, one after another
            # its own session: a golden-check child left by a kill is ended with it
            self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            assert self.proc.poll() is None or self.log().count(text) >= count, \
                f"{self.name} exited ({self.proc.returncode}) before {text!r}:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name}: no {text!r} (x{count}) in {timeout} s:\n" \
                                                f"{self.log()[-3000:]}"
            time.sleep(0.02)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._end_children()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._end_children()

    def _end_children(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def slot_files(self) -> dict[str, list[str]]:
        return {s: sorted(f.name for f in (self.fleet_dir / f"slot-{s}").iterdir()) for s in "ab"
                if (self.fleet_dir / f"slot-{s}").is_dir()}

    def pointer(self) -> dict:
        return json.loads((self.fleet_dir / "active.json").read_text())


def output(ran: subprocess.CompletedProcess) -> str:
    return f"exit {ran.returncode}\n{ran.stdout}{ran.stderr}"


class Fleet:
    """`edge-fleet` as the operator runs it, on the test's broker."""

    def __init__(self, home: Path, broker: Mosquitto | None = None):  # none: keygen and pack only
        self.home, self.broker = home, broker
        home.mkdir(parents=True, exist_ok=True)

    def cmd(self, *args: object) -> list[str]:
        return [str(EDGE_FLEET), *map(str, args)]

    def run(self, *args: object, timeout: float = FLASH_TIMEOUT_S + 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout,
                              env=quiet_env(self.home))

    def start(self, *args: object) -> Background:
        return Background(self.cmd(*args), quiet_env(self.home), self.home / f"run-{uuid.uuid4().hex[:6]}")

    def flash(self, bundle: Path, *args: object) -> subprocess.CompletedProcess:
        return self.run("flash", bundle, "--broker", self.broker.url, "--timeout", FLASH_TIMEOUT_S, *args)

    def flash_in_background(self, bundle: Path, *args: object, timeout: float = FLASH_TIMEOUT_S) -> Background:
        return self.start("flash", bundle, "--broker", self.broker.url, "--timeout", timeout, *args)

    def status(self) -> dict:
        ran = self.run("status", "--broker", self.broker.url, "--json", timeout=60)
        assert ran.returncode == 0, ran.stderr
        return json.loads(ran.stdout)


class Background:
    """A command running while the test goes on; its output in files (no pipe fills)."""

    def __init__(self, cmd: list[str], env: dict[str, str], stem: Path):
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def wait(self, timeout: float = FLASH_TIMEOUT_S + 60) -> subprocess.CompletedProcess:
        self.proc.wait(timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out_path.read_text(),
                                           self.err_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---- what the broker carries ----

@dataclass
class Seen:
    at: float     # when the watcher got it (time.time(), the boards' clock too)
    board: str
    kind: str     # offer, need, result, state, command; status (the runtime's)
    body: dict


class Watcher:
    """Every fleet message but chunks, and every runtime status, as they arrive."""

    TOPICS = [p.fleet_topic("+", k) for k in (p.OFFER, p.NEED, p.RESULT, p.STATE, p.COMMAND)] \
        + [p.status_topic("+")]

    def __init__(self, broker: Mosquitto):
        self.seen: list[Seen] = []
        self.raw: dict[str, bytes] = {}  # the last payload per topic, to send again (a replay)
        self.changed = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        # subscribed again on every connect: the broker is restarted in a test
        self.client.on_connect = lambda c, u, f, rc, props: c.subscribe([(t, 1) for t in self.TOPICS])
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "the watcher could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        parts = msg.topic.split("/")
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = None
        with self.changed:
            self.raw[msg.topic] = msg.payload
            if isinstance(body, dict):
                self.seen.append(Seen(time.time(), parts[3], parts[4], body))
            self.changed.notify_all()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def all(self, pred: Callable[[Seen], bool]) -> list[Seen]:
        with self.changed:
            return [m for m in self.seen if pred(m)]

    def wait(self, pred: Callable[[Seen], bool], what: str, timeout: float = WAIT_S) -> Seen:
        deadline = time.monotonic() + timeout
        with self.changed:
            checked = 0
            while True:
                for m in self.seen[checked:]:
                    if pred(m):
                        return m
                checked = len(self.seen)
                left = deadline - time.monotonic()
                if left <= 0:
                    recent = [(m.board, m.kind, m.body.get("state"), m.body.get("reason"))
                              for m in self.seen[-12:]]
                    pytest.fail(f"no {what} within {timeout:g} s; last messages: {recent}")
                self.changed.wait(left)

    def result(self, board: str, state: str, since: float = 0.0, timeout: float = WAIT_S) -> Seen:
        return self.wait(lambda m: m.board == board and m.kind == p.RESULT and m.at >= since
                         and m.body.get("state") == state, f"{state} result from {board}", timeout)

    def ready(self, board: Board, timeout: float = WAIT_S) -> None:
        """The board's service is online on its model and its fleet link has said
        where it stands, both since its last start."""
        since = board.started
        self.wait(lambda m: m.board == board.name and m.kind == p.STATUS and m.at >= since
                  and m.body.get("state") == "online", f"{board.name} online", timeout)
        self.wait(lambda m: m.board == board.name and m.kind == p.STATE and m.at >= since,
                  f"{board.name}'s fleet state", timeout)


class ChunkCounter:
    """mosquitto_sub printing a line for each chunk message to one board: when
    it came (seconds since the epoch), the topic and the length."""

    def __init__(self, broker: Mosquitto, board: str, out: Path):
        self.out = out
        self.chunk_topic, marker = p.fleet_topic(board, p.CHUNK), f"test/{uuid.uuid4().hex[:8]}"
        with open(out, "wb") as lines:  # mosquitto_sub flushes each line
            self.proc = subprocess.Popen(["mosquitto_sub", "-p", str(broker.port), "-V", "5", "-q", "1",
                                          "-t", self.chunk_topic, "-t", marker, "-F", "@s.@N %t %l"],
                                         stdout=lines, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while marker not in out.read_text():  # until then it may not count everything
            assert time.monotonic() < deadline, "mosquitto_sub did not subscribe"
            subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-t", marker, "-m", "x"],
                           check=True, timeout=10)
            time.sleep(0.2)

    def sent(self, since: float = 0.0, until: float = math.inf) -> int:
        count = 0
        for line in self.out.read_text().splitlines():
            at, topic, _ = line.split(" ")
            count += topic == self.chunk_topic and since <= float(at) < until
        return count

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def assert_answers_on(broker: Mosquitto, sha256: str) -> None:
    """A question gets an ok answer, from the model with this sha256."""
    with DeviceClient(ServiceConfig(broker=broker.url), f"asker-{uuid.uuid4().hex[:6]}") as device:
        final = device.ask("What is 2 + 3?", max_tokens=8, timeout=WAIT_S)
    assert final["status"] == p.OK and final["text"].strip(), final
    assert final["model"]["sha256"] == sha256, final["model"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def p95(values: list[float]) -> float:
    return sorted(values)[math.ceil(0.95 * len(values)) - 1]


# ---- bundles, good and bad ----

def write_bundle(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return path


def signed_bundle(path: Path, model: bytes, like: Manifest, signer, model_name: str = MODEL) -> Path:
    """A bundle signed by `signer` whose manifest is `like`'s, for `model`'s bytes."""
    data = dataclasses.replace(like, sha256=hashlib.sha256(model).hexdigest(), size=len(model)).to_bytes()
    return write_bundle(path, [(MANIFEST, data), (SIGNATURE, signer.sign(data)), (model_name, model)])


def random_weight_model(reference: Path, out: Path) -> Path:
    """A GGUF of exactly the reference's shape, metadata, tokenizer and tensor
    types, written with gguf's writer, whose weights are random: each
    tensor's quantized blocks (or values) in a random order, so every scale
    is a real one and nothing overflows, yet the model knows nothing."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(reference))
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # the writer's own
            continue
        kind = field.types[0]
        writer.add_key_value(name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(14)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            shuffled = rng.permutation(data.reshape(-1)).reshape(data.shape)
        else:
            blocks = data.reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
            shuffled = blocks[rng.permutation(len(blocks))].reshape(data.shape)
        writer.add_tensor(t.name, shuffled, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def model_of(bundle: Path, size: int | None = None) -> bytes:
    """The first `size` bytes (all by default) of the model in `bundle`."""
    raw = read_bundle(bundle)
    with open(bundle, "rb") as f:
        f.seek(raw.model_offset)
        return f.read(raw.model_size if size is None else size)


@pytest.fixture(scope="module")
def kit(real_model, tmp_path_factory) -> SimpleNamespace:
    """The operator's key, a stranger's key, the folders boards trust, and
    bundles made on first use."""
    root = tmp_path_factory.mktemp("fleet-kit")
    operator = Fleet(root / "operator-home")
    for who in ("keys", "stranger"):
        made = operator.run("keygen", "--out", root / who, timeout=60)
        assert made.returncode == 0, made.stderr
    trusted, strangers = root / "trusted", root / "trusts-stranger"
    for folder, who in ((trusted, "keys"), (strangers, "stranger")):
        folder.mkdir()
        shutil.copy(root / who / "fleet.pub", folder / "fleet.pub")
    signer = load_private(root / "keys" / "fleet.key")
    packed = {  # label -> model, version, key, options of `edge-fleet pack`
        "v1": (real_model, 1, "keys", ()), "v1-rollback": (real_model, 1, "keys", ("--rollback",)),
        "v2": (real_model, 2, "keys", ()), "stranger": (real_model, 2, "stranger", ()),
    }
    made: dict[str, Path] = {}

    def make(label: str, out: Path) -> None:
        if label == "random":  # loads and runs, knows nothing
            packed[label] = (random_weight_model(real_model, root / "random.gguf"), 2, "keys", ())
        if label in packed:
            model, version, key, options = packed[label]
            ran = operator.run("pack", model, "--name", NAME, "--version", version,
                               "--key", root / key / "fleet.key", "--out", out, *options, timeout=120)
            assert ran.returncode == 0, ran.stderr
        elif label == "tampered":  # one byte of the model flipped after signing
            good = bundle("v2")
            shutil.copy(good, out)
            raw = read_bundle(good)
            with open(out, "r+b") as f:
                f.seek(raw.model_offset + raw.model_size // 2)
                byte = f.read(1)[0]
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte ^ 0xFF]))
        elif label == "expired":  # packed to expire a second later (the CLI's least is 0.01 days), waited out
            m = pack_bundle(real_model, out, name=NAME, version=2, private_key=signer, expires_days=1 / 86400)
            time.sleep(max(0.0, m.expires - time.time() + 0.5))
        elif label == "cut-gguf":  # signed as it is: a GGUF whose header promises more than the file holds
            good = bundle("v2")
            signed_bundle(out, model_of(good, read_bundle(good).model_size // 2),
                          Manifest.from_bytes(read_bundle(good).manifest), signer)
        else:
            raise KeyError(label)

    def bundle(label: str) -> Path:
        if label not in made:
            make(label, root / f"{label}.bundle")
            made[label] = root / f"{label}.bundle"
        return made[label]

    return SimpleNamespace(root=root, trusted=trusted, strangers=strangers, bundle=bundle, signer=signer,
                           real_sha=sha256_file(real_model))


@pytest.fixture
def site(mosquitto, real_model, kit, tmp_path):
    """The test's broker, its watcher, an operator, and boards made on demand
    (started on the stock model), all ended at the test's end."""
    watcher = Watcher(mosquitto)
    boards: list[Board] = []

    def board(name: str, group: str = "g1", model: Path = real_model, trusted: Path = kit.trusted) -> Board:
        b = Board(tmp_path / name, name, mosquitto, model, trusted, group).start()
        boards.append(b)
        return b

    yield SimpleNamespace(broker=mosquitto, watcher=watcher, board=board,
                          fleet=Fleet(tmp_path / "operator", mosquitto))
    for b in boards:
        b.stop()
    watcher.close()


def started(site, *boards: Board) -> None:
    for b in boards:
        site.watcher.ready(b)


# ---- 1. a group rollout in waves ----

@pytest.mark.slow  # over 30 s each: `make test-slow`, so `make test` stays within 15 minutes
def test_a_group_rollout_goes_in_waves_and_status_shows_every_board(site, kit):
    boards = [site.board(name) for name in ("w1", "w2", "w3")]
    started(site, *boards)
    bundle = kit.bundle("v2")
    m = Manifest.from_bytes(read_bundle(bundle).manifest)

    ran = site.fleet.flash(bundle, "--group", "g1", "--canary", "1")

    assert ran.returncode == 0, output(ran)
    assert "wave 1 of 2: w1\n" in ran.stderr and "wave 2 of 2: w2, w3\n" in ran.stderr, ran.stderr
    for name in ("w1", "w2", "w3"):
        assert f"{name}\tcommitted\t" in ran.stdout, ran.stdout
    # the second wave was offered the bundle only once the first had committed
    canary_done = site.watcher.result("w1", p.COMMITTED, timeout=0).body["at"]
    for name in ("w2", "w3"):
        offers = site.watcher.all(lambda s, n=name: s.board == n and s.kind == p.OFFER)
        assert offers and min(s.at for s in offers) > canary_done
        assert site.watcher.result(name, p.ACCEPTED, timeout=0).body["at"] > canary_done
    states = site.fleet.status()
    assert sorted(states) == ["w1", "w2", "w3"], states
    for name, s in states.items():
        fleet_state, runtime = s["fleet"], s["runtime"]
        assert fleet_state["group"] == "g1" and fleet_state["trial"] is False
        assert fleet_state["model"] == {"name": NAME, "version": 2, "sha256": m.sha256}
        assert fleet_state["previous"] is None  # it came from the stock model
        assert fleet_state["last"]["event"] == "committed"
        assert runtime["state"] == "online" and runtime["model"]["sha256"] == m.sha256
    table = site.fleet.run("status", "--broker", site.broker.url, "--group", "g1", timeout=60)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[1:]
    assert len(rows) == 3 and all(f"{NAME} v2 {m.sha256[:12]}\tstock model\tcommitted" in r for r in rows), rows


# ---- 2. transfers cut in the middle ----

def test_a_board_killed_mid_transfer_resumes_asking_only_for_what_it_lacks(site, kit, tmp_path):
    b = site.board("k1")
    started(site, b)
    bundle = kit.bundle("v2")
    chunks = -(-read_bundle(bundle).model_size // p.FLEET_CHUNK)
    counter = ChunkCounter(site.broker, "k1", tmp_path / "chunks.txt")
    try:
        first = site.fleet.flash_in_background(bundle, "--to", "k1")
        site.watcher.wait(lambda m: m.board == "k1" and m.kind == p.RESULT and m.body.get("state") == p.RECEIVING
                          and 128 <= m.body.get("received", 0) < chunks, "k1 part-way through")
        b.kill9()
        first.stop()  # the operator's side goes too
        with sqlite3.connect(b.fleet_dir / "fleet.sqlite3") as db:
            row = db.execute("SELECT slot, received FROM transfer").fetchone()
        assert row is not None, "the transfer was not kept across the kill"
        slot, received = row
        had = {i for i, got in enumerate(received) if got}
        assert len(received) == chunks and 128 <= len(had) < chunks
        assert b.slot_files()[slot] == [MODEL + ".part"]  # no model yet, only the part

        restarted = time.time()
        b.start()
        started(site, b)
        ran = site.fleet.flash(bundle, "--to", "k1")
        assert ran.returncode == 0 and "k1\tcommitted\t" in ran.stdout, output(ran)
    finally:
        counter.stop()
    asked = {i for m in site.watcher.all(lambda m: m.board == "k1" and m.kind == p.NEED and m.at >= restarted)
             for i in m.body["chunks"]}
    assert asked and not asked & had, f"asked again for {len(asked & had)} chunks it had on disk"
    before, after = counter.sent(until=restarted), counter.sent(since=restarted)
    assert after <= chunks - len(had) + 2 * p.FLEET_WINDOW, (after, chunks, len(had))
    assert before + after < 1.5 * chunks, (before, after, chunks)
    assert sha256_file(b.fleet_dir / f"slot-{slot}" / MODEL) == Manifest.from_bytes(
        read_bundle(bundle).manifest).sha256
    assert b.pointer()["active"] == slot and b.pointer()["trial"] is False
    assert_answers_on(site.broker, kit.real_sha)


def test_a_broker_restart_mid_transfer_does_not_stop_the_flash(site, kit):
    b = site.board("k2")
    started(site, b)
    # a flash takes ~30 s here; the operator re-offers after 15 s of silence
    flash = site.fleet.flash_in_background(kit.bundle("v2"), "--to", "k2", timeout=100)
    try:
        site.watcher.wait(lambda m: m.board == "k2" and m.kind == p.RESULT and m.body.get("state") == p.RECEIVING
                          and m.body.get("received", 0) >= 128, "k2 part-way through")
        site.broker.stop()
        time.sleep(1.0)
        site.broker.start()
        ran = flash.wait()
    finally:
        flash.stop()
    assert ran.returncode == 0 and "k2\tcommitted\t" in ran.stdout, output(ran)
    assert b.pointer()["trial"] is False and b.pointer()["active"] in ("a", "b")
    assert_answers_on(site.broker, kit.real_sha)


@pytest.mark.slow  # over 30 s each: `make test-slow`, so `make test` stays within 15 minutes
def test_a_board_slow_to_come_back_from_its_switch_is_not_reported_as_refused(site, kit):
    """A Pi restarts and asks its golden prompts more slowly than this machine:
    its trial may outlast the operator's re-offer to a silent board (paused
    here with SIGSTOP once its fleet link is back). It must end committed."""
    b = site.board("s3")
    started(site, b)
    flash = site.fleet.flash_in_background(kit.bundle("v2"), "--to", "s3")
    try:
        switched = site.watcher.result("s3", p.SWITCHED)
        site.watcher.wait(lambda m: m.board == "s3" and m.kind == p.STATE and m.at > switched.at,
                          "s3's fleet link back after its restart")
        os.kill(b.proc.pid, signal.SIGSTOP)
        time.sleep(OFFER_AGAIN_S + 3)
        os.kill(b.proc.pid, signal.SIGCONT)
        ran = flash.wait()
    finally:
        flash.stop()
    assert ran.returncode == 0 and "s3\tcommitted\t" in ran.stdout, output(ran)


# ---- 3. refusals, the old model answering on ----

@pytest.fixture(scope="module")
def steady(real_model, kit, tmp_path_factory):
    """One board on the stock model that every refusal test flashes in turn:
    after each, it must still be on the stock model with empty slots."""
    root = tmp_path_factory.mktemp("steady")
    broker = Mosquitto(root / "broker").start()
    watcher = Watcher(broker)
    board = Board(root / "r1", "r1", broker, real_model, kit.trusted, "gr").start()
    watcher.ready(board)
    yield SimpleNamespace(broker=broker, watcher=watcher, board=board, fleet=Fleet(root / "operator", broker))
    board.stop()
    watcher.close()
    broker.stop()


REFUSED_ON_THE_BOARD = {
    # bundle -> what the board's reason says
    "tampered": "does not match the manifest's sha256",
    "stranger": "signed by a key this board does not trust",
    "expired": "expired on",
    "cut-gguf": "places tensor data past",
}


def no_slot_holds_a_model(board: Board) -> None:
    assert board.slot_files() == {"a": [], "b": []}, board.slot_files()
    pointer = board.fleet_dir / "active.json"
    assert not pointer.exists() or board.pointer()["active"] is None


@pytest.mark.parametrize("label", list(REFUSED_ON_THE_BOARD))
def test_the_board_refuses_a_bad_bundle_with_its_reason_and_answers_on(steady, kit, label):
    bundle = kit.bundle(label)
    says = REFUSED_ON_THE_BOARD[label]
    since = time.time()

    ran = steady.fleet.flash(bundle, "--to", "r1")

    assert ran.returncode == 1 and "Traceback" not in output(ran), output(ran)
    [(board, state, reason)] = [line.split("\t", 2) for line in ran.stdout.splitlines()]
    assert (board, state) == ("r1", p.REFUSED) and says in reason, output(ran)
    assert ran.stderr.splitlines()[-1].endswith("1 of 1 board(s) not updated: r1"), ran.stderr
    assert says in steady.watcher.result("r1", p.REFUSED, since=since, timeout=0).body["reason"]
    no_slot_holds_a_model(steady.board)  # nothing swapped, no part left to fill the disk
    assert steady.board.proc.poll() is None
    assert_answers_on(steady.broker, kit.real_sha)


def cut_bundle(kit, keep: Callable[[int, int], int]) -> Path:
    """The v2 bundle cut short: its first `keep(model_offset, model_size)` bytes."""
    raw = read_bundle(kit.bundle("v2"))
    out = kit.root / f"cut-{uuid.uuid4().hex[:6]}.bundle"
    with open(raw.path, "rb") as src, open(out, "wb") as dst:
        dst.write(src.read(keep(raw.model_offset, raw.model_size)))
    return out


MALFORMED = {
    # what edge-fleet flash must refuse before it offers anything, and how it may say so
    "cut in the model's first block": (lambda kit: cut_bundle(kit, lambda at, size: at + 100),
                                       ("cut short", "damaged")),
    "cut in half": (lambda kit: cut_bundle(kit, lambda at, size: at + size // 2), ("cut short", "damaged")),
    "one byte short": (lambda kit: cut_bundle(kit, lambda at, size: at + size - 1), ("cut short", "damaged")),
    "a member path out of the folder": (
        lambda kit: signed_bundle(kit.root / "traversal.bundle", b"GGUF" + bytes(4096),
                                  Manifest.from_bytes(read_bundle(kit.bundle("v2")).manifest), kit.signer,
                                  model_name="../../model.gguf"),
        ("a bundle holds exactly",)),
}


@pytest.mark.parametrize("label", list(MALFORMED))
def test_edge_fleet_refuses_a_malformed_bundle_before_offering_it(steady, kit, label):
    make, says = MALFORMED[label]
    bundle = make(kit)
    since = time.time()

    ran = steady.fleet.flash(bundle, "--to", "r1")

    assert_one_line(ran, 1, str(bundle))
    assert any(s in ran.stderr for s in says), ran.stderr
    time.sleep(0.5)  # anything it had sent would have reached the watcher by now
    assert not steady.watcher.all(lambda m: m.board == "r1" and m.kind == p.OFFER and m.at >= since)
    no_slot_holds_a_model(steady.board)
    assert_answers_on(steady.broker, kit.real_sha)


@pytest.mark.slow
def test_a_downgrade_is_refused_unless_signed_for_rollback_and_a_rollback_is_obeyed_once(site, kit):
    b = site.board("d1")
    started(site, b)
    sha = Manifest.from_bytes(read_bundle(kit.bundle("v2")).manifest).sha256
    ran = site.fleet.flash(kit.bundle("v2"), "--to", "d1")
    assert ran.returncode == 0 and "d1\tcommitted\t" in ran.stdout, output(ran)

    ran = site.fleet.flash(kit.bundle("v1"), "--to", "d1")
    assert ran.returncode == 1 and "d1\trefused\tpump v1 is older than v2" in ran.stdout, output(ran)
    assert "--rollback" in ran.stdout
    assert_answers_on(site.broker, sha)

    ran = site.fleet.flash(kit.bundle("v1-rollback"), "--to", "d1")
    assert ran.returncode == 0 and "d1\tcommitted\t" in ran.stdout, output(ran)
    fleet_state = site.fleet.status()["d1"]["fleet"]
    assert (fleet_state["model"]["version"], fleet_state["previous"]["version"]) == (1, 2), fleet_state

    since = time.time()
    ran = site.fleet.run("rollback", "--to", "d1", "--signing-key", kit.root / "keys" / "fleet.key",
                         "--broker", site.broker.url, "--timeout", 60)
    assert ran.returncode == 0 and "d1\trolled_back\t" in ran.stdout, output(ran)
    site.watcher.wait(lambda m: m.board == "d1" and m.kind == p.STATE and m.at > since
                      and (m.body.get("model") or {}).get("version") == 2, "d1 back on v2")
    site.watcher.wait(lambda m: m.board == "d1" and m.kind == p.STATUS and m.at > since
                      and m.body.get("state") == "online", "d1 online again")
    fleet_state = site.fleet.status()["d1"]["fleet"]
    assert (fleet_state["model"]["version"], fleet_state["previous"]["version"]) == (2, 1), fleet_state
    assert_answers_on(site.broker, sha)

    # the same signed command, sent again by whoever recorded it, is refused
    since = time.time()
    site.watcher.client.publish(p.fleet_topic("d1", p.COMMAND), site.watcher.raw[p.fleet_topic("d1", p.COMMAND)],
                                qos=1)
    assert "replay" in site.watcher.result("d1", p.REFUSED, since=since).body["reason"]
    assert site.fleet.status()["d1"]["fleet"]["model"]["version"] == 2


# ---- 4. a model that loads but knows nothing ----

def test_a_model_that_fails_its_golden_prompts_is_refused_and_not_kept(site, kit):
    b = site.board("g4")
    started(site, b)
    bundle = kit.bundle("random")

    ran = site.fleet.flash(bundle, "--to", "g4")

    assert ran.returncode == 1, output(ran)
    assert "g4\trefused\t" in ran.stdout and "golden prompts failed" in ran.stdout, output(ran)
    no_slot_holds_a_model(b)
    assert_answers_on(site.broker, kit.real_sha)  # the stock model, not the random one
    last = site.fleet.status()["g4"]["fleet"]["last"]
    assert last["event"] == "refused" and "golden prompts failed" in last["detail"], last


# ---- 5. a model that passes, then crashes the service ----

def test_a_model_that_crashes_the_service_is_rolled_back_by_the_board_itself(site, kit):
    b = site.board("c5")
    started(site, b)
    flash = site.fleet.flash_in_background(kit.bundle("v2"), "--to", "c5")
    try:
        site.watcher.result("c5", p.SWITCHED)
    finally:
        flash.stop()  # the operator has gone; the board is on its own
    for start in range(1, 4):  # killed at each start on the new model, before it commits
        b.wait_log(f"trial start {start} of 3")
        b.kill9()
        assert b.pointer()["trial"] is True and b.pointer()["starts"] == start
        b.start()  # as systemd would
    b.wait_log("did not come back healthy in 3 starts")
    started(site, b)

    pointer = b.pointer()
    assert (pointer["active"], pointer["previous"], pointer["trial"]) == (None, "a", False), pointer
    assert_answers_on(site.broker, kit.real_sha)
    fleet_state = site.fleet.status()["c5"]["fleet"]
    assert fleet_state["model"] is None and fleet_state["previous"]["version"] == 2, fleet_state
    assert fleet_state["last"]["event"] == "rolled back", fleet_state
    assert "did not come back healthy in 3 starts" in fleet_state["last"]["detail"], fleet_state
    reported = site.watcher.all(lambda m: m.board == "c5" and m.kind == p.RESULT and m.at >= b.started
                                and m.body.get("state") == p.ROLLED_BACK)

    # the operator's rollback must not bring the model that crashed back as a healthy one
    ran = site.fleet.run("rollback", "--to", "c5", "--signing-key", kit.root / "keys" / "fleet.key",
                         "--broker", site.broker.url, "--timeout", 30)
    assert ran.returncode != 0 or b.pointer()["trial"] is True, (output(ran), b.pointer())

    assert reported and "did not come back healthy" in reported[0].body["reason"], \
        "the board did not tell the operator (a rolled_back result) that it rolled back"


# ---- 6. a rollout that fails stops ----

def test_a_rollout_stops_at_max_failures_and_names_the_failed_boards(site, kit, tiny_model):
    # the model boards run does not matter here: tiny ones start fast
    boards = [site.board("m1-bad", "g6", tiny_model, kit.strangers),
              site.board("m2-bad", "g6", tiny_model, kit.strangers),
              site.board("m3-good", "g6", tiny_model)]
    started(site, *boards)
    untrusted = "signed by a key this board does not trust"

    since = time.time()
    ran = site.fleet.flash(kit.bundle("v2"), "--group", "g6", "--canary", "1", "--max-failures", "0")
    assert ran.returncode == 1, output(ran)
    assert "wave 1 of 2: m1-bad\n" in ran.stderr, ran.stderr
    assert ("stopped: 1 board(s) failed, more than --max-failures 0; not flashed: m2-bad, m3-good"
            in ran.stderr), ran.stderr
    rows = [line.split("\t", 2) for line in ran.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["m1-bad", p.REFUSED]] and untrusted in rows[0][2], output(ran)
    assert ran.stderr.splitlines()[-1].endswith("not updated: m1-bad"), ran.stderr

    ran = site.fleet.flash(kit.bundle("v2"), "--group", "g6", "--canary", "2", "--max-failures", "1")
    assert ran.returncode == 1, output(ran)
    assert ("stopped: 2 board(s) failed, more than --max-failures 1; not flashed: m3-good"
            in ran.stderr), ran.stderr
    for name in ("m1-bad", "m2-bad"):
        assert f"{name}\trefused\t{untrusted}" in ran.stdout, output(ran)
    assert ran.stderr.splitlines()[-1].endswith("not updated: m1-bad, m2-bad"), ran.stderr
    time.sleep(0.5)
    assert not site.watcher.all(lambda m: m.board == "m3-good" and m.kind == p.OFFER and m.at >= since)


# ---- 7. questions during a download ----

def test_questions_keep_being_answered_during_a_download(site, kit, parity_report):
    b = site.board("q7")
    started(site, b)
    # devices asking in turn, each well within its rate (2 questions/s)
    with contextlib.ExitStack() as stack:
        devices = [stack.enter_context(DeviceClient(ServiceConfig(broker=site.broker.url), f"probe-{i}"))
                   for i in range(8)]

        last: dict[int, float] = {}

        def timed(i: int) -> tuple[float, float]:
            d = i % len(devices)
            # 0.6 s apart for each device, well within its 2 questions/s, however fast the answers
            time.sleep(max(0.0, last.get(d, -1.0) + 0.6 - time.monotonic()))
            begun = last[d] = time.monotonic()
            final = devices[d].ask(QUESTIONS[i % len(QUESTIONS)], max_tokens=8, timeout=WAIT_S)
            assert final["status"] == p.OK, final
            return time.monotonic() - begun, time.time()

        for i in range(2):  # warm: the first question pays for what the process has not touched yet
            timed(i)
        idle = [timed(i)[0] for i in range(20)]

        # the tampered bundle downloads in full, then is refused: no check or restart follows
        # to load the machine, and the questions asked until then are the download's
        began = time.time()
        flash = site.fleet.flash_in_background(kit.bundle("tampered"), "--to", "q7")
        try:
            site.watcher.result("q7", p.ACCEPTED, since=began)
            during: list[float] = []
            while len(during) < 500:  # the whole download long
                took, ended = timed(len(during))
                finished = site.watcher.all(lambda m: m.board == "q7" and m.kind == p.RESULT and m.at >= began
                                            and m.body.get("state") == p.REFUSED)
                if finished and finished[0].body["at"] <= ended:
                    break  # this one ran past the end of the download
                during.append(took)
            ran = flash.wait()
        finally:
            flash.stop()
    assert ran.returncode == 1 and "does not match the manifest's sha256" in ran.stdout, output(ran)
    downloaded = site.watcher.result("q7", p.REFUSED, since=began, timeout=0).body["at"] - began
    assert len(during) >= 10, f"only {len(during)} questions were answered in a {downloaded:.0f} s download"
    idle_p95, during_p95 = p95(idle), p95(during)
    parity_report.append(f"fleet flash: question p95 {idle_p95 * 1000:.0f} ms idle, {during_p95 * 1000:.0f} ms "
                         f"during a {downloaded:.0f} s download of 94 MiB (n={len(idle)}/{len(during)}, "
                         "max_tokens 8, --threads 1)")
    assert during_p95 < 3 * idle_p95 + 1.0, (idle_p95, during_p95)
