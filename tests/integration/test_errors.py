"""Every failure a client can meet through the gateway, over real HTTP.

Each case checks what a user of the gateway would see: the status, an Anthropic-shaped error body
with a message that says what went wrong (never a traceback), what reached the provider, and what
the spool recorded (failed interceptions are recorded as failed, rejected requests not at all).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    anthropic_provider,
    by_kind,
    fixture_message,
)
from tests.processes import free_port

ANTHROPIC = FIXTURES / "anthropic"
REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Say hi."}],
}


def body_of(**changes: Any) -> bytes:
    """The default request with fields replaced (a value of ``...`` removes the field)."""
    obj = {**REQUEST, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def client_headers(**extra: str) -> dict[str, str]:
    return {
        "x-api-key": GATEWAY_KEY,
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        **extra,
    }


async def send(
    url: str,
    data: bytes | AsyncIterator[bytes] | None = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """One request with a fresh session: ``(status, headers, body bytes)``."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, url, data=data, headers=client_headers() if headers is None else headers
        ) as resp,
    ):
        return resp.status, resp.headers, await resp.read()


def assert_error(
    status: int, body: bytes, expected_status: int, error_type: str, *needles: str
) -> str:
    """An Anthropic-shaped error with a message mentioning every needle; returns the message."""
    assert status == expected_status, body
    assert b"Traceback" not in body
    assert b'File "' not in body
    obj = json.loads(body)
    assert obj["type"] == "error", obj
    assert obj["error"]["type"] == error_type, obj
    message = obj["error"]["message"]
    assert isinstance(message, str)
    assert message.strip()
    for needle in needles:
        assert needle.lower() in message.lower(), message
    return message


def unreachable_providers() -> list[dict[str, Any]]:
    """The default provider at a loopback port nothing listens on."""
    return [anthropic_provider(f"http://127.0.0.1:{free_port()}")]


def stream_body() -> bytes:
    return body_of(stream=True)


def sse_events(body: bytes) -> list[tuple[str, bytes]]:
    """``(event name, data)`` of each SSE event in ``body``."""
    out: list[tuple[str, bytes]] = []
    for raw in split_events(body):
        name, data = "", b""
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        out.append((name, data))
    return out


def one_end(records: list[Any]) -> dict[str, Any]:
    ended = by_kind(records, "interception_ended")
    assert len(ended) == 1, ended
    return ended[0]


# -- malformed requests: 400, nothing sent upstream, nothing recorded ---------------------------

BAD_BODIES = [
    pytest.param(b"", ("empty",), id="empty-body"),
    pytest.param(b'{"model": "claude-sonnet-4-5", "messages": [', ("json",), id="invalid-json"),
    pytest.param(b'[{"model": "claude-sonnet-4-5"}]', ("object",), id="json-array"),
    pytest.param(body_of(model=...), ("model",), id="missing-model"),
    pytest.param(body_of(model=42), ("model", "string"), id="model-not-string"),
    pytest.param(body_of(messages=...), ("messages",), id="missing-messages"),
    pytest.param(body_of(messages={"role": "user"}), ("messages", "array"), id="messages-object"),
    pytest.param(body_of(stream="yes"), ("stream", "boolean"), id="stream-not-bool"),
    pytest.param(body_of(max_tokens="1024"), ("max_tokens",), id="max-tokens-string"),
]


@pytest.mark.parametrize(("body", "needles"), BAD_BODIES)
async def test_malformed_request_is_400_and_never_reaches_upstream(
    gateway: Gateway, body: bytes, needles: tuple[str, ...]
) -> None:
    status, headers, out = await send(f"{gateway.url}/v1/messages", body)

    assert_error(status, out, 400, "invalid_request_error", *needles)
    assert headers["Content-Type"].startswith("application/json")
    assert gateway.upstream.requests == []
    assert await gateway.records() == []


async def test_sdk_sees_bad_request_error(gateway: Gateway) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=1024,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"max_tokens": "lots"},
            )
    assert caught.value.status_code == 400
    assert caught.value.type == "invalid_request_error"
    assert caught.value.api_message is not None
    assert "max_tokens" in caught.value.api_message
    assert gateway.upstream.requests == []
    assert await gateway.records() == []


