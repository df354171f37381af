"""The operator's side over MQTT: offer a bundle to boards and send them the
chunks they ask for; roll out to a group in waves; read the boards' retained
state; send a signed rollback.

The operator only answers: each board asks for the chunks it lacks, so a
board that lost its connection or rebooted resumes by asking again, and an
operator that restarts `flash` offers again and is asked for the rest. A
board silent for OFFER_AGAIN_S is offered the bundle again."""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Raw, bundle_id, read_bundle

log = logging.getLogger(__name__)

OFFER_AGAIN_S = 15.0
STATUS_WAIT_S = 2.0   # retained messages arrive at once; this is the wait for the last of them
DONE = ("committed", "refused", "rolled_back")


@dataclass
class BoardRun:
    board: str
    state: str = "offered"
    received: int = 0
    chunks: int = 0
    reason: str = ""
    heard: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.state in DONE

    @property
    def ok(self) -> bool:
        return self.state == "committed"


class Link:
    """The operator's MQTT connection: messages from boards on a queue."""

    def __init__(self, cfg, topics: list[str]):
        from firmware_bridge.client import subscribed_client

        self.inbox: queue.Queue = queue.Queue()
        self.client = subscribed_client(cfg, f"edge-fleet-{uuid.uuid4().hex[:8]}", topics, self.inbox.put)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def read_states(cfg) -> dict[str, dict]:
    """Every board's retained fleet state and runtime status, by board."""
    from firmware_bridge import protocol as p

    link = Link(cfg, [f"{p.ROOT}/{p.FLEET_SEGMENT}/+/{p.STATE}", f"{p.ROOT}/{p.RUNTIME_SEGMENT}/+/{p.STATUS}"])
    boards: dict[str, dict] = {}
    deadline = time.monotonic() + STATUS_WAIT_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = link.inbox.get(timeout=left)
            except queue.Empty:
                break
            parts = msg.topic.split("/")
            try:
                body = json.loads(msg.payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(body, dict):
                boards.setdefault(parts[3], {})["fleet" if parts[2] == p.FLEET_SEGMENT else "runtime"] = body
    finally:
        link.close()
    return boards


def group_members(cfg, group: str) -> tuple[list[str], list[str]]:
    """The boards of `group` online now, and those offline (not flashed: they
    would only run out the clock)."""
    members = {b: s for b, s in read_states(cfg).items() if s.get("fleet", {}).get("group") == group}
    online = sorted(b for b, s in members.items() if s.get("runtime", {}).get("state") == "online")
    return online, sorted(set(members) - set(online))


class Flasher:
    """One bundle to many boards."""

    def __init__(self, cfg, bundle: Path, on_update: Callable[[BoardRun], None] | None = None):
        from firmware_bridge import protocol as p

        self.raw: Raw = read_bundle(bundle)
        self.bundle = bundle_id(self.raw.manifest)
        self.on_update = on_update or (lambda run: None)
        self.link = Link(cfg, [f"{p.ROOT}/{p.FLEET_SEGMENT}/+/{p.NEED}",
                               f"{p.ROOT}/{p.FLEET_SEGMENT}/+/{p.RESULT}"])
        self.file = open(bundle, "rb")

    def close(self) -> None:
        self.file.close()
        self.link.close()

    def _offer(self, board: str) -> None:
        import base64

        from firmware_bridge import protocol as p

        offer = {"bundle": self.bundle, "manifest": base64.b64encode(self.raw.manifest).decode(),
                 "signature": base64.b64encode(self.raw.signature).decode(), "chunk_size": p.FLEET_CHUNK}
        self.link.client.publish(p.fleet_topic(board, p.OFFER), p.dumps(offer), qos=1)

    def _send(self, board: str, indices: list[int]) -> None:
        from firmware_bridge import protocol as p
        from firmware_bridge.fleet_link import chunk_properties

        size = self.raw.model_size
        for i in indices:
            if not isinstance(i, int) or not 0 <= i * p.FLEET_CHUNK < size:
                continue
            self.file.seek(self.raw.model_offset + i * p.FLEET_CHUNK)
            data = self.file.read(min(p.FLEET_CHUNK, size - i * p.FLEET_CHUNK))
            self.link.client.publish(p.fleet_topic(board, p.CHUNK), data, qos=1,
                                     properties=chunk_properties(self.bundle, i, data))

    def run(self, boards: list[str], timeout: float) -> dict[str, BoardRun]:
        """Flash `boards` until each has committed, refused or rolled back, or
        `timeout` seconds pass (then the board's last state is its result)."""
        runs = {b: BoardRun(b) for b in boards}
        for b in boards:
            self._offer(b)
        deadline = time.monotonic() + timeout
        while not all(r.done for r in runs.values()) and time.monotonic() < deadline:
            try:
                msg = self.link.inbox.get(timeout=1.0)
            except queue.Empty:
                msg = None
            if msg is not None:
                self._handle(msg, runs)
            now = time.monotonic()
            for r in runs.values():
                if not r.done and now - r.heard > OFFER_AGAIN_S:
                    r.heard = now
                    self._offer(r.board)
        for r in runs.values():
            if not r.done:
                r.reason = r.reason or f"no result within {timeout:g} s (last: {r.state})"
                r.state = "timeout"
        return runs

    def _handle(self, msg, runs: dict[str, BoardRun]) -> None:
        from firmware_bridge import protocol as p

        parts = msg.topic.split("/")
        run = runs.get(parts[3]) if len(parts) == 5 else None
        if run is None:
            return
        try:
            body = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        if not isinstance(body, dict) or body.get("bundle") not in (self.bundle, None):
            return
        run.heard = time.monotonic()
        if parts[4] == p.NEED and isinstance(body.get("chunks"), list):
            self._send(run.board, body["chunks"][:p.FLEET_WINDOW])
        elif parts[4] == p.RESULT and body.get("state") in p.FLEET_STATES:
            run.state = body["state"]
            run.reason = str(body.get("reason", ""))
            run.received = body.get("received", run.received)
            run.chunks = body.get("chunks", run.chunks)
            self.on_update(run)


def rollout(flasher: Flasher, boards: list[str], canary: int, max_failures: int, timeout: float,
            say: Callable[[str], None]) -> tuple[dict[str, BoardRun], bool]:
    """Waves: the first `canary` boards, then the rest once the first are
    healthy. Stops when failures pass `max_failures`. Returns every board's
    run and whether the rollout went to the end."""
    waves = [boards[:canary], boards[canary:]] if 0 < canary < len(boards) else [boards]
    runs: dict[str, BoardRun] = {}
    for n, wave in enumerate(waves, 1):
        if len(waves) > 1:
            say(f"wave {n} of {len(waves)}: {', '.join(wave)}")
        runs.update(flasher.run(wave, timeout))
        failed = [r for r in runs.values() if not r.ok]
        if len(failed) > max_failures:
            rest = [b for w in waves[n:] for b in w]
            say(f"stopped: {len(failed)} board(s) failed, more than --max-failures {max_failures}"
                + (f"; not flashed: {', '.join(rest)}" if rest else ""))
            return runs, False
    return runs, True


def rollback(cfg, boards: list[str], private_key, timeout: float) -> dict[str, BoardRun]:
    """Send each board a signed rollback and wait for what it says."""
    from firmware_bridge import protocol as p
    from firmware_bridge.fleet_link import signed_command

    link = Link(cfg, [f"{p.ROOT}/{p.FLEET_SEGMENT}/+/{p.RESULT}"])
    runs = {b: BoardRun(b, state="sent") for b in boards}
    try:
        for b in boards:
            link.client.publish(p.fleet_topic(b, p.COMMAND), signed_command("rollback", b, private_key), qos=1)
        deadline = time.monotonic() + timeout
        while not all(r.state in ("rolled_back", "refused") for r in runs.values()) \
                and (left := deadline - time.monotonic()) > 0:
            try:
                msg = link.inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            parts = msg.topic.split("/")
            run = runs.get(parts[3])
            try:
                body = json.loads(msg.payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if run is not None and isinstance(body, dict) and body.get("state") in ("rolled_back", "refused"):
                run.state, run.reason = body["state"], str(body.get("reason", ""))
    finally:
        link.close()
    for r in runs.values():
        if r.state == "sent":
            r.state, r.reason = "timeout", f"no answer within {timeout:g} s"
    return runs
