"""How a relayed stream ends when the provider's stream does not end with ``message_stop``.

A stream that stops early (a clean end of body, or its last event cut in half) must not look
complete to the client: the official SDK raises instead of returning a message, the client's
bytes end with an Anthropic ``error`` event, and the interception is recorded failed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    anthropic_provider,
    by_kind,
)

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
EVENTS = split_events(TEXT["streaming"].encode())
REQUEST: dict[str, Any] = orjson.loads(TEXT["request"])
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}

assert EVENTS[-1].startswith(b"event: message_stop\n")
assert EVENTS[-2].startswith(b"event: message_delta\n")

# Each: the upstream body, and how many of its events reach the client whole.
ENDINGS = [
    pytest.param(b"".join(EVENTS[:-1]), len(EVENTS) - 1, id="no-message-stop"),
    pytest.param(b"".join(EVENTS[:-2]), len(EVENTS) - 2, id="no-message-delta"),
    pytest.param(
        b"".join(EVENTS[:-1]) + EVENTS[-1][: len(EVENTS[-1]) // 2],
        len(EVENTS) - 1,
        id="message-stop-cut-in-half",
    ),
    pytest.param(
        b"".join(EVENTS[:-1]) + EVENTS[-1].rstrip(b"\n"),
        len(EVENTS) - 1,
        id="message-stop-without-blank-line",
    ),
    pytest.param(
        b"".join(EVENTS[:-2]) + EVENTS[-2][:40],
        len(EVENTS) - 2,
        id="message-delta-cut",
    ),
]


def reply(body: bytes) -> Reply:
    """The upstream answers 200 with ``body`` and ends the response cleanly."""
    return Reply(headers=SSE_HEADERS, body=body, sse=True)


def events_of(raw: bytes) -> list[tuple[str, bytes]]:
    out = []
    for event in split_events(raw):
        name, data = "", b""
        for line in event.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, data))
    return out


async def assert_failed_incomplete(gw: Gateway) -> None:
    records = await gw.records()
    ended = by_kind(records, "interception_ended")
    assert len(ended) == 1, ended
    assert ended[0]["status"] == "failed"
    assert ended[0]["error_type"] == "incomplete_stream"
    # The tokens the provider reported before the stream stopped are still accounted.
    usage = by_kind(records, "token_usage")
    assert len(usage) == 1
    assert usage[0]["input"] == 19


@pytest.mark.parametrize(("body", "whole"), ENDINGS)
async def test_sdk_raises_when_the_stream_ends_before_message_stop(
    gateway: Gateway, body: bytes, whole: int
) -> None:
    gateway.upstream.enqueue(reply(body))

    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(**REQUEST) as stream:
                await stream.get_final_message()

    assert caught.value.type == "api_error"
    assert "message_stop" in (caught.value.api_message or "")
    await assert_failed_incomplete(gateway)


@pytest.mark.parametrize(("body", "whole"), ENDINGS)
async def test_raw_client_gets_the_whole_events_then_an_error_event(
    gateway: Gateway, body: bytes, whole: int
) -> None:
    gateway.upstream.enqueue(reply(body))

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.url}/v1/messages",
            json=dict(REQUEST, stream=True),
            headers={"x-api-key": GATEWAY_KEY},
        ) as resp,
    ):
        assert resp.status == 200
        out = await resp.read()

    events = events_of(out)
    # Every whole upstream event, in order, then exactly one error event; nothing of a cut one.
    assert [name for name, _ in events[:-1]] == [name for name, _ in events_of(body)[:whole]]
    assert out.endswith(b"\n\n")
    name, data = events[-1]
    assert name == "error"
    error = orjson.loads(data)
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert "message_stop" in error["error"]["message"]
    assert b"message_stop\n" not in out
    await assert_failed_incomplete(gateway)


async def test_a_complete_stream_gets_no_error_event(gateway: Gateway) -> None:
    """The control case: the same stream with its message_stop ends normally."""
    gateway.upstream.enqueue(reply(TEXT["streaming"].encode()))

    async with (
        anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
        ) as client,
        client.messages.stream(**REQUEST) as stream,
    ):
        message = await stream.get_final_message()

    assert message.stop_reason == "end_turn"
    ended = by_kind(await gateway.records(), "interception_ended")
    assert [e["status"] for e in ended] == ["completed"]


async def test_upstream_breaking_after_message_stop_loses_the_client_nothing(
    make_gateway: GatewayFactory,
) -> None:
    """The provider sends the whole stream, then its connection dies before the chunked body's
    end: the client still gets the complete message, and nothing failed."""
    whole = TEXT["streaming"].encode()

    async def provider(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(whole), whole)
        )
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()  # no terminating chunk: the body is broken after message_stop

    server = await asyncio.start_server(provider, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(providers=[anthropic_provider(f"http://127.0.0.1:{port}")])
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{gw.url}/v1/messages",
                json=dict(REQUEST, stream=True),
                headers={"x-api-key": GATEWAY_KEY},
            ) as resp,
        ):
            out = await resp.read()
    finally:
        server.close()
        await server.wait_closed()

    assert [name for name, _ in events_of(out)] == [name for name, _ in events_of(whole)]
    assert out.endswith(EVENTS[-1])
    ended = by_kind(await gw.records(), "interception_ended")
    assert [(e["status"], e["error_type"]) for e in ended] == [("completed", "")]
