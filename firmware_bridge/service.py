"""`edge-slm serve`: answer devices' questions over MQTT through the engine.

Three kinds of thread, one rule each:
- paho's network thread runs our callbacks, which only put events on the
  worker's inbox (a question's checks and its disk write wait for the worker);
- the engine's thread runs the model and, through on_text / on_done, also
  only puts events on the inbox;
- the worker thread owns all state: it checks questions, writes them to the
  store, acknowledges them, feeds the engine fairly across devices, and
  publishes chunks and finals.

A question is acknowledged (PUBACK) only once it is on disk, and its row is
marked delivered only when the broker has acknowledged its final answer, so
neither a crash of this process nor of the broker loses an accepted question.
The broker holds what arrives while we are down: our session is persistent
(a fixed client id, clean_start off), and the MQTT 5 Receive Maximum bounds
how many unacknowledged questions it sends us at once.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_slm import __version__
from edge_slm import engine as eng
from edge_slm.engine import Engine, EngineConfig, Result
from edge_slm.errors import EdgeSlmError
from edge_slm.memory import MIB
from edge_slm.sampler import SamplingConfig

from . import protocol as p
from .store import ANSWERED, CACHE_KIB, DELIVERED, Store, StoreError

log = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    broker: str | None = None               # mqtt://HOST:PORT or mqtts://HOST:PORT; None: serve
                                            # starts a private mosquitto
    state_dir: Path | None = None           # None: $EDGE_SLM_HOME/state
    runtime_id: str | None = None           # None: the one kept in the state dir, or a new one
    share_group: str | None = None          # MQTT 5 shared subscription across runtimes
    ca: Path | None = None                  # TLS: CA bundle, client certificate and key
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None             # from --password-file or the environment only
    max_payload: int = p.MAX_PAYLOAD        # bytes per question
    reply_scope: str = p.DEFAULT_REPLY_SCOPE
    device_rate: float = 2.0                # questions per second per device, sustained
    device_burst: int = 10                  # questions a quiet device may send at once
    device_concurrency: int = 4             # questions per device accepted and not yet answered
    max_accepted: int | None = None         # all devices; None = the engine's slots + queue
    receive_maximum: int = 32               # unacknowledged questions the broker may send us
    dedup_window_s: float = 600.0           # answers kept for questions sent again
    drain_timeout_s: float = 30.0           # SIGTERM: time to finish what is running
    status_interval_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600   # the broker keeps our subscriptions and queue this long
    keepalive_s: int = 30
    ha_discovery: bool = False
    ha_prefix: str = "homeassistant"
    max_outgoing: int = 256                 # paho's queue of unsent messages; past it, finals
                                            # wait on disk for the next connection

    def __post_init__(self) -> None:
        """Settings from a file or the environment get the checks the CLI's options have."""
        ranges = {"max_payload": (256, 1 << 20), "device_rate": (0.01, 1000.0), "device_burst": (1, 10_000),
                  "device_concurrency": (1, 1000), "max_accepted": (1, 100_000), "receive_maximum": (1, 65_535),
                  "dedup_window_s": (0.0, 30 * 86400.0), "drain_timeout_s": (0.0, 3600.0),
                  "status_interval_s": (0.1, 86400.0), "session_expiry_s": (0, 2**32 - 1),
                  "keepalive_s": (5, 65_535), "max_outgoing": (16, 100_000)}
        for name, (least, most) in ranges.items():
            value = getattr(self, name)
            if value is None and name == "max_accepted":
                continue
            whole = isinstance(least, int)
            kind = int if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not least <= value <= most:
                raise EdgeSlmError(f"setting {name}: {value!r} is not a {'whole ' if whole else ''}number "
                                   f"from {least} to {most}")
        for name in ("runtime_id", "share_group"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and p.valid_device_id(value)):
                raise EdgeSlmError(f"setting {name}: {value!r}: letters, digits, '_', '.', '-'")
        if "{device}" not in str(self.reply_scope):
            raise EdgeSlmError(f"setting reply_scope: {self.reply_scope!r} must hold {{device}}, the asker's id")
        if not isinstance(self.ha_discovery, bool):
            raise EdgeSlmError(f"setting ha_discovery: {self.ha_discovery!r} is not true or false")


