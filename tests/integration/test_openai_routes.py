"""OpenAI routes' edges no SDK call shows: a WebSocket attempt, provider-shaped refusals."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.testing import FakeUpstream, Reply
from tests.conftest import GATEWAY_KEY, GatewayFactory


def openai_provider(base_url: str, **extra: Any) -> dict[str, Any]:
    """An ``openai`` provider named ``openai`` whose base URL holds the version, as OpenAI's."""
    return {"name": "openai", "type": "openai", "base_url": base_url + "/v1", **extra}


async def test_a_websocket_upgrade_gets_426_before_any_upstream_call(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(providers=[openai_provider(upstream.url, api_key="sk-central")])
    headers = {
        "Authorization": f"Bearer {GATEWAY_KEY}",
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.root}/openai/v1/responses", headers=headers) as resp,
    ):
        assert resp.status == 426
        body = orjson.loads(await resp.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "HTTP" in body["error"]["message"]
    assert upstream.requests == []
    # A plain GET (no upgrade) is still a 405.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.root}/openai/v1/responses", headers={"Authorization": "Bearer x"}) as resp,
    ):
        assert resp.status == 405


async def test_refusals_on_openai_routes_are_in_openai_shape(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(providers=[openai_provider(upstream.url, api_key="sk-central")])
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gw.root}/openai/v1/chat/completions",
            headers={"Authorization": "Bearer wrong-key"},
            data=b'{"model":"m","messages":[]}',
        ) as resp:
            assert resp.status == 401
            error = orjson.loads(await resp.read())["error"]
        async with http.post(
            f"{gw.root}/openai/v1/responses",
            headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
            data=b"not json",
        ) as resp:
            assert resp.status == 400
            bad = orjson.loads(await resp.read())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert bad["type"] == "invalid_request_error" and bad["message"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/openai/v1/files"),  # not allow-listed: never reaches the provider
        ("POST", "/openai/v1/embeddings"),
    ],
)
async def test_unknown_routes_under_an_openai_provider_answer_in_openai_shape(
    make_gateway: GatewayFactory, upstream: FakeUpstream, method: str, path: str
) -> None:
    gw = await make_gateway(
        providers=[
            openai_provider(upstream.url, api_key="sk-central"),
            {"name": "anthropic", "type": "anthropic", "base_url": upstream.url},
        ]
    )
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{gw.root}{path}") as resp:
            assert resp.status == 404
            body = orjson.loads(await resp.read())
        # Elsewhere, Anthropic's shape as before.
        async with http.get(f"{gw.root}/anthropic/v1/files") as resp:
            assert resp.status == 404
            other = orjson.loads(await resp.read())
        async with http.request("OPTIONS", f"{gw.root}/nowhere") as resp:
            assert resp.status == 404
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "not_found"
    assert other["type"] == "error" and other["error"]["type"] == "not_found_error"
    assert upstream.requests == []


# A stream's answer is text/event-stream: only an error answers a streaming request with JSON.
@pytest.mark.parametrize(("status", "stream"), [(200, False), (429, False), (429, True)])
async def test_the_content_type_of_a_blocking_answer_is_relayed_as_sent(
    make_gateway: GatewayFactory, upstream: FakeUpstream, status: int, stream: bool
) -> None:
    # Synthetic: a provider that names its charset; the client gets the header as it was.
    content_type = "application/json; charset=utf-8"
    body = (
        b'{"error":{"message":"slow down","type":"requests","param":null,"code":null}}'
        if status == 429
        else b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
        b'"total_tokens":2}}'
    )
    upstream.enqueue(Reply(status=status, headers={"Content-Type": content_type}, body=body))
    gw = await make_gateway(providers=[openai_provider(upstream.url, api_key="sk-central")])
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.root}/openai/v1/chat/completions",
            headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        ) as resp,
    ):
        assert resp.status == status
        assert resp.headers["Content-Type"] == content_type
