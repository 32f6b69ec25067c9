"""How the gateway calls the provider on ``POST /{provider}/v1/messages``.

Redirects are never followed (the central key would travel to the redirect's target), upstream
failures reach the client without naming the provider's address (the detail goes to the end
record and the log), and a call makes ``1 + max_retries`` attempts, plus one only when a pooled
keep-alive connection turned out to be closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.testing import FakeUpstream, Reply, fake_upstream, load_txtar, split_events
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    anthropic_provider,
    by_kind,
    wait_for_end,
)
from tests.mcp_server import running_mcp_server
from tests.processes import free_port

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
ADD = load_txtar(FIXTURES / "anthropic" / "injected_add.txtar")
STREAMING = pytest.mark.parametrize("stream", [True, False], ids=["stream", "blocking"])

# What a RawUpstream does with a request it read: "reset" (RST), "close" (FIN), else send bytes.
Action = str | bytes


def http_response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    """A complete keep-alive HTTP/1.1 response."""
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


MESSAGE = http_response(200, TEXT["non-streaming"].strip().encode())


class RawUpstream:
    """A provider on loopback speaking raw HTTP/1.1, to fail where aiohttp's server cannot:
    reset a connection after reading a request, or close a kept-alive one without answering.

    Each request read takes the next action (``default`` once they run out).
    """

    def __init__(self, *actions: Action, default: Action = "reset") -> None:
        self.actions: deque[Action] = deque(actions)
        self.default = default
        self.posts = 0
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.posts += 1
                action = self.actions.popleft() if self.actions else self.default
                if action == "reset":
                    sock = writer.get_extra_info("socket")
                    # Linger 0: close() sends RST instead of FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if action == "close":
                    break
                assert isinstance(action, bytes)
                writer.write(action)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def post(url: str, stream: bool, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """One client request to ``/v1/messages`` with a fresh session: (status, body bytes)."""
    payload = dict(body or orjson.loads(TEXT["request"]), stream=stream)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/messages", json=payload, headers={"x-api-key": GATEWAY_KEY}) as r,
    ):
        return r.status, await r.read()


def error_of(status: int, body: bytes) -> str:
    """The message of an Anthropic-shaped 502 ``api_error``."""
    assert status == 502, body
    obj = orjson.loads(body)
    assert obj["type"] == "error"
    assert obj["error"]["type"] == "api_error"
    message: str = obj["error"]["message"]
    return message


def stream_error_of(body: bytes) -> str:
    """The message of the ``error`` event ending a stream that had started."""
    events = split_events(body)
    assert events and events[-1].startswith(b"event: error"), body
    assert b"message_stop" not in body
    data = events[-1].split(b"data:", 1)[1]
    message: str = orjson.loads(data)["error"]["message"]
    return message


async def ended(gw: Gateway) -> dict[str, Any]:
    [end] = by_kind(await gw.records(), "interception_ended")
    return end


def providers(url: str, max_retries: int = 0) -> list[dict[str, Any]]:
    return [anthropic_provider(url, max_retries=max_retries)]


@pytest.fixture
async def elsewhere() -> AsyncIterator[FakeUpstream]:
    """Where a provider's redirect points: must never be reached."""
    async with fake_upstream() as up:
        yield up


# -- item 2: redirects are never followed -------------------------------------------------------


@STREAMING
@pytest.mark.parametrize("status", [302, 307])
async def test_provider_redirect_is_a_502_and_the_key_goes_nowhere(
    make_gateway: GatewayFactory,
    upstream: FakeUpstream,
    elsewhere: FakeUpstream,
    status: int,
    stream: bool,
) -> None:
    gw = await make_gateway(providers=providers(upstream.url, max_retries=2))
    upstream.default = Reply(status=status, headers={"Location": f"{elsewhere.url}/v1/messages"})

    code, body = await post(gw.url, stream)

    assert elsewhere.requests == []
    assert "redirect" in error_of(code, body)
    assert len(upstream.requests) == 1  # a redirect is not retried either
    end = await ended(gw)
    assert (end["status"], end["error_type"]) == ("failed", "upstream_redirect")
    assert end["upstream_status"] == status


@STREAMING
async def test_redirect_on_a_tool_loop_continuation_is_not_followed(
    make_gateway: GatewayFactory, upstream: FakeUpstream, elsewhere: FakeUpstream, stream: bool
) -> None:
    async with running_mcp_server() as mcp_url:
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": mcp_url}])
        first = ADD["streaming" if stream else "non-streaming"]
        redirect = Reply(status=302, headers={"Location": f"{elsewhere.url}/v1/messages"})
        upstream.enqueue(Reply.from_section(first), redirect)

        code, body = await post(gw.url, stream, orjson.loads(ADD["request"]))

    assert elsewhere.requests == []
    assert len(upstream.requests) == 2
    if stream:
        assert code == 200
        assert "redirect" in stream_error_of(body)
    else:
        assert "redirect" in error_of(code, body)
    end = await ended(gw)
    assert (end["status"], end["error_type"]) == ("failed", "upstream_redirect")
    assert end["upstream_status"] == 302


