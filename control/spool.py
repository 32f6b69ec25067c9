"""SQLite WAL spool: every record is written here first, in batches, off the event loop.

``submit`` is synchronous and never blocks (it runs on the request path): records go to a bounded
in-memory queue that one writer task drains into one transaction per batch on a single worker
thread. The spool is the buffer between the data plane and the host, so nothing is delivered that
was not first made durable here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.metrics import SPOOL_HIGH_WATERMARK, SPOOL_RECORDS, USAGE_RECORDS_DROPPED
from gateway.records import Record

log = logging.getLogger("aibridged.spool")
T = TypeVar("T")
# (record_id, kind, interception_id, created_at, payload), serialised on submit.
_Row = tuple[str, str, str, float, bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    interception_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """A record as stored: sequence number, stable id, kind and its JSON payload."""

    seq: int
    record_id: str
    kind: str
    interception_id: str
    created_at: float
    payload: dict[str, Any]


class Spool:
    """Durable, batched record store implementing the data plane's ``UsageSink``."""

    def __init__(
        self,
        path: Path,
        *,
        batch_max: int = 2000,
        linger: float = 0.02,
        queue_max: int = 100_000,
        max_records: int = 5_000_000,
        max_age: float = 7 * 86400.0,
    ) -> None:
        self.path = path
        self.epoch = ""
        self.dropped = 0
        self.high_watermark = 0
        self.acked_through = 0
        self._max_records = max_records
        self._max_age = max_age
        self._next_bounds_check = 0.0
        self._written_event = asyncio.Event()
        self._urgent = asyncio.Event()
        self._acked_event = asyncio.Event()
        self._batch_max = batch_max
        self._linger = linger
        # Record ids are this run's random prefix plus a counter: unique across restarts, and
        # cheap (no entropy syscall per record).
        self._id_prefix = uuid.uuid4().hex[:16]
        self._next_id = 0
        self._queue: asyncio.Queue[_Row] = asyncio.Queue(maxsize=queue_max)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._submitted = 0
        self._written = 0
        self._progress = asyncio.Event()

    async def start(self) -> None:
        """Open (or recover) the database and start the writer task."""
        self.epoch, self.high_watermark, self.acked_through = await self._run(self._open)
        SPOOL_HIGH_WATERMARK.set(self.high_watermark)
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")

    def submit(self, record: Record) -> None:
        """Queue one record for the next batch; never blocks, never raises."""
        self._next_id += 1
        row = (
            f"{self._id_prefix}-{self._next_id}",
            record.kind,
            record.interception_id,
            _created(record),
            orjson.dumps(record),
        )
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1
            USAGE_RECORDS_DROPPED.labels("queue_full").inc()
            log.error(
                "usage spool queue full: record dropped (disk stalled?)",
                extra={"dropped_total": self.dropped, "kind": record.kind},
            )
            return
        self._submitted += 1

    async def flush(self) -> None:
        """Wait until every record submitted so far is committed to disk."""
        # Someone is waiting: the writer commits now instead of lingering for more records.
        self._urgent.set()
        target = self._submitted
        while self._written < target:
            if self._writer is None or self._writer.done():
                raise RuntimeError("spool writer is not running")
            self._progress.clear()
            await self._progress.wait()

    async def close(self) -> None:
        """Flush what is queued, stop the writer and close the database."""
        if self._writer is not None:
            await self.flush()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def read_after(self, seq: int, limit: int = 500) -> list[SpooledRecord]:
        """Records with a sequence number above ``seq``, oldest first."""
        return await self._run(self._select, seq, limit)

    async def ack(self, through_seq: int) -> int:
        """Delete records up to ``through_seq``; returns how many were removed."""
        removed = await self._run(self._delete, through_seq)
        if through_seq > self.acked_through:
            self.acked_through = min(through_seq, self.high_watermark)
            self._notify("_acked_event")
        return removed

    async def stats(self) -> tuple[int, float | None]:
        """``(records in the spool, created_at of the oldest)``."""
        depth, oldest = await self._run(self._stats)
        SPOOL_RECORDS.set(depth)
        return depth, oldest

    @property
    def written(self) -> asyncio.Event:
        """Set when the next batch is committed (a fresh event after each batch)."""
        return self._written_event

    @property
    def acked(self) -> asyncio.Event:
        """Set at the next acknowledgement (a fresh event after each one)."""
        return self._acked_event

    def _notify(self, name: str) -> None:
        # Wake every current waiter, then give later waiters a fresh event.
        getattr(self, name).set()
        setattr(self, name, asyncio.Event())

    @property
    def pending(self) -> int:
        """Records submitted but not yet committed."""
        return self._submitted - self._written

    # -- worker-thread side -----------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> tuple[str, int, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is None:
            epoch = str(uuid.uuid4())
            db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        else:
            epoch = str(row[0])
        self._db = db
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        high = int(seq[0]) if seq else 0
        first = db.execute("SELECT MIN(seq) FROM records").fetchone()[0]
        # Everything below the oldest remaining record was acknowledged (or trimmed).
        acked = int(first) - 1 if first is not None else high
        return epoch, high, acked

    def _insert(self, batch: Sequence[_Row]) -> int:
        assert self._db is not None
        # One multi-row statement per batch: sqlite3 releases the GIL once per statement step, and
        # every release lets the I/O-bound event loop thread stall behind this one (convoy).
        params = [value for row in batch for value in row]
        values = ",".join(["(?, ?, ?, ?, ?)"] * len(batch))
        with self._db:
            self._db.execute("BEGIN")
            cursor = self._db.execute(
                "INSERT INTO records (record_id, kind, interception_id, created_at, payload)"
                f" VALUES {values}",
                params,
            )
        # The rowid of the last row inserted: the batch's highest sequence number.
        return int(cursor.lastrowid or 0)

    def _select(self, seq: int, limit: int) -> list[SpooledRecord]:
        assert self._db is not None
        cur = self._db.execute(
            "SELECT seq, record_id, kind, interception_id, created_at, payload FROM records"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [
            SpooledRecord(row[0], row[1], row[2], row[3], row[4], orjson.loads(row[5]))
            for row in cur.fetchall()
        ]

    def _delete(self, through_seq: int) -> int:
        assert self._db is not None
        return self._db.execute("DELETE FROM records WHERE seq <= ?", (through_seq,)).rowcount

    def _stats(self) -> tuple[int, float | None]:
        assert self._db is not None
        depth, oldest = self._db.execute("SELECT COUNT(*), MIN(created_at) FROM records").fetchone()
        return int(depth), oldest

    def _trim(self, now: float) -> tuple[int, int]:
        """Enforce the spool bounds; returns (dropped by count, dropped by age)."""
        assert self._db is not None
        by_age = self._db.execute(
            "DELETE FROM records WHERE created_at < ?", (now - self._max_age,)
        ).rowcount
        (depth,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
        by_count = 0
        if depth > self._max_records:
            by_count = self._db.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT ?)",
                (depth - self._max_records,),
            ).rowcount
        return by_count, by_age

    # -- loop side --------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            # Linger briefly so a busy gateway writes a few large transactions, not many small ones.
            if self._linger and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        await self._urgent.wait()
            self._urgent.clear()
            while len(batch) < self._batch_max and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                high = await self._run(self._insert, batch)
            except Exception:
                log.exception("usage spool write failed; retrying the batch in 1s")
                for row in batch:
                    self._requeue(row)
                await asyncio.sleep(1.0)
                continue
            self._written += len(batch)
            self.high_watermark = high
            SPOOL_HIGH_WATERMARK.set(high)
            self._progress.set()
            self._notify("_written_event")
            await self._enforce_bounds()

    async def _enforce_bounds(self) -> None:
        now = time.time()
        if now < self._next_bounds_check:
            return
        self._next_bounds_check = now + 5.0
        by_count, by_age = await self._run(self._trim, now)
        for reason, count in (("spool_max_records", by_count), ("spool_max_age", by_age)):
            if count:
                self.dropped += count
                USAGE_RECORDS_DROPPED.labels(reason).inc(count)
                log.error(
                    "usage spool over its bound: unacknowledged records DROPPED",
                    extra={"reason": reason, "dropped": count, "dropped_total": self.dropped},
                )

    def _requeue(self, row: _Row) -> None:
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1
            self._written += 1
            USAGE_RECORDS_DROPPED.labels("queue_full").inc()
            log.error("usage spool queue full: record dropped", extra={"kind": row[1]})


def _created(record: Record) -> float:
    for name in ("started_at", "ended_at", "created_at"):
        value = getattr(record, name, None)
        if isinstance(value, float):
            return value
    return 0.0
