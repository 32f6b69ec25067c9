"""Conformance with real recorded Anthropic traffic (``../shared/fixtures/aibridge/anthropic``).

The folder is reference data outside the project: read in place, never copied; skipped when
absent. Each scenario runs direct and through the gateway against the same replayed bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.testing import Reply, load_txtar
from tests.conftest import GATEWAY_KEY, SHARED_FIXTURES, Gateway, GatewayFactory, by_kind
from tests.mcp_server import McpTestServer, running_mcp_server
from tests.sdk import assert_records_match, final_message

FOLDER = SHARED_FIXTURES / "anthropic"
FILES = sorted(FOLDER.glob("*.txtar")) if FOLDER.is_dir() else []
pytestmark = pytest.mark.skipif(not FILES, reason=f"{FOLDER} is absent")

CASES = [
    pytest.param(path, section, id=f"{path.stem}-{section}")
    for path in FILES
    for section in ("streaming", "non-streaming")
    if section in load_txtar(path)
]


async def post_raw(url: str, body: dict[str, Any], key: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/messages", json=body, headers={"x-api-key": key}) as resp,
    ):
        return resp.status, await resp.read()


@pytest.mark.parametrize(("path", "section"), CASES or [pytest.param(None, None, id="none")])
async def test_recorded_scenario(gateway: Gateway, path: Path, section: str) -> None:
    fx = load_txtar(path)
    reply = Reply.from_section(fx[section])
    gateway.upstream.enqueue(reply, reply)
    streaming = section == "streaming"

    if "request" not in fx:
        # A passthrough capture (e.g. the models list): relayed byte for byte.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gateway.url}/v1/models", headers={"x-api-key": GATEWAY_KEY}) as resp,
        ):
            assert resp.status == reply.status
            assert await resp.read() == reply.body
        assert gateway.upstream.requests[-1].path == "/v1/models"
        assert await gateway.records() == []
        return

    body = dict(orjson.loads(fx["request"]), stream=streaming)
    if reply.status != 200 or b"event: error" in reply.body:
        direct = await post_raw(gateway.upstream.url, body, "sk-direct")
        through = await post_raw(gateway.url, body, GATEWAY_KEY)
        assert through[0] == direct[0]
        records = await gateway.records()
        [started] = by_kind(records, "interception_started")
        own_id = started["interception_id"].encode()
        upstream_ids = [m.encode() for m in _message_ids(direct[1])]
        expected = direct[1]
        for upstream_id in upstream_ids:
            expected = expected.replace(upstream_id, own_id)
        assert through[1] == expected
        [ended] = by_kind(records, "interception_ended")
        assert ended["status"] == "failed"
        assert ended["error_type"] in ("invalid_request_error", "api_error")
        return

    mode = "async_stream_helper" if streaming else "async_blocking"
    direct_msg = await final_message(gateway.upstream.url, "sk-direct", mode, body)
    via_gateway = await final_message(gateway.url, GATEWAY_KEY, mode, body)
    assert via_gateway.model_dump(exclude={"id"}) == direct_msg.model_dump(exclude={"id"})
    # The token record takes message_delta's cumulative output as the total: the reference
    # gateway adds message_start's output to it and over-counts (its single_builtin_tool
    # streaming total is 66 where the message used 61).
    assert_records_match(await gateway.records(), body, direct_msg, via_gateway.id)


def _message_ids(raw: bytes) -> list[str]:
    ids = []
    marker = b'"id":"msg_'
    start = raw.find(marker)
    while start >= 0:
        end = raw.index(b'"', start + 6)
        ids.append(raw[start + 6 : end].decode())
        start = raw.find(marker, end)
    return ids


INJECTED = FOLDER / "single_injected_tool.txtar"


def coder_list_workspaces(owner: str) -> str:
    """List the workspaces of a user (a stand-in for the Coder MCP server's tool)."""
    return f"workspaces of {owner}: bob (dd711d5c-83c6-4c08-a0af-b73055906e8c)"


@pytest.mark.skipif(not INJECTED.is_file(), reason=f"{INJECTED} is absent")
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "non-streaming"])
async def test_recorded_injected_tool_round_trip(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    """The recorded two-turn exchange, with a real MCP server exposing the recorded tool."""
    fx = load_txtar(INJECTED)
    first, second = (
        ("streaming", "streaming/tool-call")
        if streaming
        else ("non-streaming", "non-streaming/tool-call")
    )
    server = McpTestServer("coder")
    server.add_tool(coder_list_workspaces)
    async with running_mcp_server(server) as url:
        gw = await make_gateway(mcp_servers=[{"id": "coder", "url": url}])
        gw.upstream.enqueue(Reply.from_section(fx[first]), Reply.from_section(fx[second]))
        body = orjson.loads(fx["request"])
        mode = "async_stream_helper" if streaming else "async_blocking"
        message = await final_message(gw.url, GATEWAY_KEY, mode, body)

    answer = _final_text(fx[second], streaming)
    assert [b.type for b in message.content][-1] == "text"
    assert message.content[-1].text == answer  # type: ignore[union-attr]
    assert not any(b.type == "tool_use" for b in message.content)
    follow = orjson.loads(gw.upstream.requests[1].body)
    result = follow["messages"][-1]["content"][0]
    assert result["type"] == "tool_result"
    assert "workspaces of admin" in result["content"][0]["text"]

    records = await gw.records()
    [tool] = by_kind(records, "tool_usage")
    assert (tool["tool"], tool["injected"]) == ("coder_list_workspaces", True)
    assert orjson.loads(tool["args"]) == {"owner": "admin"}
    tokens = by_kind(records, "token_usage")
    assert len(tokens) == 2
    expected_in = sum(_usage(fx[s], streaming)[0] for s in (first, second))
    expected_out = sum(_usage(fx[s], streaming)[1] for s in (first, second))
    assert sum(t["input"] for t in tokens) == expected_in  # 7545 + 7763 = 15308
    # Cumulative message_delta usage taken once per message (the reference reports 204 here).
    assert sum(t["output"] for t in tokens) == expected_out
    assert message.usage.output_tokens == expected_out
    if not streaming:
        assert message.usage.input_tokens == expected_in


def _usage(section: str, streaming: bool) -> tuple[int, int]:
    """(input, final output) tokens of one recorded reply, read from the reply itself."""
    if not streaming:
        usage = orjson.loads(section)["usage"]
        return usage["input_tokens"], usage["output_tokens"]
    frames = [orjson.loads(line[6:]) for line in section.splitlines() if line.startswith("data: ")]
    start = next(f for f in frames if f["type"] == "message_start")
    delta = [f for f in frames if f["type"] == "message_delta"][-1]
    return start["message"]["usage"]["input_tokens"], delta["usage"]["output_tokens"]


def _final_text(section: str, streaming: bool) -> str:
    if not streaming:
        return str(orjson.loads(section)["content"][-1]["text"])
    frames = [orjson.loads(line[6:]) for line in section.splitlines() if line.startswith("data: ")]
    return "".join(
        f["delta"]["text"]
        for f in frames
        if f["type"] == "content_block_delta" and f["delta"]["type"] == "text_delta"
    )
