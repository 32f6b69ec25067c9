"""Agentic-loop cases end to end: a real MCP server, the fake upstream, the official SDK.

Each case is scripted by a ``loop_*`` fixture (or ``injected_add``) and checked from the user's
side: the client's final message, the raw SSE it received, what the provider and the MCP server
got, and the records of the interception.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import anthropic
import orjson
import pytest
from anthropic.types import Message, TextBlock, ToolUseBlock
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

from control.v1 import control_pb2 as pb
from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import (
    CONTROL_METADATA,
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    by_kind,
    fixture_message,
    fixture_usage,
    metric_value,
    replayed_sections,
)
from tests.mcp_server import FAIL_MESSAGE, McpTestServer, add, running_mcp_server
from tests.processes import free_port

if TYPE_CHECKING:
    from control.v1.control_pb2_grpc import ControlServiceAsyncStub, ControlServiceStub


def fixture(name: str) -> dict[str, str]:
    return load_txtar(FIXTURES / "anthropic" / f"{name}.txtar")


ADD = fixture("injected_add")
TWO = fixture("loop_two_calls")
MIXED = fixture("loop_mixed")
FAIL = fixture("loop_fail")
WEIRD = fixture("loop_weird_name")
AUTH = fixture("loop_echo_auth")
TEXT = fixture("text")
CLIENT_TOOL = fixture("client_tool")

WEIRD_NAME = "weird.tool name é"
WEIRD_ID = "bmcp_tools_weird_tool_name__"
TOOL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MCP_TOKEN = "mcp-token-of-alice-0123456789"
STREAMING = pytest.mark.parametrize("streaming", [True, False], ids=["stream", "blocking"])


class RecordingServer(McpTestServer):
    """The test MCP server, plus the weird-named tool; remembers every ``tools/call`` it served.

    ``hold`` delays each call so that overlapping calls are seen (``max_inflight``).
    """

    def __init__(self, hold: float = 0.0) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.hold = hold
        self.inflight = 0
        self.max_inflight = 0
        super().__init__()
        self.add_tool(add, name=WEIRD_NAME)

    async def _paginate(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.method != "tools/call":
            return await super()._paginate(ctx, call_next)
        params = ctx.params or {}
        self.calls.append((str(params.get("name")), dict(params.get("arguments") or {})))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(self.hold)
            return await call_next(ctx)
        finally:
            self.inflight -= 1


# -- helpers -----------------------------------------------------------------------------------


async def start(make_gateway: GatewayFactory, url: str, **settings: Any) -> Gateway:
    mcp = {k: settings.pop(k) for k in ("tool_allow_regex", "tool_deny_regex") if k in settings}
    return await make_gateway(mcp_servers=[{"id": "tools", "url": url, **mcp}], **settings)


def request(fx: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(fx["request"])
    return body


def script(gw: Gateway, fx: dict[str, str], streaming: bool, *, follow: bool = True) -> None:
    """Enqueue the fixture's tool-calling turn and, with ``follow``, its answer turn."""
    keys = replayed_sections(streaming, follow=follow)
    gw.upstream.enqueue(*(Reply.from_section(fx[k]) for k in keys))


def run_usage(fx: dict[str, str], streaming: bool, *, follow: bool = True) -> tuple[int, int]:
    """(input, output) tokens the client's final message totals over the turns ``script`` sent."""
    usage = fixture_usage(fx, replayed_sections(streaming, follow=follow))
    return usage["input"], usage["output"]


def answer(fx: dict[str, str], streaming: bool) -> str:
    """The text that ends the answer turn the run replays."""
    return texts(fixture_message(fx[replayed_sections(streaming, follow=True)[1]]))[-1]


def tool_uses(fx: dict[str, str], streaming: bool) -> list[ToolUseBlock]:
    """The tool calls of the first turn the run replays."""
    content = fixture_message(fx[replayed_sections(streaming)[0]]).content
    return [b for b in content if isinstance(b, ToolUseBlock)]


async def ask(gw: Gateway, body: dict[str, Any], streaming: bool) -> Message:
    """The client's final message, through the SDK's stream helper or a blocking create."""
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0)
    async with client:
        if streaming:
            async with client.messages.stream(**body) as stream:
                return await stream.get_final_message()
        message: Message = await client.messages.create(**body)
        return message


