"""What crosses the gateway in each direction: headers, credentials, body bytes, identities.

The provider must see the client's request minus hop-by-hop headers, cookies and every client
credential, with exactly one provider credential added; the client must see the provider's
answer with only the allow-listed headers. Authentication failures never reach the provider.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp
import anthropic
import pytest
from multidict import CIMultiDictProxy

from gateway.testing import FakeUpstream, ReceivedRequest, Reply, load_txtar
from tests.conftest import (
    ALICE,
    FIXTURES,
    GATEWAY_KEY,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    anthropic_provider,
    by_kind,
)

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
BYOK_KEY = "sk-ant-user-own-key-123456"
PERSONAL_KEY = "sk-ant-personal-abcdefghijkl"
OAUTH_TOKEN = "sk-ant-oat01-xyzabcdefghijklmnopqrstuvwxyz0123456789"

# Hand-written: odd whitespace, key order and an unknown field must all reach the provider as-is.
RAW_BODY = (
    b'{ "model" :"claude-sonnet-4-5",\n\t"max_tokens":  1024 ,'
    b'  "future_field": {"a": [1, 2]},\r\n "messages": [ {"role":"user", "content":"hi"} ]  }'
)
RAW_STREAM_BODY = (
    b'{"stream" : true ,  "model":"claude-sonnet-4-5",  "future_field": {"a": [1, 2]},\n'
    b'  "messages":[{"role":"user","content":[ {"type":"text","text":"hi"} ]}],"max_tokens":1024}'
)

CLIENT_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "tools-2024-05-16",
    "x-custom-thing": "1",
    "Cookie": "session=abc",
    "Connection": "keep-alive, x-hop",
    "x-hop": "1",
    "User-Agent": "claude-cli/2.0.67 (external, cli)",
    "X-Claude-Code-Session-Id": "sess-123",
}


def reply_for(stream: bool) -> Reply:
    return Reply.from_section(TEXT["streaming" if stream else "non-streaming"])


def headers(**extra: str) -> dict[str, str]:
    base = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    return {**base, **extra}


def keyed(**extra: str) -> dict[str, str]:
    return headers(**{"x-api-key": GATEWAY_KEY, **extra})


def simple_body(stream: bool = False) -> bytes:
    obj: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        obj["stream"] = True
    return json.dumps(obj).encode()


async def send(
    url: str,
    data: bytes | None = None,
    *,
    hdrs: dict[str, str],
    method: str = "POST",
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """One request with a fresh session: ``(status, headers, body bytes)``."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=hdrs) as resp,
    ):
        return resp.status, resp.headers, await resp.read()


def last_request(gw: Gateway) -> ReceivedRequest:
    assert gw.upstream.requests, "the upstream received no request"
    return gw.upstream.requests[-1]


def assert_error(status: int, body: bytes, expected_status: int, error_type: str) -> str:
    assert status == expected_status, body
    assert b"Traceback" not in body
    obj = json.loads(body)
    assert obj["type"] == "error"
    assert obj["error"]["type"] == error_type
    message: str = obj["error"]["message"]
    assert message.strip()
    return message


def started_of(records: list[Any]) -> dict[str, Any]:
    started = by_kind(records, "interception_started")
    assert len(started) == 1, started
    return started[0]


def secrets_absent(records: list[Any], *secrets: str) -> None:
    assert records, "no records to check"
    for record in records:
        dumped = json.dumps(record.payload)
        for secret in secrets:
            assert secret not in dumped, (record.kind, dumped)


def personal_providers(base_url: str) -> list[dict[str, Any]]:
    """The default provider without a central key."""
    return [{"name": "anthropic", "type": "anthropic", "base_url": base_url}]


