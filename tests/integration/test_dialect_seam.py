"""The shell serves a registered dialect through its seam alone (``gateway.intercept.dialect``).

These tests register a second dialect, a twin of Messages (its parser and rewriters, so the
fixtures still apply) under another provider type with its own path, key scheme, error shapes,
keep-alive and terminal event: synthetic, for the shell's sake. What the shell does with it is
what the OpenAI dialects will get: their route and upstream path, their keys sent as
``Authorization: Bearer``, gateway-side errors in their shape, their passthrough allow-list on a
path Anthropic lists too.
"""

from __future__ import annotations

import dataclasses
import json

import aiohttp
import orjson
import pytest

from gateway.intercept.dialect import KeyScheme, ProviderApi
from gateway.intercept.dialects import route_table
from gateway.intercept.errors import anthropic_error_type
from gateway.intercept.messages.dialect import MESSAGES
from gateway.intercept.passthrough_paths import ID
from gateway.testing import FakeUpstream, Reply, load_txtar, split_events
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    anthropic_provider,
    by_kind,
)

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
TWIN_KEY = "sk-proj-twin-central-0123456789"
BYOK_KEY = "sk-twin-user-own-key-123456"
TWIN_PING = b": twin keep-alive\n\n"


def twin_error(status: int, message: str) -> bytes:
    """An error body in a shape unlike Anthropic's (OpenAI's, with a telling type)."""
    return orjson.dumps(
        {"error": {"message": message, "type": f"twin_{status}", "param": None, "code": None}}
    )


def twin_event(status: int, message: str) -> bytes:
    return b"data: " + twin_error(status, message) + b"\n\n"


TWIN_API = ProviderApi(
    type="openai",
    keys=KeyScheme(header="authorization", prefix="Bearer ", label="Authorization: Bearer"),
    error_body=twin_error,
    passthrough=(("GET", ("v1", "models")), ("GET", ("v1", "models", ID))),
)
TWIN = dataclasses.replace(
    MESSAGES,
    name="twin",
    provider=TWIN_API,
    path="/v1/chat/completions",
    error_event=twin_event,
    relayed_error_event=lambda body: b"data: " + body + b"\n\n",
    keepalive=TWIN_PING,
    terminal_event="twin_stop",
)
BODY = b'{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = BODY[:-1] + b',"stream":true}'


@pytest.fixture
async def twin(
    make_gateway: GatewayFactory, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> Gateway:
    """A gateway serving Messages and the twin, with one provider of each type."""
    monkeypatch.setattr("gateway.proxy.app.DIALECTS", route_table([MESSAGES, TWIN]))
    twin_provider = {"name": "twin", "type": "openai", "base_url": upstream.url}
    return await make_gateway(
        providers=[anthropic_provider(upstream.url), {**twin_provider, "api_key": TWIN_KEY}],
        ping_interval=0.15,
    )


async def call(
    gw: Gateway, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    sent = {"x-api-key": GATEWAY_KEY, "content-type": "application/json", **headers}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, gw.root + path, data=body, headers=sent) as resp,
    ):
        return resp.status, await resp.read()


def twin_shaped(out: bytes, status: int) -> None:
    obj = json.loads(out)
    assert obj == {
        "error": {
            "message": obj["error"]["message"],
            "type": f"twin_{status}",
            "param": None,
            "code": None,
        }
    }, out


def anthropic_shaped(out: bytes, status: int) -> None:
    obj = json.loads(out)
    error = {"type": anthropic_error_type(status), "message": obj["error"]["message"]}
    assert obj == {"type": "error", "error": error}, out


async def test_twin_route_calls_its_path_with_its_key_scheme(twin: Gateway) -> None:
    twin.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    twin.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))

    central = await call(twin, "POST", "/twin/v1/chat/completions", BODY)
    own = await call(
        twin, "POST", "/twin/v1/chat/completions", BODY, **{"x-aibridged-provider-key": BYOK_KEY}
    )

    assert central[0] == own[0] == 200
    first, second = twin.upstream.requests
    assert (first.method, first.path, first.body) == ("POST", "/v1/chat/completions", BODY)
    # Whatever the key's prefix, it goes as a bearer token; no x-api-key reaches the provider.
    assert first.headers.getall("authorization") == [f"Bearer {TWIN_KEY}"]
    assert second.headers.getall("authorization") == [f"Bearer {BYOK_KEY}"]
    assert "x-api-key" not in first.headers and "x-api-key" not in second.headers
    started = by_kind(await twin.records(), "interception_started")
    assert [r["provider"] for r in started] == ["openai", "openai"]


