"""Unit tests for control.spool: the SQLite WAL record spool."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from control.journal import Journal, read_journal
from control.spool import Spool, SpooledRecord
from control.spool_file import SpoolFile
from gateway.config import ConfigError
from gateway.records import (
    InterceptionEnded,
    InterceptionStarted,
    ModelThought,
    PromptUsage,
    Record,
    TokenUsage,
    ToolUsage,
)


def _record(i: int) -> Record:
    iid = f"intc-{i // 6}"
    match i % 6:
        case 0:
            return InterceptionStarted(
                interception_id=iid,
                provider="anthropic",
                provider_name="anthropic",
                model="claude-sonnet-4-5",
                actor_id="u-1",
                username="alice",
                actor_metadata={"team": "core", "n": str(i)},
                client="claude-code",
                user_agent="ua/1.0",
                client_session_id=None if i % 12 else f"sess-{i}",
                correlating_tool_call_id=None,
                credential_kind="centralized",
                credential_hint="sk-...mnop",
                streaming=bool(i % 2),
            )
        case 1:
            return TokenUsage(
                iid,
                f"msg_{i}",
                input=i,
                output=2 * i,
                cache_read=3,
                cache_write=4,
                cache_write_5m=1,
                cache_write_1h=3,
                extra={"web_search_requests": i % 5},
            )
        case 2:
            return PromptUsage(iid, f"msg_{i}", f"prompt #{i} — ünïcode ✓")
        case 3:
            return ToolUsage(iid, f"msg_{i}", "get_weather", f"toolu_{i}", '{"location": "Lisbon"}')
        case 4:
            return ModelThought(iid, f"msg_{i}", f"thinking {i}\nmore")
        case _:
            return InterceptionEnded(iid, "failed", "overloaded_error", "Overloaded", 529)


def _expected(record: Record) -> object:
    return orjson.loads(orjson.dumps(record))


def _die(spool: Spool) -> None:
    """What the process being killed does to a spool: nothing more is written, nothing closed
    cleanly; the kernel unmaps the journal and releases the lock."""
    assert spool._thread is not None and spool._journal is not None
    assert spool._lock is not None and spool._reader is not None
    spool._rows.clear()
    spool._stopping = True
    spool._wake()
    spool._thread.join(5)
    if spool._stall_timer is not None:
        spool._stall_timer.cancel()
    spool._journal.close()
    spool._reader.close()
    os.close(spool._lock)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool.db")
    await s.start()
    yield s
    await s.close()


async def test_submit_flush_read_in_order(spool: Spool) -> None:
    records = [_record(i) for i in range(1000)]
    for r in records:
        spool.submit(r)
    await spool.flush()
    assert spool.pending == 0
    assert spool.dropped == 0

    stored = await spool.read_after(0, 5000)
    assert len(stored) == 1000
    seqs = [s.seq for s in stored]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 1000
    assert len({s.record_id for s in stored}) == 1000
    for s, r in zip(stored, records, strict=True):
        assert isinstance(s, SpooledRecord)
        assert s.payload == _expected(r)
        assert s.kind == r.kind
        assert s.interception_id == r.interception_id
        assert s.payload["kind"] == r.kind
    assert {s.kind for s in stored} == {
        "interception_started",
        "token_usage",
        "prompt_usage",
        "tool_usage",
        "model_thought",
        "interception_ended",
    }
    started = stored[0]
    assert started.created_at == records[0].started_at  # type: ignore[union-attr]
    ended = stored[5]
    assert ended.created_at == records[5].ended_at  # type: ignore[union-attr]


async def test_read_after_pages(spool: Spool) -> None:
    for i in range(250):
        spool.submit(_record(i))
    await spool.flush()
    everything = await spool.read_after(0, 5000)

    pages: list[list[SpooledRecord]] = []
    cursor = 0
    while True:
        page = await spool.read_after(cursor, 64)
        if not page:
            break
        assert len(page) <= 64
        assert all(r.seq > cursor for r in page)
        pages.append(page)
        cursor = page[-1].seq
    assert [len(p) for p in pages] == [64, 64, 64, 58]
    assert [r for p in pages for r in p] == everything

    middle = everything[99].seq
    assert await spool.read_after(middle, 10) == everything[100:110]
    assert await spool.read_after(everything[-1].seq, 10) == []


async def test_ack_deletes_through_seq(spool: Spool) -> None:
    for i in range(100):
        spool.submit(_record(i))
    await spool.flush()
    stored = await spool.read_after(0, 1000)
    through = stored[39].seq
    assert await spool.ack(through) == 40
    remaining = await spool.read_after(0, 1000)
    assert remaining == stored[40:]
    assert await spool.ack(through) == 0
    assert await spool.ack(stored[-1].seq) == 60
    assert await spool.read_after(0, 1000) == []


async def test_reopen_keeps_epoch_records_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "spool.db"
    first = Spool(path)
    await first.start()
    epoch = first.epoch
    assert epoch
    for i in range(30):
        first.submit(_record(i))
    await first.flush()
    stored = await first.read_after(0, 100)
    await first.ack(stored[9].seq)
    await first.close()

    second = Spool(path)
    await second.start()
    try:
        assert second.epoch == epoch
        survivors = await second.read_after(0, 100)
        assert survivors == stored[10:]
        later = [_record(i) for i in range(30, 40)]
        for r in later:
            second.submit(r)
        await second.flush()
        after = await second.read_after(0, 100)
        assert after[:20] == stored[10:]
        new = after[20:]
        assert len(new) == 10
        assert min(r.seq for r in new) > stored[-1].seq
        assert [r.payload for r in new] == [_expected(r) for r in later]
    finally:
        await second.close()


async def test_seq_not_reused_after_everything_acked(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path)
    await first.start()
    for i in range(5):
        first.submit(_record(i))
    await first.flush()
    last = (await first.read_after(0, 10))[-1].seq
    await first.ack(last)
    await first.close()

    second = Spool(path)
    await second.start()
    try:
        second.submit(_record(5))
        await second.flush()
        records = await second.read_after(0, 10)
        # intc-0 was left open (acked start, no end): its interrupted end comes first.
        assert [r.payload.get("status") for r in records] == ["interrupted", "failed"]
        assert all(r.seq > last for r in records)
    finally:
        await second.close()


async def test_fresh_path_new_epoch(tmp_path: Path) -> None:
    a, b = Spool(tmp_path / "a.db"), Spool(tmp_path / "b.db")
    await a.start()
    await b.start()
    try:
        assert a.epoch and b.epoch
        assert a.epoch != b.epoch
    finally:
        await a.close()
        await b.close()


async def test_queue_overflow_drops_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool.db", queue_max=10)
    caplog.set_level(logging.ERROR, logger="aibridged.spool")
    try:
        for i in range(15):
            spool.submit(_record(i))
        assert spool.dropped == 5
        assert spool.pending == 10
        errors = [
            r for r in caplog.records if r.name == "aibridged.spool" and r.levelno == logging.ERROR
        ]
        # Drops 1, 2 and 4 are logged (then 8, 16, ... and every 10,000th), not every one.
        assert [getattr(r, "dropped_total", None) for r in errors] == [1, 2, 4]
        assert "dropped" in errors[0].getMessage()
    finally:
        await spool.close()


async def test_flush_without_writer_raises(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    try:
        spool.submit(_record(0))
        with pytest.raises(RuntimeError):
            await spool.flush()
    finally:
        await spool.close()


async def test_close_flushes_queued_records(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path)
    await first.start()
    records = [_record(i) for i in range(50)]
    for r in records:
        first.submit(r)
    await first.close()

    second = Spool(path)
    await second.start()
    try:
        stored = await second.read_after(0, 100)
        assert [r.payload for r in stored] == [_expected(r) for r in records]
    finally:
        await second.close()


async def test_seq_not_reused_when_the_newest_rows_are_acked_while_running(spool: Spool) -> None:
    for i in range(3):
        spool.submit(_record(i))
    await spool.flush()
    last = (await spool.read_after(0, 10))[-1].seq
    await spool.ack(last)
    spool.submit(_record(3))
    await spool.flush()
    (record,) = await spool.read_after(0, 10)
    assert record.seq == last + 1
    assert spool.high_watermark == last + 1


async def test_spool_created_with_autoincrement_continues_its_sequence(tmp_path: Path) -> None:
    """A spool file written by an earlier version (AUTOINCREMENT, all records acked)."""
    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, record_id TEXT NOT NULL, kind TEXT NOT NULL,
            interception_id TEXT NOT NULL, created_at REAL NOT NULL, payload BLOB NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('epoch', 'old-epoch');
        INSERT INTO records VALUES (41, 'r-41', 'prompt_usage', 'i', 1.0, '{}');
        DELETE FROM records;
        """
    )
    db.commit()
    db.close()

    spool = Spool(path)
    await spool.start()
    try:
        assert (spool.epoch, spool.high_watermark, spool.acked_through) == ("old-epoch", 41, 41)
        spool.submit(_record(0))
        await spool.flush()
        (record,) = await spool.read_after(0, 10)
        assert record.seq == 42
    finally:
        await spool.close()


