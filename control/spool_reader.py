"""The spool's reads, on a connection and a thread of their own.

In WAL mode a reader never waits for the writer: ``StreamUsage``, ``GetStatus`` and ``AckUsage``
keep answering while the writer thread is stuck in a write (a stalled or full disk).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from control.spool_file import SpooledRecord, SpoolFile


class SpoolReader:
    """Read-only queries on the spool file, one at a time on the reader thread."""

    def __init__(self, path: Path, epoch: str) -> None:
        self._file = SpoolFile.open_reader(path, epoch)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spool-reader")

    async def select(self, after: int, limit: int, through: int) -> list[SpooledRecord]:
        """Records with ``after < seq <= through``, oldest first."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._file.select, after, limit, through
        )

    async def count_between(self, after: int, through: int) -> int:
        """How many records the file holds with ``after < seq <= through``."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._file.count_between, after, through
        )

    async def stats(self, acked: int) -> tuple[int, float | None]:
        """``(records above acked, created_at of the oldest of them)``."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._file.stats, acked)

    def close(self) -> None:
        """Close the connection once a read still running (if any) is done."""
        self._pool.submit(self._file.close)
        self._pool.shutdown(wait=False)


class SpoolReads:
    """The spool's reads (``Spool`` sets these attributes): what a host is sent stops at the
    high watermark the event loop knows, since the reader's connection may see a commit before
    the writer thread's news of it reaches the loop."""

    _reader: SpoolReader | None
    acked_through: int
    high_watermark: int

    async def read_after(self, seq: int, limit: int = 500) -> list[SpooledRecord]:
        """Unacknowledged records above ``seq`` and at most ``high_watermark``, oldest first:
        a batch never holds a record the host cannot acknowledge yet."""
        after = max(seq, self.acked_through)
        return await self._reads().select(after, limit, self.high_watermark)

    async def stats(self) -> tuple[int, float | None]:
        """``(records in the spool, created_at of the oldest)``."""
        return await self._reads().stats(self.acked_through)

    def _reads(self) -> SpoolReader:
        if self._reader is None:
            raise RuntimeError("spool is not open")
        return self._reader
