"""The spool's SQLite file: schema, recovery and every statement (called on one thread only).

WAL journal, ``synchronous=NORMAL``: a committed batch survives the process being killed (the
operating system has it), and the file stays consistent across power loss.

A row holds a run of consecutive records (up to ``_ROW_MAX``), not one: SQLite's cost is per row
far more than per byte, and one row per batch cut the writer thread's time per request by half.
The ``spooled_records`` view shows one row per record for operators.

The files hold prompts: the database, its WAL and shared-memory files, the journal and the lock
are the owner's only (0600), tightened at start when an earlier version left them wider (one
daemon per spool: ``control.spool_lock``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("aibridged.spool")

# No AUTOINCREMENT: it rewrites the sqlite_sequence page in every commit. Sequence numbers still
# never go back: the spool gives each record the next one explicitly, and the high watermark is
# kept in meta whenever rows are deleted. Acknowledged records of a row that is still partly
# unacknowledged stay until the rest is: meta's acked_through hides them.
_RECORDS = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,     -- sequence number of the row's first record
    count INTEGER NOT NULL,      -- records in the row: seq, seq + 1, ..., seq + count - 1
    created_at REAL NOT NULL,    -- when the row's records were spooled (the age bound)
    payload BLOB NOT NULL,       -- the records, a JSON array with one record per line
    record_id TEXT               -- only on rows carried over from the one-record-per-row layout
)"""
_SCHEMA = f"""{_RECORDS};
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS open_interceptions (id TEXT PRIMARY KEY);
CREATE VIEW IF NOT EXISTS spooled_records AS
SELECT r.seq + j.key AS seq,
       coalesce(r.record_id, (SELECT value FROM meta WHERE key = 'epoch') || ':' || (r.seq + j.key))
           AS record_id,
       json_extract(j.value, '$.kind') AS kind,
       json_extract(j.value, '$.interception_id') AS interception_id,
       j.value AS payload
FROM records AS r, json_each(CAST(r.payload AS TEXT)) AS j
WHERE r.seq + j.key
    > coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'acked_through'), 0);
"""

# What every SQLite database file starts with (an empty file is a new database).
_HEADER = b"SQLite format 3\x00"
_INSERT = "INSERT INTO records (seq, count, created_at, payload) VALUES "
_INSERTS: dict[int, str] = {}
# Records per row at most: a reader paging with a small limit parses a whole row.
_ROW_MAX = 256
# (first seq, created_at, JSON objects): a run of records with consecutive sequence numbers.
Run = tuple[int, float, list[bytes]]


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """A record as stored: sequence number, stable id, kind and its JSON payload.

    ``raw`` is the line as stored, kept only when the record could not be read whole (not a
    JSON object, or no text kind, interception id or readable time stamp): the host then gets
    those bytes. The fields that could be read are kept, the others are "" and 0.0.
    """

    seq: int
    record_id: str
    kind: str
    interception_id: str
    created_at: float
    payload: dict[str, Any]
    raw: bytes = b""


