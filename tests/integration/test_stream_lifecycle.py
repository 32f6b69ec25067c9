"""Streams over time: keep-alive pings, client disconnects (drain or cancel)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from gateway.sse.keepalive import ANTHROPIC_PING
from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    by_kind,
    fixture_message,
    wait_for_end,
)

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
REQUEST = dict(orjson.loads(TEXT["request"]), stream=True)
STREAMED = fixture_message(TEXT["streaming"])  # every test here replays the streaming section
FINAL_OUTPUT = STREAMED.usage.output_tokens


async def read_whole_stream(gw: Gateway) -> bytes:
    """Send the streamed request; every byte the client receives."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.url}/v1/messages", json=REQUEST, headers={"x-api-key": GATEWAY_KEY}
        ) as resp,
    ):
        return await resp.read()


async def read_first_chunk_then_disconnect(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{gw.url}/v1/messages", json=REQUEST, headers={"x-api-key": GATEWAY_KEY}
        )
        assert resp.status == 200
        first = await resp.content.readany()
        assert b"message_start" in first
        resp.close()  # drop the connection mid-stream


async def test_disconnect_drains_upstream_and_records_final_usage(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    gw.upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=0.05))
    await read_first_chunk_then_disconnect(gw)

    ended = await wait_for_end(gw)
    assert ended["status"] == "client_disconnected"
    records = await gw.records()
    [tokens] = by_kind(records, "token_usage")
    # The upstream was read to its end, so the message's final usage was recorded.
    assert tokens["output"] == FINAL_OUTPUT
    assert gw.upstream.events_sent == len(split_events(TEXT["streaming"].encode()))
    assert len(by_kind(records, "prompt_usage")) == 1


async def test_disconnect_cancel_mode_stops_upstream_and_still_records(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(on_client_disconnect="cancel")
    gw.upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=0.1))
    await read_first_chunk_then_disconnect(gw)

    ended = await wait_for_end(gw)
    assert ended["status"] == "client_disconnected"
    [tokens] = by_kind(await gw.records(), "token_usage")
    # Cancelled early: what message_start reported is recorded, and generation stopped.
    assert tokens["input"] == STREAMED.usage.input_tokens
    assert tokens["output"] < FINAL_OUTPUT
    await asyncio.wait_for(gw.upstream.finished.wait(), 5)
    assert gw.upstream.events_sent < len(split_events(TEXT["streaming"].encode()))


async def test_drain_is_bounded_by_its_timeout(make_gateway: GatewayFactory) -> None:
    # A silent upstream means no write reveals the disconnect until the next keep-alive ping.
    gw = await make_gateway(disconnect_drain_timeout=0.3, ping_interval=0.2)
    reply = Reply.from_section(TEXT["streaming"])
    reply.hang_after = 4  # the upstream stalls forever after a few events
    gw.upstream.enqueue(reply)
    await read_first_chunk_then_disconnect(gw)

    ended = await wait_for_end(gw, within=5)
    assert ended["status"] == "client_disconnected"
    assert len(by_kind(await gw.records(), "token_usage")) == 1


async def test_pings_sent_while_upstream_is_silent(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ping_interval=0.15)
    events = split_events(TEXT["streaming"].encode())
    # Few events, long gaps: message_start, then silence, then the end of the message.
    slow = Reply(
        headers={"Content-Type": "text/event-stream"},
        body=events[0] + events[-2] + events[-1],
        sse=True,
        event_delay=0.5,
    )
    gw.upstream.enqueue(slow)
    received = await read_whole_stream(gw)
    pings = received.count(ANTHROPIC_PING)
    assert pings >= 4
    without_pings = received.replace(ANTHROPIC_PING, b"")
    [started] = by_kind(await gw.records(), "interception_started")
    upstream_id = STREAMED.id.encode()
    assert without_pings == slow.body.replace(upstream_id, started["interception_id"].encode())


async def test_no_ping_when_events_flow(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ping_interval=0.5)
    reply = Reply.from_section(TEXT["streaming"])
    gw.upstream.enqueue(reply)
    received = await read_whole_stream(gw)
    assert received.count(b"event: ping") == reply.body.count(b"event: ping")
