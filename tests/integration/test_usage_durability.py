"""Usage delivery under stress: host reconnects, SIGKILL, concurrency, flow control, spool bound.

Real ``grpc.aio`` clients on the generated stubs read ``StreamUsage`` the way a host does; the
SIGKILL tests run ``aibridged serve`` as a real process and restart it on the same spool.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import orjson
import pytest

from control.v1 import control_pb2 as pb
from control.v1 import control_pb2_grpc
from gateway.testing import FakeUpstream, Reply, load_txtar
from tests.conftest import (
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    metric_value,
)
from tests.processes import DaemonProcess

if TYPE_CHECKING:
    from control.v1.control_pb2_grpc import ControlServiceAsyncStub as Stub

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
KINDS = {"interception_started", "prompt_usage", "token_usage", "interception_ended"}
HEADERS = {"x-api-key": GATEWAY_KEY, "content-type": "application/json"}
DROPPED = "aibridged_usage_records_dropped_total"


# -- helpers -----------------------------------------------------------------------------------


def kind(record: pb.UsageRecord) -> str:
    return record.WhichOneof("record") or ""


def kinds_by_interception(records: Iterable[pb.UsageRecord]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in records:
        out[r.interception_id].add(kind(r))
    return out


async def ask(http: aiohttp.ClientSession, url: str, stream: bool = False) -> str:
    """One request through the gateway; returns the interception id the client saw."""
    body = dict(orjson.loads(TEXT["request"]), stream=stream)
    async with http.post(f"{url}/v1/messages", json=body, headers=HEADERS) as r:
        raw = await r.read()
        assert r.status == 200, raw
    if not stream:
        return str(orjson.loads(raw)["id"])
    assert raw.rstrip().endswith(b'"message_stop"}')
    for line in raw.splitlines():
        if line.startswith(b"data:") and b'"message_start"' in line:
            return str(orjson.loads(line[5:])["message"]["id"])
    raise AssertionError("no message_start in the stream")


async def ask_many(url: str, n: int, stream: bool = False) -> list[str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        return list(await asyncio.gather(*(ask(http, url, stream) for _ in range(n))))


async def get_status(stub: Stub) -> pb.GetStatusResponse:
    return await stub.GetStatus(pb.GetStatusRequest(), metadata=CONTROL_METADATA)


async def ack(stub: Stub, epoch: str, through: int) -> pb.AckUsageResponse:
    req = pb.AckUsageRequest(epoch=epoch, acked_through=through)
    return await stub.AckUsage(req, metadata=CONTROL_METADATA)


class Reader:
    """A ``StreamUsage`` call drained in the background, as a host would."""

    def __init__(self, stub: Stub, **request: Any) -> None:
        self.call = stub.StreamUsage(pb.StreamUsageRequest(**request), metadata=CONTROL_METADATA)
        self.records: list[pb.UsageRecord] = []
        self.batch_sizes: list[int] = []
        self.epochs: set[str] = set()
        self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        async for batch in self.call:
            self.records.extend(batch.records)
            if batch.records:
                self.batch_sizes.append(len(batch.records))
                self.epochs.add(batch.epoch)

    async def until(self, done: Callable[[list[pb.UsageRecord]], bool], within: float = 20) -> None:
        async with asyncio.timeout(within):
            while not done(self.records):
                if self._task.done():
                    raise AssertionError(f"usage stream ended: {self._task.exception()!r}")
                await asyncio.sleep(0.01)

    async def count(self, n: int, within: float = 20) -> list[pb.UsageRecord]:
        await self.until(lambda records: len(records) >= n, within)
        return self.records

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def read_everything(target: str, after: int = 0, epoch: str = "") -> list[pb.UsageRecord]:
    """Connect to a (restarted) daemon and read every spooled record above ``after``."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        high = (await get_status(stub)).high_watermark
        if high <= after:
            return []
        reader = Reader(stub, resume_after=after, epoch=epoch, max_in_flight=10_000_000)
        try:
            await reader.until(lambda records: bool(records) and records[-1].seq >= high)
        finally:
            await reader.close()
        return reader.records


# -- (a) reconnect and resume ------------------------------------------------------------------