class SpoolFile:
    """One connection to the spool file, its epoch, highest and acknowledged sequence numbers."""

    def __init__(self, db: sqlite3.Connection, epoch: str, seq: int, acked: int) -> None:
        self._db = db
        self._epoch = epoch
        self._seq = seq
        self._acked = acked

    @classmethod
    def open(cls, path: Path) -> tuple[SpoolFile, str, int, int]:
        """Open (create or recover) the file: ``(file, epoch, high watermark, acked through)``."""
        # Created 0600 before SQLite opens it: SQLite gives the WAL and shared-memory files it
        # creates the database file's permissions.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            header = os.read(fd, len(_HEADER))
        finally:
            os.close(fd)
        # Some other file: refused as SQLite would, before its permissions are touched.
        if header and header != _HEADER:
            raise sqlite3.DatabaseError("file is not a database")
        for name in ("", "-wal", "-shm"):
            owner_only(path.with_name(path.name + name))
        # Opened on a helper thread, then used only by the writer thread (never concurrently).
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        _upgrade_one_record_rows(db)
        db.executescript(_SCHEMA)
        epoch = _meta(db, "epoch")
        if epoch is None:
            epoch = str(uuid.uuid4())
            db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        first, last = db.execute("SELECT MIN(seq), MAX(seq + count - 1) FROM records").fetchone()
        high = max(int(last or 0), int(_meta(db, "high_watermark") or 0), _autoincrement_seq(db))
        # Everything below the oldest remaining record was acknowledged (or trimmed).
        acked = high if first is None else max(int(first) - 1, int(_meta(db, "acked_through") or 0))
        return cls(db, epoch, high, acked), epoch, high, acked

    @classmethod
    def open_reader(cls, path: Path, epoch: str) -> SpoolFile:
        """A second connection, for reads only: in WAL mode it never waits for the writer."""
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA query_only=1")
        return cls(db, epoch, 0, 0)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def insert(self, runs: list[Run]) -> int:
        """Write ``runs`` in one statement (one transaction); the highest seq now stored."""
        params: list[Any] = []
        for first, created_at, records in runs:
            for i in range(0, len(records), _ROW_MAX):
                part = records[i : i + _ROW_MAX]
                # Compact JSON has no raw newline: a reader splits the records without parsing.
                params += (first + i, len(part), created_at, b"[" + b",\n".join(part) + b"]")
        rows = len(params) // 4
        sql = _INSERTS.get(rows)
        if sql is None:
            # Kept, so the statement cache finds it by a string whose hash is already known.
            sql = _INSERTS[rows] = _INSERT + ",".join(["(?,?,?,?)"] * rows)
        # Autocommit: the single multi-row statement is its own transaction.
        self._db.execute(sql, params)
        first, _, records = runs[-1]
        self._seq = max(self._seq, first + len(records) - 1)
        return self._seq

    def select(self, after: int, limit: int, through: int) -> list[SpooledRecord]:
        """Records with ``after < seq <= through``, oldest first.

        ``after`` is at least the acknowledged sequence number (acknowledged records may still
        be in the file: the writer deletes them when it gets to it). ``through`` is the high
        watermark the caller reports with them: this connection may see a commit before the
        event loop hears of it.
        """
        # From the row holding ``after`` (it may hold later records too), or the next one.
        cur = self._db.execute(
            "SELECT seq, payload, record_id FROM records WHERE seq >= coalesce("
            "(SELECT MAX(seq) FROM records WHERE seq <= ?1), ?1 + 1) AND seq <= ?3"
            " ORDER BY seq LIMIT ?2",
            (after, limit + 1, through),  # + 1: the first row may hold nothing above ``after``
        )
        out: list[SpooledRecord] = []
        for first, payload, legacy_id in cur:  # rows fetched one by one: they can be large
            lines = payload[1:-1].split(b",\n")
            skip = max(0, after - first + 1)
            end = min(len(lines), through - first + 1, skip + limit - len(out))
            for i in range(skip, end):
                n = first + i
                out.append(_spooled(n, legacy_id or f"{self._epoch}:{n}", lines[i]))
            if len(out) == limit:
                break
        return out

    def delete(self, through_seq: int) -> int:
        """Acknowledge records up to ``through_seq``; how many were removed."""
        through = min(through_seq, self._seq)
        if through <= self._acked:
            return 0
        with self._db:
            self._db.execute("BEGIN")
            rows = self._db.execute(
                "SELECT seq, count FROM records WHERE seq <= ?", (through,)
            ).fetchall()
            removed = sum(self._unacked(s, c) - self._unacked(s, c, through) for s, c in rows)
            self._remember_open(through)
            self._db.execute(
                "DELETE FROM records WHERE seq <= ?1 AND seq + count - 1 <= ?1", (through,)
            )
            self._acked = through
            _set_meta(self._db, "acked_through", through)
            self._keep_high_watermark()
        return removed

    def _unacked(self, seq: int, count: int, acked: int | None = None) -> int:
        """How many of a row's records lie above ``acked`` (default: the file's)."""
        done = (self._acked if acked is None else acked) - seq + 1
        return count - min(max(done, 0), count)

    def _keep_high_watermark(self) -> None:
        # Deleting the newest rows must not let a later batch reuse their sequence numbers.
        _set_meta(self._db, "high_watermark", self._seq)

    def stats(self, acked: int | None = None) -> tuple[int, float | None]:
        """``(records above acked in the file, created_at of the oldest)``; default: the file's."""
        total, oldest = self._db.execute(
            "SELECT total(min(count, seq + count - 1 - ?1)), MIN(created_at) FROM records"
            " WHERE seq + count - 1 > ?1",
            (self._acked if acked is None else acked,),
        ).fetchone()
        return int(total), oldest

    def count_between(self, after: int, through: int) -> int:
        """How many records the file holds with ``after < seq <= through``."""
        (total,) = self._db.execute(
            "SELECT total(min(seq + count - 1, ?2) - max(seq, ?1 + 1) + 1) FROM records"
            " WHERE seq <= ?2 AND seq + count - 1 > ?1",
            (after, through),
        ).fetchone()
        return int(total)

    def _remember_open(self, through: int) -> None:
        """Before rows up to ``through`` are deleted, keep the ids of the interceptions they
        start and do not end (``open_interceptions`` table), and forget those they end.

        A host acknowledges a start within milliseconds while the stream lasts minutes: without
        this, a crash would leave the host with starts whose interruption nobody records.
        """
        rows = self._db.execute(
            "SELECT payload FROM records WHERE seq <= ?1 AND seq + count - 1 <= ?1 ORDER BY seq",
            (through,),
        )
        opened: dict[str, None] = {}
        ended: set[str] = set()
        for (payload,) in rows:
            _follow_interceptions(payload[1:-1].split(b",\n"), opened, ended)
        if opened:
            self._db.executemany(
                "INSERT OR IGNORE INTO open_interceptions (id) VALUES (?)", [(i,) for i in opened]
            )
        if ended:
            self._db.executemany(
                "DELETE FROM open_interceptions WHERE id = ?", [(i,) for i in ended]
            )

    def open_interceptions(self) -> list[str]:
        """Ids of ``interception_started`` records with no end record after them: those of
        deleted rows (``open_interceptions`` table) and those of the rows still in the file,
        acknowledged or not.

        An interception's end is always spooled after its start, so one pass in sequence order
        keeps only the interceptions open at that point in memory. A record is decoded only
        when its line names one of the two kinds (most are usage records).
        """
        open_: dict[str, None] = dict.fromkeys(
            i for (i,) in self._db.execute("SELECT id FROM open_interceptions")
        )
        ended: set[str] = set()
        for (payload,) in self._db.execute("SELECT payload FROM records ORDER BY seq"):
            _follow_interceptions(payload[1:-1].split(b",\n"), open_, ended)
        return list(open_)

    def trim(self, now: float, max_age: float, max_records: int) -> tuple[int, int, int]:
        """Enforce the spool bounds; returns (dropped by count, dropped by age, the highest
        sequence number of the records dropped or 0)."""
        with self._db:
            self._db.execute("BEGIN")
            old = self._db.execute(
                "SELECT seq, count FROM records WHERE created_at < ?", (now - max_age,)
            ).fetchall()
            by_age = sum(self._unacked(s, c) for s, c in old)
            through = max((s + c - 1 for s, c in old), default=0)
            self._db.execute("DELETE FROM records WHERE created_at < ?", (now - max_age,))
            excess = self.stats()[0] - max_records
            by_count = 0
            if excess > 0:
                last = 0
                for s, c in self._db.execute("SELECT seq, count FROM records ORDER BY seq"):
                    by_count += self._unacked(s, c)
                    last = s
                    through = max(through, s + c - 1)
                    if by_count >= excess:
                        break
                self._db.execute("DELETE FROM records WHERE seq <= ?", (last,))
            if by_age or by_count:
                self._keep_high_watermark()
        return by_count, by_age, through if by_age or by_count else 0


