"""A board's two model slots and the update that moves between them, as a
state machine in the manner of Mender and RAUC:

    verify -> write to the inactive slot -> check (load + golden prompts) -> switch
           -> trial (the service restarted on it) -> commit | roll back

Every step that fails leaves the active slot as it was and says why. The
slot pointer (`active.json`) is replaced atomically (written beside, synced,
renamed, the directory synced), so a power cut leaves either the old
pointer or the new one. After a switch the new slot is on trial: each
service start counts, and a slot that has not been committed (its golden
prompts answered by the running service) after MAX_TRIAL_STARTS starts is
given up for the previous one, by the board itself.

Kept in SQLite beside the slots, surviving restarts: the version floor per
model name (a lower version is refused unless its manifest carries a signed
rollback), the latest trusted time seen, and every transition.

On expiry without a clock: a Pi has no real-time clock and may boot in 1970
or at its last saved time. Expiry only ever gates installing a bundle, never
the model already running, so a wrong clock cannot brick a board. A board
judges expiry against the later of its clock and the newest manifest time
it has trusted (which only moves forward): a board whose clock is behind
still refuses bundles older than ones it has seen expire, and one whose
clock is ahead refuses early, which an operator fixes by re-signing."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..errors import EdgeSlmError
from .bundle import MANIFEST, MODEL, BundleError, Manifest, Opened, runtime_tuple, sha256_of

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
POINTER = "active.json"
DB = "fleet.sqlite3"
MAX_TRIAL_STARTS = 3       # starts a switched-to slot gets to come back healthy
DISK_MARGIN = 64 << 20     # free space kept beyond a new model, so the board's disk never fills


@dataclass
class Pointer:
    active: str | None = None    # slot answering questions; None: the stock model (pull)
    previous: str | None = None  # slot kept to go back to
    trial: bool = False          # the active slot is not yet committed
    starts: int = 0              # service starts on the slot under trial
    reason: str = ""             # why the last transition happened


def _locked(method):
    """Board methods run one at a time: the service, its fleet link and the
    trial check each call them from their own thread."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


