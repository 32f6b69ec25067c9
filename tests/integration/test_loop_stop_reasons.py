"""The agentic loop goes on only when the model's turn stopped on ``tool_use``.

A turn cut off by ``max_tokens`` in the middle of an injected tool call must not run that call
(its arguments are half written): the turn is the final one, the client sees the real stop
reason and no trace of the injected block, and the provider gets no continuation request.
Checked end to end with a real MCP server, the fake upstream and the official SDK.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import FIXTURES, GATEWAY_KEY, Gateway, GatewayFactory, by_kind
from tests.mcp_server import McpTestServer, running_mcp_server

CUT = load_txtar(FIXTURES / "anthropic" / "synthetic_loop_max_tokens.txtar")
# What the provider would answer if the gateway wrongly continued the loop.
TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
STREAMING = pytest.mark.parametrize("streaming", [True, False], ids=["stream", "blocking"])


class RecordingServer(McpTestServer):
    """The test MCP server, remembering every ``tools/call`` it served."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        super().__init__()

    async def _paginate(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.method == "tools/call":
            params = ctx.params or {}
            self.calls.append((str(params.get("name")), dict(params.get("arguments") or {})))
        return await super()._paginate(ctx, call_next)


def request(streaming: bool) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(CUT["request"])
    return dict(body, stream=streaming)


def script(gw: Gateway, streaming: bool) -> None:
    key = "streaming" if streaming else "non-streaming"
    gw.upstream.enqueue(Reply.from_section(CUT[key]), Reply.from_section(TEXT[key]))


async def post(gw: Gateway, body: dict[str, Any]) -> bytes:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gw.url}/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}) as resp,
    ):
        assert resp.status == 200
        return await resp.read()


async def assert_one_turn_recorded(gw: Gateway, server: RecordingServer, streaming: bool) -> None:
    assert server.calls == []  # the half-written call never reached the MCP server
    assert len(gw.upstream.requests) == 1  # no continuation
    records = await gw.records()
    ended = by_kind(records, "interception_ended")
    assert [e["status"] for e in ended] == ["completed"]
    usage = by_kind(records, "token_usage")
    assert [(u["input"], u["output"]) for u in usage] == [(612 if streaming else 608, 40)]
    # The call the model started is on record, marked as not run, with the reason.
    (tool,) = by_kind(records, "tool_usage")
    assert tool["tool"] == "add"
    assert tool["injected"] is True
    assert "max_tokens" in tool["invocation_error"]


@STREAMING
async def test_sdk_gets_max_tokens_and_the_injected_call_is_not_run(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}])
        script(gw, streaming)
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
        ) as client:
            body = request(streaming)
            del body["stream"]
            if streaming:
                async with client.messages.stream(**body) as stream:
                    message = await stream.get_final_message()
            else:
                message = await client.messages.create(**body)

        assert message.stop_reason == "max_tokens"
        assert [b.type for b in message.content] == ["text"]
        assert message.content[0].type == "text"
        assert message.content[0].text == "I'll add those numbers."
        assert message.usage.output_tokens == 40
        await assert_one_turn_recorded(gw, server, streaming)


async def test_raw_stream_hides_the_injected_block_and_keeps_the_stop_reason(
    make_gateway: GatewayFactory,
) -> None:
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}])
        script(gw, True)
        out = await post(gw, request(True))

        assert b"bmcp_" not in out
        assert b"toolu_" not in out
        names = []
        for event in split_events(out):
            name = event.split(b"\n", 1)[0].removeprefix(b"event: ").decode()
            names.append(name)
            if name == "message_delta":
                data = orjson.loads(event.split(b"\ndata: ", 1)[1])
                assert data["delta"]["stop_reason"] == "max_tokens"
        assert names.count("content_block_start") == 1
        assert names.count("message_delta") == 1
        assert names[-2:] == ["message_delta", "message_stop"]
        await assert_one_turn_recorded(gw, server, True)


async def test_blocking_body_drops_the_injected_block(make_gateway: GatewayFactory) -> None:
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}])
        script(gw, False)
        out = orjson.loads(await post(gw, request(False)))

        assert out["stop_reason"] == "max_tokens"
        assert out["content"] == [{"type": "text", "text": "I'll add those numbers."}]
        await assert_one_turn_recorded(gw, server, False)
