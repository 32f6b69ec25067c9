"""``StreamUsage``: replay the spool after a cursor, then tail it, in flow-controlled batches.

At-least-once: records stay in the spool until ``AckUsage``; a host that reconnects resumes
after its cursor (or from the oldest record when its epoch is not the spool's). Memory stays
bounded whatever the host's speed: one batch is built at a time, each send awaits the transport
(gRPC flow control), and no more than ``max_in_flight`` records are sent beyond the last ack.

Nothing inside the stream raises on a record's content: a record this daemon cannot convert (a
kind from a newer daemon, a payload of the wrong shape) goes out as an ``UnknownRecord``, is
counted and logged once, and every later record still flows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

from control.convert import deliverable
from control.spool import Spool, SpooledRecord
from control.v1 import control_pb2
from gateway.metrics import USAGE_RECORDS_DELIVERED, USAGE_RECORDS_UNCONVERTIBLE

log = logging.getLogger("aibridged.control")

DEFAULT_BATCH = 500
MAX_BATCH = 5000
DEFAULT_IN_FLIGHT = 10_000
# A batch stops growing past this size: gRPC clients refuse messages over 4 MiB by default, and a
# batch a host cannot receive would be sent again, in vain, on every reconnect. (A single record
# larger than the host's limit still goes alone: the host must raise its receive limit.)
MAX_BATCH_BYTES = 3 << 20
# An empty batch is sent after this much quiet, so the host can tell a live stream from a dead one.
HEARTBEAT_SECONDS = 15.0
# Unconvertible records already logged and counted: a host that reconnects gets them again, and
# the log must not repeat (nor memory grow) with every resend.
_SEEN_MAX = 4096
_seen_unconvertible: OrderedDict[str, None] = OrderedDict()


async def stream_usage(
    request: control_pb2.StreamUsageRequest,
    spool: Spool,
    stop: asyncio.Event,
    heartbeat: float = HEARTBEAT_SECONDS,
) -> AsyncIterator[control_pb2.StreamUsageResponse]:
    """Yield batches until ``stop`` is set (daemon shutdown) or the client goes away."""
    cursor = request.resume_after if request.epoch in ("", spool.epoch) else 0
    max_batch = min(request.max_batch or DEFAULT_BATCH, MAX_BATCH)
    max_in_flight = request.max_in_flight or DEFAULT_IN_FLIGHT
    while not stop.is_set():
        # Take the events before reading, so a commit that lands during the read still wakes us.
        written, acked = spool.written, spool.acked
        room = spool.acked_through + max_in_flight - cursor
        records = []
        if room > 0:
            records = await spool.read_after(cursor, min(max_batch, room))
        if records:
            batch, cursor = _convert(records)
            USAGE_RECORDS_DELIVERED.inc(len(batch))
            yield _batch(spool, batch)
            continue
        # Nothing to send (or the host is too far behind on acks): wait for news.
        wake = acked if room <= 0 else written
        if not await _wait_any((wake, stop), heartbeat):
            yield _batch(spool, [])
    # Flush what was written before shutdown began, so a host that stays connected gets it.
    while True:
        room = spool.acked_through + max_in_flight - cursor
        records = await spool.read_after(cursor, min(max_batch, max(room, 0))) if room > 0 else []
        if not records:
            return
        batch, cursor = _convert(records)
        USAGE_RECORDS_DELIVERED.inc(len(batch))
        yield _batch(spool, batch)


def _convert(records: list[SpooledRecord]) -> tuple[list[control_pb2.UsageRecord], int]:
    """The leading ``records`` that fit in one batch (at least one), converted, and the sequence
    number of the last one taken (the stream's new cursor)."""
    out: list[control_pb2.UsageRecord] = []
    size = 0
    cursor = records[0].seq
    for rec in records:
        message, reason, detail = deliverable(rec)
        size += message.ByteSize()
        if out and size > MAX_BATCH_BYTES:
            break
        if reason:
            _unconvertible(rec, reason, detail)
        out.append(message)
        cursor = rec.seq
    return out, cursor


def _unconvertible(rec: SpooledRecord, reason: str, detail: str) -> None:
    if rec.record_id in _seen_unconvertible:
        return
    _seen_unconvertible[rec.record_id] = None
    if len(_seen_unconvertible) > _SEEN_MAX:
        _seen_unconvertible.popitem(last=False)
    USAGE_RECORDS_UNCONVERTIBLE.labels(reason).inc()
    log.warning(
        "usage record cannot be converted: delivered as UnknownRecord",
        extra={"record_id": rec.record_id, "seq": rec.seq, "reason": reason, "detail": detail},
    )


def _batch(spool: Spool, records: list[control_pb2.UsageRecord]) -> control_pb2.StreamUsageResponse:
    return control_pb2.StreamUsageResponse(
        epoch=spool.epoch, records=records, high_watermark=spool.high_watermark
    )


async def _wait_any(events: tuple[asyncio.Event, ...], within: float) -> bool:
    """True when one of ``events`` is set within ``within`` seconds."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
