"""SQLite WAL spool: every record is written here first, in batches, off the event loop.

``submit`` is synchronous and never blocks (it runs on the request path): it serialises the record,
gives it its sequence number and hands it to one writer thread that owns the database. The thread
commits whatever has accumulated as one statement (one implicit transaction) per batch, after a
short linger so that batches are large; at once when someone waits in ``flush``. ``persist``,
which every response calls before its last byte, does not wait for that: it copies the records
into the journal (``control.journal``, a memory-mapped file), and the next start replays whatever
SQLite had not committed. The spool is the buffer between the data plane and the host, so nothing is
delivered that was not first made durable here.

Why a dedicated thread and one statement per batch: every call into sqlite3 releases the GIL and
must win it back from a busy event loop, which can take a whole switch interval. Fewer calls per
batch keep the commit latency (and so the time a finished response waits for its records) low.
The file itself (schema, recovery, statements) is ``control.spool_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from control.journal import Journal, read_journal
from control.spool_file import Run, SpooledRecord, SpoolFile, record_time
from gateway.metrics import (
    SPOOL_HIGH_WATERMARK,
    SPOOL_RECORDS,
    SPOOL_WRITE_PROBLEMS,
    USAGE_RECORDS_DROPPED,
)
from gateway.records import Record

__all__ = ["Spool", "SpooledRecord"]

log = logging.getLogger("aibridged.spool")
T = TypeVar("T")

# Rows per statement at most (a backlog after a disk stall is written in several).
_BATCH_MAX = 2000
# How often the writer enforces the spool's bounds (max records, max age).
_BOUNDS_EVERY = 5.0


_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class Spool:
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
        self._max_records = max_records
        self._max_age = max_age
        self._queue_max = queue_max
        self._linger = linger
        self._written_event = asyncio.Event()
        self._acked_event = asyncio.Event()
        # A record's sequence number is implied by its position: the n-th record submitted since
        # start (from 0) gets _seq_base + 1 + n, on both sides (the journal needs them on the
        # loop side, the writer thread counts its own). A record's id is epoch:seq.
        self._seq_base = 0
        self._journal: Journal | None = None
        self._unjournaled: list[bytes] = []
        self._journaled_through = 0
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
        # Used on the writer thread only; the thread runs until _writer returns.
        self._file: SpoolFile | None = None
        self._running = False
        self._write_failing = False
        # Shared with the writer thread without a lock (deques are thread-safe; each flag has
        # one writer per transition, see _writer_main). Waking the thread is one lock release,
        # and only when a flag says it is asleep.
        self._rows: deque[bytes] = deque()
        self._writer_seq = 1
        self._jobs: deque[_Job] = deque()
        self._urgent = False
        self._idle = False
        self._lingering = False
        self._stopping = False
        # Released by the loop to wake the thread, which sleeps acquiring it. Releasing a lock
        # keeps the GIL (a pipe write would hand it to the thread in the middle of a request).
        self._signal = threading.Lock()
        self._signal.acquire()

    @property
    def journal_path(self) -> Path:
        """The journal beside the database file."""
        return self.path.with_name(self.path.name + ".journal")

    async def start(self) -> None:
        """Open (or recover) the database, replay the journal, start the writer thread."""
        self._loop = asyncio.get_running_loop()
        opened = await asyncio.to_thread(SpoolFile.open, self.path)
        self._file, self.epoch, self.high_watermark, self.acked_through = opened
        replayed = await asyncio.to_thread(self._replay_journal, self._file)
        if replayed:
            log.warning(
                "usage journal replayed: records of the last run committed now",
                extra={"records": replayed},
            )
        try:
            self._journal = Journal(self.journal_path, self.epoch)
        except OSError as exc:
            log.error(
                "usage journal unavailable: responses wait for the SQLite commit instead",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
        self._seq_base = self.high_watermark
        self._writer_seq = self.high_watermark + 1
        self._journaled_through = self.high_watermark
        SPOOL_HIGH_WATERMARK.set(self.high_watermark)
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._running = True
        self._thread.start()

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
        payload = orjson.dumps(record)
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
        """Write what is queued (for up to ``flush_timeout``), stop the writer, close the file."""
        if self._thread is None:
            return
        if self._unjournaled:
            self._journal_records()
        if self._thread.is_alive():
            await self._drain()
            try:
                assert self._file is not None
                await asyncio.wait_for(self._run(self._file.close), self._flush_timeout)
            except TimeoutError:
                log.error("usage spool writer is stuck (disk hung?): closing without it")
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5.0)
        self._thread = None
        if self._journal is not None:  # already restarted by the last commit if SQLite caught up
            self._journal.close()
            self._journal = None

    def _replay_journal(self, file: SpoolFile) -> int:
        """Commit the journal's records that SQLite does not have (killed before it did)."""
        runs: list[Run] = []
        replayed = 0
        for seq, line in read_journal(self.journal_path, self.epoch):
            if seq <= self.high_watermark:
                continue
            try:
                created_at = record_time(orjson.loads(line))
            except (orjson.JSONDecodeError, TypeError):
                log.error("usage journal holds an unreadable record: skipped", extra={"seq": seq})
                continue
            last = runs[-1] if runs else None
            if last is not None and last[0] + len(last[2]) == seq and len(last[2]) < _BATCH_MAX:
                last[2].append(line)
            else:
                runs.append((seq, created_at, [line]))
            replayed += 1
        for run in runs:
            self.high_watermark = file.insert([run])
        return replayed

    async def _drain(self) -> None:
        # Even when degraded: the writer retries failed batches, give it flush_timeout.
        target = self._submitted
        deadline = time.monotonic() + self._flush_timeout
        while self._written < target and self._running:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_committed(target), left)
        lost = target - self._written
        if lost > 0 and self._journal is not None:
            log.error(
                "usage spool closing with records it could not commit: kept in the journal,"
                " committed at the next start",
                extra={"records": lost},
            )
        elif lost > 0:
            self.dropped += lost
            USAGE_RECORDS_DROPPED.labels("shutdown").inc(lost)
            log.error(
                "usage spool closing with records it could not write: DROPPED",
                extra={"dropped": lost, "dropped_total": self.dropped},
            )

    async def read_after(self, seq: int, limit: int = 500) -> list[SpooledRecord]:
        """Records with a sequence number above ``seq``, oldest first."""
        assert self._file is not None
        return await self._run(self._file.select, seq, limit)

    async def ack(self, through_seq: int) -> int:
        """Delete records up to ``through_seq``; returns how many were removed."""
        assert self._file is not None
        removed = await self._run(self._file.delete, through_seq)
        if through_seq > self.acked_through:
            self.acked_through = min(through_seq, self.high_watermark)
            self._notify("_acked_event")
        return removed

    async def stats(self) -> tuple[int, float | None]:
        """``(records in the spool, created_at of the oldest)``."""
        assert self._file is not None
        depth, oldest = await self._run(self._file.stats)
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

    # -- loop side ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the writer thread (it owns the connection)."""
        if not self._running or self._loop is None:
            raise RuntimeError("spool writer is not running")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.append((fn, args, future))
        if self._idle or self._lingering:
            self._wake()
        return await future

    def _wake(self) -> None:
        # RuntimeError: already released, a wake-up is pending.
        with contextlib.suppress(RuntimeError):
            self._signal.release()

    def _committed(self, count: int, high: int) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("usage spool writes again: responses wait for their records again")
        self._written += count
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

    def _trimmed(self, by_count: int, by_age: int) -> None:
        for reason, count in (("spool_max_records", by_count), ("spool_max_age", by_age)):
            if count:
                self.dropped += count
                USAGE_RECORDS_DROPPED.labels(reason).inc(count)
                log.error(
                    "usage spool over its bound: unacknowledged records DROPPED",
                    extra={"reason": reason, "dropped": count, "dropped_total": self.dropped},
                )

    # -- writer thread ------------------------------------------------------------------------

    def _writer(self) -> None:
        try:
            self._writer_main()
        except BaseException:
            log.exception("usage spool writer stopped")
            raise
        finally:
            self._running = False

    def _writer_main(self) -> None:
        file = self._file
        assert file is not None
        next_bounds_check = 0.0
        # Right after a batch the writer stays "warm": it lingers even with nothing queued, so
        # a busy gateway's records never need a wake-up, only its flushes do.
        warm = False
        # Each flag is published before the state it guards is checked (and the loop side
        # changes that state before it reads the flag), so a wake-up is never lost; at worst
        # one is spurious.
        while True:
            if not warm:
                self._idle = True
                if not (self._rows or self._jobs or self._stopping):
                    self._sleep(None)
                self._idle = False
            if not (self._jobs or self._urgent or self._stopping):
                # Linger briefly so a quiet gateway writes a few large transactions.
                self._lingering = True
                if not (self._jobs or self._urgent or self._stopping):
                    self._sleep(self._linger)
                self._lingering = False
            # Cleared before the rows are taken: a flush for rows that miss this batch sets it
            # again after appending them.
            self._urgent = False
            rows = _take(self._rows, _BATCH_MAX)
            jobs = _take(self._jobs, len(self._jobs))
            if self._rows:
                self._urgent = True  # a backlog (after a stall): next batch at once
            if self._stopping and not rows and not jobs:
                return
            warm = bool(rows)
            if rows and self._write(file, rows):
                now = time.time()
                if now >= next_bounds_check:
                    next_bounds_check = now + _BOUNDS_EVERY
                    try:
                        trimmed = file.trim(now, self._max_age, self._max_records)
                        self._post(self._trimmed, *trimmed)
                    except Exception:
                        log.exception("usage spool bounds check failed")
            for fn, args, future in jobs:
                try:
                    result = fn(*args)
                except Exception as exc:  # delivered to the awaiting coroutine
                    self._post(_fail, future, exc)
                else:
                    self._post(_resolve, future, result)

    def _sleep(self, timeout: float | None) -> None:
        self._signal.acquire(timeout=-1 if timeout is None else timeout)

    def _write(self, file: SpoolFile, rows: list[bytes]) -> bool:
        try:
            high = file.insert([(self._writer_seq, time.time(), rows)])
        except Exception as exc:
            if not self._write_failing:  # one traceback per outage, not one per retry
                log.exception("usage spool write failed; retrying the batch every second")
            self._write_failing = True
            self._rows.extendleft(reversed(rows))
            self._post(self._degrade, "error", f"{type(exc).__name__}: {exc}")
            time.sleep(1.0)
            return False
        self._write_failing = False
        self._writer_seq += len(rows)
        self._post(self._committed, len(rows), high)
        return True

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop is closed, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)


def _take(items: deque[T], limit: int) -> list[T]:
    popleft = items.popleft
    return [popleft() for _ in range(min(len(items), limit))]


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
