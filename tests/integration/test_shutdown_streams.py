"""Streams still open when ``shutdown_grace`` runs out.

They are not cut silently: each client gets an Anthropic ``overloaded_error`` event saying the
gateway is shutting down, then the end of the body, and each interception gets its end record.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import FIXTURES, GATEWAY_KEY, Gateway, GatewayFactory
from tests.mcp_server import McpTestServer, running_mcp_server

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
ADD = load_txtar(FIXTURES / "anthropic" / "injected_add.txtar")
REQUEST: dict[str, Any] = dict(orjson.loads(TEXT["request"]), stream=True)


class CallSignallingServer(McpTestServer):
    """The test MCP server; ``called`` is set once a ``tools/call`` arrives."""

    def __init__(self) -> None:
        self.called = asyncio.Event()
        super().__init__()

    async def _paginate(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.method == "tools/call":
            self.called.set()
        return await super()._paginate(ctx, call_next)


async def open_stream(http: aiohttp.ClientSession, gw: Gateway) -> aiohttp.ClientResponse:
    resp = await http.post(
        f"{gw.url}/v1/messages", json=REQUEST, headers={"x-api-key": GATEWAY_KEY}
    )
    assert resp.status == 200
    return resp


def spooled(path: Path, kind: str) -> list[dict[str, Any]]:
    """Payloads of one kind of record in a stopped daemon's spool."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT payload FROM spooled_records WHERE kind = ?", (kind,)).fetchall()
    finally:
        db.close()
    return [orjson.loads(payload) for (payload,) in rows]


def assert_ends_with_shutdown_error(out: bytes) -> None:
    last = split_events(out)[-1]
    assert last.startswith(b"event: error\ndata: "), out[-300:]
    error = orjson.loads(last.split(b"\ndata: ", 1)[1])
    assert error["type"] == "error"
    assert error["error"]["type"] == "overloaded_error"
    assert "shutting down" in error["error"]["message"]
    assert b"message_stop" not in out


async def test_streams_open_after_the_grace_get_an_error_event_and_records(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(shutdown_grace=0.5)
    # Two slow streams (an event every 2 s): neither can finish within the grace.
    for _ in range(2):
        gw.upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=2.0))
    async with aiohttp.ClientSession() as http:
        responses = [await open_stream(http, gw) for _ in range(2)]
        firsts = [await resp.content.readany() for resp in responses]
        assert all(b"message_start" in first for first in firsts)

        await asyncio.wait_for(gw.daemon.stop(), 30)
        outs = [first + await resp.read() for first, resp in zip(firsts, responses, strict=True)]

    for out in outs:
        assert out.startswith(b"event: message_start\n")
        assert_ends_with_shutdown_error(out)
    ended = spooled(gw.daemon.settings.spool_path, "interception_ended")
    assert len(ended) == 2
    for end in ended:
        assert end["status"] == "failed"
        assert end["error_type"] == "shutdown"
    # What the provider reported before the cut is accounted.
    usage = spooled(gw.daemon.settings.spool_path, "token_usage")
    assert [u["input"] for u in usage] == [19, 19]


async def test_stream_waiting_for_an_injected_tool_gets_the_error_event(
    make_gateway: GatewayFactory,
) -> None:
    """The stream is between two turns, its MCP tool still running, when the grace runs out."""
    slow_call = (
        ADD["streaming"]
        .replace("bmcp_tools_add", "bmcp_tools_slow")
        .replace('{\\"a\\": 2, ', '{\\"seconds\\": ')
        .replace('\\"b\\": 3}', "30}")
    )
    assert '"partial_json":"{\\"seconds\\": "' in slow_call
    assert '"partial_json":"30}"' in slow_call
    server = CallSignallingServer()
    async with running_mcp_server(server) as url:
        gw = await make_gateway(shutdown_grace=0.5, mcp_servers=[{"id": "tools", "url": url}])
        gw.upstream.enqueue(Reply.from_section(slow_call))
        async with aiohttp.ClientSession() as http:
            resp = await open_stream(http, gw)
            first = await resp.content.readany()
            assert b"message_start" in first
            await asyncio.wait_for(server.called.wait(), 10)  # the tool runs, for 30 s
            await asyncio.wait_for(gw.daemon.stop(), 30)
            out = first + await resp.read()

    assert_ends_with_shutdown_error(out)
    assert b"bmcp_" not in out
    assert len(gw.upstream.requests) == 1  # the loop did not go on
    (end,) = spooled(gw.daemon.settings.spool_path, "interception_ended")
    assert (end["status"], end["error_type"]) == ("failed", "shutdown")