# -- body too large -------------------------------------------------------------------------------


def oversized() -> bytes:
    padding = "x" * 2048
    return body_of(messages=[{"role": "user", "content": padding}])


async def test_body_over_limit_is_413(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_body_bytes=1024)
    body = oversized()
    assert len(body) > 2048

    status, _, out = await send(f"{gw.url}/v1/messages", body)

    assert_error(status, out, 413, "request_too_large", "1024")
    assert gw.upstream.requests == []
    assert await gw.records() == []


async def test_chunked_body_over_limit_is_413(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_body_bytes=1024)
    body = oversized()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    status, _, out = await send(f"{gw.url}/v1/messages", chunks())

    assert_error(status, out, 413, "request_too_large")
    assert gw.upstream.requests == []
    assert await gw.records() == []


async def test_body_at_limit_is_accepted(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_body_bytes=1024)
    fx = load_txtar(ANTHROPIC / "text.txtar")
    gw.upstream.enqueue(Reply.from_section(fx["non-streaming"]))
    body = body_of()
    body += b" " * (1024 - len(body))

    status, _, _ = await send(f"{gw.url}/v1/messages", body)

    assert status == 200
    assert gw.upstream.requests[-1].body == body


# -- routes and methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/nope", "/anthropic/v1/complete", "/unknown-provider/v1/messages"]
)
async def test_unknown_route_is_404_in_anthropic_shape(gateway: Gateway, path: str) -> None:
    status, headers, out = await send(gateway.root + path, body_of())

    assert_error(status, out, 404, "not_found_error", path)
    assert headers["Content-Type"].startswith("application/json")
    assert gateway.upstream.requests == []
    assert await gateway.records() == []


async def test_get_on_messages_is_405(gateway: Gateway) -> None:
    status, headers, out = await send(f"{gateway.url}/v1/messages", method="GET")

    assert_error(status, out, 405, "invalid_request_error", "GET")
    assert headers["Content-Type"].startswith("application/json")
    assert gateway.upstream.requests == []
    assert await gateway.records() == []


async def raw_request(
    gateway: Gateway, method: str, target: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request sent byte for byte (targets no client library would send as they are)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.daemon.port)
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        f"x-api-key: {GATEWAY_KEY}\r\ncontent-type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head_bytes, _, out = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, out


def assert_shaped(
    status: int, headers: dict[str, str], body: bytes, method: str, expected: int, message: str
) -> None:
    """An Anthropic-shaped error with exactly ``message`` (HEAD answers carry no body)."""
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    if method == "HEAD":
        assert body == b""
        assert int(headers["content-length"]) > 0
        return
    obj = json.loads(body)
    assert obj == {"type": "error", "error": {"type": obj["error"]["type"], "message": message}}
    assert int(headers["content-length"]) == len(body)