# -- what the provider receives -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "body"), [(False, RAW_BODY), (True, RAW_STREAM_BODY)], ids=["blocking", "streaming"]
)
async def test_upstream_request_headers_and_body(
    gateway: Gateway, stream: bool, body: bytes
) -> None:
    gateway.upstream.enqueue(reply_for(stream))
    sent = {"x-api-key": GATEWAY_KEY, "content-type": "application/json", **CLIENT_HEADERS}

    status, _, out = await send(f"{gateway.url}/v1/messages", body, hdrs=sent)

    assert status == 200, out
    got = last_request(gateway)
    assert got.method == "POST"
    assert got.path == "/v1/messages"
    assert got.body == body
    h = got.headers
    assert h.getall("anthropic-version") == ["2023-06-01"]
    assert h.getall("anthropic-beta") == ["tools-2024-05-16"]
    assert h.getall("x-custom-thing") == ["1"]
    assert h.get("User-Agent") == "claude-cli/2.0.67 (external, cli)"
    assert "Cookie" not in h
    assert "x-hop" not in h
    assert "Authorization" not in h
    assert h.getall("x-api-key") == [UPSTREAM_KEY]
    assert all(GATEWAY_KEY not in value for value in h.values())

    records = await gateway.records()
    started = started_of(records)
    assert started["client"] == "Claude Code"
    assert started["client_session_id"] == "sess-123"
    assert started["actor_id"] == "u-1"
    assert started["username"] == "alice"
    assert started["actor_metadata"] == {"team": "core"}
    assert started["credential_kind"] == "centralized"
    assert started["credential_hint"] == "sk-a...mnop"
    assert started["streaming"] is stream
    assert started["user_agent"] == "claude-cli/2.0.67 (external, cli)"
    secrets_absent(records, UPSTREAM_KEY, GATEWAY_KEY)


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
async def test_no_made_up_user_agent_or_content_type(gateway: Gateway, stream: bool) -> None:
    """Headers the client did not send are not filled in by the gateway's HTTP client."""
    gateway.upstream.enqueue(reply_for(stream))
    async with (
        aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Content-Type")) as session,
        session.post(
            f"{gateway.url}/v1/messages", data=simple_body(stream), headers=keyed()
        ) as resp,
    ):
        assert resp.status == 200, await resp.read()
        await resp.read()
    h = last_request(gateway).headers
    assert "User-Agent" not in h
    assert h.getall("Content-Type") == ["application/json"]

    gateway.upstream.enqueue(reply_for(stream))
    hdrs = {"anthropic-version": "2023-06-01", "x-api-key": GATEWAY_KEY}
    async with (
        aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Content-Type")) as session,
        session.post(f"{gateway.url}/v1/messages", data=simple_body(stream), headers=hdrs) as resp,
    ):
        assert resp.status == 200, await resp.read()
        await resp.read()
    h = last_request(gateway).headers
    assert "User-Agent" not in h
    assert "Content-Type" not in h


async def test_gateway_key_as_bearer(gateway: Gateway) -> None:
    gateway.upstream.enqueue(reply_for(False))
    hdrs = headers(Authorization=f"Bearer {GATEWAY_KEY}")

    status, _, out = await send(f"{gateway.url}/v1/messages", simple_body(), hdrs=hdrs)

    assert status == 200, out
    h = last_request(gateway).headers
    assert "Authorization" not in h
    assert h.getall("x-api-key") == [UPSTREAM_KEY]
    assert all(GATEWAY_KEY not in value for value in h.values())
    assert started_of(await gateway.records())["actor_id"] == "u-1"


async def test_sdk_with_auth_token_uses_bearer(gateway: Gateway) -> None:
    gateway.upstream.enqueue(reply_for(False))
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, auth_token=GATEWAY_KEY, max_retries=0
    ) as client:
        message = await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=1024, messages=[{"role": "user", "content": "hi"}]
        )
    assert message.content[0].type == "text"
    h = last_request(gateway).headers
    assert "Authorization" not in h
    assert h.getall("x-api-key") == [UPSTREAM_KEY]


@pytest.mark.parametrize(
    "hdrs",
    [
        pytest.param(headers(**{"x-api-key": "gw-not-a-real-key-000000"}), id="unknown-key"),
        pytest.param(headers(Authorization="Bearer gw-not-a-real-key-000000"), id="unknown-bearer"),
        pytest.param(headers(), id="missing-key"),
        pytest.param(headers(Authorization=f"Basic {GATEWAY_KEY}"), id="not-bearer"),
    ],
)
async def test_bad_gateway_key_is_401(gateway: Gateway, hdrs: dict[str, str]) -> None:
    status, _, out = await send(f"{gateway.url}/v1/messages", simple_body(), hdrs=hdrs)

    message = assert_error(status, out, 401, "authentication_error")
    assert "key" in message.lower()
    assert gateway.upstream.requests == []
    assert await gateway.records() == []


async def test_sdk_sees_authentication_error(gateway: Gateway) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key="gw-not-a-real-key-000000", max_retries=0
    ) as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=1024,
                messages=[{"role": "user", "content": "hi"}],
            )
    assert caught.value.status_code == 401
    assert caught.value.type == "authentication_error"
    assert "invalid gateway API key" in (caught.value.api_message or "")
    assert gateway.upstream.requests == []