async def post_raw(gw: Gateway, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` as is to ``/v1/messages``; the status and the exact bytes received."""
    headers = {
        "x-api-key": GATEWAY_KEY,
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gw.url}/v1/messages", data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.read()


def texts(message: Message) -> list[str]:
    return [b.text for b in message.content if isinstance(b, TextBlock)]


def sent(gw: Gateway, i: int) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(gw.upstream.requests[i].body)
    return body


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in split_events(raw):
        name, data = "", b"{}"
        for line in chunk.splitlines():
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        events.append((name, orjson.loads(data)))
    return events


def assert_consistent(raw: bytes, *, stopped: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """The client stream is one well-formed message without a trace of injected tools."""
    assert b"bmcp_" not in raw
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names.count("message_start") == 1
    assert names.count("message_stop") == int(stopped)
    if stopped:
        assert names[-1] == "message_stop"
    started = 0
    open_blocks: set[int] = set()
    for name, data in events:
        if name == "content_block_start":
            assert data["index"] == started  # 0..n-1, no gap, no duplicate
            open_blocks.add(started)
            started += 1
        elif name in ("content_block_delta", "content_block_stop"):
            assert data["index"] in open_blocks
            if name == "content_block_stop":
                open_blocks.remove(data["index"])
    assert not open_blocks
    return events


def tool_records(records: list[Any]) -> dict[str, dict[str, Any]]:
    """tool_usage records by tool_call_id (calls finish in any order)."""
    return {t["tool_call_id"]: t for t in by_kind(records, "tool_usage")}


# -- 1. two injected calls in one turn ---------------------------------------------------------


@STREAMING
async def test_two_injected_calls_run_concurrently_in_one_continuation(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    server = RecordingServer(hold=0.3)
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, url)
        script(gw, TWO, streaming)
        message = await ask(gw, request(TWO), streaming)

    assert [b.type for b in message.content] == (["text", "text"] if streaming else ["text"])
    assert texts(message)[-1] == answer(TWO, streaming)
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == run_usage(TWO, streaming)

    calls = tool_uses(TWO, streaming)
    ids = [call.id for call in calls]
    assert len(calls) == 2
    assert sorted(server.calls, key=repr) == sorted([("add", c.input) for c in calls], key=repr)
    assert server.max_inflight == 2  # run concurrently, not one after the other

    assert len(gw.upstream.requests) == 2
    follow = sent(gw, 1)
    assert follow["messages"][:-2] == request(TWO)["messages"]
    assistant, user = follow["messages"][-2:]
    assert assistant["role"] == "assistant"
    assert [b["type"] for b in assistant["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["id"] for b in assistant["content"][1:]] == ids
    assert user["role"] == "user"
    assert user["content"] == [
        {"type": "tool_result", "tool_use_id": tid, "content": [{"type": "text", "text": text}]}
        | {"is_error": False}
        for tid, text in zip(ids, ["5", "14"], strict=True)
    ]

    records = await gw.records()
    tools = tool_records(records)
    assert set(tools) == set(ids)
    assert [orjson.loads(tools[c.id]["args"]) for c in calls] == [c.input for c in calls]
    for tool in tools.values():
        assert (tool["tool"], tool["injected"], tool["server_url"]) == ("add", True, url)
        assert tool["invocation_error"] == ""
    tokens = by_kind(records, "token_usage")
    turns = [fixture_usage(TWO, [turn]) for turn in replayed_sections(streaming, follow=True)]
    assert [(t["input"], t["output"]) for t in tokens] == [(u["input"], u["output"]) for u in turns]
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"


# -- 2. an injected and a client tool in one turn ----------------------------------------------


async def run_mixed(
    make_gateway: GatewayFactory, streaming: bool
) -> tuple[Gateway, RecordingServer, Message, str]:
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, url)
        script(gw, MIXED, streaming, follow=False)
        message = await ask(gw, request(MIXED), streaming)
    return gw, server, message, url


@STREAMING
async def test_turn_with_client_tool_goes_back_to_the_client(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    gw, server, message, url = await run_mixed(make_gateway, streaming)
    injected, client_call = tool_uses(MIXED, streaming)
    assert (injected.name, client_call.name) == ("bmcp_tools_add", "get_weather")

    assert [b.type for b in message.content] == ["text", "tool_use"]
    call = message.content[1]
    assert isinstance(call, ToolUseBlock)
    assert (call.id, call.name, call.input) == (client_call.id, "get_weather", client_call.input)
    assert message.stop_reason == "tool_use"
    usage = run_usage(MIXED, streaming, follow=False)
    assert (message.usage.input_tokens, message.usage.output_tokens) == usage

    assert server.calls == []  # the injected call was not run
    assert len(gw.upstream.requests) == 1
    first = sent(gw, 0)
    assert [t["name"] for t in first["tools"]][-1] == "get_weather"

    records = await gw.records()
    tools = tool_records(records)
    weather = tools[client_call.id]
    assert (weather["tool"], weather["injected"]) == ("get_weather", False)
    assert orjson.loads(weather["args"]) == client_call.input
    skipped = tools[injected.id]  # recorded, with why it did not run
    assert (skipped["tool"], skipped["injected"], skipped["server_url"]) == ("add", True, url)
    assert skipped["invocation_error"] != ""
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"


@pytest.mark.parametrize("streaming", [True, False])
async def test_skipped_injected_call_is_recorded_with_its_args(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    gw, _, _, _ = await run_mixed(make_gateway, streaming)
    injected = tool_uses(MIXED, streaming)[0]
    skipped = tool_records(await gw.records())[injected.id]
    assert orjson.loads(skipped["args"]) == injected.input == {"a": 1, "b": 1}


# -- 3. a failing tool -------------------------------------------------------------------------


@STREAMING
async def test_failing_tool_result_is_an_error_and_the_answer_still_arrives(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, url)
        script(gw, FAIL, streaming)
        message = await ask(gw, request(FAIL), streaming)

    assert texts(message)[-1] == answer(FAIL, streaming)
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == run_usage(FAIL, streaming)
    assert server.calls == [("fail", {})]

    [result] = sent(gw, 1)["messages"][-1]["content"]
    assert result["type"] == "tool_result" and result["is_error"] is True
    assert FAIL_MESSAGE in " ".join(b["text"] for b in result["content"])

    records = await gw.records()
    [tool] = by_kind(records, "tool_usage")
    assert (tool["tool"], tool["injected"], tool["server_url"]) == ("fail", True, url)
    assert FAIL_MESSAGE in tool["invocation_error"]
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"


# -- 4. a server that is down ------------------------------------------------------------------


@STREAMING
async def test_down_server_is_left_out(make_gateway: GatewayFactory, streaming: bool) -> None:
    metric = "aibridged_mcp_server_unavailable_total"
    down = f"http://127.0.0.1:{free_port()}/mcp"
    async with running_mcp_server(RecordingServer()) as url:
        servers = [{"id": "down", "url": down}, {"id": "tools", "url": url}]
        gw = await make_gateway(mcp_servers=servers)
        before = await metric_value(gw.metrics_url, metric, mcp_server="down")
        script(gw, ADD, streaming)
        message = await ask(gw, request(ADD), streaming)

    assert texts(message)[-1] == answer(ADD, streaming)
    names = [t["name"] for t in sent(gw, 0)["tools"]]
    assert "bmcp_tools_add" in names
    assert all(name.startswith("bmcp_tools_") for name in names)
    assert await metric_value(gw.metrics_url, metric, mcp_server="down") >= before + 1
    [ended] = by_kind(await gw.records(), "interception_ended")
    assert ended["status"] == "completed"


# -- 5. allow/deny filtering; 9. small model ---------------------------------------------------


@STREAMING
async def test_allow_and_deny_patterns_select_the_injected_tools(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    async with running_mcp_server(RecordingServer()) as url:
        gw = await start(make_gateway, url, tool_allow_regex="^(add|fail)$", tool_deny_regex="fail")
        script(gw, ADD, streaming)
        message = await ask(gw, request(ADD), streaming)
    assert [t["name"] for t in sent(gw, 0)["tools"]] == ["bmcp_tools_add"]
    assert texts(message)[-1] == answer(ADD, streaming)


async def assert_untouched(gw: Gateway, body: dict[str, Any], reply: str, streaming: bool) -> None:
    """The client's exact bytes reach the provider; the answer is relayed."""
    raw = orjson.dumps({**body, "stream": True} if streaming else body, option=orjson.OPT_INDENT_2)
    gw.upstream.enqueue(Reply.from_section(reply))
    status, answer = await post_raw(gw, raw)
    assert status == 200
    assert gw.upstream.requests[-1].body == raw
    if streaming:
        assert_consistent(answer)
    else:
        assert orjson.loads(answer)["type"] == "message"


@STREAMING
async def test_no_injected_tool_leaves_the_request_byte_identical(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, url, tool_deny_regex=".*")
        body = request(CLIENT_TOOL) | {"tool_choice": {"type": "any"}}
        await assert_untouched(
            gw, body, CLIENT_TOOL["streaming" if streaming else "non-streaming"], streaming
        )
    assert sent(gw, 0)["tool_choice"] == {"type": "any"}
    assert server.calls == []


@STREAMING
async def test_small_model_gets_no_injected_tools(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    async with running_mcp_server(RecordingServer()) as url:
        gw = await start(make_gateway, url)
        body = request(TEXT) | {"model": "claude-haiku-4-5"}
        await assert_untouched(
            gw, body, TEXT["streaming" if streaming else "non-streaming"], streaming
        )
    assert "tools" not in sent(gw, 0)


# -- 6. the iteration cap ----------------------------------------------------------------------


@STREAMING
async def test_iteration_cap_stops_the_loop(make_gateway: GatewayFactory, streaming: bool) -> None:
    key = "streaming" if streaming else "non-streaming"
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, url, mcp_max_iterations=2)
        gw.upstream.enqueue(*(Reply.from_section(ADD[key]) for _ in range(3)))
        with pytest.raises(anthropic.APIStatusError) as raised:
            await ask(gw, request(ADD), streaming)
        if streaming:  # the same again, read raw: the stream ends with an error event
            gw.upstream.enqueue(*(Reply.from_section(ADD[key]) for _ in range(3)))
            status, raw = await post_raw(gw, orjson.dumps(request(ADD) | {"stream": True}))
            assert status == 200
            events = assert_consistent(raw, stopped=False)
            name, data = events[-1]
            assert name == "error" and "mcp_max_iterations" in data["error"]["message"]

    assert "mcp_max_iterations" in str(raised.value)
    if not streaming:
        assert raised.value.status_code == 502
    runs = 2 if streaming else 1
    assert len(gw.upstream.requests) == 2 * runs
    assert len(server.calls) == runs  # the first turn's call ran, the second's did not
    records = await gw.records()
    assert len(by_kind(records, "token_usage")) == 2 * runs
    ends = by_kind(records, "interception_ended")
    assert len(ends) == runs
    for ended in ends:
        assert (ended["status"], ended["error_type"]) == ("failed", "tool_loop_limit")
        assert "mcp_max_iterations" in ended["error_message"]


# -- 7. a tool name that needs sanitising ------------------------------------------------------


@STREAMING
async def test_tool_name_is_sanitised_and_mapped_back(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, url)
        script(gw, WEIRD, streaming)
        message = await ask(gw, request(WEIRD), streaming)

    names = [t["name"] for t in sent(gw, 0)["tools"]]
    assert WEIRD_ID in names
    assert all(TOOL_ID.match(name) for name in names)
    assert server.calls == [(WEIRD_NAME, {"a": 20, "b": 22})]
    [result] = sent(gw, 1)["messages"][-1]["content"]
    assert result["content"] == [{"type": "text", "text": "42"}]
    assert texts(message)[-1] == answer(WEIRD, streaming)
    assert (message.usage.input_tokens, message.usage.output_tokens) == run_usage(WEIRD, streaming)
    cache_read = fixture_usage(WEIRD, replayed_sections(streaming, follow=True))["cache_read"]
    assert (message.usage.cache_read_input_tokens or 0) == cache_read

    [tool] = by_kind(await gw.records(), "tool_usage")
    assert (tool["tool"], tool["injected"], tool["server_url"]) == (WEIRD_NAME, True, url)
    assert orjson.loads(tool["args"]) == {"a": 20, "b": 22}


# -- 8. the actor's MCP token, pushed over the control plane ----------------------------------


@STREAMING
async def test_pushed_actor_token_reaches_the_tool_and_removal_applies(
    control: tuple[Gateway, ControlServiceStub], streaming: bool
) -> None:
    gw, stub = control[0], cast("ControlServiceAsyncStub", control[1])
    server = RecordingServer()
    async with running_mcp_server(server) as url:
        servers = pb.PutMcpServersRequest(
            config_version=1, servers=[pb.McpServer(id="tools", url=url)]
        )
        await stub.PutMcpServers(servers, metadata=CONTROL_METADATA)
        token = pb.McpAccessToken(actor_id="u-1", server_id="tools", token=MCP_TOKEN)
        tokens = pb.PutMcpAccessTokensRequest(config_version=1, tokens=[token])
        await stub.PutMcpAccessTokens(tokens, metadata=CONTROL_METADATA)
        script(gw, AUTH, streaming)
        message = await ask(gw, request(AUTH), streaming)

        assert texts(message)[-1] == answer(AUTH, streaming)
        assert server.calls == [("echo_auth", {})]
        [result] = sent(gw, 1)["messages"][-1]["content"]
        assert result["content"] == [{"type": "text", "text": f"Bearer {MCP_TOKEN}"}]

        removed = pb.PutMcpServersRequest(config_version=2, servers=[])
        await stub.PutMcpServers(removed, metadata=CONTROL_METADATA)
        key = "streaming" if streaming else "non-streaming"
        await assert_untouched(gw, request(TEXT), TEXT[key], streaming)
    assert len(gw.upstream.requests) == 3
    assert "tools" not in sent(gw, 2)


# -- 10. stable encoding -----------------------------------------------------------------------


@STREAMING
async def test_identical_requests_give_byte_identical_upstream_bodies(
    make_gateway: GatewayFactory, streaming: bool
) -> None:
    async with running_mcp_server(RecordingServer()) as url:
        gw = await start(make_gateway, url)
        for _ in range(2):
            script(gw, ADD, streaming)
            await ask(gw, request(ADD), streaming)
    assert len(gw.upstream.requests) == 4
    assert gw.upstream.requests[0].body == gw.upstream.requests[2].body
    assert gw.upstream.requests[1].body == gw.upstream.requests[3].body
    assert "bmcp_tools_add" in [t["name"] for t in sent(gw, 0)["tools"]]


# -- the raw client stream (streaming only) ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        ("injected_add", ["text", "text"]),
        ("loop_two_calls", ["text", "text"]),
        ("loop_mixed", ["text", "tool_use"]),
        ("loop_fail", ["text", "text"]),
        ("loop_weird_name", ["text", "text"]),
    ],
)
async def test_client_stream_is_one_consistent_message(
    make_gateway: GatewayFactory, name: str, blocks: list[str]
) -> None:
    fx = fixture(name)
    turns = [k for k in ("streaming", "streaming/tool-call") if k in fx]
    async with running_mcp_server(RecordingServer()) as url:
        gw = await start(make_gateway, url)
        script(gw, fx, True, follow=len(turns) == 2)
        status, raw = await post_raw(gw, orjson.dumps(request(fx) | {"stream": True}))
    assert status == 200
    events = assert_consistent(raw)
    starts = [data["content_block"] for ev, data in events if ev == "content_block_start"]
    assert [b["type"] for b in starts] == blocks
    [delta] = [data for ev, data in events if ev == "message_delta"]
    usage = fixture_usage(fx, turns)
    assert delta["usage"]["output_tokens"] == usage["output"]
    if len(turns) == 2:  # after a loop the final delta carries the totals of every turn
        assert delta["usage"]["input_tokens"] == usage["input"]
    assert len(gw.upstream.requests) == len(turns)