# Streamed text is published at most this often per question.
CHUNK_INTERVAL_S = 0.05
# A small model decoding greedily falls into loops; as `edge-slm ask` does.
REPEAT_PENALTY = 1.1


def planned_bytes(cfg: ServiceConfig, engine: EngineConfig) -> int:
    """What the service holds beside the engine, for the memory plan: each
    question it may hold (accepted, or received and not yet on disk) as
    payload, parsed text and stored row; each answer as text and JSON;
    paho's outgoing queue of answers (with a grounded answer's sources); SQLite's page cache and its own
    structures; the network and worker threads."""
    capacity = cfg.max_accepted or engine.slots + engine.queue_size
    question = 3 * cfg.max_payload + 4096
    # ~6 bytes of text a token, as str and as JSON; a grounded answer's passages (800 characters
    # at most, as text and JSON, UTF-8 up to 4 bytes a character)
    answer = 1024 + 24 * engine.max_tokens + engine.ground_passages * 8 * 800
    return ((capacity + cfg.receive_maximum) * question + (capacity + cfg.max_outgoing) * answer
            + 2 * CACHE_KIB * 1024 + 1 * MIB)


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> float:
        """0 if a question may pass now, else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(frozen=True)
class Incoming:
    """A checked question and the MQTT message that brought it (to acknowledge)."""

    q: p.Question
    generation: int  # the connection it came on
    mid: int
    qos: int


@dataclass
class Flight:
    """An accepted question until its final answer is published."""

    q: p.Question
    req: eng.Request | None = None  # None while it waits for the engine
    submitted: float = 0.0          # wall clock
    seq: int = 0                    # next chunk number
    chunk_sent: float = 0.0         # monotonic time of the last chunk
    unsent: list[str] = field(default_factory=list)  # text not yet published as a chunk
    # Text from the engine's thread, taken by the worker when it publishes a
    # chunk (a deque's append and popleft are safe across threads).
    pieces: collections.deque[str] = field(default_factory=collections.deque)
    woke: bool = False              # its first piece has woken the worker
    drained: bool = False           # cut off by a drain: stays pending on disk
    stored: bool = False            # on disk (and so acknowledged)
    copies: list[Incoming] = field(default_factory=list)  # resent while not yet stored: acked with it
    cancel_asked: bool = False      # cancelled before it was on disk: answered so once it is


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) from mqtt://HOST[:PORT] or mqtts://HOST[:PORT]."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise EdgeSlmError(f"broker {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise EdgeSlmError(f"broker {url!r}: the port is not a number from 1 to 65535") from None
    return parts.hostname, port, parts.scheme == "mqtts"


def make_client(client_id: str, cfg: ServiceConfig) -> mqtt.Client:
    """A paho MQTT 5 client for `cfg`'s broker, TLS and credentials (not yet connected)."""
    host, port, tls = broker_address(cfg.broker)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5, manual_ack=True)
    if tls or cfg.ca or cfg.cert:
        try:
            client.tls_set(ca_certs=str(cfg.ca) if cfg.ca else None,
                           certfile=str(cfg.cert) if cfg.cert else None,
                           keyfile=str(cfg.key) if cfg.key else None)
        except (OSError, ValueError) as e:
            raise EdgeSlmError(f"TLS setup: {e}") from None
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password)
    client.max_queued_messages_set(cfg.max_outgoing)
    client.reconnect_delay_set(1, 30)
    send_at_once(client)
    return client


def send_at_once(client: mqtt.Client) -> None:
    """Turn off Nagle's algorithm on the client's socket. With it on, a small
    packet written while the last is unacknowledged waits for the peer's
    delayed ACK (40 ms on Linux): measured, that put 40-80 ms between a first
    token and its chunk reaching the device, and held closed-loop askers on
    4 slots to 0.76x of the engine's throughput. paho leaves it on."""
    def on_socket_open(c, userdata, sock) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = on_socket_open