async def test_expired_key_is_401(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_keys=[{**ALICE, "expires_at": 1.0}])

    status, _, out = await send(f"{gw.url}/v1/messages", simple_body(), hdrs=keyed())

    message = assert_error(status, out, 401, "authentication_error")
    assert "expired" in message
    assert gw.upstream.requests == []
    assert await gw.records() == []


async def test_key_given_as_sha256(make_gateway: GatewayFactory) -> None:
    secret = "gw-bob-hashed-key-9876543210"
    digest = hashlib.sha256(secret.encode()).hexdigest()
    gw = await make_gateway(
        api_keys=[{"key_sha256": digest.upper(), "actor_id": "u-2", "username": "bob"}]
    )
    gw.upstream.enqueue(reply_for(False))

    status, _, out = await send(
        f"{gw.url}/v1/messages", simple_body(), hdrs=headers(**{"x-api-key": secret})
    )

    assert status == 200, out
    assert last_request(gw).headers.getall("x-api-key") == [UPSTREAM_KEY]
    started = started_of(await gw.records())
    assert started["actor_id"] == "u-2"
    assert started["username"] == "bob"
    # The hash itself is not a key.
    status, _, out = await send(
        f"{gw.url}/v1/messages", simple_body(), hdrs=headers(**{"x-api-key": digest})
    )
    assert_error(status, out, 401, "authentication_error")


# -- bring your own key ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
async def test_byok_key_goes_upstream(gateway: Gateway, stream: bool) -> None:
    gateway.upstream.enqueue(reply_for(stream))
    hdrs = keyed(**{"x-aibridged-provider-key": BYOK_KEY})

    status, _, out = await send(f"{gateway.url}/v1/messages", simple_body(stream), hdrs=hdrs)

    assert status == 200, out
    h = last_request(gateway).headers
    assert h.getall("x-api-key") == [BYOK_KEY]
    assert "x-aibridged-provider-key" not in h
    assert all(GATEWAY_KEY not in value and UPSTREAM_KEY not in value for value in h.values())
    records = await gateway.records()
    started = started_of(records)
    assert started["credential_kind"] == "byok"
    assert started["actor_id"] == "u-1"
    secrets_absent(records, BYOK_KEY, GATEWAY_KEY, UPSTREAM_KEY)