# Each known path and the methods it does not serve: an Anthropic 405, never a 404.
WRONG_METHODS = [
    pytest.param(method, path, id=f"{method}-{path}")
    for path, methods in [
        ("/healthz", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        ("/readyz", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        ("/anthropic/v1/messages", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]),
        # Passthrough routes are GET only: HEAD is not relayed.
        ("/anthropic/v1/models", ["HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        ("/anthropic/v1/models/claude-sonnet-4-5", ["POST", "PUT", "DELETE", "OPTIONS"]),
        ("/anthropic/v1/models/a/b", ["POST", "PATCH"]),
        ("/anthropic/v1/messages/count_tokens", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]),
        ("/unknown-provider/v1/models", ["POST"]),
        ("/unknown-provider/v1/messages/count_tokens", ["GET"]),
    ]
    for method in methods
]


@pytest.mark.parametrize(("method", "path"), WRONG_METHODS)
async def test_wrong_method_on_a_known_path_is_405(
    gateway: Gateway, method: str, path: str
) -> None:
    status, headers, out = await raw_request(gateway, method, path)

    assert_shaped(status, headers, out, method, 405, f"method {method} not allowed on {path}")
    assert gateway.upstream.requests == []


# Targets no route serves, with what ``request.path`` makes of them.
UNKNOWN_TARGETS = [
    ("/", "/"),
    ("//", "//"),
    ("/healthz/", "/healthz/"),
    ("/HEALTHZ", "/HEALTHZ"),
    ("/readyz/x", "/readyz/x"),
    ("/anthropic/v1/messages/", "/anthropic/v1/messages/"),
    ("/anthropic//v1/messages", "/anthropic//v1/messages"),
    ("/anthropic/v1/models/", "/anthropic/v1/models/"),
    ("/anthropic/v1/messages/count_tokens/", "/anthropic/v1/messages/count_tokens/"),
    ("/anthropic%2Fv1/messages", "/anthropic/v1/messages"),
    ("/anthropic/v1%2Fmessages", "/anthropic/v1/messages"),
    ("/a%0Ab", "/a\nb"),
    ("/healthz%0A", "/healthz\n"),
    ("/anthropic%0A/v1/messages", "/anthropic\n/v1/messages"),
    ("/caf%C3%A9", "/caf\u00e9"),
    ("/anthropic/v1/complete?x=1", "/anthropic/v1/complete"),
    ("http://example.com/nope", "/nope"),
]


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "OPTIONS", "DELETE"])
@pytest.mark.parametrize(("target", "path"), UNKNOWN_TARGETS)
async def test_unknown_target_is_404_in_anthropic_shape(
    gateway: Gateway, method: str, target: str, path: str
) -> None:
    status, headers, out = await raw_request(gateway, method, target)

    assert_shaped(status, headers, out, method, 404, f"route not supported: {method} {path}")
    assert gateway.upstream.requests == []


async def test_options_asterisk_is_404_in_anthropic_shape(gateway: Gateway) -> None:
    status, headers, out = await raw_request(gateway, "OPTIONS", "*")

    assert_shaped(status, headers, out, "OPTIONS", 404, "route not supported: OPTIONS *")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/healthz?probe=1"])
async def test_health_answers_get_and_head(gateway: Gateway, method: str, path: str) -> None:
    status, headers, out = await raw_request(gateway, method, path)

    assert status == 200
    assert headers["content-type"].startswith("application/json")
    if method == "HEAD":
        assert out == b""
    else:
        assert json.loads(out)["status"] in ("ok", "ready")


async def test_count_tokens_body_over_limit_is_413(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_body_bytes=1024)

    status, headers, out = await send(f"{gw.url}/v1/messages/count_tokens", oversized())

    assert_error(status, out, 413, "request_too_large", "1024")
    assert headers["Content-Type"] == "application/json"
    assert gw.upstream.requests == []


# -- a handler failing ----------------------------------------------------------------------------

FAILURES = [
    pytest.param(RuntimeError("boom"), 500, "internal gateway error", id="unexpected"),
    pytest.param(KeyError("x"), 500, "internal gateway error", id="key-error"),
    pytest.param(TimeoutError(), 500, "internal gateway error", id="timeout"),
    pytest.param(web.HTTPBadRequest(), 400, "Bad Request", id="http-400"),
    pytest.param(web.HTTPGone(reason="Really Gone"), 410, "Really Gone", id="http-410"),
    pytest.param(web.HTTPNotFound(), 404, "route not supported: {method} {path}", id="http-404"),
    pytest.param(
        web.HTTPMethodNotAllowed("POST", ["GET"]),
        405,
        "method {method} not allowed on {path}",
        id="http-405",
    ),
]

# Where to make each route's handler fail: (method, path, module, function).
FAILING_ROUTES = [
    pytest.param("POST", "/anthropic/v1/messages", "handlers", "authenticate", id="messages"),
    pytest.param(
        "POST", "/anthropic/v1/messages/count_tokens", "passthrough", "authenticate", id="tokens"
    ),
    pytest.param("GET", "/anthropic/v1/models", "passthrough", "authenticate", id="models"),
    pytest.param("GET", "/anthropic/v1/models/m", "passthrough", "authenticate", id="model"),
]


