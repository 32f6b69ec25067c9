"""The passthrough allow-list under attack, and passthrough failures as a client sees them.

Targets are sent byte for byte over a raw socket (client libraries normalise them), and the
provider side records the exact request target it received.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

from gateway.testing import LoopbackServer, Reply
from tests.conftest import GATEWAY_KEY, UPSTREAM_KEY, Gateway, GatewayFactory, anthropic_provider
from tests.processes import free_port

MODELS = b'{"data": [], "has_more": false, "first_id": null, "last_id": null}'
LEAKED = b'{"data": [{"id": "user_1", "email": "ceo@example.com"}]}'


async def raw_request(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request sent byte for byte: ``(status, body)``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        f"x-api-key: {GATEWAY_KEY}\r\ncontent-type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head_bytes, _, out = data.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), out


class RawProvider(LoopbackServer):
    """A provider on loopback that records each request target exactly as it arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.api_keys: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.targets.append(f"{request.method} {request.raw_path}")
        self.api_keys.append(request.headers.get("x-api-key", ""))
        await request.read()
        body = MODELS if request.path.startswith("/v1/models") else LEAKED
        return web.Response(body=body, content_type="application/json")


@pytest.fixture
async def provider() -> AsyncIterator[RawProvider]:
    raw = await RawProvider().start()
    yield raw
    await raw.close()


@pytest.fixture
async def gw(make_gateway: GatewayFactory, provider: RawProvider) -> Gateway:
    """A gateway whose provider records raw request targets."""
    return await make_gateway(providers=[anthropic_provider(f"http://127.0.0.1:{provider.port}")])


# Every way found to step out of /v1/models/{id}, plus shapes no allowed route has.
ESCAPES = [
    "/v1/models/../../v1/organizations/users",
    "/v1/models/..%2f..%2fv1/organizations/users",
    "/v1/models/..%2F..%2Fv1%2Forganizations%2Fusers",
    "/v1/models/%2e%2e/%2e%2e/v1/organizations/users",
    "/v1/models/%2E%2E%2F%2E%2E%2Fv1%2Forganizations%2Fusers",
    "/v1/models/.%2e/%2e./v1/organizations/users",
    "/v1/models/%252e%252e/%252e%252e/v1/organizations/users",
    "/v1/models/..%252f..%252fv1%252forganizations%252fusers",
    "/v1/models/..;/..;/v1/organizations/users",
    "/v1/models/x;a=b",
    "/v1/models/..\\..\\v1\\organizations\\users",
    "/v1/models/..%5c..%5cv1%5corganizations%5cusers",
    "/v1/models/x%00",
    "/v1/models/x%0a",
    "/v1/models/x%0d%0aX-Injected:%201",
    "/v1/models//x",
    "/v1/models/a/b",
    "/v1/models/x/..",
    "/v1/models/.",
    "/v1/models/..%2fmessages%2fcount_tokens",
    "/v1/models/..%2f..%2fv1/organizations/users?limit=1",
]


@pytest.mark.parametrize("tail", ESCAPES)
async def test_escape_is_404_and_never_reaches_the_provider(
    gw: Gateway, provider: RawProvider, tail: str
) -> None:
    status, out = await raw_request(gw.daemon.port, "GET", "/anthropic" + tail)

    assert status == 404, out
    error = json.loads(out)
    assert error["type"] == "error"
    assert error["error"]["type"] == "not_found_error"
    assert error["error"]["message"].startswith("route not supported: GET ")
    assert provider.targets == []
    assert await gw.records() == []


async def test_absolute_form_target_cannot_escape(gw: Gateway, provider: RawProvider) -> None:
    target = "http://gw/anthropic/v1/models/..%2f..%2fv1/organizations/users"

    status, out = await raw_request(gw.daemon.port, "GET", target)

    assert status == 404, out
    assert provider.targets == []


