"""The index of a site's manuals: passages in SQLite, searched with FTS5.

Each passage is indexed twice: once stemmed (porter over unicode61), so that
"overheating" finds "overheat", and once by exact tokens that keep '-', '.',
'/' and '_' inside them, so that an error code, a part number or a model name
(`E-417`, `HP-30`, `6204-2RS`) matches itself and nothing else. The exact
table is asked only for a query's codes, and its score counts EXACT_WEIGHT
times. Both tables are contentless: the text is stored once, in `passages`."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeSlmError, is_whole
from ..paths import home
from .passages import Passage, UnparsableFile, split_markdown, split_pdf, split_text
from .retrieve import exact_text, fts_query, query_terms

SCHEMA_VERSION = "1"
INDEX_FILE = "index.sqlite3"
CACHE_KIB = 2048            # SQLite's page cache, per connection: the index's share of the memory plan
HEADING_WEIGHT = 3.0        # bm25 column weight of the heading path against 1.0 for the body
EXACT_WEIGHT = 2.0          # an exact code counts twice: a question names one on purpose (tests/grounding)
CANDIDATES = 50             # passages taken from each FTS table before the two scores are summed
BUSY_SECONDS = 10.0         # how long to wait for another indexer to finish before giving up

_COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SPLITTERS = {".md": split_markdown, ".markdown": split_markdown, ".txt": split_text, ".text": split_text,
              ".pdf": split_pdf}

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE collections (name TEXT PRIMARY KEY, root TEXT NOT NULL, indexed_at REAL NOT NULL);
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    collection TEXT NOT NULL REFERENCES collections(name),
    path TEXT NOT NULL,          -- relative to the collection's folder, '/'-separated
    sha256 TEXT NOT NULL,
    UNIQUE (collection, path));
CREATE TABLE passages (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id),
    heading TEXT NOT NULL,       -- ' > '-joined heading path, or ''
    page INTEGER,                -- PDF page from 1, or NULL
    text TEXT NOT NULL);
CREATE INDEX passages_file ON passages(file_id);
CREATE VIRTUAL TABLE fts_stem USING fts5(heading, body, content='', tokenize='porter unicode61');
CREATE VIRTUAL TABLE fts_exact USING fts5(heading, body, content='',
    tokenize="unicode61 tokenchars '-./_'");
INSERT INTO meta VALUES ('schema', '{SCHEMA_VERSION}');
"""


class IndexFileError(EdgeSlmError):
    """An index file that is missing, corrupt, locked or from another version."""


@dataclass(frozen=True)
class IndexReport:
    added: int
    changed: int
    removed: int
    unchanged: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    files: int
    passages: int
    indexed_at: float  # seconds since the epoch


@dataclass(frozen=True)
class Hit:
    collection: str
    file: str            # relative to the indexed folder
    heading: str         # ' > '-joined heading path, or ''
    page: int | None     # PDF page from 1
    text: str
    score: float         # higher is better: the summed bm25 of the stemmed and exact matches
    passage_id: int
    coverage: float = 0.0  # share of the query's words in the passage, each weighted by its
                           # rarity in the index (idf): how much of the question it speaks to