@pytest.mark.parametrize(("method", "path", "module", "function"), FAILING_ROUTES)
@pytest.mark.parametrize(("exc", "expected", "message"), FAILURES)
async def test_handler_failure_is_provider_shaped(
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    module: str,
    function: str,
    exc: Exception,
    expected: int,
    message: str,
) -> None:
    def fail(*_: object) -> None:
        raise exc

    monkeypatch.setattr(f"gateway.proxy.{module}.{function}", fail)

    status, headers, out = await raw_request(gateway, method, path, body_of())

    assert_shaped(status, headers, out, method, expected, message.format(method=method, path=path))
    assert b"Traceback" not in out
    logged = [r for r in caplog.records if r.getMessage() == f"unhandled error on {method} {path}"]
    assert len(logged) == (expected == 500)
    assert all(r.name == "aibridged.app" and r.exc_info for r in logged)
    assert gateway.upstream.requests == []


async def test_readyz_failure_is_provider_shaped(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.daemon.readiness, "state", None)

    status, headers, out = await raw_request(gateway, "GET", "/readyz")

    assert_shaped(status, headers, out, "GET", 500, "internal gateway error")


async def test_redirect_raised_by_a_handler_is_not_reshaped(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: object) -> None:
        raise web.HTTPFound("/elsewhere")

    monkeypatch.setattr("gateway.proxy.handlers.authenticate", fail)

    status, headers, _ = await raw_request(gateway, "POST", "/anthropic/v1/messages", body_of())

    assert status == 302
    assert headers["location"] == "/elsewhere"


# -- upstream unreachable -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
async def test_unreachable_upstream_is_502(make_gateway: GatewayFactory, stream: bool) -> None:
    gw = await make_gateway(providers=unreachable_providers())

    status, headers, out = await send(f"{gw.url}/v1/messages", body_of(stream=stream))

    assert_error(status, out, 502, "api_error", "upstream")
    assert headers["Content-Type"].startswith("application/json")
    records = await gw.records()
    started = by_kind(records, "interception_started")
    assert len(started) == 1
    assert started[0]["streaming"] is stream
    end = one_end(records)
    assert end["status"] == "failed"
    assert end["interception_id"] == started[0]["interception_id"]
    assert end["error_type"]