async def test_journal_replays_what_sqlite_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """persist() returns before SQLite commits; a crash then loses nothing (next start replays)."""
    path = tmp_path / "spool.db"
    first = Spool(path)
    await first.start()
    assert first._file is not None and first._thread is not None and first._journal is not None

    def broken(rows: list[Any]) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(first._file, "insert", broken)
    records = [_record(i) for i in range(12)]
    for r in records:
        first.submit(r)
    await first.persist()  # returns at once: nothing is committed, the journal holds them
    assert first.pending == 12
    _die(first)

    second = Spool(path)
    await second.start()
    try:
        stored = await second.read_after(0, 100)
        assert [s.payload for s in stored] == [_expected(r) for r in records]
        assert [s.seq for s in stored] == list(range(1, 13))
        assert second.high_watermark == 12
        # Replayed once only: a third start finds nothing more to replay.
        second.submit(_record(12))
        await second.persist()
        await second.flush()
    finally:
        await second.close()
    third = Spool(path)
    await third.start()
    try:
        assert [s.seq for s in await third.read_after(0, 100)] == list(range(1, 14))
    finally:
        await third.close()


def test_journal_reading_stops_at_a_torn_frame_and_ignores_another_epoch(tmp_path: Path) -> None:
    path = tmp_path / "spool.db.journal"
    journal = Journal(path, "epoch-a", size=1 << 16)
    assert journal.append(1, [b'{"n":1}', b'{"n":2}'], committed=0)
    assert journal.append(3, [b'{"n":3}'], committed=0)
    journal.close()
    assert read_journal(path, "epoch-a") == [(1, b'{"n":1}'), (2, b'{"n":2}'), (3, b'{"n":3}')]
    assert read_journal(path, "epoch-b") == []

    data = bytearray(path.read_bytes())
    data[data.index(b'{"n":3}')] ^= 0xFF  # the last frame cut short by a crash
    path.write_bytes(bytes(data))
    assert read_journal(path, "epoch-a") == [(1, b'{"n":1}'), (2, b'{"n":2}')]

    small = Journal(tmp_path / "small.journal", "e", size=256)
    assert not small.append(1, [b"x" * 300], committed=0)  # no room: the caller waits instead
    small.close()