class Index:
    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db = db
        self.path = path

    @classmethod
    def open(cls, path: Path | None = None, *, create: bool = True, shared: bool = False) -> Index:
        """The index at `path` (default $EDGE_SLM_HOME/index.sqlite3), made
        empty if it is absent and `create` is set. A `shared` index may be
        used from any thread, one at a time (the caller serialises)."""
        path = home() / INDEX_FILE if path is None else Path(path)
        if not path.exists():
            if not create:
                raise IndexFileError(f"{path}: no index there; run `edge-slm index DIR` first")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise IndexFileError(f"{path}: cannot make an index there ({e.strerror})") from None
        elif not path.is_file():
            raise IndexFileError(f"{path}: is not a file")
        try:
            # Autocommit: add_folder opens its one transaction itself.
            db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None,
                                 check_same_thread=not shared)
        except sqlite3.Error as e:
            raise IndexFileError(f"{path}: cannot open the index ({e})") from None
        try:
            _prepare(db, path)
        except BaseException:
            db.close()
            raise
        return cls(db, path)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_folder(self, folder: Path, collection: str = "default",
                   progress: Callable[[int, int, str], None] | None = None,
                   replace: bool = False) -> IndexReport:
        """Make `collection` mirror the manuals in `folder`: files whose
        content changed are re-read, files gone are dropped, and the whole run
        is one transaction, so an interrupted run leaves the previous index.
        A collection made from another folder is refused unless `replace`:
        mirroring this one would drop every manual of the other."""
        folder = Path(folder)
        if not _COLLECTION_NAME.fullmatch(collection):
            raise EdgeSlmError(f"{collection!r}: a collection name is 1-64 letters, digits, '_', '.' or '-'")
        if not folder.is_dir():
            raise EdgeSlmError(f"{folder}: not a folder")
        root = self._read("SELECT root FROM collections WHERE name = ?", (collection,))
        if root and root[0][0] != str(folder.resolve()) and not replace:
            raise EdgeSlmError(f"collection {collection!r} holds the manuals of {root[0][0]}; name another "
                               "with --collection, or replace them with --replace")
        files, skipped = _manual_files(folder)
        db = self._db
        added = changed = unchanged = 0
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO collections VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                           "root = excluded.root, indexed_at = excluded.indexed_at",
                           (collection, str(folder.resolve()), time.time()))
                known = dict(db.execute("SELECT path, sha256 FROM files WHERE collection = ?", (collection,)))
                for done, (rel, path) in enumerate(files, 1):
                    if progress is not None:
                        progress(done, len(files), rel)
                    digest = _sha256(path)
                    if digest is None:
                        skipped.append((rel, "cannot be read"))
                        known.pop(rel, None)  # unreadable for now: keep what was indexed
                        continue
                    old = known.pop(rel, None)
                    if old == digest:
                        unchanged += 1
                        continue
                    try:
                        # Whole before any is stored: a PDF failing at page 90
                        # must leave no first 89 pages behind.
                        passages = list(_SPLITTERS[path.suffix.lower()](path))
                    except UnparsableFile as e:
                        skipped.append((rel, str(e)))
                        continue
                    self._replace_file(collection, rel, digest, passages)
                    if old is None:
                        added += 1
                    else:
                        changed += 1
                # What is left in `known` was not found in the folder.
                for rel in known:
                    self._drop_file(collection, rel)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite itself rolls back on some errors (a full disk)
                    db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:  # locked by another indexer, a full disk, a damaged file
            raise IndexFileError(f"{self.path}: cannot write the index ({e})") from None
        return IndexReport(added, changed, len(known), unchanged, skipped)

    def _replace_file(self, collection: str, rel: str, digest: str, passages: list[Passage]) -> None:
        db = self._db
        self._drop_file(collection, rel)
        file_id = db.execute("INSERT INTO files (collection, path, sha256) VALUES (?, ?, ?)",
                             (collection, rel, digest)).lastrowid
        for p in passages:
            pid = db.execute("INSERT INTO passages (file_id, heading, page, text) VALUES (?, ?, ?, ?)",
                             (file_id, p.heading, p.page, p.text)).lastrowid
            db.execute("INSERT INTO fts_stem (rowid, heading, body) VALUES (?, ?, ?)", (pid, p.heading, p.text))
            db.execute("INSERT INTO fts_exact (rowid, heading, body) VALUES (?, ?, ?)",
                       (pid, exact_text(p.heading), exact_text(p.text)))

    def _drop_file(self, collection: str, rel: str) -> None:
        db = self._db
        row = db.execute("SELECT id FROM files WHERE collection = ? AND path = ?", (collection, rel)).fetchone()
        if row is None:
            return
        # A contentless FTS5 table forgets a row only when told the very
        # values it indexed.
        for pid, heading, text in db.execute("SELECT id, heading, text FROM passages WHERE file_id = ?", row):
            db.execute("INSERT INTO fts_stem (fts_stem, rowid, heading, body) VALUES ('delete', ?, ?, ?)",
                       (pid, heading, text))
            db.execute("INSERT INTO fts_exact (fts_exact, rowid, heading, body) VALUES ('delete', ?, ?, ?)",
                       (pid, exact_text(heading), exact_text(text)))
        db.execute("DELETE FROM passages WHERE file_id = ?", row)
        db.execute("DELETE FROM files WHERE id = ?", row)

    def collections(self) -> list[CollectionInfo]:
        rows = self._read(
            "SELECT c.name, (SELECT count(*) FROM files f WHERE f.collection = c.name), "
            "(SELECT count(*) FROM passages p JOIN files f ON f.id = p.file_id WHERE f.collection = c.name), "
            "c.indexed_at FROM collections c ORDER BY c.name")
        return [CollectionInfo(*row) for row in rows]

    def search(self, query: str, collection: str | None = None, limit: int = 5) -> list[Hit]:
        """The best `limit` passages for `query`, best first. Any text is a
        safe query: it is reduced to quoted terms, never read as FTS5 syntax."""
        if not is_whole(limit, 1):
            raise EdgeSlmError(f"limit {limit!r}: must be a whole number >= 1")
        if collection is not None and not self._read("SELECT 1 FROM collections WHERE name = ?", (collection,)):
            names = [name for (name,) in self._read("SELECT name FROM collections ORDER BY name")]
            raise EdgeSlmError(f"no collection {collection!r}; there are: {', '.join(names) or 'none'}")
        scores: dict[int, float] = {}
        where = "" if collection is None else " AND f.collection = ?"
        for table, match, weight in (("fts_stem", fts_query(query), 1.0),
                                     ("fts_exact", fts_query(query, codes_only=True), EXACT_WEIGHT)):
            if not match:
                continue
            args = (match,) if collection is None else (match, collection)
            rows = self._read(
                f"SELECT {table}.rowid, bm25({table}, {HEADING_WEIGHT}, 1.0) AS b FROM {table} "
                f"JOIN passages p ON p.id = {table}.rowid JOIN files f ON f.id = p.file_id "
                f"WHERE {table} MATCH ?{where} ORDER BY b LIMIT {max(CANDIDATES, limit)}", args)
            for pid, bm25 in rows:
                scores[pid] = scores.get(pid, 0.0) - weight * bm25  # bm25() is lower for better matches
        best = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:limit]
        # An indexer may commit between these reads: a passage gone since is left out.
        hits = [hit for pid, score in best if (hit := self._hit(pid, score)) is not None]
        return self._with_coverage(query, hits)

    def _with_coverage(self, query: str, hits: list[Hit]) -> list[Hit]:
        """`hits` with their coverage of `query`. Unlike bm25, whose scale
        grows with the number of passages indexed, coverage is a share (0 to
        1), so one threshold on it holds for one manual or a thousand: a
        question about something the manuals never name (its rarest words
        found nowhere) stays low however many passages share its common words."""
        if not hits:
            return hits
        terms = query_terms(query)
        (n_passages,) = self._read("SELECT count(*) FROM passages")[0]
        idf = {}
        for t in terms:
            (n,) = self._read("SELECT count(*) FROM fts_stem WHERE fts_stem MATCH ?", (f'"{t}"',))[0]
            idf[t] = math.log((n_passages - n + 0.5) / (n + 0.5) + 1)  # bm25's, never negative
        total = sum(idf.values()) or 1.0
        return [dataclasses.replace(hit, coverage=sum(
            w for t, w in idf.items()
            if self._read("SELECT 1 FROM fts_stem WHERE fts_stem MATCH ? AND rowid = ?",
                          (f'"{t}"', hit.passage_id))) / total) for hit in hits]

    def passage(self, passage_id: int) -> Hit | None:
        """A passage by its id (a source a front end opens again), with score 0."""
        return self._hit(passage_id, 0.0)

    def _hit(self, passage_id: int, score: float) -> Hit | None:
        rows = self._read("SELECT f.collection, f.path, p.heading, p.page, p.text FROM passages p "
                          "JOIN files f ON f.id = p.file_id WHERE p.id = ?", (passage_id,))
        return Hit(*rows[0], score, passage_id) if rows else None

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise IndexFileError(f"{self.path}: cannot read the index ({e})") from None


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Check that `db` is an index of this version (or make it one if empty)
    and set the connection up."""
    try:
        db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            db.executescript(_SCHEMA)
            row = (SCHEMA_VERSION,)
        else:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if "meta" in tables else None
        if row is not None:
            # WAL lets a reader (the kiosk) search while an index is written.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.OperationalError as e:
        if "fts5" in str(e):
            raise IndexFileError(f"this Python's sqlite3 (SQLite {sqlite3.sqlite_version}) has no FTS5") from None
        raise IndexFileError(f"{path}: cannot read the index ({e})") from None
    except sqlite3.DatabaseError as e:
        raise IndexFileError(f"{path}: not an edge-slm index ({e})") from None
    if row is None:
        raise IndexFileError(f"{path}: not an edge-slm index (an SQLite file without its tables)")
    if row[0] != SCHEMA_VERSION:
        raise IndexFileError(f"{path}: index format {row[0]}, this edge-slm reads {SCHEMA_VERSION}; "
                             "delete it and index again")


def _manual_files(folder: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """The manuals under `folder` as (relative path, path), in a stable order,
    and the ones refused before reading. Hidden files and folders and files of
    other kinds are passed over in silence."""
    files: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(top, name)
            if name.startswith(".") or path.suffix.lower() not in _SPLITTERS:
                continue
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                skipped.append((rel, "a symlink, not followed"))
            elif not path.is_file():
                skipped.append((rel, "not a regular file"))
            else:
                files.append((rel, path))
    return files, skipped


def _sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()