def owner_only(path: Path) -> None:
    """Take group and other permissions away from ``path`` if it exists and has any."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        path.chmod(mode & 0o700)
        log.warning(
            "spool file was readable by others: permissions tightened to its owner",
            extra={"file": str(path), "mode": f"{mode:o}", "now": f"{mode & 0o700:o}"},
        )


def _spooled(seq: int, record_id: str, line: bytes) -> SpooledRecord:
    """The record a stored line holds, read leniently: a corrupt line is still delivered (as
    what could be read of it, and its bytes), since raising here would stop every reader at
    this line on every reconnect."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        return SpooledRecord(seq, record_id, "", "", 0.0, {}, line)
    kind, iid = record.get("kind"), record.get("interception_id")
    try:
        at: float | None = record_time(record)
    except (TypeError, ValueError, OverflowError):
        at = None
    if isinstance(kind, str) and isinstance(iid, str) and at is not None:
        return SpooledRecord(seq, record_id, kind, iid, at, record)
    kind, iid = (v if isinstance(v, str) else "" for v in (kind, iid))
    return SpooledRecord(seq, record_id, kind, iid, at or 0.0, record, line)


def record_time(record: dict[str, Any]) -> float:
    """A decoded record's time stamp (each kind has one of these)."""
    for key in ("created_at", "started_at", "ended_at"):
        if key in record:
            return float(record[key])
    return 0.0


