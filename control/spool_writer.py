"""The spool's writer thread: the half of ``control.spool.Spool`` that runs off the event loop.

One thread owns the connection that writes. It commits whatever records accumulated as one
statement (one implicit transaction) per batch, after a short linger so that batches are large;
at once when someone waits in ``flush``. It also applies the host's acknowledgements (recorded
in memory by ``Spool.ack``, which never waits for it) and enforces the spool's bounds. Reads use
a connection of their own (WAL readers never wait for the writer), so a stalled write holds back
nothing but writes.

Why a dedicated thread and one statement per batch: every call into sqlite3 releases the GIL and
must win it back from a busy event loop, which can take a whole switch interval. Fewer calls per
batch keep the commit latency (and so the time a finished response waits for its records) low.

A mixin, not an object of its own: ``Spool.submit`` runs on the request path and reads the
shared attributes below directly, with no extra hop. They are shared without a lock (deques are
thread-safe; each flag has one writer per transition, see ``_writer_main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from control.spool_file import SpoolFile

log = logging.getLogger("aibridged.spool")
T = TypeVar("T")

# Rows per statement at most (a backlog after a disk stall is written in several).
BATCH_MAX = 2000
# How often the writer enforces the spool's bounds (max records, max age).
_BOUNDS_EVERY = 5.0
# Pause between attempts at a batch that failed (disk full, I/O error).
_RETRY_EVERY = 1.0


class SpoolWriter:
    """The writer thread's state and loop; ``Spool`` sets the attributes up and starts it."""

    _loop: asyncio.AbstractEventLoop | None

    def _init_writer(self, linger: float, max_records: int, max_age: float) -> None:
        """Set up the state the thread shares with the loop side (before it starts)."""
        self._linger = linger
        self._max_records = max_records
        self._max_age = max_age
        # Set by the loop side, read here: the records to write, the acknowledgement to apply.
        self._rows: deque[bytes] = deque()
        self._ack_target = 0
        self._urgent = False
        self._stopping = False
        # Set when close() gave up waiting and counted what is left: no further batch.
        self._abandoned = False
        # Set here, read by the loop side.
        self._idle = False
        self._lingering = False
        self._running = False
        # The next sequence number to write (the writer counts its own, see Spool._seq_base).
        self._writer_seq = 1
        # Released by the loop to wake the thread, which sleeps acquiring it. Releasing a lock
        # keeps the GIL (a pipe write would hand it to the thread in the middle of a request).
        self._signal = threading.Lock()
        self._signal.acquire()
        # Writer thread only (the file is opened on a helper thread before the thread starts).
        self._file: SpoolFile | None = None
        self._acks_applied = 0
        self._write_failing = False
        self._ack_failing = False

    # Loop-side callbacks, posted to the event loop.
    def _committed(self, count: int, high: int) -> None:
        raise NotImplementedError

    def _degrade(self, reason: str, detail: str) -> None:
        raise NotImplementedError

    def _trimmed(self, by_count: int, by_age: int, through: int) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        # RuntimeError: already released, a wake-up is pending.
        with contextlib.suppress(RuntimeError):
            self._signal.release()

    def _writer(self) -> None:
        file = self._file
        assert file is not None
        try:
            self._writer_main(file)
        except BaseException:
            log.exception("usage spool writer stopped")
            raise
        finally:
            self._running = False
            self._apply_acks(file)
            try:
                file.close()
            except Exception:
                log.exception("usage spool file did not close cleanly")

    def _writer_main(self, file: SpoolFile) -> None:
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
                # An acknowledgement that failed waits for the next batch or the next ack.
                ack = self._ack_target > self._acks_applied and not self._ack_failing
                if not (self._rows or self._stopping or ack):
                    self._sleep(None)
                self._idle = False
            if not (self._urgent or self._stopping):
                # Linger briefly so a quiet gateway writes a few large transactions.
                self._lingering = True
                if not (self._urgent or self._stopping):
                    self._sleep(self._linger)
                self._lingering = False
            # Cleared before the rows are taken: a flush for rows that miss this batch sets it
            # again after appending them.
            self._urgent = False
            # Before the bounds check, so that acknowledged records are not counted as dropped.
            self._apply_acks(file)
            rows = _take(self._rows, BATCH_MAX)
            if self._rows:
                self._urgent = True  # a backlog (after a stall): next batch at once
            warm = bool(rows)
            if not rows or self._abandoned:
                if self._stopping:
                    return
                continue
            if not self._write(file, rows):
                if self._stopping:
                    return  # Spool.close accounts for what is left (journal or dropped)
                self._sleep(_RETRY_EVERY)  # cut short by close()
                continue
            now = time.time()
            if now >= next_bounds_check:
                next_bounds_check = now + _BOUNDS_EVERY
                try:
                    # Acks that came in during the write first: they are not drops.
                    self._apply_acks(file)
                    trimmed = file.trim(now, self._max_age, self._max_records)
                    self._post(self._trimmed, *trimmed)
                except Exception:
                    log.exception("usage spool bounds check failed")

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
            return False
        self._write_failing = False
        self._writer_seq += len(rows)
        self._post(self._committed, len(rows), high)
        return True

    def _apply_acks(self, file: SpoolFile) -> None:
        target = self._ack_target
        if target <= self._acks_applied:
            return
        try:
            file.delete(target)
        except Exception:
            if not self._ack_failing:
                log.exception("usage spool could not delete acknowledged records; will retry")
            self._ack_failing = True
            return
        self._ack_failing = False
        self._acks_applied = target

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop is closed, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)


def _take(items: deque[T], limit: int) -> list[T]:
    popleft = items.popleft
    return [popleft() for _ in range(min(len(items), limit))]
