"""Redirects never carry a credential away: passthrough calls and MCP connections.

A "target" on loopback records every request it receives; the provider (or an endpoint in front
of a real MCP server) redirects to it. The central key or the actor's MCP token must never
arrive there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web

from gateway.proxy.upstream_failure import redirected
from gateway.state import McpServer, McpToken
from gateway.testing import LoopbackServer, Reply
from gateway.tools.mcp_pool import McpCallError, McpPool
from tests.conftest import GATEWAY_KEY, UPSTREAM_KEY, Gateway
from tests.mcp_server import McpTestServer

MCP_TOKEN = "tok-alice-mcp-secret"


class Target(LoopbackServer):
    """A loopback HTTP server that records the headers of every request and answers 200."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append((f"{request.method} {request.path}", dict(request.headers)))
        await request.read()
        return web.json_response({"data": [], "stolen": True})

    def saw(self, secret: str) -> bool:
        """Whether any recorded request carried ``secret`` in a header."""
        return any(secret in value for _, headers in self.seen for value in headers.values())


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = await Target().start()
    yield t
    await t.close()


# -- passthrough ----------------------------------------------------------------------------------

PASSTHROUGH = [
    pytest.param("GET", "/v1/models", id="models"),
    pytest.param("GET", "/v1/models/claude-sonnet-4-5", id="model"),
    pytest.param("POST", "/v1/messages/count_tokens", id="count-tokens"),
]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize(("method", "path"), PASSTHROUGH)
async def test_passthrough_redirect_is_502_and_not_followed(
    gateway: Gateway,
    target: Target,
    caplog: pytest.LogCaptureFixture,
    status: int,
    method: str,
    path: str,
) -> None:
    gateway.upstream.enqueue(Reply(status=status, headers={"Location": f"{target.url}/steal"}))

    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            gateway.url + path,
            data=b'{"model": "claude-sonnet-4-5", "messages": []}' if method == "POST" else None,
            headers={"x-api-key": GATEWAY_KEY, "content-type": "application/json"},
            allow_redirects=False,
        ) as resp,
    ):
        out = await resp.read()
        assert resp.status == 502, out
        assert "Location" not in resp.headers

    assert json.loads(out) == {
        "type": "error",
        "error": {"type": "api_error", "message": redirected(status).client_message},
    }
    assert target.seen == []
    assert [r.path for r in gateway.upstream.requests] == [path]
    logged = [r for r in caplog.records if r.name == "aibridged.passthrough"]
    assert [r.levelno for r in logged] == [logging.WARNING]
    assert str(status) in logged[0].getMessage()
    assert await gateway.records() == []


async def test_passthrough_same_origin_redirect_is_not_followed(gateway: Gateway) -> None:
    """A relative Location would send the central key to another provider endpoint."""
    gateway.upstream.enqueue(
        Reply(status=302, headers={"Location": "/v1/organizations/users"}),
        Reply(status=200, headers={"Content-Type": "application/json"}, body=b'{"data": []}'),
    )

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.url}/v1/models", headers={"x-api-key": GATEWAY_KEY}) as resp,
    ):
        assert resp.status == 502

    assert [r.path for r in gateway.upstream.requests] == ["/v1/models"]
    assert gateway.upstream.requests[0].headers["x-api-key"] == UPSTREAM_KEY


# -- MCP connections ------------------------------------------------------------------------------


def redirecting(app: Any, redirects: dict[str, str]) -> Any:
    """``app`` (ASGI) behind an endpoint answering 307 to ``redirects[path]`` for those paths."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        location = redirects.get(scope["path"]) if scope["type"] == "http" else None
        if location is None:
            await app(scope, receive, send)
            return
        headers = [(b"location", location.encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 307, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return asgi


def recording(app: Any, seen: list[tuple[str, dict[str, str]]]) -> Any:
    """``app`` (ASGI) that records each HTTP request's path and headers first."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            seen.append((f"{scope['method']} {scope['path']}", headers))
        await app(scope, receive, send)

    return asgi


class RedirectedMcp:
    """A real MCP server at ``/mcp``; ``/old/mcp`` on the same origin answers 307 to it, and
    ``/away/mcp`` answers 307 to another origin (a :class:`Target`)."""

    def __init__(self, away: str) -> None:
        self.server = McpTestServer()
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.app = recording(
            redirecting(
                self.server.mcp.streamable_http_app(), {"/old/mcp": "/mcp", "/away/mcp": away}
            ),
            self.seen,
        )
        self.url = ""

    def saw_at_mcp(self, secret: str) -> bool:
        """Whether a request that reached the real MCP endpoint carried ``secret``."""
        return any(
            path.endswith(" /mcp") and any(secret in v for v in headers.values())
            for path, headers in self.seen
        )


@pytest.fixture
async def mcp(target: Target) -> AsyncIterator[RedirectedMcp]:
    served = RedirectedMcp(f"{target.url}/mcp")
    config = uvicorn.Config(
        served.app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    deadline = time.monotonic() + 20
    while not uv.started:
        assert not task.done() and time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    served.url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    yield served
    uv.should_exit = True
    await task


@pytest.fixture
async def pool(mcp: RedirectedMcp) -> AsyncIterator[McpPool]:
    """A pool closed before the MCP server stops."""
    p = McpPool(list_timeout=5.0)
    yield p
    await p.close()


def configure(pool: McpPool, url: str) -> None:
    pool.configure({"s1": McpServer("s1", url)}, {("u1", "s1"): McpToken("u1", "s1", MCP_TOKEN)})


async def test_mcp_server_reached_directly_gets_the_token(
    pool: McpPool, mcp: RedirectedMcp
) -> None:
    """The setup the redirect tests rely on: without a redirect the token arrives."""
    configure(pool, f"{mcp.url}/mcp")

    result = await pool.call("u1", "s1", "echo_auth", {})

    assert result.content[0]["text"] == f"Bearer {MCP_TOKEN}"
    assert mcp.saw_at_mcp(MCP_TOKEN)


@pytest.mark.parametrize("path", ["/old/mcp", "/away/mcp"], ids=["same-origin", "other-origin"])
async def test_mcp_redirect_is_not_followed(
    pool: McpPool,
    mcp: RedirectedMcp,
    target: Target,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    configure(pool, mcp.url + path)

    with pytest.raises(McpCallError) as failed:
        await pool.call("u1", "s1", "echo_auth", {})
    assert await pool.list_tools("u1") == []

    assert "redirect" in str(failed.value)
    assert MCP_TOKEN not in str(failed.value)
    assert not mcp.saw_at_mcp(MCP_TOKEN)
    assert not target.saw(MCP_TOKEN)
    assert target.seen == []
    assert any("redirects are not followed" in r.getMessage() for r in caplog.records)
    assert all(MCP_TOKEN not in r.getMessage() for r in caplog.records)