class Service:
    def __init__(self, engine: Engine, cfg: ServiceConfig, shared: bool = False,
                 extra_status: Callable[[], dict[str, Any]] | None = None):
        """`shared`: another front end (the kiosk) asks the same engine, so
        no question of ours waits inside it beyond its slots: the other's
        waits for one slot at most, while ours wait here, fairly.
        `extra_status`: more fields for the retained status (the fleet's)."""
        self.engine = engine
        self.cfg = cfg
        self.extra_status = extra_status
        self.engine_depth = (1 if shared else 2) * len(engine.slots)  # ours in the engine at most
        self.store = Store.in_folder(cfg.state_dir)
        self.runtime_id = self.store.runtime_id(cfg.runtime_id)
        st = engine.status()
        self.capacity = cfg.max_accepted or st["slots"] + st["queue_size"]
        self.model_name = engine.model.name
        self.model_sha256 = engine.model.sha256()
        self.status_topic = p.status_topic(self.runtime_id)
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._draining = False
        self._connected = False
        self._generation = 0  # connection count: a message's mid is only valid on its own
        self.flights: dict[tuple[str, str], Flight] = {}
        self.waiting: dict[str, collections.deque[tuple[str, str]]] = {}  # per device, oldest first
        self.turn: collections.deque[str] = collections.deque()          # devices with waiting questions
        self.buckets: dict[str, TokenBucket] = {}
        self.unacked: dict[tuple[str, str], Incoming] = {}   # the disk refused them: not acknowledged
        self.finals_sent: dict[int, tuple[str, str]] = {}     # mid -> key, until the broker's PUBACK
        self.unsent_finals: set[tuple[str, str]] = set()      # stored, but paho's queue was full
        self.stats: collections.Counter = collections.Counter()
        self._answer_seconds = 0.0  # engine time of the answers so far, for retry hints
        self.started = time.monotonic()
        self._last_status = 0.0
        self._last_purge = 0.0
        self._last_retry = 0.0  # of storing questions the disk refused
        self._worker = threading.Thread(target=self._work, name="edge-slm-serve", daemon=True)
        self.client = self._client()

    # ---- connection (network thread: callbacks only enqueue) ----

    def _client(self) -> mqtt.Client:
        client = make_client(f"edge-slm-{self.runtime_id}", self.cfg)
        client.will_set(self.status_topic, p.dumps({"state": "offline", "runtime_id": self.runtime_id}),
                        qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self._generation += 1
        self._connected = True
        subs = [(f, 1) for f in p.subscriptions(self.cfg.share_group)]
        if self.cfg.ha_discovery:
            subs.append((f"{self.cfg.ha_prefix}/status", 1))
        client.subscribe(subs)
        log.info("connected to %s as %s (session %s)", self.cfg.broker, client._client_id.decode(),
                 "resumed" if flags.session_present else "new")
        self._inbox.put(("connected", None))

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        if self._connected:
            log.warning("lost the broker (%s); reconnecting", reason)
        self._connected = False

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(("message", (self._generation, msg, time.time())))

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        self._inbox.put(("published", (mid, reason)))

    # ---- running ----

    def start(self) -> Service:
        host, port, _ = broker_address(self.cfg.broker)
        props = Properties(PacketTypes.CONNECT)
        # Alone, a persistent session: the broker keeps questions for us while
        # we restart. In a share group, Mosquitto would also route a share of
        # the questions to a member that is down, to wait for it; so members
        # hold no session and a question goes only to one that is up.
        shared = self.cfg.share_group is not None
        props.SessionExpiryInterval = 0 if shared else self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        try:
            self.client.connect_async(host, port, keepalive=self.cfg.keepalive_s, clean_start=shared,
                                      properties=props)
        except (OSError, ValueError) as e:
            raise EdgeSlmError(f"broker {self.cfg.broker}: {e}") from None
        for q in self.store.pending():  # accepted before a crash or a drain: answer them now
            self.flights[q.key] = Flight(q, stored=True)
            self._enqueue(q.key)
        if self.flights:
            log.info("%d question(s) accepted before the restart are answered first", len(self.flights))
        for q, final in self.store.undelivered():
            self._inbox.put(("republish", (q, final)))
        self._worker.start()
        self.client.loop_start()
        return self

    def stop(self) -> None:
        """Drain: stop taking questions, finish what runs (up to the drain
        timeout), keep the rest on disk for the next start, say offline."""
        self._inbox.put(("drain", None))
        self._worker.join(self.cfg.drain_timeout_s + 10)
        self.client.loop_stop()
        self.store.close()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._connected and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._connected

    def _work(self) -> None:
        drain_deadline = None
        while True:
            events = []
            # While answers stream, wake for their next chunks; else for events only.
            streaming = any(f.woke for f in self.flights.values())
            try:
                events.append(self._inbox.get(timeout=CHUNK_INTERVAL_S if streaming else 0.25))
                while len(events) < 256:
                    events.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            questions = []
            for kind, data in events:
                if kind == "message":
                    incoming = self._receive(*data)
                    if incoming is not None:
                        questions.append(incoming)
                elif kind == "text":  # a first piece: its chunk goes out below, at once
                    pass
                elif kind == "done":
                    self._done(*data)
                elif kind == "published":
                    self._published(*data)
                elif kind == "connected":
                    self._republish_unsent()
                    self._publish_status(force=True)
                    if self.cfg.ha_discovery:
                        self._publish_discovery()
                elif kind == "republish":
                    q, final = data
                    self._publish_final(q, json.loads(final), stored=True)
                elif kind == "drain" and drain_deadline is None:
                    drain_deadline = self._begin_drain()
            if questions:
                self._accept(questions)
            if self.unacked:
                self._retry_unacked()
            self._dispatch()
            self._flush_chunks()
            self._housekeeping()
            if drain_deadline is not None and self._drained(drain_deadline):
                break
        self._finish_drain()

    # ---- taking questions in ----

    def _receive(self, generation: int, msg: mqtt.MQTTMessage, now: float) -> Incoming | None:
        """Check one incoming message. Returns a new question to store and
        acknowledge; everything else is answered (or dropped) and acknowledged here."""
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""
        if self.cfg.ha_discovery and topic == f"{self.cfg.ha_prefix}/status":
            if msg.payload == b"online":
                self._publish_discovery()
            self._ack(generation, msg)
            return None
        if self._draining:
            return None  # unacknowledged: the broker sends it again after the restart
        where = p.parse_topic(topic)
        if where is None:
            log.warning("dropped a message on %r: not a topic of this protocol", topic[:120])
            self._ack(generation, msg)
            return None
        device, kind = where
        if kind == p.CANCEL:
            self._cancel(device, p.parse_cancel(msg.payload))
            self._ack(generation, msg)
            return None
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props else None
        try:
            q = p.parse_question(msg.payload, device, now=now, max_payload=self.cfg.max_payload,
                                 response_topic=response_topic, correlation=correlation,
                                 expiry_s=expiry, reply_scope=self.cfg.reply_scope)
        except p.BadRequest as e:
            self._refuse_bad(device, e, response_topic, correlation, now)
            self._ack(generation, msg)
            return None
        if q.key in self.unacked:  # sent again after a reconnect: acknowledge this copy once stored
            self.unacked[q.key] = Incoming(self.unacked[q.key].q, generation, msg.mid, msg.qos)
            return None
        if q.key in self.flights:
            log.info("%s/%s: asked again while in flight; not queued twice", *q.key)
            flight = self.flights[q.key]
            if flight.stored:
                self._ack(generation, msg)
            else:  # acknowledged only once the first copy is on disk
                flight.copies.append(Incoming(q, generation, msg.mid, msg.qos))
            return None
        stored = self.store.lookup(q.key)
        if stored and stored[0] in (ANSWERED, DELIVERED) and stored[1]:
            log.info("%s/%s: asked again; its stored answer is sent again", *q.key)
            self._publish_final(q, json.loads(stored[1]), stored=True)
            self._ack(generation, msg)
            return None
        refusal = self._admission(q, now)
        if refusal:
            self.stats[p.BUSY] += 1
            log.info("%s/%s: busy: %s; retry after %g s", *q.key, *refusal)
            self._publish_final(q, self._final(q, p.BUSY, error=refusal[0], retry_after_s=refusal[1]))
            self._ack(generation, msg)
            return None
        self.flights[q.key] = Flight(q)  # counted at once, so a burst is admitted against itself
        return Incoming(q, generation, msg.mid, msg.qos)

    def _refuse_bad(self, device: str, e: p.BadRequest, response_topic: str | None,
                    correlation: bytes | None, now: float) -> None:
        self.stats[p.BAD_REQUEST] += 1
        log.warning("%s: bad request%s: %s", device, f" {e.rid}" if e.rid else "", e)
        # A refused reply topic is not used for the refusal either: the device's own is.
        topic = response_topic if response_topic and p.reply_allowed(
            response_topic, device, self.cfg.reply_scope) else p.answer_topic(device)
        q = p.Question(device=device, id=e.rid or "", reply_to=topic, correlation=correlation,
                       mqtt5=response_topic is not None, received_at=now)
        self._publish_final(q, self._final(q, p.BAD_REQUEST, error=str(e)))

    def _admission(self, q: p.Question, now: float) -> tuple[str, float] | None:
        """(reason, retry_after_s) if the question must wait its turn, else None."""
        mine = sum(1 for k in self.flights if k[0] == q.device)
        if mine >= self.cfg.device_concurrency:
            return (f"this device already has {mine} questions in flight", 1.0)
        bucket = self.buckets.setdefault(q.device, TokenBucket(self.cfg.device_rate, self.cfg.device_burst,
                                                                time.monotonic()))
        wait = bucket.take(time.monotonic())
        if wait:
            return (f"this device is over {self.cfg.device_rate:g} questions/s", round(wait, 1) or 0.1)
        if len(self.flights) >= self.capacity:
            return ("the runtime is busy", self._retry_hint())
        return None

    def _accept(self, incoming: list[Incoming]) -> bool:
        """On disk in one transaction, then acknowledged: the order that loses
        nothing. If the disk refuses, they are held unacknowledged and tried
        again; the broker's Receive Maximum stops the flow meanwhile."""
        try:
            self.store.accept([i.q for i in incoming])
        except StoreError as e:
            if not self.unacked:
                log.error("cannot store questions; not acknowledged (the broker keeps them): %s", e)
            self.unacked.update((i.q.key, i) for i in incoming)
            return False
        for i in incoming:
            flight = self.flights[i.q.key]
            flight.stored = True
            for copy in [i, *flight.copies]:
                if copy.qos:
                    self._ack_mid(copy.generation, copy.mid)
            flight.copies = []
            if flight.cancel_asked:
                self._answer(flight, self._final(flight.q, p.CANCELLED, error="cancelled while waiting"))
            else:
                self._enqueue(i.q.key)
        self.stats["accepted"] += len(incoming)
        return True

    def _retry_unacked(self) -> None:
        now = time.monotonic()
        if now - self._last_retry < 1.0:
            return
        self._last_retry = now
        held = list(self.unacked.values())  # left there if refused again: one log line per outage
        if self._accept(held):
            self.unacked = {}
            log.info("the state directory is writable again: %d question(s) stored", len(held))

    def _ack(self, generation: int, msg: mqtt.MQTTMessage) -> None:
        if msg.qos:
            self._ack_mid(generation, msg.mid)

    def _ack_mid(self, generation: int, mid: int) -> None:
        # A mid belongs to its connection; after a reconnect the broker sends
        # the message again and the store recognises it.
        if generation == self._generation:
            self.client.ack(mid, 1)

    def _cancel(self, device: str, rid: str | None) -> None:
        flight = self.flights.get((device, rid)) if rid else None
        if flight is None:
            # In a share group every member hears every cancel; one holds the question.
            (log.debug if self.cfg.share_group else log.info)(
                "%s: cancel for %s, which is not in flight here", device,
                repr(rid) if rid else "no readable id")
            return
        if flight.req is not None:
            flight.req.cancel()  # the engine frees the slot at its next step; on_done follows
        elif not flight.stored:
            flight.cancel_asked = True
        else:
            self.waiting[device].remove(flight.q.key)
            if not self.waiting[device]:
                self.turn.remove(device)
            self._answer(flight, self._final(flight.q, p.CANCELLED, error="cancelled while waiting"))

    def _retry_hint(self) -> float:
        """Seconds until a place is likely free: the questions ahead, over the
        slots, at the mean answer time so far."""
        answered = max(1, self.stats[p.OK])
        per_answer = self._answer_seconds / answered if self._answer_seconds else 1.0
        ahead = len(self.flights) - self.capacity + 1
        return round(max(0.5, per_answer * max(1, ahead) / len(self.engine.slots)), 1)

    # ---- feeding the engine ----

    def _enqueue(self, key: tuple[str, str]) -> None:
        device = key[0]
        if device not in self.waiting or not self.waiting[device]:
            self.waiting.setdefault(device, collections.deque())
            self.turn.append(device)
        self.waiting[device].append(key)

    def _dispatch(self) -> None:
        """Hand waiting questions to the engine, one device at a time in
        turn, keeping at most a slot's worth queued inside the engine (none,
        when it is shared): its queue is first come, first served, ours is fair."""
        if self._draining:
            return
        room = self.engine_depth - sum(1 for f in self.flights.values()
                                                if f.req is not None and not f.req.done())
        while room > 0 and self.turn:
            device = self.turn.popleft()
            key = self.waiting[device].popleft()
            if self.waiting[device]:
                self.turn.append(device)
            flight = self.flights[key]
            if flight.q.expires_at is not None and time.time() >= flight.q.expires_at:
                self._answer(flight, self._final(flight.q, p.EXPIRED, error="expired before it could run"))
                continue
            self._submit(flight)
            room -= 1

    def _submit(self, flight: Flight) -> None:
        q = flight.q
        messages = list(q.messages) if q.messages else [{"role": "user", "content": q.question}]
        if q.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": q.system})
        timeout = self.engine.cfg.timeout
        if q.expires_at is not None:
            timeout = max(0.001, min(timeout, q.expires_at - time.time()))
        key = q.key
        flight.submitted = time.time()
        try:
            sampling = SamplingConfig(temperature=q.temperature or 0.0, seed=q.seed,
                                      repeat_penalty=REPEAT_PENALTY)
            flight.req = self.engine.submit(
                messages=messages, max_tokens=q.max_tokens, sampling=sampling, timeout=timeout,
                request_id=f"{q.device}/{q.id}",
                on_text=(lambda piece: self._text(flight, piece)) if q.stream else None,
                on_done=lambda result: self._inbox.put(("done", (key, result))),
                ground=q.ground, collection=q.collection)
        except (ValueError, TypeError, EdgeSlmError) as e:
            self._answer(flight, self._final(q, p.BAD_REQUEST, error=str(e)))

    def _text(self, flight: Flight, piece: str) -> None:
        """On the engine's thread: file the piece. Only the first wakes the
        worker: a wake a token would take a core from the model's threads
        hundreds of times a second; the rest go out with the next chunk."""
        flight.pieces.append(piece)
        if not flight.woke:
            flight.woke = True
            self._inbox.put(("text", flight.q.key))

    def _done(self, key: tuple[str, str], result: Result) -> None:
        flight = self.flights.get(key)
        if flight is None:
            return
        if flight.drained:  # stays pending on disk, answered after the restart, and counted as kept
            flight.req = None
            return
        self._flush_chunk(flight)
        if result.status == eng.OK:
            self._answer_seconds += result.total_s
        self._answer(flight, self._from_result(flight, result))

    def _from_result(self, flight: Flight, r: Result) -> dict[str, Any]:
        q = flight.q
        status = {eng.OK: p.OK, eng.BUSY: p.BUSY, eng.TOO_LONG: p.TOO_LONG, eng.TIMEOUT: p.TIMEOUT,
                  eng.CANCELLED: p.CANCELLED}.get(r.status)
        if status is None:  # the engine's ERROR: the question's fault, or ours
            status = p.INTERNAL if r.internal else p.BAD_REQUEST
        if status == p.TIMEOUT and not r.tokens and q.expires_at and time.time() >= q.expires_at:
            status = p.EXPIRED
        waited = flight.submitted - q.received_at  # before the engine saw it
        return self._final(q, status, text=r.text, error=r.error if status != p.OK else None,
                           finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                           answer_tokens=len(r.tokens), retry_after_s=r.retry_after,
                           queued=waited + r.queued_s,
                           first_token=None if r.ttft_s is None else waited + r.ttft_s,
                           grounding=r.grounding, sources=[p.source(h) for h in r.sources] or None)

    def _final(self, q: p.Question, status: str, *, text: str = "", error: str | None = None,
               prompt_tokens: int = 0, answer_tokens: int = 0, queued: float | None = None,
               first_token: float | None = None, **fields: Any) -> dict[str, Any]:
        """Every final carries the same fields, whatever ended the question."""
        total = max(0.0, time.time() - q.received_at) if q.received_at else 0.0
        ms = lambda s: None if s is None else round(1000 * s)  # noqa: E731
        return p.final(q.id or None, status, text=text, error=error, prompt_tokens=prompt_tokens,
                       answer_tokens=answer_tokens,
                       latency_ms={"queued": ms(total if queued is None else queued),
                                   "first_token": ms(first_token), "total": ms(total)},
                       model={"name": self.model_name, "sha256": self.model_sha256}, **fields)

    # ---- publishing ----

    def _answer(self, flight: Flight, final: dict[str, Any]) -> None:
        """Store the final, then publish it; the flight is over."""
        del self.flights[flight.q.key]
        self.stats[final["status"]] += 1
        if final["status"] not in (p.OK, p.CANCELLED):  # a refusal or a failure: one line saying why
            (log.warning if final["status"] == p.INTERNAL else log.info)(
                "%s/%s: %s: %s", *flight.q.key, final["status"], final.get("error"))
        if final["status"] == p.BUSY:  # the engine's queue was full: asking again must run it
            self._write_quietly(self.store.forget, flight.q.key)
            self._publish_final(flight.q, final)
            return
        self._write_quietly(self.store.answer, flight.q.key, p.dumps(final))
        self._publish_final(flight.q, final, stored=True)

    def _write_quietly(self, write, *args) -> None:
        try:
            write(*args)
        except StoreError as e:
            log.error("state not saved (an answer may be computed again after a restart): %s", e)

    def _properties(self, q: p.Question, status: str | None) -> Properties:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = p.CONTENT_TYPE
        props.PayloadFormatIndicator = 1
        if q.correlation is not None:
            props.CorrelationData = q.correlation
        if status is not None:
            props.UserProperty = (p.STATUS_PROPERTY, status)
        expiry = p.remaining_expiry(q.expires_at, time.time())
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        return props

    def _publish_final(self, q: p.Question, final: dict[str, Any], stored: bool = False) -> None:
        final = {**final, "id": q.id or final.get("id")}
        info = self.client.publish(q.reply_to, p.dumps(final), qos=1,
                                   properties=self._properties(q, final["status"]))
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            log.error("%s/%s: outgoing queue full; the final is kept on disk and sent at the next "
                      "connection", *q.key)
            if stored:
                self.unsent_finals.add(q.key)
        elif stored:
            self.finals_sent[info.mid] = q.key

    def _published(self, mid: int, reason) -> None:
        key = self.finals_sent.pop(mid, None)
        if key is None:
            return
        if reason.is_failure:  # e.g. the broker's ACL: sent again at the next start
            log.error("%s/%s: the broker refused the final answer: %s", *key, reason)
            return
        self._write_quietly(self.store.delivered, [key])

    def _republish_unsent(self) -> None:
        if not self.unsent_finals:
            return
        for q, final in self.store.undelivered():
            if q.key in self.unsent_finals:
                self.unsent_finals.discard(q.key)
                self._publish_final(q, json.loads(final), stored=True)

    def _flush_chunks(self) -> None:
        """The first chunk at once (time to first text is what a device
        feels), then at most one per CHUNK_INTERVAL_S per question: a message
        per token would cost the model threads their cores."""
        now = time.monotonic()
        for flight in self.flights.values():
            if (flight.unsent or flight.pieces) and (flight.seq == 0 or now - flight.chunk_sent >= CHUNK_INTERVAL_S):
                self._flush_chunk(flight)

    def _flush_chunk(self, flight: Flight) -> None:
        # Chunks are best effort (QoS 0, not sent while disconnected): the
        # final carries the whole text, and `seq` shows a gap.
        while flight.pieces:
            flight.unsent.append(flight.pieces.popleft())
        if not flight.unsent:
            return
        text = "".join(flight.unsent)
        flight.unsent = []
        flight.chunk_sent = time.monotonic()
        if self._connected:
            self.client.publish(flight.q.reply_to, p.dumps(p.chunk(flight.q.id, flight.seq, text)),
                                qos=0, properties=self._properties(flight.q, None))
        flight.seq += 1

    def status(self) -> dict[str, Any]:
        st = self.engine.status()
        return {"state": "online", "runtime_id": self.runtime_id, "version": __version__, "at": time.time(),
                "protocol": p.VERSION,
                "model": {"name": self.model_name, "sha256": self.model_sha256},
                "backend": st["backend"],
                "slots": st["slots"], "slots_busy": st["slots_busy"], "context": st["n_ctx"],
                "memory_budget": self.engine.cfg.memory_budget, "memory_plan": st["memory_plan"],
                "queue_depth": len(self.flights),
                "capacity": self.capacity, "uptime_s": round(time.monotonic() - self.started),
                "answers": {k: v for k, v in self.stats.items() if k in p.STATUSES},
                **(self.extra_status() if self.extra_status else {})}

    def _publish_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_status >= self.cfg.status_interval_s:
            self._last_status = now
            self.client.publish(self.status_topic, p.dumps(self.status()), qos=1, retain=True)

    def _publish_discovery(self) -> None:
        """Home Assistant MQTT discovery: the runtime as a device with a few
        sensors read from its retained status message."""
        node = f"edge_slm_{self.runtime_id}".replace("-", "_")
        device = {"identifiers": [node], "name": f"edge-slm {self.runtime_id}",
                  "model": self.model_name, "sw_version": __version__, "manufacturer": "edge-slm"}
        sensors = {"state": ("{{ value_json.state }}", None),
                   "queue_depth": ("{{ value_json.queue_depth }}", "questions"),
                   "slots_busy": ("{{ value_json.slots_busy }}", "slots"),
                   "uptime": ("{{ value_json.uptime_s }}", "s")}
        for name, (template, unit) in sensors.items():
            config = {"name": name.replace("_", " "), "unique_id": f"{node}_{name}",
                      "state_topic": self.status_topic, "value_template": template, "device": device,
                      "availability_topic": self.status_topic,
                      "availability_template": "{{ value_json.state }}",
                      "payload_available": "online", "payload_not_available": "offline"}
            if unit:
                config["unit_of_measurement"] = unit
                config["state_class"] = "measurement"
            self.client.publish(f"{self.cfg.ha_prefix}/sensor/{node}/{name}/config", p.dumps(config),
                                qos=1, retain=True)

    def _housekeeping(self) -> None:
        if self._connected:
            self._publish_status()
        now = time.monotonic()
        if now - self._last_purge > 60:
            self._last_purge = now
            self._write_quietly(self.store.purge, time.time() - self.cfg.dedup_window_s)

    # ---- draining ----

    def _begin_drain(self) -> float:
        # Alone, the subscription stays: the broker keeps what devices send
        # for our persistent session, and messages that arrive now go
        # unacknowledged, so it sends them again when we are back.
        log.info("draining: no new questions; finishing %d running (up to %g s)",
                 sum(1 for f in self.flights.values() if f.req), self.cfg.drain_timeout_s)
        self._draining = True
        if self.cfg.share_group and self._connected:  # the other members take new questions now
            self.client.unsubscribe(p.subscriptions(self.cfg.share_group))
        return time.monotonic() + self.cfg.drain_timeout_s

    def _drained(self, deadline: float) -> bool:
        now = time.monotonic()
        running = [f for f in self.flights.values() if f.req is not None]
        if now >= deadline:
            for f in running:
                if not f.drained:
                    f.drained = True
                    f.req.cancel()  # the engine ends it at its next step
        if running:
            return False
        return not self.finals_sent or now >= deadline + 5  # the broker's acknowledgements

    def _finish_drain(self) -> None:
        left = len(self.flights)
        if left:
            log.info("%d question(s) kept on disk, answered at the next start", left)
        info = self.client.publish(self.status_topic, p.dumps({"state": "offline", "at": time.time(),
                                                               "runtime_id": self.runtime_id}),
                                   qos=1, retain=True)
        if self._connected:
            try:
                info.wait_for_publish(timeout=5)
            except (RuntimeError, ValueError):
                pass
        self._connected = False  # our own goodbye is not a lost broker
        self.client.disconnect()
        log.info("stopped: status offline, %d question(s) kept for the next start", left)