# A gateway-side error on the twin's route, and the message it carries.
TWIN_ERRORS = [
    pytest.param("POST", "/twin/v1/chat/completions", {"x-api-key": ""}, 401, id="no-key"),
    pytest.param("GET", "/twin/v1/chat/completions", {}, 405, id="method"),
    pytest.param("POST", "/twin/v1/chat/completions", {}, 400, id="bad-body"),
    # An Anthropic provider on the twin's path: the route belongs to the twin's type.
    pytest.param("POST", "/anthropic/v1/chat/completions", {}, 404, id="other-type"),
    pytest.param("POST", "/twin/v1/models", {}, 405, id="passthrough-method"),
]


@pytest.mark.parametrize(("method", "path", "headers", "status"), TWIN_ERRORS)
async def test_gateway_errors_take_the_route_types_shape(
    twin: Gateway, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    got, out = await call(twin, method, path, b"[1]", **headers)

    assert got == status
    twin_shaped(out, status)
    assert twin.upstream.requests == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/anthropic/v1/messages", 405),
        ("POST", "/twin/v1/messages", 404),
        ("POST", "/anthropic/v1/models", 405),
        ("GET", "/nope", 404),
    ],
)
async def test_anthropic_routes_keep_their_shape(
    twin: Gateway, method: str, path: str, status: int
) -> None:
    got, out = await call(twin, method, path, BODY)

    assert got == status
    anthropic_shaped(out, status)


async def test_a_path_both_types_list_relays_each_with_its_keys(twin: Gateway) -> None:
    listing = Reply(headers={"Content-Type": "application/json"}, body=b'{"data":[]}')
    twin.upstream.enqueue(listing, listing, listing)

    results = [
        await call(twin, "GET", "/twin/v1/models"),
        await call(twin, "GET", "/twin/v1/models/gpt-x"),
        await call(twin, "GET", "/anthropic/v1/models"),
    ]

    assert results == [(200, b'{"data":[]}')] * 3
    twin_models, twin_model, anthropic_models = twin.upstream.requests
    assert (twin_models.path, twin_model.path) == ("/v1/models", "/v1/models/gpt-x")
    assert twin_model.headers.getall("authorization") == [f"Bearer {TWIN_KEY}"]
    assert "x-api-key" not in twin_model.headers
    assert anthropic_models.headers.getall("x-api-key") == [UPSTREAM_KEY]
    assert "authorization" not in anthropic_models.headers
    # The Anthropic-only path is no route for the twin's provider type.
    got, out = await call(twin, "POST", "/twin/v1/messages/count_tokens", BODY)
    assert got == 404
    anthropic_shaped(out, 404)


async def test_twin_stream_gets_its_keepalive_and_its_incomplete_event(twin: Gateway) -> None:
    events = split_events(TEXT["streaming"].encode())
    # message_start, a long silence, then the body ends with no terminal event.
    twin.upstream.enqueue(
        Reply(
            headers={"Content-Type": "text/event-stream"},
            body=events[0] + events[1],
            sse=True,
            event_delay=0.6,
        )
    )

    got, out = await call(twin, "POST", "/twin/v1/chat/completions", STREAM_BODY)

    assert got == 200
    assert out.count(TWIN_PING) >= 2
    assert out.replace(TWIN_PING, b"").count(b"event: ping") == (events[0] + events[1]).count(
        b"event: ping"
    )
    message = "upstream stream ended before twin_stop: the response is incomplete"
    assert out.endswith(twin_event(502, message))
    assert b"event: error" not in out
    [ended] = by_kind(await twin.records(), "interception_ended")
    assert (ended["error_type"], ended["error_message"]) == (
        "incomplete_stream",
        "upstream stream ended before twin_stop",
    )