async def test_byok_refused_when_disabled(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(allow_byok=False)
    hdrs = keyed(**{"x-aibridged-provider-key": BYOK_KEY})

    status, _, out = await send(f"{gw.url}/v1/messages", simple_body(), hdrs=hdrs)

    message = assert_error(status, out, 403, "permission_error")
    assert "x-aibridged-provider-key" in message
    assert BYOK_KEY not in message
    assert gw.upstream.requests == []
    assert await gw.records() == []


# -- personal mode (no gateway keys, no central key) ----------------------------------------------


async def test_personal_mode_forwards_client_key(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(api_keys=[], providers=personal_providers(upstream.url))
    gw.upstream.enqueue(reply_for(False), reply_for(True), reply_for(False))
    url = f"{gw.url}/v1/messages"

    for stream in (False, True):
        status, _, out = await send(
            url, simple_body(stream), hdrs=headers(**{"x-api-key": PERSONAL_KEY})
        )
        assert status == 200, out
        h = last_request(gw).headers
        assert h.getall("x-api-key") == [PERSONAL_KEY]
        assert "Authorization" not in h
    other = "sk-ant-personal-zyxwvutsrqpo"
    status, _, _ = await send(url, simple_body(), hdrs=headers(**{"x-api-key": other}))
    assert status == 200

    records = await gw.records()
    started = by_kind(records, "interception_started")
    assert len(started) == 3
    first, second, third = (s["actor_id"] for s in started)
    assert first.startswith("key-")
    assert first == second
    assert third.startswith("key-")
    assert third != first
    assert all(s["credential_kind"] == "byok" for s in started)
    secrets_absent(records, PERSONAL_KEY, other)


async def test_personal_mode_oauth_bearer(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(api_keys=[], providers=personal_providers(upstream.url))
    gw.upstream.enqueue(reply_for(True))

    status, _, out = await send(
        f"{gw.url}/v1/messages",
        simple_body(True),
        hdrs=headers(Authorization=f"Bearer {OAUTH_TOKEN}"),
    )

    assert status == 200, out
    h = last_request(gw).headers
    assert h.getall("Authorization") == [f"Bearer {OAUTH_TOKEN}"]
    assert "x-api-key" not in h
    records = await gw.records()
    assert started_of(records)["actor_id"].startswith("key-")
    secrets_absent(records, OAUTH_TOKEN)


async def test_personal_mode_without_key_is_401(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(api_keys=[], providers=personal_providers(upstream.url))

    status, _, out = await send(f"{gw.url}/v1/messages", simple_body(), hdrs=headers())

    assert_error(status, out, 401, "authentication_error")
    assert gw.upstream.requests == []
    assert await gw.records() == []


# -- actor headers --------------------------------------------------------------------------------


async def test_actor_headers_sent_when_enabled(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(providers=[anthropic_provider(upstream.url, send_actor_headers=True)])
    gw.upstream.enqueue(reply_for(False))
    hdrs = keyed(**{"X-AI-Bridge-Actor-Id": "spoofed", "X-AI-Bridge-Actor-Metadata-team": "evil"})

    status, _, out = await send(f"{gw.url}/v1/messages", simple_body(), hdrs=hdrs)

    assert status == 200, out
    h = last_request(gw).headers
    assert h.getall("X-AI-Bridge-Actor-Id") == ["u-1"]
    assert h.getall("X-AI-Bridge-Actor-Metadata-team") == ["core"]


async def test_actor_headers_off_by_default(gateway: Gateway) -> None:
    gateway.upstream.enqueue(reply_for(False))
    hdrs = keyed(**{"X-AI-Bridge-Actor-Id": "spoofed", "X-AI-Bridge-Actor-Metadata-x": "y"})

    status, _, out = await send(f"{gateway.url}/v1/messages", simple_body(), hdrs=hdrs)

    assert status == 200, out
    h = last_request(gateway).headers
    assert not [name for name in h if name.lower().startswith("x-ai-bridge-actor")]
    assert all("spoofed" not in value for value in h.values())


# -- what the client receives ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
async def test_response_headers_are_allow_listed(gateway: Gateway, stream: bool) -> None:
    reply = reply_for(stream)
    reply.headers.update(
        {
            "request-id": "req_1",
            "anthropic-ratelimit-tokens-remaining": "99",
            "set-cookie": "x=y",
            "x-internal": "1",
        }
    )
    gateway.upstream.enqueue(reply)

    status, h, out = await send(f"{gateway.url}/v1/messages", simple_body(stream), hdrs=keyed())

    assert status == 200, out
    assert h.getall("request-id") == ["req_1"]
    assert h.getall("anthropic-ratelimit-tokens-remaining") == ["99"]
    assert "set-cookie" not in h
    assert "x-internal" not in h
    expected_type = "text/event-stream" if stream else "application/json"
    assert h["Content-Type"].startswith(expected_type)


async def test_provider_cookies_are_not_replayed_to_other_requests(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    """A provider cookie set on one user's call must never ride along on the next call."""
    # A host name, not an IP: cookie jars refuse cookies from IP addresses.
    base_url = upstream.url.replace("127.0.0.1", "localhost")
    gw = await make_gateway(providers=[anthropic_provider(base_url)])
    first = reply_for(False)
    first.headers["Set-Cookie"] = "__cf_bm=alice-affinity; Path=/; HttpOnly"
    gw.upstream.enqueue(first, reply_for(True))

    for stream in (False, True):
        status, _, out = await send(f"{gw.url}/v1/messages", simple_body(stream), hdrs=keyed())
        assert status == 200, out

    assert len(gw.upstream.requests) == 2
    assert "Cookie" not in gw.upstream.requests[1].headers


# -- passthrough routes ---------------------------------------------------------------------------

MODELS = (
    b'{"data": [ {"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5"},'
    b' {"type":"model","id":"claude-haiku-4-5"} ],\n "has_more": true, "first_id": null}'
)


async def test_passthrough_models_list(gateway: Gateway) -> None:
    gateway.upstream.enqueue(
        Reply(
            status=200,
            headers={"Content-Type": "application/json", "request-id": "req_m", "x-internal": "1"},
            body=MODELS,
        )
    )

    status, h, out = await send(
        f"{gateway.url}/v1/models?limit=2", method="GET", hdrs=keyed(Cookie="a=b")
    )

    assert status == 200
    assert out == MODELS
    assert h["Content-Type"] == "application/json"
    assert h["request-id"] == "req_m"
    assert "x-internal" not in h
    got = last_request(gateway)
    assert got.method == "GET"
    assert got.path == "/v1/models"
    assert got.query == "limit=2"
    assert got.headers.getall("x-api-key") == [UPSTREAM_KEY]
    assert "Cookie" not in got.headers
    assert all(GATEWAY_KEY not in value for value in got.headers.values())
    assert await gateway.records() == []


async def test_passthrough_relays_upstream_status(gateway: Gateway) -> None:
    missing = b'{"type":"error","error":{"type":"not_found_error","message":"model: nope"}}'
    gateway.upstream.enqueue(
        Reply(status=404, headers={"Content-Type": "application/json"}, body=missing)
    )

    status, _, out = await send(f"{gateway.url}/v1/models/nope", method="GET", hdrs=keyed())

    assert status == 404
    assert out == missing
    assert last_request(gateway).path == "/v1/models/nope"
    assert await gateway.records() == []


async def test_passthrough_count_tokens(gateway: Gateway) -> None:
    answer = b'{"input_tokens": 12}'
    gateway.upstream.enqueue(
        Reply(status=200, headers={"Content-Type": "application/json"}, body=answer)
    )

    status, _, out = await send(
        f"{gateway.url}/v1/messages/count_tokens", RAW_BODY, hdrs=keyed(**CLIENT_HEADERS)
    )

    assert status == 200
    assert out == answer
    got = last_request(gateway)
    assert got.method == "POST"
    assert got.path == "/v1/messages/count_tokens"
    assert got.body == RAW_BODY
    assert got.headers.getall("x-api-key") == [UPSTREAM_KEY]
    assert got.headers.getall("anthropic-beta") == ["tools-2024-05-16"]
    assert "x-hop" not in got.headers
    assert "Cookie" not in got.headers
    assert await gateway.records() == []


async def test_sdk_count_tokens_and_models(gateway: Gateway) -> None:
    gateway.upstream.enqueue(
        Reply(status=200, headers={"Content-Type": "application/json"}, body=b'{"input_tokens":7}'),
        Reply(status=200, headers={"Content-Type": "application/json"}, body=MODELS),
    )
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        counted = await client.messages.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
        )
        page = await client.models.list(limit=2)
    assert counted.input_tokens == 7
    assert [m.id for m in page.data] == ["claude-sonnet-4-5", "claude-haiku-4-5"]
    assert [r.path for r in gateway.upstream.requests] == [
        "/v1/messages/count_tokens",
        "/v1/models",
    ]
    assert all(r.headers.getall("x-api-key") == [UPSTREAM_KEY] for r in gateway.upstream.requests)
    assert await gateway.records() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("GET", "/v1/models/x"), ("POST", "/v1/messages/count_tokens")],
)
async def test_passthrough_without_key_is_401(gateway: Gateway, method: str, path: str) -> None:
    status, _, out = await send(
        gateway.url + path,
        simple_body() if method == "POST" else None,
        method=method,
        hdrs=headers(),
    )

    assert_error(status, out, 401, "authentication_error")
    assert gateway.upstream.requests == []
    assert await gateway.records() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/v1/models/x"), ("POST", "/v1/models"), ("GET", "/v1/messages/count_tokens")],
)
async def test_passthrough_refuses_other_methods(gateway: Gateway, method: str, path: str) -> None:
    """The allow-list is per method: a central key may be an admin key."""
    status, _, out = await send(gateway.url + path, None, method=method, hdrs=keyed())

    assert_error(status, out, 405, "invalid_request_error")
    assert method in json.loads(out)["error"]["message"]
    assert gateway.upstream.requests == []


# -- provider base URL with a path ----------------------------------------------------------------


async def test_provider_base_url_with_path(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(providers=[anthropic_provider(upstream.url + "/api")])
    gw.upstream.enqueue(
        reply_for(False),
        Reply(status=200, headers={"Content-Type": "application/json"}, body=MODELS),
    )

    status, _, out = await send(f"{gw.url}/v1/messages?beta=true", simple_body(), hdrs=keyed())
    assert status == 200, out
    assert last_request(gw).path == "/api/v1/messages"
    assert last_request(gw).query == "beta=true"

    status, _, out = await send(f"{gw.url}/v1/models", method="GET", hdrs=keyed())
    assert status == 200
    assert out == MODELS
    assert last_request(gw).path == "/api/v1/models"
