"""The official anthropic SDK through the gateway gets what it gets from the provider directly.

Every scenario runs twice against the same fake upstream replaying the same (synthetic) fixture
bytes: once direct, once through the gateway. The SDK's final message must be identical but for its
id, and the spool must hold exactly the records the scenario implies (derived from the direct
message).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.testing import Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY, Gateway, by_kind, fixture_message
from tests.sdk import MODES, assert_records_match, final_message

SCENARIOS = ["text", "thinking", "client_tool", "parallel_tools", "cache_tokens", "long_stream"]


def fixture(scenario: str) -> tuple[dict[str, str], dict[str, Any]]:
    fx = load_txtar(FIXTURES / "anthropic" / f"{scenario}.txtar")
    body: dict[str, Any] = orjson.loads(fx["request"])
    return fx, body


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_sdk_final_message_equals_direct(gateway: Gateway, scenario: str, mode: str) -> None:
    fx, body = fixture(scenario)
    section = "non-streaming" if mode.endswith("blocking") else "streaming"
    reply = Reply.from_section(fx[section])
    gateway.upstream.enqueue(reply, reply)

    direct = await final_message(gateway.upstream.url, "sk-direct", mode, body)
    via_gateway = await final_message(gateway.url, GATEWAY_KEY, mode, body)

    assert via_gateway.model_dump(exclude={"id"}) == direct.model_dump(exclude={"id"})
    assert via_gateway.id != direct.id
    records = await gateway.records()
    assert_records_match(records, body, direct, via_gateway.id)
    [started] = by_kind(records, "interception_started")
    assert started["streaming"] is (section == "streaming")


async def test_stream_bytes_identical_but_for_message_id(gateway: Gateway) -> None:
    """Byte for byte: the client receives the upstream's bytes with only the id swapped."""
    fx, body = fixture("thinking")
    reply = Reply.from_section(fx["streaming"])
    gateway.upstream.enqueue(reply)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.url}/v1/messages",
            json=dict(body, stream=True),
            headers={"x-api-key": GATEWAY_KEY},
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        received = await r.read()
    [started] = by_kind(await gateway.records(), "interception_started")
    upstream_id = fixture_message(fx["streaming"]).id.encode()
    expected = reply.body.replace(upstream_id, started["interception_id"].encode())
    assert received == expected
    assert upstream_id not in received