async def test_sdk_sees_internal_server_error_when_upstream_unreachable(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(providers=unreachable_providers())
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client.messages.create(**REQUEST, stream=True)
    assert caught.value.status_code == 502
    assert caught.value.type == "api_error"
    assert "upstream" in (caught.value.api_message or "")


# -- upstream error before the stream -------------------------------------------------------------


@pytest.mark.parametrize("section", ["streaming", "non-streaming"])
async def test_pre_stream_error_is_relayed_with_headers(gateway: Gateway, section: str) -> None:
    reply = Reply.from_section(load_txtar(ANTHROPIC / "pre_stream_error.txtar")[section])
    gateway.upstream.enqueue(reply)

    status, headers, out = await send(
        f"{gateway.url}/v1/messages", body_of(stream=section == "streaming")
    )

    assert status == 429
    assert out == reply.body
    for name in ("retry-after", "request-id", "anthropic-ratelimit-requests-remaining"):
        assert headers[name] == reply.headers[name], name
    assert headers["Content-Type"].startswith("application/json")
    assert len(gateway.upstream.requests) == 1
    records = await gateway.records()
    assert len(by_kind(records, "interception_started")) == 1
    end = one_end(records)
    assert end["status"] == "failed"
    assert end["error_type"] == "rate_limit_error"
    assert end["upstream_status"] == 429


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
async def test_sdk_sees_rate_limit_error(gateway: Gateway, stream: bool) -> None:
    section = "streaming" if stream else "non-streaming"
    reply = Reply.from_section(load_txtar(ANTHROPIC / "pre_stream_error.txtar")[section])
    gateway.upstream.enqueue(reply)

    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(**REQUEST, stream=stream)

    expected = json.loads(reply.body)
    assert caught.value.status_code == 429
    assert caught.value.type == "rate_limit_error"
    assert caught.value.api_message == expected["error"]["message"]
    assert caught.value.request_id == reply.headers["request-id"]
    assert len(gateway.upstream.requests) == 1


# -- upstream error inside the stream -------------------------------------------------------------


async def test_mid_stream_error_is_relayed_verbatim(gateway: Gateway) -> None:
    section = load_txtar(ANTHROPIC / "mid_stream_error.txtar")["streaming"]
    started_with = fixture_message(section)  # what arrived before the error event
    reply = Reply.from_section(section)
    gateway.upstream.enqueue(reply)

    status, headers, out = await send(f"{gateway.url}/v1/messages", stream_body())

    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    records = await gateway.records()
    started = by_kind(records, "interception_started")
    assert len(started) == 1
    interception_id = started[0]["interception_id"]
    expected = reply.body.replace(
        json.dumps(started_with.id).encode(), json.dumps(interception_id).encode()
    )
    assert expected != reply.body
    assert out == expected
    error_frame = split_events(reply.body)[-1]
    assert error_frame.startswith(b"event: error\n")
    assert error_frame in out
    assert out.endswith(error_frame)

    end = one_end(records)
    assert end["status"] == "failed"
    assert end["error_type"] == "overloaded_error"
    usage = by_kind(records, "token_usage")
    assert len(usage) == 1
    assert usage[0]["input"] == started_with.usage.input_tokens
    assert usage[0]["msg_id"] == started_with.id


async def test_sdk_sees_mid_stream_error(gateway: Gateway) -> None:
    reply = Reply.from_section(load_txtar(ANTHROPIC / "mid_stream_error.txtar")["streaming"])
    gateway.upstream.enqueue(reply)
    seen: list[str] = []

    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        events = await client.messages.create(**REQUEST, stream=True)
        with pytest.raises(anthropic.APIStatusError) as caught:
            async for event in events:
                seen.append(event.type)

    scripted = sse_events(reply.body)
    [error] = [json.loads(data)["error"] for name, data in scripted if name == "error"]
    assert (caught.value.type, caught.value.api_message) == (error["type"], error["message"])
    assert seen[0] == "message_start"
    deltas = [name for name, _ in scripted].count("content_block_delta")
    assert deltas and seen.count("content_block_delta") == deltas


async def test_upstream_cut_mid_stream_ends_with_error_event(gateway: Gateway) -> None:
    text = load_txtar(ANTHROPIC / "text.txtar")["streaming"]
    reply = Reply.from_section(text)
    reply.cut_after = 3
    gateway.upstream.enqueue(reply)

    status, _, out = await send(f"{gateway.url}/v1/messages", stream_body())

    assert status == 200
    # The response headers went out before the upstream broke: the client got every event the
    # upstream sent before the cut, byte for byte (message id aside), then exactly one error.
    events = split_events(out)
    relayed = split_events(reply.body)[: reply.cut_after]
    assert len(events) == len(relayed) + 1
    assert events[1:-1] == relayed[1:]
    assert sse_events(events[0])[0][0] == "message_start"
    # The client is told the stream broke instead of seeing a silent truncation.
    name, data = sse_events(out)[-1]
    assert name == "error"
    error = json.loads(data)
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert "upstream" in error["error"]["message"]
    assert "127.0.0.1" not in error["error"]["message"]
    assert b"Traceback" not in out
    assert out.endswith(b"\n\n")
    assert b"message_stop" not in out
    end = one_end(await gateway.records())
    assert end["status"] == "failed"
    assert end["error_type"] == "upstream_stream_broken"


async def test_sdk_raises_when_the_upstream_breaks_mid_stream(gateway: Gateway) -> None:
    reply = Reply.from_section(load_txtar(ANTHROPIC / "text.txtar")["streaming"])
    reply.cut_after = 5
    gateway.upstream.enqueue(reply)
    seen: list[str] = []

    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(**REQUEST) as stream:
                async for event in stream:
                    seen.append(event.type)

    assert caught.value.type == "api_error"
    assert seen[:2] == ["message_start", "content_block_start"]
    assert "text" in seen  # the deltas before the cut reached the client
    end = one_end(await gateway.records())
    assert (end["status"], end["error_type"]) == ("failed", "upstream_stream_broken")
