"""A blocking request whose upstream answers 200 with something that is not a message.

The client gets a 502 ``api_error`` in Anthropic's shape (never the provider's junk as a 200),
the official SDK raises, and the interception is recorded failed.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from gateway.testing import Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY, Gateway, by_kind

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
REQUEST: dict[str, Any] = orjson.loads(TEXT["request"])
JSON = {"Content-Type": "application/json"}

NOT_A_MESSAGE = [
    pytest.param(
        {"Content-Type": "text/html"},
        b"<html><body>upstream proxy says hello</body></html>",
        id="html",
    ),
    pytest.param(JSON, b'{"id": "msg_01", "type": "message", "content": [', id="invalid-json"),
    pytest.param(JSON, b"", id="empty"),
    pytest.param(JSON, b"[]", id="json-array"),
    pytest.param(JSON, b'{"foo": 1}', id="object-without-id"),
    pytest.param(JSON, b"null", id="json-null"),
]


async def post(gw: Gateway, body: dict[str, Any]) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gw.url}/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}) as resp,
    ):
        return resp.status, resp.headers["Content-Type"], await resp.read()


async def assert_recorded_failed(gw: Gateway) -> None:
    records = await gw.records()
    assert len(by_kind(records, "interception_started")) == 1
    ended = by_kind(records, "interception_ended")
    assert len(ended) == 1, ended
    assert ended[0]["status"] == "failed"
    assert ended[0]["error_type"] == "invalid_upstream_response"
    assert ended[0]["upstream_status"] == 200


@pytest.mark.parametrize(("headers", "junk"), NOT_A_MESSAGE)
async def test_non_message_200_is_a_502_api_error(
    gateway: Gateway, headers: dict[str, str], junk: bytes
) -> None:
    gateway.upstream.enqueue(Reply(status=200, headers=headers, body=junk))

    status, content_type, out = await post(gateway, REQUEST)

    assert status == 502, out
    assert content_type.startswith("application/json")
    error = orjson.loads(out)
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert "not a message" in error["error"]["message"]
    if junk.strip():
        assert junk not in out
    await assert_recorded_failed(gateway)


async def test_sdk_raises_on_a_non_message_200(gateway: Gateway) -> None:
    gateway.upstream.enqueue(
        Reply(status=200, headers={"Content-Type": "text/html"}, body=b"<html>hello</html>")
    )

    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(**REQUEST)

    assert caught.value.status_code == 502
    assert caught.value.type == "api_error"
    await assert_recorded_failed(gateway)


async def test_streaming_request_answered_with_junk_json_is_a_502(gateway: Gateway) -> None:
    """A streamed request whose upstream answers JSON, not SSE, takes the blocking path."""
    gateway.upstream.enqueue(Reply(status=200, headers=JSON, body=b'{"foo": 1}'))

    status, _, out = await post(gateway, dict(REQUEST, stream=True))

    assert status == 502, out
    assert orjson.loads(out)["error"]["type"] == "api_error"
    await assert_recorded_failed(gateway)


async def test_a_message_is_still_relayed_as_200(gateway: Gateway) -> None:
    """The control case: a real message body passes, with the interception's id."""
    gateway.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))

    status, _, out = await post(gateway, REQUEST)

    assert status == 200
    assert orjson.loads(out)["content"] == orjson.loads(TEXT["non-streaming"])["content"]
    ended = by_kind(await gateway.records(), "interception_ended")
    assert [e["status"] for e in ended] == ["completed"]