async def test_host_disconnects_mid_stream_and_resumes_from_its_cursor_without_gap(
    control: tuple[Gateway, Stub],
) -> None:
    gw, stub = control
    gw.upstream.default = Reply.from_section(TEXT["non-streaming"])
    ids = await ask_many(gw.url, 10)
    await gw.daemon.spool.flush()

    first = stub.StreamUsage(pb.StreamUsageRequest(max_batch=3), metadata=CONTROL_METADATA)
    seen: list[pb.UsageRecord] = []
    for _ in range(2):
        batch = await first.read()
        assert isinstance(batch, pb.StreamUsageResponse)
        assert len(batch.records) == 3
        seen.extend(batch.records)
        epoch = batch.epoch
    first.cancel()  # the host goes away mid-stream, 34 records short
    cursor = seen[-1].seq

    ids += await ask_many(gw.url, 10)
    reader = Reader(stub, resume_after=cursor, epoch=epoch, max_batch=3)
    try:
        await reader.count(80 - len(seen))
        await asyncio.sleep(0.2)  # and nothing more than that
    finally:
        await reader.close()
    rest = reader.records
    assert rest[0].seq == cursor + 1
    seqs = [r.seq for r in seen + rest]
    assert seqs == list(range(1, 81)), "gap or duplicate after the cursor"
    assert len({r.record_id for r in seen + rest}) == 80
    assert max(reader.batch_sizes) <= 3 and reader.epochs == {epoch}
    grouped = kinds_by_interception(seen + rest)
    assert sorted(grouped) == sorted(ids) and len(set(ids)) == 20
    assert all(kinds == KINDS for kinds in grouped.values())

    # A cursor of another epoch is void: the stream replays from the oldest record.
    other = stub.StreamUsage(
        pb.StreamUsageRequest(resume_after=cursor, epoch="another-epoch", max_batch=3),
        metadata=CONTROL_METADATA,
    )
    batch = await other.read()
    other.cancel()
    assert isinstance(batch, pb.StreamUsageResponse)
    assert batch.epoch == epoch
    assert [r.record_id for r in batch.records] == [r.record_id for r in seen[:3]]


# -- (b) SIGKILL -------------------------------------------------------------------------------