# Allowed requests reach the provider rebuilt from their decoded segments.
ALLOWED = [
    ("GET", "/v1/models", "GET /v1/models"),
    ("GET", "/v1/%6dodels", "GET /v1/models"),
    ("GET", "/v1/models/claude-sonnet-4-5", "GET /v1/models/claude-sonnet-4-5"),
    ("GET", "/v1/models/claude%2Dsonnet-4-5", "GET /v1/models/claude-sonnet-4-5"),
    (
        "GET",
        "/v1/models/claude-3-5-sonnet-v2@20241022",
        "GET /v1/models/claude-3-5-sonnet-v2@20241022",
    ),
    ("POST", "/v1/messages/count_tokens", "POST /v1/messages/count_tokens"),
]


@pytest.mark.parametrize(("method", "tail", "seen"), ALLOWED)
async def test_allowed_target_reaches_the_provider(
    gw: Gateway, provider: RawProvider, method: str, tail: str, seen: str
) -> None:
    status, out = await raw_request(gw.daemon.port, method, "/anthropic" + tail, b"{}")

    assert status == 200, out
    assert provider.targets == [seen]
    assert provider.api_keys == [UPSTREAM_KEY]


# The query goes upstream parsed and encoded again: the provider gets the client's parameters,
# no more (an encoded "&" stays inside its value), and no raw control bytes.
QUERIES = [
    ("limit=2", [("limit", "2")]),
    ("limit=2&after_id=x%26limit%3D1000", [("limit", "2"), ("after_id", "x&limit=1000")]),
    ("before_id=%2e%2e%2f%2e%2e%2fv1", [("before_id", "../../v1")]),
    ("a=%0d%0aX-Injected:%201", [("a", "\r\nX-Injected: 1")]),
    ("a=1;b=2", [("a", "1;b=2")]),
    ("flag", [("flag", "")]),
]


@pytest.mark.parametrize(("query", "pairs"), QUERIES)
async def test_query_is_reencoded(
    gw: Gateway, provider: RawProvider, query: str, pairs: list[tuple[str, str]]
) -> None:
    status, out = await raw_request(gw.daemon.port, "GET", f"/anthropic/v1/models?{query}")

    assert status == 200, out
    [target] = provider.targets
    path, _, sent = target.partition("?")
    assert path == "GET /v1/models"
    assert parse_qsl(sent, keep_blank_values=True) == pairs
    assert sent.isprintable()


async def test_unreachable_provider_is_502_without_its_address(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    gw = await make_gateway(providers=[anthropic_provider(f"http://127.0.0.1:{port}")])

    status, out = await raw_request(gw.daemon.port, "GET", "/anthropic/v1/models")

    assert status == 502, out
    error = json.loads(out)["error"]
    assert error == {
        "type": "api_error",
        "message": "upstream provider unreachable: connection failed",
    }
    assert b"127.0.0.1" not in out and str(port).encode() not in out
    logged = [r for r in caplog.records if r.name == "aibridged.passthrough"]
    assert [r.levelno for r in logged] == [logging.WARNING]
    assert str(port) in logged[0].getMessage()
    assert all(UPSTREAM_KEY not in r.getMessage() for r in caplog.records)


async def test_body_broken_after_headers_aborts_the_client(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sees a broken body at once, not a second answer it waits on forever."""
    gateway.upstream.enqueue(
        Reply(
            headers={"Content-Type": "application/json"},
            body=b'{"data": [\n\n{"id": "claude"}]}\n\n',
            sse=True,  # sent in two parts: the connection is cut after the first
            cut_after=1,
        )
    )

    async with (
        asyncio.timeout(10),  # the old behaviour: waiting until the client's own timeout
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.url}/v1/models", headers={"x-api-key": GATEWAY_KEY}) as resp,
    ):
        assert resp.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    assert received == b'{"data": [\n\n'

    logged = [r.getMessage() for r in caplog.records if r.name == "aibridged.passthrough"]
    assert len(logged) == 1
    assert logged[0].startswith("passthrough GET /v1/models: upstream_stream_broken: ")
    assert await gateway.records() == []
