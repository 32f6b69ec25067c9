"""``StreamUsage`` past records it cannot convert: they go out as ``UnknownRecord``, never stall it.

A spool outlives the daemon that wrote it (a rollback leaves records of a kind this version does
not know) and a row may not have its kind's shape. Before, such a record raised inside the stream
at the same place on every reconnect, so no later record ever reached the host.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import grpc
import orjson
import pytest

from control.v1 import control_pb2 as pb
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.records import Record
from gateway.testing import Reply, load_txtar
from tests.conftest import (
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    metric_value,
)

if TYPE_CHECKING:
    from control.v1.control_pb2_grpc import ControlServiceAsyncStub as Stub

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
METRIC = "aibridged_usage_records_unconvertible_total"


@dataclass
class SandboxUsage:
    """A record kind from a newer daemon (synthetic)."""

    interception_id: str
    seconds: float
    kind: str = "sandbox_usage"
    created_at: float = field(default_factory=time.time)


@dataclass
class ShapelessTokenUsage:
    """A ``token_usage`` whose ``extra`` is a list where an object belongs (synthetic)."""

    interception_id: str
    extra: list[int]
    kind: str = "token_usage"
    msg_id: str = "msg_x"
    created_at: float = field(default_factory=time.time)


@dataclass
class UnboundUsage:
    """A record kind from a newer daemon that belongs to no interception (synthetic)."""

    region: str
    kind: str = "fleet_usage"
    created_at: float = field(default_factory=time.time)


@dataclass
class BadTimePrompt:
    """A ``prompt_usage`` whose time stamp is not a number (synthetic)."""

    interception_id: str
    prompt: str
    created_at: str = "x"
    kind: str = "prompt_usage"
    msg_id: str = "msg_x"


async def ask(gw: Gateway) -> None:
    """One blocking request through the data plane (4 records)."""
    gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.url}/v1/messages", data=TEXT["request"], headers={"x-api-key": GATEWAY_KEY}
        ) as resp,
    ):
        assert resp.status == 200


async def stream(stub: Stub, n: int, resume_after: int = 0) -> list[pb.UsageRecord]:
    """The first ``n`` records StreamUsage sends after ``resume_after`` (fails if it stalls)."""
    call = stub.StreamUsage(
        pb.StreamUsageRequest(resume_after=resume_after), metadata=CONTROL_METADATA
    )
    records: list[pb.UsageRecord] = []
    try:
        async with asyncio.timeout(10):
            async for batch in call:
                records.extend(batch.records)
                if len(records) >= n:
                    return records
    finally:
        call.cancel()
    return records


@pytest.fixture
async def gw_stub(make_gateway: GatewayFactory) -> Any:
    gw = await make_gateway(control_token=CONTROL_TOKEN)
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        yield gw, ControlServiceStub(channel)


async def test_unconvertible_records_are_delivered_opaque_and_the_stream_goes_on(
    gw_stub: tuple[Gateway, Stub], caplog: pytest.LogCaptureFixture
) -> None:
    gw, stub = gw_stub
    unknown_before = await metric_value(gw.metrics_url, METRIC, reason="unknown_kind")
    malformed_before = await metric_value(gw.metrics_url, METRIC, reason="malformed")
    spool = gw.daemon.spool
    spool.submit(cast(Record, SandboxUsage("intc-future", 12.5)))
    spool.submit(cast(Record, ShapelessTokenUsage("intc-shapeless", [1, 2])))
    await ask(gw)
    spooled = await gw.records()
    assert len(spooled) == 6

    with caplog.at_level(logging.WARNING, logger="aibridged.control"):
        first = await stream(stub, 6)
        # A host that reconnects from the start gets the same records again: no stall.
        again = await stream(stub, 6)
    for got in (first, again):
        assert [r.seq for r in got] == [r.seq for r in spooled]
        kinds = [r.WhichOneof("record") for r in got]
        assert kinds[:2] == ["unknown", "unknown"]
        assert kinds[2:] == [
            "interception_started",
            "prompt_usage",
            "token_usage",
            "interception_ended",
        ]
        future, shapeless = got[0], got[1]
        assert (future.unknown.kind, future.unknown.reason) == ("sandbox_usage", "unknown_kind")
        assert future.interception_id == "intc-future"
        assert orjson.loads(future.unknown.payload)["seconds"] == 12.5
        assert future.created_at.seconds > 0
        assert (shapeless.unknown.kind, shapeless.unknown.reason) == ("token_usage", "malformed")
        assert orjson.loads(shapeless.unknown.payload)["extra"] == [1, 2]
        assert got[-1].interception_ended.status == "completed"

    # Resuming right after the first bad record still reaches the rest.
    resumed = await stream(stub, 5, resume_after=first[0].seq)
    assert [r.seq for r in resumed] == [r.seq for r in spooled[1:]]

    # Counted and logged once per record, not once per resend.
    assert await metric_value(gw.metrics_url, METRIC, reason="unknown_kind") == unknown_before + 1
    assert await metric_value(gw.metrics_url, METRIC, reason="malformed") == malformed_before + 1
    lines = [r for r in caplog.records if "cannot be converted" in r.getMessage()]
    assert sorted(getattr(r, "reason", "") for r in lines) == ["malformed", "unknown_kind"]
    assert all("12.5" not in r.getMessage() for r in lines)

    # The host can acknowledge past them like any other record.
    ack = await stub.AckUsage(
        pb.AckUsageRequest(epoch=spool.epoch, acked_through=first[-1].seq),
        metadata=CONTROL_METADATA,
    )
    assert ack.spool_depth == 0


async def test_a_corrupt_spool_row_is_delivered_opaque_and_the_stream_goes_on(
    gw_stub: tuple[Gateway, Stub],
) -> None:
    gw, stub = gw_stub
    await ask(gw)
    await ask(gw)
    spooled = await gw.records()
    assert len(spooled) == 8
    # Damage the first request's prompt record in the file itself (a torn or hand-edited row).
    db = sqlite3.connect(gw.daemon.settings.spool_path)
    with db:
        changed = db.execute(
            "UPDATE records SET payload = CAST(replace(payload, ?, ?) AS BLOB)",
            (b'"kind":"prompt_usage"', b'"kind":'),
        ).rowcount
    db.close()
    assert changed >= 1

    got = await stream(stub, 8)
    assert [r.seq for r in got] == [r.seq for r in spooled]
    kinds = [r.WhichOneof("record") for r in got]
    assert kinds.count("unknown") == 2  # both prompts: every row was damaged the same way
    assert got[1].unknown.reason == "malformed"
    # The line as stored, not an empty object: the host can still see what it was.
    damaged = orjson.dumps(spooled[1].payload).replace(b'"kind":"prompt_usage"', b'"kind":')
    assert got[1].unknown.payload == damaged
    assert got[-1].interception_ended.status == "completed"


async def test_an_unreadable_envelope_keeps_the_kind_and_the_bytes_as_stored(
    gw_stub: tuple[Gateway, Stub],
) -> None:
    """A newer kind without ``interception_id``, a time stamp that is not a number: the host
    gets the kind and the record exactly as spooled, not an empty object of no kind."""
    gw, stub = gw_stub
    unbound, bad_time = UnboundUsage("eu-west"), BadTimePrompt("intc-bad-time", "hello")
    gw.daemon.spool.submit(cast(Record, unbound))
    gw.daemon.spool.submit(cast(Record, bad_time))
    await ask(gw)
    spooled = await gw.records()
    assert len(spooled) == 6

    got = await stream(stub, 6)
    assert [r.seq for r in got] == [r.seq for r in spooled]
    first, second = got[0], got[1]
    assert (first.unknown.kind, first.unknown.reason) == ("fleet_usage", "unknown_kind")
    assert first.unknown.payload == orjson.dumps(unbound)
    assert first.interception_id == ""
    assert first.created_at.ToMicroseconds() == round(unbound.created_at * 1e6)
    assert (second.unknown.kind, second.unknown.reason) == ("prompt_usage", "malformed")
    assert second.unknown.payload == orjson.dumps(bad_time)
    assert second.interception_id == "intc-bad-time"
    assert not second.HasField("created_at")  # no time known, rather than 1970
    assert got[-1].interception_ended.status == "completed"


async def test_batches_stay_under_the_grpc_default_message_limit(
    gw_stub: tuple[Gateway, Stub],
) -> None:
    """Records of long prompts: a default batch of 500 would be tens of MiB, over the 4 MiB a
    gRPC client accepts by default, and the host would be refused the same batch forever."""
    gw, stub = gw_stub
    big = "x" * 300_000
    for n in range(30):
        gw.daemon.spool.submit(cast(Record, SandboxUsage(f"intc-{n}-{big}", float(n))))
    assert len(await gw.records()) == 30
    batches: list[int] = []
    call = stub.StreamUsage(pb.StreamUsageRequest(), metadata=CONTROL_METADATA)
    try:
        async with asyncio.timeout(10):
            async for batch in call:
                batches.append(len(batch.records))
                assert batch.ByteSize() < 4 << 20
                if sum(batches) >= 30:
                    break
    finally:
        call.cancel()
    assert sum(batches) == 30 and len(batches) > 1
