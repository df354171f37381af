"""A board's side of fleet updates over MQTT (edge_slm/fleet has the slots
and checks): offers checked against the trusted keys and the board's
policy, the model asked for a window of chunks at a time and written where
each belongs, then checked and switched to; a signed rollback obeyed.

It runs on its own connection and thread beside the service, which answers
questions meanwhile: network callbacks only enqueue, and the next window is
asked for only once the last is on disk, more slowly while the engine is
busy, so the download takes what the board can spare. A transfer survives
a lost connection, a restart of either side and a power cut: the board
keeps which chunks are on disk and asks again for the rest."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_slm.fleet.board import Board, Transfer, check_and_switch
from edge_slm.fleet.bundle import BundleError, bundle_id, verify_manifest

from . import protocol as p
from .service import ServiceConfig, broker_address, make_client

log = logging.getLogger(__name__)

INBOX = 2 * p.FLEET_WINDOW  # messages waiting for the worker; chunks beyond are asked for again
ASK_AGAIN_S = 5.0        # a window not filled by then is asked for again (the operator may be gone)
BUSY_RATE = 4 << 20      # bytes/s the download takes while the engine is answering
IDLE_RATE = 64 << 20     # and while it is idle
COMMAND_MAX_AGE_S = 3600.0  # a signed command older than this is refused (a replay)
STATE_EVERY_S = 60.0     # the retained state is refreshed this often: its "at" is when the board was last seen


def planned_bytes() -> int:
    """What a board's fleet link holds, for the memory plan: its inbox and the
    window being gathered, in chunks, and paho's buffers for one more.
    (cryptography, for the signatures, is imported before the engine plans:
    it is in the measured interpreter row.)"""
    return (INBOX + 2 * p.FLEET_WINDOW) * p.FLEET_CHUNK


class FleetLink:
    def __init__(self, board: Board, cfg: ServiceConfig, board_id: str, trusted: dict[str, object],
                 memory_budget: int | None, on_switch: Callable[[], None], busy: Callable[[], bool],
                 group: str | None = None):
        self.board = board
        self.group = group
        self.started = time.time()
        self.cfg = cfg
        self.board_id = board_id
        self.trusted = trusted
        self.memory_budget = memory_budget
        self.on_switch = on_switch  # the service restarts on the new slot
        self.busy = busy
        self._inbox: queue.Queue = queue.Queue(INBOX)
        self._stop = threading.Event()
        self._window: dict[int, bytes] = {}   # chunk index -> bytes, for the window asked for
        self._asked: set[int] = set()
        self._asked_at = 0.0
        self._state_at = 0.0
        self._thread = threading.Thread(target=self._work, name="edge-slm-fleet", daemon=True)
        self.client = make_client(f"{board_id}-fleet", cfg)
        self.client.manual_ack_set(False)  # a chunk lost before it is on disk is asked for again
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    # ---- network thread: validate and enqueue ----

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if not reason.is_failure:
            for kind in (p.OFFER, p.CHUNK, p.COMMAND):
                client.subscribe(p.fleet_topic(self.board_id, kind), qos=1)
            self._inbox.put(("connected", None))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind in (p.OFFER, p.COMMAND) and len(msg.payload) > p.MAX_OFFER:
            return
        if kind == p.CHUNK:
            props = dict(getattr(msg.properties, "UserProperty", None) or [])
            item = (kind, (props.get("bundle"), props.get("index"), props.get("sha256"), msg.payload))
        else:
            item = (kind, msg.payload)
        try:
            self._inbox.put_nowait(item)
        except queue.Full:  # a chunk dropped here is asked for again
            pass

    # ---- running ----

    def start(self) -> FleetLink:
        host, port, _ = broker_address(self.cfg.broker)
        self.client.connect_async(host, port, keepalive=self.cfg.keepalive_s, clean_start=True)
        self.client.loop_start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.loop_stop()
        self.client.disconnect()

    def report(self, state: str, reason: str = "", **fields: Any) -> None:
        """A result message for the operator (and the log); the retained state
        follows every step but a chunk's progress."""
        assert state in p.FLEET_STATES, state
        t = self.board.transfer()
        msg = {"board": self.board_id, "state": state, "reason": reason, "at": time.time(), **fields}
        if t is not None and "bundle" not in msg:
            msg["bundle"] = t.bundle
        self.client.publish(p.fleet_topic(self.board_id, p.RESULT), p.dumps(msg), qos=1)
        if state != p.RECEIVING:
            self.publish_state()

    def publish_state(self) -> None:
        """What `edge-fleet status` shows, retained: it stays when the board is offline."""
        state = {"board": self.board_id, "group": self.group, "memory_budget": self.memory_budget,
                 "started": self.started, "at": time.time(), **self.board.describe()}
        self.client.publish(p.fleet_topic(self.board_id, p.STATE), p.dumps(state), qos=1, retain=True)
        self._state_at = time.monotonic()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                kind, value = self._inbox.get(timeout=0.5)
            except queue.Empty:
                kind, value = None, None
            try:
                if kind == "connected" or time.monotonic() - self._state_at > STATE_EVERY_S:
                    self.publish_state()
                elif kind == p.OFFER:
                    self._offer(value)
                elif kind == p.CHUNK:
                    self._chunk(*value)
                elif kind == p.COMMAND:
                    self._command(value)
                t = self.board.transfer()
                if t is not None and (kind == "connected" or self._asked
                                      and time.monotonic() - self._asked_at > ASK_AGAIN_S):
                    self._ask(t, again=True)
            except BundleError as e:
                self.report(p.REFUSED, str(e))
            except Exception as e:  # a bug must not end the board's updates for good
                log.exception("fleet update failed")
                self.report(p.REFUSED, f"internal error: {e}")

    # ---- the update ----

    def _offer(self, payload: bytes) -> None:
        try:
            offer = json.loads(payload.decode("utf-8"))
            data = base64.b64decode(offer["manifest"], validate=True)
            signature = base64.b64decode(offer["signature"], validate=True)
            chunk_size = offer["chunk_size"]
            if not isinstance(chunk_size, int) or not 4096 <= chunk_size <= 1 << 20:
                raise ValueError("chunk_size")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BundleError(f"a malformed offer ({e})") from None
        m = verify_manifest(data, signature, self.trusted)
        bundle = bundle_id(data)
        active = self.board.manifest(self.board.pointer().active)
        if active == m:
            # offered again while (or after) the board switched to it: where it stands, not a refusal
            trial = self.board.pointer().trial
            self.report(p.SWITCHED if trial else p.COMMITTED,
                        f"{m.name} v{m.version} {'on trial' if trial else 'already running'}", bundle=bundle)
            return
        current = self.board.transfer()
        if current is None or current.bundle != bundle:
            try:
                self.board.check_manifest(m, self.memory_budget)
            except BundleError as e:
                self.board.log("refused", str(e))
                raise BundleError(str(e)) from None
        t = self.board.begin_transfer(bundle, data, signature, m, chunk_size)
        self.report(p.ACCEPTED, f"{m.name} v{m.version}", bundle=bundle, received=sum(t.received),
                    chunks=t.chunks)
        self._window.clear()
        self._asked.clear()
        self._ask(t)

    def _ask(self, t: Transfer, again: bool = False) -> None:
        """Ask for the next window of missing chunks (or the same again)."""
        wanted = [i for i in t.missing(p.FLEET_WINDOW) if i not in self._window]
        if not wanted:
            return
        self._asked = set(wanted)
        self._asked_at = time.monotonic()
        self.client.publish(p.fleet_topic(self.board_id, p.NEED),
                            p.dumps({"bundle": t.bundle, "chunks": wanted}), qos=1)

    def _chunk(self, bundle: str | None, index: str | None, digest: str | None, data: bytes) -> None:
        t = self.board.transfer()
        if t is None or bundle != t.bundle or index is None or not index.isdigit():
            return
        i = int(index)
        if i not in self._asked or len(data) != t.chunk_length(i):
            return
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("fleet: chunk %d of %s damaged in transit; asked for again", i, bundle)
            return
        self._window[i] = data
        self._asked.discard(i)
        if self._asked:
            return
        started = time.monotonic()
        t.write(self._window)
        written = sum(len(d) for d in self._window.values())
        self._window.clear()
        got = sum(t.received)
        if got % (8 * p.FLEET_WINDOW) < p.FLEET_WINDOW or t.complete():
            self.report(p.RECEIVING, "", bundle=t.bundle, received=got, chunks=t.chunks)
        if t.complete():
            self._install(t)
            return
        # pace: the questions being answered come first
        pause = written / (BUSY_RATE if self.busy() else IDLE_RATE) - (time.monotonic() - started)
        if pause > 0:
            self._stop.wait(pause)
        self._ask(t)

    def _install(self, t: Transfer) -> None:
        m = t.manifest
        slot = t.finish()
        self.report(p.CHECKING, f"{m.name} v{m.version}: loading it and asking its golden prompts",
                    bundle=t.bundle)
        check_and_switch(self.board, slot, m, self.memory_budget)
        self.report(p.SWITCHED, f"{m.name} v{m.version} in slot {slot}; restarting on it", bundle=t.bundle)
        self.on_switch()

    def _command(self, payload: bytes) -> None:
        """A signed rollback: {"op": "rollback", "board", "issued", "key_id"} and its
        Ed25519 signature (base64) over those bytes, as edge-fleet sends them."""
        from cryptography.exceptions import InvalidSignature

        try:
            envelope = json.loads(payload.decode("utf-8"))
            body = base64.b64decode(envelope["command"], validate=True)
            signature = base64.b64decode(envelope["signature"], validate=True)
            command = json.loads(body.decode("utf-8"))
            key = self.trusted.get(command.get("key_id"))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BundleError(f"a malformed command ({e})") from None
        if key is None:
            raise BundleError("a command signed by a key this board does not trust")
        try:
            key.verify(signature, body)
        except InvalidSignature:
            raise BundleError("a command whose signature does not check") from None
        issued = command.get("issued")
        if command.get("board") != self.board_id or not isinstance(issued, (int, float)) \
                or abs(time.time() - issued) > COMMAND_MAX_AGE_S \
                or issued <= float(self.board.meta("last_command") or 0):
            raise BundleError("a command for another board, too old, or sent before (a replay)")
        self.board.set_meta("last_command", str(issued))
        if command.get("op") != "rollback":
            raise BundleError(f"an unknown command {command.get('op')!r}")
        if not self.board.roll_back("rolled back by the operator"):
            raise BundleError("nothing to roll back to")
        self.report(p.ROLLED_BACK, "by the operator")
        self.on_switch()


def signed_command(op: str, board: str, private_key) -> bytes:
    """A command for one board, signed: what `edge-fleet rollback` sends."""
    from edge_slm.fleet.keys import key_id, raw_public

    body = json.dumps({"op": op, "board": board, "issued": time.time(),
                       "key_id": key_id(raw_public(private_key.public_key()))}).encode()
    return p.dumps({"command": base64.b64encode(body).decode(),
                    "signature": base64.b64encode(private_key.sign(body)).decode()})


def chunk_properties(bundle: str, index: int, data: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("bundle", bundle), ("index", str(index)),
                          ("sha256", hashlib.sha256(data).hexdigest())]
    return props

