"""Injected MCP tools run server-side inside one client request (real MCP server, real SDK)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic.types import TextBlock

from gateway.sse.keepalive import ANTHROPIC_PING
from gateway.testing import Reply, load_txtar
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    by_kind,
    fixture_message,
    fixture_usage,
    replayed_sections,
    wait_for_end,
)
from tests.mcp_server import McpTestServer, running_mcp_server

ADD = load_txtar(FIXTURES / "anthropic" / "injected_add.txtar")
REQUEST: dict[str, Any] = orjson.loads(ADD["request"])


def texts(content: Sequence[object]) -> list[str]:
    return [block.text for block in content if isinstance(block, TextBlock)]


async def start(make_gateway: GatewayFactory, mcp_url: str, **mcp: Any) -> Gateway:
    return await make_gateway(mcp_servers=[{"id": "tools", "url": mcp_url, **mcp}])


@pytest.mark.parametrize("streaming", [True, False])
async def test_injected_tool_runs_and_client_sees_one_message(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    async with running_mcp_server(McpTestServer()) as url:
        gw = await start(make_gateway, url)
        turns = replayed_sections(streaming, follow=True)
        gw.upstream.enqueue(*(Reply.from_section(ADD[turn]) for turn in turns))
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0)
        if streaming:
            async with client.messages.stream(**REQUEST) as stream:
                message = await stream.get_final_message()
        else:
            message = await client.messages.create(**REQUEST)

    # The client sees text only: the injected tool_use is hidden, and so is the blocking
    # tool-calling turn (a stream has already sent its text).
    assert [b.type for b in message.content] == (["text", "text"] if streaming else ["text"])
    shown = turns if streaming else turns[1:]
    expected = [fixture_message(ADD[turn]).content for turn in shown]
    assert texts(message.content) == [text for content in expected for text in texts(content)]
    assert message.stop_reason == "end_turn"
    # Usage of every turn, input included (the reference leaves the first turn's input).
    usage = fixture_usage(ADD, turns)
    assert message.usage.output_tokens == usage["output"]
    assert message.usage.input_tokens == usage["input"]
    assert message.usage.cache_read_input_tokens == usage["cache_read"]

    # The provider got the tool result in the continuation.
    assert len(gw.upstream.requests) == 2
    first_body = orjson.loads(gw.upstream.requests[0].body)
    assert first_body["tools"][0]["name"] == "bmcp_tools_add"
    assert first_body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    follow = orjson.loads(gw.upstream.requests[1].body)
    assistant, user = follow["messages"][-2:]
    assert assistant["role"] == "assistant"
    assert [b["type"] for b in assistant["content"]] == ["text", "tool_use"]
    assert user["content"][0]["type"] == "tool_result"
    assert user["content"][0]["content"] == [{"type": "text", "text": "5"}]
    assert user["content"][0]["is_error"] is False

    records = await gw.records()
    [tool] = by_kind(records, "tool_usage")
    assert (tool["tool"], tool["injected"], tool["server_url"]) == ("add", True, url)
    assert orjson.loads(tool["args"]) == {"a": 2, "b": 3}
    assert tool["invocation_error"] == ""
    tokens = by_kind(records, "token_usage")
    assert len(tokens) == len(turns)
    assert sum(t["input"] for t in tokens) == usage["input"]
    assert sum(t["output"] for t in tokens) == usage["output"]
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"


def slow_turn(seconds: float) -> str:
    """Turn one of injected_add, calling the MCP server's ``slow`` tool instead."""
    return (
        ADD["streaming"]
        .replace("bmcp_tools_add", "bmcp_tools_slow")
        .replace('{\\"a\\": 2, ', '{\\"seconds\\": ')
        .replace('\\"b\\": 3}', f"{seconds}}}")
    )


async def test_client_leaving_while_a_tool_runs_gets_no_further_turn(
    make_gateway: GatewayFactory,
) -> None:
    async with running_mcp_server(McpTestServer()) as url:
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}], ping_interval=0.1)
        gw.upstream.enqueue(
            Reply.from_section(slow_turn(0.6)), Reply.from_section(ADD["streaming/tool-call"])
        )
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{gw.url}/v1/messages",
                json=dict(REQUEST, stream=True),
                headers={"x-api-key": GATEWAY_KEY},
            )
            assert b"message_start" in await resp.content.readany()
            resp.close()  # gone while the tool runs
        ended = await wait_for_end(gw)
    assert ended["status"] == "client_disconnected"
    records = await gw.records()
    assert len(gw.upstream.requests) == 1  # no turn nobody would read
    [tool] = by_kind(records, "tool_usage")
    assert tool["tool"] == "slow" and tool["injected"] is True
    [tokens] = by_kind(records, "token_usage")
    usage = fixture_usage(ADD, ["streaming"])  # only the turn that called the tool
    assert (tokens["input"], tokens["output"]) == (usage["input"], usage["output"])


async def test_pings_keep_the_stream_alive_while_a_tool_runs(make_gateway: GatewayFactory) -> None:
    """A slow injected tool: the client keeps receiving pings until the answer continues."""
    turn_one = slow_turn(0.8)
    async with running_mcp_server(McpTestServer()) as url:
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}], ping_interval=0.15)
        gw.upstream.enqueue(
            Reply.from_section(turn_one), Reply.from_section(ADD["streaming/tool-call"])
        )
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{gw.url}/v1/messages",
                json=dict(REQUEST, stream=True),
                headers={"x-api-key": GATEWAY_KEY},
            ) as resp,
        ):
            received = await resp.read()
    follow = orjson.loads(gw.upstream.requests[1].body)
    assert "seconds" in follow["messages"][-2]["content"][1]["input"]
    # Beyond the fixture streams' own pings, at least three were sent while the tool ran.
    scripted = (turn_one + ADD["streaming/tool-call"]).encode().count(ANTHROPIC_PING)
    assert received.count(ANTHROPIC_PING) >= scripted + 3
    assert received.count(b"event: message_start") == 1
    assert received.rstrip().endswith(b'"message_stop"}')