def _follow_interceptions(lines: list[bytes], opened: dict[str, None], ended: set[str]) -> None:
    """Update ``opened`` (started, not yet ended) and ``ended`` (ended, start not in
    ``opened``) with ``lines``, records in sequence order."""
    for line in lines:
        if b'"interception_started"' not in line and b'"interception_ended"' not in line:
            continue
        try:
            record = orjson.loads(line)
            kind, iid = record["kind"], record["interception_id"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            continue  # unreadable: StreamUsage reports it, nothing to close here
        if not isinstance(iid, str):
            continue
        if kind == "interception_started":
            opened[iid] = None
        elif kind == "interception_ended" and opened.pop(iid, 0) is not None:
            ended.add(iid)


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_meta(db: sqlite3.Connection, key: str, value: object) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))


def _upgrade_one_record_rows(db: sqlite3.Connection) -> None:
    """Carry a spool written by earlier versions (one record per row) over to this layout."""
    columns = [row[1] for row in db.execute("PRAGMA table_info(records)")]
    if "kind" not in columns:
        return
    (last,) = db.execute("SELECT MAX(seq) FROM records").fetchone()
    kept = _meta(db, "high_watermark")
    high = max(int(last or 0), int(kept or 0), _autoincrement_seq(db))
    with db:
        db.execute("BEGIN")
        db.execute("ALTER TABLE records RENAME TO records_one_per_row")
        db.execute(_RECORDS)
        db.execute(
            "INSERT INTO records (seq, count, created_at, payload, record_id)"
            " SELECT seq, 1, created_at, CAST('[' || CAST(payload AS TEXT) || ']' AS BLOB),"
            " record_id"
            " FROM records_one_per_row"
        )
        db.execute("DROP TABLE records_one_per_row")
        _set_meta(db, "high_watermark", high)


def _autoincrement_seq(db: sqlite3.Connection) -> int:
    """The last sequence number of a spool made with AUTOINCREMENT by earlier versions, or 0."""
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    except sqlite3.OperationalError:  # no sqlite_sequence: no AUTOINCREMENT table here
        return 0
    return int(row[0]) if row else 0
