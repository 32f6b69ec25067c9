"""SQLite WAL spool: every record is written here first, in batches, off the event loop.

``submit`` is synchronous and never blocks (it runs on the request path): it serialises the record,
gives it its sequence number and hands it to one writer thread that owns the database
(``control.spool_writer``). ``persist``, which every response calls before its last byte, does not
wait for that: it copies the records into the journal (``control.journal``, a memory-mapped file),
and the next start replays whatever SQLite had not committed. The spool is the buffer between the
data plane and the host, so nothing is delivered that was not first made durable here.

Reads run on a connection and thread of their own (``control.spool_reader``) and ``ack`` is
recorded in memory at once: a stalled disk write holds back neither ``StreamUsage``, ``GetStatus``
nor ``AckUsage``. At start the spool takes its lock, replays the journal and ends what the last
run left open (``control.spool_recovery``); at close, each record it could not commit is in the
journal or counted as dropped, never lost silently. The file itself is ``control.spool_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from control.journal import Journal
from control.record_json import sanitised_json
from control.spool_backlog import Backlog
from control.spool_file import SpooledRecord
from control.spool_lock import lock_spool
from control.spool_reader import SpoolReader, SpoolReads
from control.spool_recovery import interrupted, recover, report_unwritten
from control.spool_writer import SpoolWriter
from gateway.metrics import (
    SPOOL_HIGH_WATERMARK,
    SPOOL_WRITE_PROBLEMS,
    USAGE_RECORDS_DROPPED,
)
from gateway.records import Record

__all__ = ["Spool", "SpooledRecord"]

log = logging.getLogger("aibridged.spool")


class Spool(SpoolWriter, SpoolReads):
    """Durable, batched record store implementing the data plane's ``UsageSink``."""

    def __init__(
        self,
        path: Path,
        *,
        linger: float = 0.02,
        queue_max: int = 100_000,
        max_records: int = 5_000_000,
        max_age: float = 7 * 86400.0,
        flush_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.epoch = ""
        self.dropped = 0
        self.high_watermark = 0
        self.acked_through = 0
        self._queue_max = queue_max
        self._written_event = asyncio.Event()
        self._acked_event = asyncio.Event()
        # A record's sequence number is implied by its position: the n-th record submitted since
        # start (from 0) gets _seq_base + 1 + n, on both sides (the journal needs them on the
        # loop side, the writer thread counts its own). A record's id is epoch:seq.
        self._seq_base = 0
        self._journal: Journal | None = None
        self._unjournaled: list[bytes] = []
        self._journaled_through = 0
        self._journal_full_logged = False
        # Loop side: counts and the flush waiters, (records submitted before, future) in order.
        self._submitted = 0
        self._written = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Degraded: the last batch failed, or nothing committed for flush_timeout while someone
        # waited. Responses then stop waiting (availability first); their records stay queued
        # and are written once the disk recovers, which ends the degraded state.
        self.degraded = False
        self._flush_timeout = flush_timeout
        self._stall_timer: asyncio.TimerHandle | None = None
        self._written_at_check = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # The lock's descriptor, and the reads (a connection and thread of their own).
        self._lock: int | None = None
        self._reader: SpoolReader | None = None
        self._backlog = Backlog()
        # Shared with the writer thread (control.spool_writer). Waking the thread is one lock
        # release, and only when a flag says it is asleep.
        self._init_writer(linger, max_records, max_age)

    @property
    def journal_path(self) -> Path:
        """The journal beside the database file."""
        real = self.path.resolve()  # one journal per file, however the path spells it
        return real.with_name(real.name + ".journal")

    async def start(self) -> None:
        """Lock and open (or recover) the spool, replay the journal, start the writer thread.

        Raises ``ConfigError`` when another process has the spool open.
        """
        self._loop = asyncio.get_running_loop()
        self._lock = await asyncio.to_thread(lock_spool, self.path)
        try:
            got = await asyncio.to_thread(recover, self.path, self.journal_path)
        except BaseException:
            self._release()
            raise
        if got.unreadable:
            self.dropped += got.unreadable
            USAGE_RECORDS_DROPPED.labels("journal_unreadable").inc(got.unreadable)
        if got.replayed:
            log.warning(
                "usage journal replayed: records of the last run committed now",
                extra={"records": got.replayed},
            )
        self._file, self._reader, self._journal = got.file, got.reader, got.journal
        self.epoch, self.high_watermark = got.epoch, got.high_watermark
        self._seq_base = self._journaled_through = self.high_watermark
        self._writer_seq = self.high_watermark + 1
        self.acked_through = self._ack_target = self._acks_applied = got.acked_through
        SPOOL_HIGH_WATERMARK.set(self.high_watermark)
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._running = True
        self._thread.start()
        try:
            await self._mark_start()
            if got.left_open:
                for record in interrupted(got.left_open):
                    self.submit(record)
                await self.persist()
                log.warning(
                    "interceptions the last run left open are ended as interrupted",
                    extra={"interceptions": len(got.left_open)},
                )
        except BaseException:
            # The caller gets no spool to close: stop the writer and release the lock here.
            await self.close()
            raise

    async def _mark_start(self) -> None:
        """The backlog the file holds at start (one query, before serving)."""
        depth, oldest = await self._reads().stats(self.acked_through)
        self._backlog.start(self.acked_through, self.high_watermark, depth, oldest, time.time())

    def backlog(self) -> tuple[int, float | None]:
        """``(records not acknowledged nor dropped, time.time() the oldest was spooled)``, the
        time None when there are none: from memory, from any thread (the metrics).

        Records submitted but not committed yet count. The time is a lower bound, at most
        ``spool_backlog.MARK_EVERY`` (or a stalled write) before the truth.
        """
        return self._backlog.read(self._seq_base + self._submitted, self.acked_through)

    def submit(self, record: Record) -> None:
        """Queue one record for the next batch; never blocks, never raises."""
        if self._submitted - self._written >= self._queue_max:
            self.dropped += 1
            USAGE_RECORDS_DROPPED.labels("queue_full").inc()
            # A dead disk drops every record: log the 1st, 2nd, 4th, 8th... and every 10,000th
            # (the metric counts them all), not a line per record.
            n = self.dropped
            if n & (n - 1) == 0 or n % 10_000 == 0:
                log.error(
                    "usage spool queue full: record dropped (disk stalled?)",
                    extra={"dropped_total": n, "kind": record.kind},
                )
            return
        # Only the serialised record is kept (once, in both queues): no per-record tuple or
        # time stamp, the sequence number is implied (see _seq_base).
        try:
            payload = orjson.dumps(record)
        except TypeError:  # orjson.JSONEncodeError: text that is not UTF-8, a huge integer
            payload = sanitised_json(record)
        self._submitted += 1
        self._unjournaled.append(payload)
        self._rows.append(payload)
        # The writer marks itself idle before it last looks at the deque, so a row appended
        # after that look always finds the flag set (no lost wake-up).
        if self._idle:
            self._idle = False
            self._wake()

    async def persist(self) -> None:
        """Make every record submitted so far survive the process being killed.

        A copy into the journal, no wait. When the journal is full (SQLite is far behind) or
        missing, this waits for the SQLite commit like ``flush``.
        """
        if self._unjournaled and not self._journal_records():
            await self.flush()

    def _journal_records(self) -> bool:
        journal = self._journal
        if journal is None:
            return False
        last = self._seq_base + self._submitted
        if not journal.append(
            last - len(self._unjournaled) + 1, self._unjournaled, self.high_watermark
        ):
            SPOOL_WRITE_PROBLEMS.labels("journal_full").inc()
            if self.degraded and not self._journal_full_logged:
                self._journal_full_logged = True
                log.error(
                    "usage journal full while the spool cannot write: new records are kept in"
                    " memory only until the disk recovers (counted as dropped if the daemon"
                    " stops first, lost if it is killed)",
                    extra={"pending": self.pending},
                )
            return False
        self._unjournaled = []
        self._journaled_through = last
        # Nobody waits for SQLite now, but a writer that stops committing must be noticed.
        self._arm_stall_check()
        return True

    async def flush(self) -> None:
        """Wait until every record submitted so far is committed to the SQLite file.

        Returns at once while the spool is ``degraded`` (it cannot write): a broken disk must
        not hold every response back. The records stay queued and are written on recovery.
        """
        target = self._submitted
        if self._written >= target or self.degraded:
            return
        await self._wait_committed(target)

    async def _wait_committed(self, target: int) -> None:
        if not self._running or self._loop is None:
            raise RuntimeError("spool writer is not running")
        future = self._loop.create_future()
        self._waiters.append((target, future))
        self._arm_stall_check()
        # Someone is waiting: the writer commits now instead of lingering for more records.
        # One wake-up per batch: later flushes find the flag already set.
        if not self._urgent:
            self._urgent = True
            if self._idle or self._lingering:
                self._wake()
        await future

    async def close(self) -> None:
        """Write what is queued (for up to ``flush_timeout``), stop the writer, release the spool.

        What could not be committed is either in the journal (logged as kept, replayed at the
        next start) or counted and logged as dropped.
        """
        thread = self._thread
        if thread is None:
            return
        if self._unjournaled:
            self._journal_records()
        # Even when degraded: the writer retries failed batches, give it flush_timeout.
        target, deadline = self._submitted, time.monotonic() + self._flush_timeout
        while self._written < target and self._running:
            if (left := deadline - time.monotonic()) <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_committed(target), left)
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._stopping = True
        self._wake()
        # The writer finishes its batch, or gives up at the first failure, then closes its file.
        await asyncio.to_thread(thread.join, self._flush_timeout)
        self._abandoned = True
        self._thread = None
        # The writer is done (unless stuck in a hung write): its count is final.
        journaled = self._journaled_through if self._journal is not None else 0
        last = self._seq_base + self._submitted
        lost = report_unwritten(self._writer_seq - 1, journaled, last, thread.is_alive())
        if lost:
            self.dropped += lost
            USAGE_RECORDS_DROPPED.labels("shutdown").inc(lost)
        self._release()

    def _release(self) -> None:
        """Close the journal and the reads, give the lock back."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    async def ack(self, through_seq: int) -> int:
        """Acknowledge records up to ``through_seq``; returns how many that acknowledged.

        Recorded at once (reads no longer return them); the writer thread deletes them with its
        next batch, so a stalled disk does not hold the host back. Should the process die before
        that, they are delivered again (at least once).
        """
        reader = self._reads()
        previous = self.acked_through
        through = min(through_seq, self.high_watermark)
        if through <= previous:
            return 0
        self.acked_through = through
        self._backlog.moved(through)
        self._notify("_acked_event")
        # Counted before the writer may delete them.
        removed = await reader.count_between(previous, through)
        if through > self._ack_target:
            self._ack_target = through
            if self._idle:
                self._idle = False
                self._wake()
        return removed

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

    # -- loop side ----------------------------------------------------------------------------

    def _committed(self, count: int, high: int) -> None:
        if self.degraded:
            self.degraded = False
            self._journal_full_logged = False
            log.warning("usage spool writes again: responses wait for their records again")
        self._written += count
        self._backlog.mark(self._seq_base + self._submitted, time.time())
        if high > self.high_watermark:
            self.high_watermark = high
            SPOOL_HIGH_WATERMARK.set(high)
        if self._journal is not None and high >= self._journaled_through:
            self._journal.restart()  # SQLite holds everything the journal does
        # Records SQLite holds need no journaling (after a full journal, they piled up here).
        excess = len(self._unjournaled) - (self._seq_base + self._submitted - high)
        if excess > 0:
            del self._unjournaled[:excess]
        waiters = self._waiters
        done = 0
        while done < len(waiters) and waiters[done][0] <= self._written:
            _resolve(waiters[done][1], None)
            done += 1
        if done:
            del waiters[:done]
        self._notify("_written_event")

    def _check_stall(self) -> None:
        self._stall_timer = None
        if not self._waiters and not self.pending:
            return
        if self._written == self._written_at_check:
            self._degrade("stall", f"no batch committed for {self._flush_timeout:g}s")
            return
        self._arm_stall_check()

    def _arm_stall_check(self) -> None:
        # One timer at a time: it notes what is written now and checks for progress later.
        if self._stall_timer is None and self._loop is not None:
            self._written_at_check = self._written
            self._stall_timer = self._loop.call_later(self._flush_timeout, self._check_stall)

    def _degrade(self, reason: str, detail: str) -> None:
        SPOOL_WRITE_PROBLEMS.labels(reason).inc()
        if not self.degraded:
            self.degraded = True
            log.error(
                "usage spool cannot write (%s): its records stay queued in memory (and in the"
                " journal) until the disk recovers; no response waits for them",
                detail,
                extra={"reason": reason, "pending": self.pending},
            )
        waiters, self._waiters = self._waiters, []
        for _, future in waiters:
            _resolve(future, None)

    def _trimmed(self, by_count: int, by_age: int, through: int) -> None:
        if through:
            self._backlog.moved(self.acked_through, through)
        for reason, count in (("spool_max_records", by_count), ("spool_max_age", by_age)):
            if count:
                self.dropped += count
                USAGE_RECORDS_DROPPED.labels(reason).inc(count)
                log.error(
                    "usage spool over its bound: unacknowledged records DROPPED",
                    extra={"reason": reason, "dropped": count, "dropped_total": self.dropped},
                )


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)