# -- item 6: client messages name no internal address ------------------------------------------


def assert_hidden(body: bytes, port: int) -> None:
    assert b"127.0.0.1" not in body, body
    assert str(port).encode() not in body, body


def assert_logged(caplog: pytest.LogCaptureFixture, port: int) -> None:
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"127.0.0.1:{port}" in str(getattr(r, "error", "")) for r in warnings)


@STREAMING
async def test_closed_port_is_not_named_to_the_client(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    port = free_port()
    gw = await make_gateway(providers=providers(f"http://127.0.0.1:{port}"))

    code, body = await post(gw.url, stream)

    assert "unreachable" in error_of(code, body)
    assert_hidden(body, port)
    end = await ended(gw)
    assert (end["status"], end["error_type"]) == ("failed", "upstream_unreachable")
    assert f"127.0.0.1:{port}" in end["error_message"]
    assert_logged(caplog, port)


@STREAMING
async def test_reset_connection_is_not_named_to_the_client(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    async with RawUpstream() as raw:
        gw = await make_gateway(providers=providers(raw.url))
        code, body = await post(gw.url, stream)

    assert "unreachable" in error_of(code, body)
    assert_hidden(body, raw.port)
    end = await ended(gw)
    assert (end["status"], end["error_type"]) == ("failed", "upstream_unreachable")
    assert f"127.0.0.1:{raw.port}" in end["error_message"]
    assert_logged(caplog, raw.port)


async def test_stream_broken_midway_is_not_named_to_the_client(
    make_gateway: GatewayFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway()
    upstream.enqueue(replace(Reply.from_section(TEXT["streaming"]), cut_after=2))

    code, body = await post(gw.url, stream=True)

    assert code == 200
    assert "broken" in stream_error_of(body)
    assert_hidden(body, upstream.port)
    end = await wait_for_end(gw)
    assert (end["status"], end["error_type"]) == ("failed", "upstream_stream_broken")
    assert f"127.0.0.1:{upstream.port}" in end["error_message"]
    assert_logged(caplog, upstream.port)


async def test_failed_tool_loop_continuation_is_not_named_to_the_client(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first = http_response(200, ADD["streaming"].encode(), "text/event-stream")
    async with running_mcp_server() as mcp_url, RawUpstream(first) as raw:
        gw = await make_gateway(
            providers=providers(raw.url), mcp_servers=[{"id": "tools", "url": mcp_url}]
        )
        code, body = await post(gw.url, True, orjson.loads(ADD["request"]))

    assert code == 200
    assert "unreachable" in stream_error_of(body)
    assert_hidden(body, raw.port)
    end = await ended(gw)
    assert (end["status"], end["error_type"]) == ("failed", "upstream_unreachable")
    assert f"127.0.0.1:{raw.port}" in end["error_message"]
    assert_logged(caplog, raw.port)


# -- item 11: 1 + max_retries attempts ---------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 2])
@pytest.mark.parametrize("how", ["reset", "close"])
async def test_broken_connections_cost_one_plus_max_retries_attempts(
    make_gateway: GatewayFactory, max_retries: int, how: str
) -> None:
    async with RawUpstream(default=how) as raw:
        gw = await make_gateway(providers=providers(raw.url, max_retries))
        code, body = await post(gw.url, stream=False)

    error_of(code, body)
    assert raw.posts == 1 + max_retries
    assert (await ended(gw))["error_type"] == "upstream_unreachable"


@pytest.mark.parametrize("max_retries", [0, 2])
async def test_overloaded_provider_gets_one_plus_max_retries_attempts(
    make_gateway: GatewayFactory, upstream: FakeUpstream, max_retries: int
) -> None:
    gw = await make_gateway(providers=providers(upstream.url, max_retries))
    upstream.default = Reply(
        status=503,
        headers={"Content-Type": "application/json", "retry-after-ms": "10"},
        body=b'{"type":"error","error":{"type":"api_error","message":"unavailable"}}',
    )

    code, _ = await post(gw.url, stream=False)

    assert code == 503
    assert len(upstream.requests) == 1 + max_retries


async def test_stale_keep_alive_connection_gets_the_one_extra_attempt(
    make_gateway: GatewayFactory,
) -> None:
    # The second request goes out on the kept-alive connection, which the provider closes
    # unanswered (as when its idle timeout races the request): retried on a new connection,
    # although no retry is configured.
    async with RawUpstream(MESSAGE, "close", MESSAGE) as raw:
        gw = await make_gateway(providers=providers(raw.url, max_retries=0))
        first = await post(gw.url, stream=False)
        second = await post(gw.url, stream=False)

    assert (first[0], second[0]) == (200, 200)
    assert (raw.posts, raw.connections) == (3, 2)