async def test_sigkill_under_load_keeps_every_record_of_completed_requests(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Every request that completed before the kill keeps all its records; acked ones stay gone."""
    upstream.default = Reply.from_section(TEXT["non-streaming"])
    daemon = DaemonProcess(tmp_path, upstream.url, control=True)
    completed: dict[str, float] = {}  # interception id -> when the client had the whole response
    interrupted = 0
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal interrupted
        while not stop.is_set():
            try:
                async with http.post(
                    f"{daemon.url}/v1/messages", data=TEXT["request"], headers=HEADERS
                ) as r:
                    body = await r.read()
            except (aiohttp.ClientError, OSError):
                interrupted += 1
                continue
            if r.status == 200:
                completed[orjson.loads(body)["id"]] = time.monotonic()

    try:
        await daemon.start()
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            grpc.aio.insecure_channel(daemon.control_target) as channel,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            stub = control_pb2_grpc.ControlServiceStub(channel)
            epoch = (await get_status(stub)).spool_epoch
            reader = Reader(stub, max_batch=50)
            clients = [asyncio.create_task(client(http)) for _ in range(30)]
            acked_through = 0
            for _ in range(4):  # ack half of what arrived, every 250 ms, for the first second
                await asyncio.sleep(0.25)
                if reader.records:
                    through = reader.records[len(reader.records) // 2].seq
                    await ack(stub, epoch, through)
                    acked_through = through
            await asyncio.sleep(0.5)  # no ack is in flight at the kill
            killed_at = time.monotonic()
            daemon.kill()
            stop.set()
            await asyncio.gather(*clients)
            await daemon.wait()
            await reader.close()
        acked = [r for r in reader.records if r.seq <= acked_through]
        unacked_seen = [r for r in reader.records if r.seq > acked_through]

        await daemon.start()
        async with grpc.aio.insecure_channel(daemon.control_target) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            assert (await get_status(stub)).spool_epoch == epoch, "epoch changed across restart"
        delivered = await read_everything(daemon.control_target, acked_through, epoch)
    finally:
        await daemon.close()

    assert interrupted > 0, "the kill should hit requests in flight"
    assert acked and unacked_seen
    assert all(r.seq > acked_through for r in delivered)
    delivered_ids = [r.record_id for r in delivered]
    assert len(set(delivered_ids)) == len(delivered_ids)
    assert not {r.record_id for r in acked} & set(delivered_ids), "an acked record came back"
    # Every record the host saw but did not ack is delivered again (at least once).
    assert {r.record_id for r in unacked_seen} <= set(delivered_ids)

    assert len(completed) > 30
    acked_kinds = kinds_by_interception(acked)
    assert any(acked_kinds.get(i) != KINDS for i in completed), "every completion was acked"
    kinds = kinds_by_interception(acked + delivered)
    lost = {i: at for i, at in completed.items() if kinds.get(i) != KINDS}
    # Requests done 200 ms before the kill were committed whatever the batching; the rest only
    # because a response is released after its records are committed (Interception.complete).
    assert not [i for i, at in lost.items() if at < killed_at - 0.2], "lost long-completed records"
    assert not lost, f"records of {len(lost)} requests completed just before the kill were lost"


async def test_sigkill_right_after_the_response_loses_no_record(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A response is released only once its records are committed: a kill at once keeps them."""
    upstream.default = Reply.from_section(TEXT["non-streaming"])
    daemon = DaemonProcess(tmp_path, upstream.url, control=True)
    try:
        await daemon.start()
        for stream in (False, True, False, True):
            upstream.default = Reply.from_section(TEXT["streaming" if stream else "non-streaming"])
            async with aiohttp.ClientSession() as http:
                interception_id = await ask(http, daemon.url, stream)
                daemon.kill()  # the client has its whole response: the request is complete
            await daemon.wait()
            await daemon.start()
            records = await read_everything(daemon.control_target)
            kinds = kinds_by_interception(records).get(interception_id, set())
            assert kinds == KINDS, f"stream={stream}: records lost: {sorted(KINDS - kinds)}"
    finally:
        await daemon.close()


# -- (c) concurrency ---------------------------------------------------------------------------


async def test_200_concurrent_streams_yield_exactly_their_records(
    control: tuple[Gateway, Stub],
) -> None:
    gw, stub = control
    gw.upstream.default = Reply.from_section(TEXT["streaming"])
    ids = await ask_many(gw.url, 200, stream=True)
    assert len(set(ids)) == 200
    reader = Reader(stub, max_batch=100)
    try:
        await reader.count(800)
        await asyncio.sleep(0.2)
    finally:
        await reader.close()
    unique = {r.record_id: r for r in reader.records}
    assert Counter(kind(r) for r in unique.values()) == {k: 200 for k in KINDS}
    assert {r.interception_id for r in unique.values()} == set(ids)
    assert all(kinds == KINDS for kinds in kinds_by_interception(unique.values()).values())
    ended = [
        r.interception_ended.status for r in unique.values() if kind(r) == "interception_ended"
    ]
    assert set(ended) == {"completed"}


# -- (d) flow control --------------------------------------------------------------------------


async def test_stream_waits_for_acks_beyond_max_in_flight(control: tuple[Gateway, Stub]) -> None:
    gw, stub = control
    gw.upstream.default = Reply.from_section(TEXT["non-streaming"])
    await ask_many(gw.url, 3)
    await gw.daemon.spool.flush()
    status = await get_status(stub)
    assert status.spool_depth == 12
    reader = Reader(stub, max_in_flight=5, max_batch=2)
    try:
        await reader.count(5)
        await asyncio.sleep(0.5)
        assert len(reader.records) == 5, "sent more than max_in_flight beyond the last ack"
        assert max(reader.batch_sizes) <= 2
        await ack(stub, status.spool_epoch, reader.records[2].seq)
        await reader.count(8)  # room for 3 more
        await asyncio.sleep(0.5)
        assert len(reader.records) == 8
        await ack(stub, status.spool_epoch, reader.records[7].seq)
        await reader.count(12)
    finally:
        await reader.close()
    assert [r.seq for r in reader.records] == list(range(1, 13))
    assert max(reader.batch_sizes) <= 2


# -- (e) spool bound ---------------------------------------------------------------------------


async def test_spool_bound_drops_oldest_and_says_so(
    make_gateway: GatewayFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aibridged.spool")
    upstream.default = Reply.from_section(TEXT["non-streaming"])
    gw = await make_gateway(control_token=CONTROL_TOKEN, spool_max_records=8)
    before = await metric_value(gw.metrics_url, DROPPED, reason="spool_max_records")
    await ask_many(gw.url, 1)
    await gw.daemon.spool.flush()
    checked = time.time()  # the first commit's bound check ran before this
    await ask_many(gw.url, 2)  # 12 records
    # The bound is checked at most every 5 s after a write: write again once that has passed.
    await asyncio.sleep(checked + 5.1 - time.time())
    await ask_many(gw.url, 1)
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        for _ in range(250):
            status = await get_status(stub)
            if status.dropped_records:
                break
            await asyncio.sleep(0.02)
    dropped = status.dropped_records
    # The bound held when it was checked; records of the last request may have committed in a
    # later batch than the one that triggered the check.
    assert dropped >= 4
    assert status.spool_depth <= 8 + 4
    assert status.spool_depth + dropped == 16
    assert (
        await metric_value(gw.metrics_url, DROPPED, reason="spool_max_records") - before == dropped
    )
    errors = [
        r for r in caplog.records if r.name == "aibridged.spool" and r.levelno == logging.ERROR
    ]
    assert errors and "DROPPED" in errors[0].getMessage()
    assert getattr(errors[0], "reason", None) == "spool_max_records"
    assert getattr(errors[0], "dropped", None) == dropped


# -- a disk that fails or stalls ---------------------------------------------------------------


@pytest.mark.parametrize("fault", ["error", "stall"])
async def test_a_spool_that_cannot_write_does_not_hold_responses(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Disk full or hung: streams still complete; the records are written once it recovers."""
    gw = await make_gateway(spool_flush_timeout=0.5)
    spool = gw.daemon.spool
    assert spool._file is not None
    real_insert = spool._file.insert
    broken = threading.Event()
    broken.set()

    def insert(rows: list[Any]) -> int:
        if fault == "error" and broken.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        if fault == "stall":
            recovered.wait()  # the writer hangs here until the test lets it go
        return real_insert(rows)

    recovered = threading.Event()
    monkeypatch.setattr(spool._file, "insert", insert)
    gw.upstream.enqueue(*[Reply.from_section(TEXT["streaming"]) for _ in range(3)])

    try:
        started = time.monotonic()
        async with aiohttp.ClientSession() as http, asyncio.timeout(10):
            ids = [await ask(http, gw.url, stream=True) for _ in range(3)]
        # No response waited for SQLite (the journal holds their records) ...
        assert time.monotonic() - started < 3.0
        # ... and the spool notices it cannot write (an error at once, a stall after 0.5 s).
        async with asyncio.timeout(5):
            while not spool.degraded:  # noqa: ASYNC110 (a plain flag, no event to wait on)
                await asyncio.sleep(0.05)
        problems = "aibridged_usage_spool_write_problems_total"
        assert await metric_value(gw.metrics_url, problems, reason=fault) >= 1
    finally:
        broken.clear()
        recovered.set()

    async with asyncio.timeout(10):
        while True:
            committed = spool.written  # taken before reading: no batch can slip in between
            records = await spool.read_after(0, 100)
            if len(records) == 12:
                break
            await committed.wait()
    assert not spool.degraded
    assert {r.interception_id for r in records} == set(ids)
    assert Counter(r.kind for r in records) == dict.fromkeys(KINDS, 3)


async def test_control_rpcs_answer_while_the_spool_write_is_stalled(
    control: tuple[Gateway, Stub], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GetStatus, AckUsage and StreamUsage do not queue behind a write stuck on the disk."""
    gw, stub = control
    gw.upstream.default = Reply.from_section(TEXT["non-streaming"])
    await ask_many(gw.url, 3)
    await gw.daemon.spool.flush()
    epoch = (await get_status(stub)).spool_epoch
    spool = gw.daemon.spool
    assert spool._file is not None
    real_insert = spool._file.insert
    stalled, release = threading.Event(), threading.Event()

    def insert(rows: list[Any]) -> int:
        stalled.set()
        release.wait(30)  # the disk hangs: the writer thread is stuck here
        return real_insert(rows)

    monkeypatch.setattr(spool._file, "insert", insert)
    reader = None
    try:
        await ask_many(gw.url, 1)  # answered at once (journal); its records wait for the disk
        assert await asyncio.to_thread(stalled.wait, 5)
        async with asyncio.timeout(3):  # each answers at once; a loaded VM gets some slack
            status = await get_status(stub)
            assert (status.spool_depth, status.high_watermark) == (12, 12)
            reader = Reader(stub, max_batch=100)
            first = await reader.count(12)
            assert [r.seq for r in first] == list(range(1, 13))
            acked = await ack(stub, epoch, 6)
            assert (acked.removed, acked.spool_depth) == (6, 6)
            assert (await get_status(stub)).spool_depth == 6
    finally:
        release.set()
    assert reader is not None
    try:
        records = await reader.count(16)  # the stalled batch, delivered once written
    finally:
        await reader.close()
    assert [r.seq for r in records] == list(range(1, 17))
