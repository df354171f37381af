"""The questions the service has accepted, on disk, so none is lost.

A question is written here (WAL, synchronous=FULL: on disk when commit
returns) before its PUBACK goes out. Its final answer is written here before
it is published, and the row is marked delivered when the broker acknowledges
that publish. Delivered rows are kept for a window so a question sent again
with the same (device, id) gets its stored answer instead of a second run,
then purged. After a crash, `pending()` and `undelivered()` say what to do.

One thread (the service's worker) uses a Store."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from .protocol import Question

PENDING, ANSWERED, DELIVERED = "pending", "answered", "delivered"

SCHEMA = """
CREATE TABLE IF NOT EXISTS questions (
    device      TEXT NOT NULL,
    id          TEXT NOT NULL,
    received_at REAL NOT NULL,   -- wall-clock seconds
    question    TEXT NOT NULL,   -- protocol.Question as JSON
    state       TEXT NOT NULL,   -- pending | answered | delivered
    final       BLOB,            -- the final answer's payload, once computed
    finished_at REAL,
    PRIMARY KEY (device, id)
);
CREATE INDEX IF NOT EXISTS questions_state ON questions (state, received_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(Exception):
    """The state directory cannot be written (full, read-only, gone)."""


def _to_json(q: Question) -> str:
    d = asdict(q)
    d["correlation"] = q.correlation.hex() if q.correlation is not None else None
    return json.dumps(d, ensure_ascii=False)


def _from_json(text: str) -> Question:
    d = json.loads(text)
    d["correlation"] = bytes.fromhex(d["correlation"]) if d["correlation"] is not None else None
    return Question(**d)


STORE_FILE = "questions.sqlite3"  # in the service's state directory
CACHE_KIB = 1024                  # SQLite's page cache


class Store:
    @classmethod
    def in_folder(cls, state_dir: Path) -> Store:
        return cls(Path(state_dir) / STORE_FILE)

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # bounded: the memory plan counts it
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            hint = " (is the state directory writable?)" if "unable to open" in str(e) else ""
            raise StoreError(f"{self.path}: {e}{hint}") from None

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, rows: list[tuple]) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # a COMMIT the disk refused has rolled back already
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {e}") from None

    def runtime_id(self, wanted: str | None = None) -> str:
        """The runtime's id: `wanted` if given (and kept from now on), else
        the one kept from an earlier run, else a new one."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'runtime_id'").fetchone()
        rid = wanted or (row[0] if row else f"rt-{uuid.uuid4().hex[:12]}")
        if not row or row[0] != rid:
            self._write("INSERT OR REPLACE INTO meta VALUES ('runtime_id', ?)", [(rid,)])
        return rid

    def lookup(self, key: tuple[str, str]) -> tuple[str, bytes | None] | None:
        """(state, final) of a question already stored, else None."""
        return self.db.execute("SELECT state, final FROM questions WHERE device = ? AND id = ?",
                               key).fetchone()

    def accept(self, questions: list[Question]) -> None:
        """Write new questions in one transaction: on disk when this returns.
        One still pending (its answer could not be stored) is asked again:
        its row is kept, with what it asks now."""
        self._write("INSERT INTO questions (device, id, received_at, question, state) "
                    "VALUES (?, ?, ?, ?, 'pending') ON CONFLICT (device, id) DO UPDATE SET "
                    "received_at = excluded.received_at, question = excluded.question "
                    "WHERE state = 'pending'",
                    [(q.device, q.id, q.received_at, _to_json(q)) for q in questions])

    def answer(self, key: tuple[str, str], final: bytes) -> None:
        self._write("UPDATE questions SET state = 'answered', final = ?, finished_at = ? "
                    "WHERE device = ? AND id = ?", [(final, time.time(), *key)])

    def forget(self, key: tuple[str, str]) -> None:
        self._write("DELETE FROM questions WHERE device = ? AND id = ?", [key])

    def delivered(self, keys: list[tuple[str, str]]) -> None:
        self._write("UPDATE questions SET state = 'delivered' WHERE device = ? AND id = ? "
                    "AND state = 'answered'", keys)

    def pending(self) -> list[Question]:
        rows = self.db.execute("SELECT question FROM questions WHERE state = 'pending' "
                               "ORDER BY received_at").fetchall()
        return [_from_json(r[0]) for r in rows]

    def undelivered(self) -> list[tuple[Question, bytes]]:
        rows = self.db.execute("SELECT question, final FROM questions WHERE state = 'answered' "
                               "ORDER BY finished_at").fetchall()
        return [(_from_json(q), f) for q, f in rows]

    def purge(self, older_than: float) -> int:
        """Forget delivered answers finished before `older_than` (wall clock)."""
        try:
            cur = self.db.execute("DELETE FROM questions WHERE state = 'delivered' AND finished_at < ?",
                                  (older_than,))
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {e}") from None
        return cur.rowcount

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, count(*) FROM questions GROUP BY state").fetchall())
