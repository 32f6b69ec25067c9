"""OpenAI routes' edges no SDK call shows: a WebSocket attempt, provider-shaped refusals."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from gateway.testing import FakeUpstream
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