class Board:
    """The slots of one board, under `root` ($EDGE_SLM_HOME/fleet by default)."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        self.rolled_back: str | None = None  # why the last start() went back a slot, if it did
        try:
            root.mkdir(parents=True, exist_ok=True)
            for s in SLOTS:
                (root / f"slot-{s}").mkdir(exist_ok=True)
            # one connection, used by the service's threads in turn (the lock)
            self.db = sqlite3.connect(root / DB, timeout=10, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript("""
                CREATE TABLE IF NOT EXISTS floor (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY, at REAL NOT NULL,
                                                    event TEXT NOT NULL, detail TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS transfer (bundle TEXT PRIMARY KEY, manifest BLOB NOT NULL,
                                                     signature BLOB NOT NULL, slot TEXT NOT NULL,
                                                     chunk_size INTEGER NOT NULL, received BLOB NOT NULL);""")
        except (OSError, sqlite3.Error) as e:
            raise EdgeSlmError(f"{root}: cannot keep the model slots there ({e})") from None

    @_locked
    def close(self) -> None:
        self.db.close()

    # ---- what is where ----

    @_locked
    def pointer(self) -> Pointer:
        try:
            data = json.loads((self.root / POINTER).read_text())
            p = Pointer(**data)
        except FileNotFoundError:
            return Pointer()
        except (OSError, ValueError, TypeError) as e:  # a pointer we cannot read: keep to the stock model
            log.error("%s: unreadable (%s); using the stock model", self.root / POINTER, e)
            return Pointer()
        typed = (p.active in (*SLOTS, None) and p.previous in (*SLOTS, None) and isinstance(p.trial, bool)
                 and isinstance(p.starts, int) and not isinstance(p.starts, bool) and isinstance(p.reason, str))
        if not typed:
            log.error("%s: not a slot pointer; using the stock model", self.root / POINTER)
        return p if typed else Pointer()

    def _set_pointer(self, p: Pointer, event: str) -> None:
        path = self.root / POINTER
        tmp = path.with_name(f".{POINTER}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(asdict(p), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)
        self.log(event, p.reason)

    @_locked
    def slot_dir(self, slot: str) -> Path:
        return self.root / f"slot-{slot}"

    @_locked
    def manifest(self, slot: str | None) -> Manifest | None:
        if slot is None:
            return None
        try:
            return Manifest.from_bytes((self.slot_dir(slot) / MANIFEST).read_bytes())
        except (OSError, BundleError):
            return None

    @_locked
    def model_path(self, slot: str | None) -> Path | None:
        return None if slot is None else self.slot_dir(slot) / MODEL

    @_locked
    def inactive(self) -> str:
        p = self.pointer()
        return "b" if p.active == "a" else "a"

    @_locked
    def floor(self, name: str) -> int:
        row = self.db.execute("SELECT version FROM floor WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    @_locked
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @_locked
    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                        "SET value = excluded.value", (key, value))

    @_locked
    def trusted_time(self) -> float:
        return max(time.time(), float(self.meta("trusted_time") or 0.0))

    @_locked
    def log(self, event: str, detail: str = "") -> None:
        self.db.execute("INSERT INTO history (at, event, detail) VALUES (?, ?, ?)", (time.time(), event, detail))
        log.info("fleet: %s%s", event, f": {detail}" if detail else "")

    @_locked
    def last_result(self) -> tuple[str, str] | None:
        row = self.db.execute("SELECT event, detail FROM history ORDER BY id DESC LIMIT 1").fetchone()
        return row

    # ---- the update ----

    @_locked
    def check_manifest(self, m: Manifest, memory_budget: int | None) -> None:
        """Everything a manifest must pass before a byte of its model is stored."""
        p = self.pointer()
        running = self.manifest(p.active)
        if running and running.name == m.name and running.version == m.version and running.sha256 == m.sha256:
            raise BundleError(f"{m.name} v{m.version} is already running")
        failed = self.meta(_failed_key(m))
        if failed:
            raise BundleError(f"{m.name} v{m.version} failed on this board after its switch ({failed}); "
                              "sign a new version")
        if p.trial:  # its fallback is the slot a new model would fill
            raise BundleError(f"slot {p.active} is on trial; install again once it is committed or "
                              "rolled back")
        now = self.trusted_time()
        if now > m.expires:
            raise BundleError(f"{m.name} v{m.version} expired on "
                              f"{time.strftime('%Y-%m-%d', time.gmtime(m.expires))}; sign it again")
        floor = self.floor(m.name)
        if m.version < floor and not m.rollback:
            raise BundleError(f"{m.name} v{m.version} is older than v{floor}, installed before: a "
                              "downgrade needs a bundle packed with --rollback")
        if runtime_tuple(m.min_runtime) > runtime_tuple(__version__):
            raise BundleError(f"{m.name} v{m.version} needs edge-slm {m.min_runtime}; this is {__version__}")
        if memory_budget and m.memory_bytes > memory_budget:
            raise BundleError(f"{m.name} v{m.version} needs {m.memory_bytes >> 20} MiB at one slot; "
                              f"the board's budget is {memory_budget >> 20} MiB")
        free = shutil.disk_usage(self.root).free
        if m.size + DISK_MARGIN > free:
            raise BundleError(f"{m.name} v{m.version} is {m.size >> 20} MiB; the disk has "
                              f"{free >> 20} MiB free (keeping {DISK_MARGIN >> 20} MiB)")

    @_locked
    def receive(self, opened: Opened, progress: Callable[[int], None] | None = None) -> str:
        """Copy the bundle's model into the inactive slot, checking its sha256
        on the way; returns the slot. A partial copy is a .part file that
        the next receive starts again, never the slot's model."""
        slot = self._take_inactive()
        part = self.slot_dir(slot) / (MODEL + ".part")
        with open(opened.path, "rb") as src, open(part, "wb") as dst:
            src.seek(opened.model_offset)
            digest = sha256_of(_Tee(src, dst), opened.model_size, progress)
            dst.flush()
            os.fsync(dst.fileno())
        if digest != opened.manifest.sha256:
            part.unlink()
            raise BundleError(f"{opened.path}: model.gguf does not match the manifest's sha256")
        self.place(slot, part, opened.manifest)
        return slot

    # ---- a transfer in chunks (over MQTT): resumable after a lost link, kill -9 or power loss ----

    @_locked
    def begin_transfer(self, bundle: str, data: bytes, signature: bytes, m: Manifest,
                       chunk_size: int) -> Transfer:
        """The transfer of `bundle` (its signed manifest checked): the one in
        progress if it is this bundle, else a new one into the inactive slot,
        its space reserved on disk at once so the disk cannot fill later."""
        current = self.transfer()
        if current is not None and current.bundle == bundle and current.chunk_size == chunk_size:
            return current
        self.drop_transfer()
        slot = self._take_inactive()
        part = self.slot_dir(slot) / (MODEL + ".part")
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, m.size)
            os.fsync(fd)
        except OSError as e:
            raise BundleError(f"cannot reserve {m.size >> 20} MiB for the model ({e.strerror})") from None
        finally:
            os.close(fd)
        chunks = -(-m.size // chunk_size)
        with self.db:
            self.db.execute("INSERT INTO transfer VALUES (?, ?, ?, ?, ?, ?)",
                            (bundle, data, signature, slot, chunk_size, bytes(chunks)))
        self.log("receiving", f"{m.name} v{m.version} into slot {slot} ({chunks} chunks)")
        return self.transfer()

    @_locked
    def transfer(self) -> Transfer | None:
        row = self.db.execute("SELECT bundle, manifest, signature, slot, chunk_size, received "
                              "FROM transfer").fetchone()
        if row is None:
            return None
        try:
            m = Manifest.from_bytes(row[1])
        except BundleError:
            self.drop_transfer()
            return None
        return Transfer(self, row[0], row[1], row[2], m, row[3], row[4], bytearray(row[5]))

    @_locked
    def drop_transfer(self) -> None:
        t = self.transfer() if self.db.execute("SELECT 1 FROM transfer").fetchone() else None
        with self.db:
            self.db.execute("DELETE FROM transfer")
        if t is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.slot_dir(t.slot) / (MODEL + ".part")).unlink()

    @_locked
    def place(self, slot: str, model_file: Path, manifest: Manifest) -> None:
        """Make `model_file` (checked) the slot's model, with its manifest."""
        folder = self.slot_dir(slot)
        os.replace(model_file, folder / MODEL)
        tmp = folder / (MANIFEST + ".part")
        tmp.write_bytes(manifest.to_bytes())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
        fsync_dir(folder)
        self.log("received", f"{manifest.name} v{manifest.version} in slot {slot}")

    def _take_inactive(self) -> str:
        """The inactive slot, emptied for a new model: no longer a fallback."""
        slot = self.inactive()
        p = self.pointer()
        if p.previous == slot:
            p.previous = None
            self._set_pointer(p, f"slot {slot} refilled")
        self.clear(slot)
        return slot

    @_locked
    def clear(self, slot: str) -> None:
        for name in (MODEL, MANIFEST, MODEL + ".part"):
            with contextlib.suppress(FileNotFoundError):
                (self.slot_dir(slot) / name).unlink()

    @_locked
    def switch(self, slot: str, reason: str) -> None:
        """Make `slot` (received and checked) the active one, on trial."""
        p = self.pointer()
        self._set_pointer(Pointer(active=slot, previous=p.active, trial=True, starts=0, reason=reason),
                          "switched")

    @_locked
    def start(self) -> Path | None:
        """At each service start: the model to load (None: the stock one).
        A slot on trial that has had its starts without being committed is
        given up for the previous slot."""
        p = self.pointer()
        self.rolled_back = None
        if p.trial:
            if p.starts >= MAX_TRIAL_STARTS:
                self.give_up(f"slot {p.active} did not come back healthy in {MAX_TRIAL_STARTS} starts")
                p = self.pointer()
            else:
                p.starts += 1
                self._set_pointer(p, f"trial start {p.starts} of {MAX_TRIAL_STARTS}")
        return self.model_path(p.active)

    @_locked
    def commit(self) -> None:
        """The slot on trial answered its golden prompts in service: keep it,
        and raise the version floor to it."""
        p = self.pointer()
        if not p.trial:
            return
        m = self.manifest(p.active)
        with self.db:
            if m is not None:
                self.db.execute("INSERT INTO floor (name, version) VALUES (?, ?) ON CONFLICT(name) DO "
                                "UPDATE SET version = max(version, excluded.version)", (m.name, m.version))
                self.db.execute("INSERT INTO meta (key, value) VALUES ('trusted_time', ?) ON CONFLICT(key) "
                                "DO UPDATE SET value = max(CAST(value AS REAL), excluded.value)", (m.created,))
        p.trial, p.starts = False, 0
        p.reason = f"{m.name} v{m.version} healthy" if m else "healthy"
        self._set_pointer(p, "committed")

    @_locked
    def give_up(self, reason: str) -> None:
        """The slot on trial failed after its switch (it did not load, did not
        answer its golden prompts in service, or did not come back healthy):
        back to the previous slot, and that model is not taken again."""
        m = self.manifest(self.pointer().active)
        if m is not None:
            self.set_meta(_failed_key(m), reason)
        self.roll_back(reason)
        self.rolled_back = reason

    @_locked
    def roll_back(self, reason: str) -> bool:
        """Back to the previous slot (or the stock model); False if there is
        nothing to go back to, or only a model that failed here."""
        p = self.pointer()
        if p.previous is not None and not self.model_path(p.previous).is_file():
            p.previous = None
        kept = self.manifest(p.previous)
        if kept is not None and self.meta(_failed_key(kept)):
            raise BundleError(f"slot {p.previous} holds {kept.name} v{kept.version}, which failed on this "
                              f"board: {self.meta(_failed_key(kept))}")
        if p.active is None and p.previous is None:
            return False
        self._set_pointer(Pointer(active=p.previous, previous=p.active, trial=False, starts=0,
                                  reason=reason), "rolled back")
        return True

    @_locked
    def describe(self) -> dict:
        """For the board's retained status."""
        p = self.pointer()
        now, before = self.manifest(p.active), self.manifest(p.previous)
        last = self.last_result()
        brief = lambda m: None if m is None else {"name": m.name, "version": m.version,  # noqa: E731
                                                  "sha256": m.sha256}
        return {"slot": p.active, "model": brief(now), "previous": brief(before), "trial": p.trial,
                "last": {"event": last[0], "detail": last[1]} if last else None}


