"""Memory-mapped journal beside the spool: records survive a crash before SQLite has them.

A finished response must not reach the client before its records would survive the gateway
being killed. Waiting for the SQLite commit for that held every response back for a batch
commit on the writer thread (several GIL hand-offs, milliseconds under load). Instead the
records are copied into this journal, a file mapped into memory: the mapped pages belong to the
operating system's page cache, so once the copy is done a killed process loses nothing, and an
append costs no system call. The writer thread commits the records to SQLite at its own pace;
whatever it had not committed is replayed from here at the next start. The journal's two halves
take turns, each reused once SQLite holds everything in it.

Layout: a header (magic, spool epoch), then two halves of frames ``<payload length, crc32, first
seq>`` + payload: the records' JSON, one per line (compact JSON never contains a raw newline).
Reading a half stops at the first frame that is empty, cut short or fails its checksum; frames
left over from an earlier turn hold only records SQLite already had.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from pathlib import Path

__all__ = ["Journal", "read_journal"]

_MAGIC = b"AIBJ1"
_HEAD = struct.Struct("<5s59s")  # magic, spool epoch (a UUID string, NUL padded)
_FRAME = struct.Struct("<IIQ")


class Journal:
    """The mapped journal of one spool epoch; ``append`` is a memory copy.

    Two halves take turns: when the current one is full, appending moves to the other once
    SQLite holds every record in it, so a steady stream of records never fills the journal.
    """

    def __init__(self, path: Path, epoch: str, size: int = 8 << 20) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # it holds prompts: owner only, even if an earlier run made it
            # Emptied (it was replayed before this), then its blocks reserved: a store into a
            # page never needs a new block, which on a full disk would kill the process
            # (SIGBUS), and never reads the disk (reserved blocks read as zeros).
            os.ftruncate(fd, 0)
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        _HEAD.pack_into(self._map, 0, _MAGIC, epoch.encode())
        half = (size - _HEAD.size) // 2
        self._starts = (_HEAD.size, _HEAD.size + half)
        self._half = half
        self._current = 0
        # The last sequence number written into each half.
        self._last = [0, 0]
        self.end = _HEAD.size

    def append(self, first_seq: int, records: list[bytes], committed: int) -> bool:
        """Add one frame holding ``records`` (sequence numbers from ``first_seq`` on).

        ``committed`` is the highest sequence number SQLite holds. False when there is no room
        (the other half still holds records SQLite lacks): nothing is written.
        """
        payload = b"\n".join(records)
        size = _FRAME.size + len(payload)
        if self.end + size + _FRAME.size > self._starts[self._current] + self._half:
            other = 1 - self._current
            if self._last[other] > committed or size + _FRAME.size > self._half:
                return False
            self._current = other
            self.end = self._starts[other]
        m = self._map
        start = self.end + _FRAME.size
        stop = start + len(payload)
        m[start:stop] = payload
        # The header last, and the next header zeroed: reading stops right after this frame.
        _FRAME.pack_into(m, stop, 0, 0, 0)
        _FRAME.pack_into(m, self.end, len(payload), zlib.crc32(payload), first_seq)
        self.end = stop
        self._last[self._current] = first_seq + len(records) - 1
        return True

    def restart(self) -> None:
        """Append at the front of the current half again (SQLite holds everything so far)."""
        start = self._starts[self._current]
        if self.end != start:
            _FRAME.pack_into(self._map, start, 0, 0, 0)
            self.end = start

    def close(self) -> None:
        """Unmap the file (its contents stay for the next start)."""
        self._map.close()


def read_journal(path: Path, epoch: str) -> list[tuple[int, bytes]]:
    """``(seq, record JSON)`` of every record in the journal's intact frames, in order.

    Empty when there is no journal or it belongs to another spool epoch (another file). The
    file is mapped, not read: only the pages holding frames are touched.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _frames(data, epoch)
    except (FileNotFoundError, ValueError):  # ValueError: an empty file cannot be mapped
        return []


def _frames(data: mmap.mmap, epoch: str) -> list[tuple[int, bytes]]:
    if len(data) < _HEAD.size:
        return []
    magic, owner = _HEAD.unpack_from(data, 0)
    if magic != _MAGIC or owner.rstrip(b"\0") != epoch.encode():
        return []
    half = (len(data) - _HEAD.size) // 2
    out: list[tuple[int, bytes]] = []
    for pos in (_HEAD.size, _HEAD.size + half):
        while pos + _FRAME.size <= len(data):
            length, crc, seq = _FRAME.unpack_from(data, pos)
            start = pos + _FRAME.size
            payload = data[start : start + length]
            if length == 0 or len(payload) < length or zlib.crc32(payload) != crc:
                break
            out.extend((seq + i, line) for i, line in enumerate(payload.split(b"\n")))
            pos = start + length
    out.sort()
    return out
