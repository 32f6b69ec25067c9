"""The spool's SQLite file: schema, recovery and every statement (called on one thread only).

WAL journal, ``synchronous=NORMAL``: a committed batch survives the process being killed (the
operating system has it), and the file stays consistent across power loss.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import orjson

# No AUTOINCREMENT: it rewrites the sqlite_sequence page in every commit. Sequence numbers still
# never go back: the spool gives each record the next one explicitly, and the high watermark is
# kept in meta whenever rows are deleted.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    interception_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_INSERT = "INSERT INTO records (seq, record_id, kind, interception_id, created_at, payload) VALUES "
_INSERTS: dict[int, str] = {}
# (seq, record_id, kind, interception_id, created_at, payload), serialised on submit, where the
# sequence number is given too (the journal needs it).
Row = tuple[int, str, str, str, float, bytes]


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """A record as stored: sequence number, stable id, kind and its JSON payload."""

    seq: int
    record_id: str
    kind: str
    interception_id: str
    created_at: float
    payload: dict[str, Any]


class SpoolFile:
    """One connection to the spool file and the highest sequence number it holds."""

    def __init__(self, db: sqlite3.Connection, seq: int) -> None:
        self._db = db
        self._seq = seq

    @classmethod
    def open(cls, path: Path) -> tuple[SpoolFile, str, int, int]:
        """Open (create or recover) the file: ``(file, epoch, high watermark, acked through)``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened on a helper thread, then used only by the writer thread (never concurrently).
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is None:
            epoch = str(uuid.uuid4())
            db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        else:
            epoch = str(row[0])
        first, last = db.execute("SELECT MIN(seq), MAX(seq) FROM records").fetchone()
        kept = db.execute("SELECT value FROM meta WHERE key = 'high_watermark'").fetchone()
        high = max(int(last or 0), int(kept[0]) if kept else 0, _autoincrement_seq(db))
        # Everything below the oldest remaining record was acknowledged (or trimmed).
        acked = int(first) - 1 if first is not None else high
        return cls(db, high), epoch, high, acked

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def insert(self, rows: list[Row]) -> int:
        """Write ``rows`` in one statement (one transaction); the batch's highest seq."""
        sql = _INSERTS.get(len(rows))
        if sql is None:
            # Kept, so the statement cache finds it by a string whose hash is already known.
            sql = _INSERTS[len(rows)] = _INSERT + ",".join(["(?,?,?,?,?,?)"] * len(rows))
        # Autocommit: the single multi-row statement is its own transaction.
        self._db.execute(sql, list(chain.from_iterable(rows)))
        self._seq = max(self._seq, rows[-1][0])
        return self._seq

    def select(self, seq: int, limit: int) -> list[SpooledRecord]:
        """Records with a sequence number above ``seq``, oldest first."""
        cur = self._db.execute(
            "SELECT seq, record_id, kind, interception_id, created_at, payload FROM records"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [
            SpooledRecord(row[0], row[1], row[2], row[3], row[4], orjson.loads(row[5]))
            for row in cur.fetchall()
        ]

    def delete(self, through_seq: int) -> int:
        """Delete records up to ``through_seq``; how many were removed."""
        with self._db:
            self._db.execute("BEGIN")
            removed = self._db.execute("DELETE FROM records WHERE seq <= ?", (through_seq,))
            self._keep_high_watermark()
        return removed.rowcount

    def _keep_high_watermark(self) -> None:
        # Deleting the newest rows must not let a later batch reuse their sequence numbers.
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('high_watermark', ?)",
            (str(self._seq),),
        )

    def stats(self) -> tuple[int, float | None]:
        """``(records in the file, created_at of the oldest)``."""
        depth, oldest = self._db.execute("SELECT COUNT(*), MIN(created_at) FROM records").fetchone()
        return int(depth), oldest

    def trim(self, now: float, max_age: float, max_records: int) -> tuple[int, int]:
        """Enforce the spool bounds; returns (dropped by count, dropped by age)."""
        with self._db:
            self._db.execute("BEGIN")
            by_age = self._db.execute(
                "DELETE FROM records WHERE created_at < ?", (now - max_age,)
            ).rowcount
            (depth,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
            by_count = 0
            if depth > max_records:
                by_count = self._db.execute(
                    "DELETE FROM records WHERE seq IN"
                    " (SELECT seq FROM records ORDER BY seq LIMIT ?)",
                    (depth - max_records,),
                ).rowcount
            if by_age or by_count:
                self._keep_high_watermark()
        return by_count, by_age


def _autoincrement_seq(db: sqlite3.Connection) -> int:
    """The last sequence number of a spool made with AUTOINCREMENT by earlier versions, or 0."""
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    except sqlite3.OperationalError:  # no sqlite_sequence: no AUTOINCREMENT table here
        return 0
    return int(row[0]) if row else 0