@dataclass
class Transfer:
    """A model arriving in chunks: which are on disk (synced) is kept in SQLite."""

    board: Board
    bundle: str
    data: bytes          # the signed manifest, as offered
    signature: bytes
    manifest: Manifest
    slot: str
    chunk_size: int
    received: bytearray  # one byte per chunk: 1 once it is synced to disk

    @property
    def part(self) -> Path:
        return self.board.slot_dir(self.slot) / (MODEL + ".part")

    @property
    def chunks(self) -> int:
        return len(self.received)

    def missing(self, limit: int) -> list[int]:
        return [i for i, got in enumerate(self.received) if not got][:limit]

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.manifest.size - index * self.chunk_size)

    def write(self, pieces: dict[int, bytes]) -> None:
        with self.board.lock:
            self._write(pieces)

    def _write(self, pieces: dict[int, bytes]) -> None:
        """Write chunks at their places, sync, then record them: the record
        never claims a chunk that a power cut could lose."""
        fd = os.open(self.part, os.O_WRONLY)
        try:
            for index, data in pieces.items():
                os.pwrite(fd, data, index * self.chunk_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        for index in pieces:
            self.received[index] = 1
        with self.board.db:
            self.board.db.execute("UPDATE transfer SET received = ? WHERE bundle = ?",
                                  (bytes(self.received), self.bundle))

    def complete(self) -> bool:
        return all(self.received)

    def finish(self) -> str:
        with self.board.lock:
            return self._finish()

    def _finish(self) -> str:
        """Check the whole file against the manifest and place it in its
        slot; returns the slot. A mismatch starts the transfer again."""
        with open(self.part, "rb") as f:
            digest = sha256_of(f, self.manifest.size) if self.part.stat().st_size == self.manifest.size else ""
        if digest != self.manifest.sha256:
            self.board.drop_transfer()
            raise BundleError(f"{self.manifest.name} v{self.manifest.version}: the received model does "
                              "not match the manifest's sha256")
        from .header import check_header

        try:  # before it takes the slot's name: a header that lies never becomes a model
            with open(self.part, "rb") as f:
                check_header(f.read, self.manifest.size)
        except BundleError:
            self.board.drop_transfer()
            raise
        with self.board.db:
            self.board.db.execute("DELETE FROM transfer")
        self.board.place(self.slot, self.part, self.manifest)
        return self.slot


class _Tee:
    """A reader that writes what it reads: the copy and its hash in one pass."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst

    def read(self, n: int) -> bytes:
        block = self.src.read(n)
        self.dst.write(block)
        return block


def _failed_key(m: Manifest) -> str:
    """A release that failed on a board after its switch: never taken again there."""
    return f"failed:{m.name}:{m.version}:{m.sha256}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(board: Board, bundle: Path, trusted: dict[str, object], memory_budget: int | None,
            progress: Callable[[int], None] | None = None) -> Manifest:
    """The whole update from a local file, short of the trial: verify,
    receive into the inactive slot, check the candidate, switch."""
    from .bundle import open_bundle, verify_model
    from .header import check_header

    try:
        opened = open_bundle(bundle, trusted)
        board.check_manifest(opened.manifest, memory_budget)
        with open(bundle, "rb") as f:  # a header that lies is refused before a byte is stored
            f.seek(opened.model_offset)
            check_header(f.read, opened.model_size)
        # the whole file first: the inactive slot holds the fallback until a good model replaces it
        verify_model(opened, progress)
        slot = board.receive(opened)
    except BundleError as e:
        board.log("refused", str(e))
        raise
    check_and_switch(board, slot, opened.manifest, memory_budget)
    return opened.manifest


def check_and_switch(board: Board, slot: str, m: Manifest, memory_budget: int | None) -> None:
    """A received model's last check before it answers anyone (it loads
    under the budget and answers its golden prompts), then the switch. A
    refusal raises BundleError with the reason, logged; the active slot
    keeps answering and the untrusted model is not kept."""
    from .golden import GoldenFailed, check_candidate

    try:
        check_candidate(board.model_path(slot), m.golden, memory_budget, m.memory_bytes)
    except GoldenFailed as e:
        board.clear(slot)
        board.log("refused", f"{m.name} v{m.version}: {e}")
        raise BundleError(f"{m.name} v{m.version} refused: {e}") from None
    board.switch(slot, f"{m.name} v{m.version} installed")