def test_journal_halves_take_turns_once_sqlite_holds_a_half(tmp_path: Path) -> None:
    path = tmp_path / "spool.db.journal"
    journal = Journal(path, "e", size=64 + 2 * 100)  # two halves of 100 bytes
    record = b"r" * 20  # a 36-byte frame: two fit in a half with its end marker
    assert journal.append(1, [record], committed=0)
    assert journal.append(2, [record], committed=0)
    assert journal.append(3, [record], committed=0)  # first half full: on to the second
    assert journal.append(4, [record], committed=0)
    # Second half full, and SQLite does not hold the first half's records yet: no room.
    assert not journal.append(5, [record], committed=1)
    assert [seq for seq, _ in read_journal(path, "e")] == [1, 2, 3, 4]
    # Once it does, the first half is reused; what SQLite lacks is all still readable.
    assert journal.append(5, [record], committed=2)
    journal.close()
    assert [seq for seq, _ in read_journal(path, "e")] == [3, 4, 5]


async def test_spool_of_one_record_per_row_is_carried_over(tmp_path: Path) -> None:
    """A spool written by an earlier version, with records still unacknowledged."""
    path = tmp_path / "spool.db"
    old = [_record(1), _record(3)]  # no interception_started: nothing left open to end
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE records (
            seq INTEGER PRIMARY KEY, record_id TEXT NOT NULL, kind TEXT NOT NULL,
            interception_id TEXT NOT NULL, created_at REAL NOT NULL, payload BLOB NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('epoch', 'old-epoch');
        """
    )
    for seq, r in zip((7, 8), old, strict=True):
        db.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
            (seq, f"rid-{seq}", r.kind, r.interception_id, time.time(), orjson.dumps(r)),
        )
    db.commit()
    db.close()

    spool = Spool(path)
    await spool.start()
    try:
        assert (spool.epoch, spool.high_watermark, spool.acked_through) == ("old-epoch", 8, 6)
        new = _record(2)
        spool.submit(new)
        await spool.flush()
        stored = await spool.read_after(0, 10)
        assert [(s.seq, s.record_id) for s in stored] == [
            (7, "rid-7"),
            (8, "rid-8"),
            (9, "old-epoch:9"),
        ]
        assert [s.payload for s in stored] == [_expected(r) for r in [*old, new]]
        assert await spool.ack(8) == 2
        assert [s.seq for s in await spool.read_after(0, 10)] == [9]
    finally:
        await spool.close()
    db = sqlite3.connect(path)
    view = db.execute("SELECT seq, record_id, kind FROM spooled_records").fetchall()
    db.close()
    assert view == [(9, "old-epoch:9", "prompt_usage")]


# -- files, lock (issue 9, item 6) -------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_spool_files_are_the_owners_only(tmp_path: Path) -> None:
    """They hold prompts: database, WAL, shared memory, journal and lock are created 0600."""
    path = tmp_path / "spool.db"
    spool = Spool(path)
    await spool.start()
    try:
        spool.submit(_record(2))
        await spool.persist()
        await spool.flush()
        files = [path.with_name(path.name + end) for end in ("", "-wal", "-shm", ".journal")]
        files.append(path.with_name(path.name + ".lock"))
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        await spool.close()


async def test_files_an_earlier_run_left_readable_are_tightened_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path)
    await first.start()
    record = _record(2)
    first.submit(record)
    await first.close()
    other = sqlite3.connect(path)  # an open connection keeps the WAL and shared-memory files
    other.execute("SELECT * FROM meta").fetchall()
    files = [path.with_name(path.name + end) for end in ("", "-wal", "-shm", ".journal")]
    for f in files:
        f.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="aibridged.spool")

    second = Spool(path)
    await second.start()
    other.close()
    try:
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert [r.payload for r in await second.read_after(0, 10)] == [_expected(record)]
    finally:
        await second.close()
    tightened = [r for r in caplog.records if "permissions tightened" in r.getMessage()]
    assert sorted(Path(getattr(r, "file", "")).name for r in tightened) == sorted(
        f.name for f in files
    )


async def test_a_second_spool_on_the_same_path_is_refused(tmp_path: Path) -> None:
    """A second daemon on the same spool would overwrite the first one's journal."""
    path = tmp_path / "spool.db"
    first = Spool(path)
    await first.start()
    try:
        record = _record(0)
        first.submit(record)
        await first.persist()
        second = Spool(path)
        with pytest.raises(ConfigError, match=r"^spool_path .*spool\.db: in use by another"):
            await second.start()
        await second.close()
        # The first one carries on, its journal untouched.
        assert read_journal(first.journal_path, first.epoch) == [(1, orjson.dumps(record))]
        first.submit(_record(1))
        await first.flush()
        assert len(await first.read_after(0, 10)) == 2
    finally:
        await first.close()
    third = Spool(path)  # the lock goes with the spool that held it
    await third.start()
    await third.close()


# -- a stalled writer (item 16) ----------------------------------------------------------------


async def test_reads_and_acks_do_not_wait_for_a_stalled_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    await spool.start()
    assert spool._file is not None
    for i in range(12):
        spool.submit(_record(i))
    await spool.flush()
    stored = await spool.read_after(0, 100)
    _, oldest = await spool.stats()

    stalled, release = threading.Event(), threading.Event()
    real_insert = spool._file.insert

    def insert(runs: list[Any]) -> int:
        stalled.set()
        release.wait(30)  # the disk hangs: the writer thread is stuck here
        return real_insert(runs)

    monkeypatch.setattr(spool._file, "insert", insert)
    try:
        spool.submit(_record(12))
        await spool.persist()
        assert await asyncio.to_thread(stalled.wait, 5)
        async with asyncio.timeout(2):  # each answers at once; a loaded VM gets some slack
            assert await spool.read_after(0, 100) == stored
            assert await spool.stats() == (12, oldest)
            assert await spool.ack(stored[5].seq) == 6
            assert await spool.read_after(0, 100) == stored[6:]
            assert (await spool.stats())[0] == 6
            assert await spool.ack(stored[5].seq) == 0
    finally:
        release.set()
    await spool.flush()
    assert [r.seq for r in await spool.read_after(0, 100)] == list(range(7, 14))
    await spool.close()
    # The acknowledgement reached the file once the writer got to it.
    db = sqlite3.connect(path)
    remaining = db.execute("SELECT seq FROM spooled_records").fetchall()
    db.close()
    assert remaining == [(seq,) for seq in range(7, 14)]


# -- interceptions a killed run left open (item 15) --------------------------------------------


async def test_interceptions_left_open_are_ended_interrupted_at_the_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path)
    await first.start()
    for i in range(6):  # intc-0: started ... ended
        first.submit(_record(i))
    for i in range(6, 9):  # intc-1: started, token, prompt; acknowledged, its row deleted
        first.submit(_record(i))
    await first.flush()
    await first.ack(9)
    for i in range(12, 15):  # intc-2: started, token, prompt; its start acknowledged, in SQLite
        first.submit(_record(i))
    await first.flush()  # the writer deletes the first row with this batch
    await first.ack(10)
    await first.flush()
    first.submit(_record(18))  # intc-3: started, in the journal only
    await first.persist()
    assert first._file is not None

    def broken(runs: list[Any]) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    first._file.insert = broken  # type: ignore[method-assign]
    _die(first)

    second = Spool(path)
    await second.start()
    try:
        await second.flush()
        records = await second.read_after(0, 100)
        ended = [r.payload for r in records if r.kind == "interception_ended"]
        # intc-0 ended; the host has the starts of intc-1 (row deleted) and intc-2 (row
        # kept): they are ended too, or the host would hold them open forever.
        assert [(e["interception_id"], e["status"]) for e in ended] == [
            ("intc-1", "interrupted"),
            ("intc-2", "interrupted"),
            ("intc-3", "interrupted"),
        ]
        assert ended[0]["error_type"] == "gateway_stopped"
        assert abs(ended[0]["ended_at"] - time.time()) < 60
    finally:
        await second.close()
    third = Spool(path)  # ended once: nothing is left open now
    await third.start()
    try:
        assert len(await third.read_after(0, 100)) == len(records)
    finally:
        await third.close()


# -- reads bounded by the high watermark -------------------------------------------------------


async def test_reads_stop_at_the_high_watermark_the_loop_knows(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's connection sees a commit before the event loop hears of it: a batch read
    then must not hold records above the ``high_watermark`` sent with it (the host's ack of them
    would be refused as OUT_OF_RANGE)."""
    for i in range(6):
        spool.submit(_record(i))
    await spool.flush()
    known = spool.high_watermark
    assert [r.seq for r in await spool.read_after(0, 100)] == list(range(1, known + 1))

    committed, release = threading.Event(), threading.Event()
    real_post = spool._post

    def post(fn: Any, *args: Any) -> None:
        if fn == spool._committed:  # on the writer thread, right after its commit
            committed.set()
            release.wait(30)
        real_post(fn, *args)

    monkeypatch.setattr(spool, "_post", post)
    try:
        for i in range(6, 12):
            spool.submit(_record(i))
        assert await asyncio.to_thread(committed.wait, 10)
        # In the file, but the loop does not know yet.
        assert spool.high_watermark == known
        got = await spool.read_after(0, 100)
        assert [r.seq for r in got] == list(range(1, known + 1))
        assert await spool.read_after(known, 100) == []
    finally:
        release.set()
    await spool.flush()
    assert spool.high_watermark == known + 6
    assert [r.seq for r in await spool.read_after(known, 100)] == list(range(known + 1, known + 7))


def test_a_read_bounded_inside_a_row_stops_there(tmp_path: Path) -> None:
    file, *_ = SpoolFile.open(tmp_path / "spool.db")
    try:
        file.insert([(1, time.time(), [orjson.dumps(_record(i)) for i in range(10)])])
        assert [r.seq for r in file.select(0, 100, 4)] == [1, 2, 3, 4]
        assert [r.seq for r in file.select(2, 100, 4)] == [3, 4]
        assert file.select(4, 100, 4) == []
        assert [r.seq for r in file.select(4, 100, 10)] == list(range(5, 11))
    finally:
        file.close()


# -- a start that fails half-way -----------------------------------------------------------------


async def test_a_start_that_fails_after_the_writer_started_stops_it_and_releases_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path)
    await first.start()
    first.submit(_record(0))  # an interception started, never ended: the next start ends it
    await first.flush()
    _die(first)
    writers_before = {t for t in threading.enumerate() if t.name == "spool-writer"}

    second = Spool(path)

    async def persist() -> None:  # the disk fails while the interrupted ends are persisted
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(second, "persist", persist)
    with pytest.raises(OSError, match="Input/output error"):
        await second.start()
    # No writer thread left behind, and the spool is free for the next start.
    assert {t for t in threading.enumerate() if t.name == "spool-writer"} <= writers_before
    third = Spool(path)
    await third.start()
    try:
        await third.flush()
        ended = [r.payload for r in await third.read_after(0, 10) if r.kind == "interception_ended"]
        assert [e["status"] for e in ended] == ["interrupted"]
    finally:
        await third.close()
