"""How Responses interceptions end on record: incomplete and failed responses, client calls.

A response cut short by ``max_output_tokens`` (``response.incomplete``) or one that failed
(``response.failed``) reaches the client as the provider sent it, streamed or not, and its
interception ends ``incomplete`` or ``failed`` with the usage it spent. Every client call is
recorded with its output item's id, in the spool and on the control plane's usage stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import orjson
import pytest

from control.v1 import control_pb2 as pb
from control.v1 import control_pb2_grpc
from gateway.testing import FakeUpstream, Reply, load_txtar, split_events
from tests.conftest import (
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    by_kind,
    wait_for_end,
)
from tests.mcp_server import McpTestServer, running_mcp_server

if TYPE_CHECKING:
    from control.v1.control_pb2_grpc import ControlServiceAsyncStub as Stub

FOLDER = FIXTURES / "openai" / "responses"


def _fixture(name: str) -> dict[str, str]:
    return load_txtar(FOLDER / f"{name}.txtar")


def _terminal(stream: str) -> dict[str, Any]:
    """The ``response`` of the stream's terminal event (the last one)."""
    last = split_events(stream.encode())[-1]
    data = next(line for line in last.splitlines() if line.startswith(b"data: "))
    response: dict[str, Any] = orjson.loads(data[6:])["response"]
    return response


def _section(name: str, stream: bool) -> str:
    """What the upstream replays: the stream, or the blocking body (for a fixture that has
    none, the response its stream ended with: what a blocking call returns)."""
    sections = _fixture(name)
    if stream:
        return sections["streaming"]
    if "non-streaming" in sections:
        return sections["non-streaming"]
    return orjson.dumps(_terminal(sections["streaming"])).decode()


def _sent(name: str, stream: bool) -> bytes:
    """The bytes the upstream sends for fixture ``name``."""
    return Reply.from_section(_section(name, stream)).body


def _response(name: str, stream: bool = False) -> dict[str, Any]:
    """The whole response the fixture's section describes (its usage, output, status): the
    blocking body, or the response the stream ended with."""
    sections = _fixture(name)
    if not stream and "non-streaming" in sections:
        body: dict[str, Any] = orjson.loads(sections["non-streaming"])
        return body
    return _terminal(sections["streaming"])


async def _gateway(make_gateway: GatewayFactory, upstream: FakeUpstream, **kw: Any) -> Gateway:
    provider = {
        "name": "openai",
        "type": "openai",
        "base_url": upstream.url + "/v1",
        "api_key": "sk-central",
    }
    return await make_gateway(providers=[provider], **kw)


async def _post(gw: Gateway, name: str, stream: bool, follow: bool = False) -> tuple[int, bytes]:
    """Replay fixture ``name`` through the gateway (``follow``: and its ``/tool-call`` turn, for
    a loop); the client's status and body bytes."""
    gw.upstream.enqueue(Reply.from_section(_section(name, stream)))
    if follow:
        key = "streaming" if stream else "non-streaming"
        gw.upstream.enqueue(Reply.from_section(_fixture(name)[f"{key}/tool-call"]))
    request = orjson.loads(_fixture(name)["request"])
    request["stream"] = stream
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.root}/openai/v1/responses",
            headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
            json=request,
        ) as resp,
    ):
        return resp.status, await resp.read()


def _tokens(records: list[dict[str, Any]], response: dict[str, Any]) -> None:
    """The one token record is the response's usage, normalised (input excludes cached)."""
    usage = response["usage"]
    (tokens,) = records
    cached = usage["input_tokens_details"]["cached_tokens"]
    assert tokens["msg_id"] == response["id"]
    assert (tokens["input"], tokens["cache_read"], tokens["output"]) == (
        usage["input_tokens"] - cached,
        cached,
        usage["output_tokens"],
    )


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "blocking"])
async def test_incomplete_response_is_relayed_and_ends_incomplete(
    make_gateway: GatewayFactory, upstream: FakeUpstream, stream: bool
) -> None:
    gw = await _gateway(make_gateway, upstream)
    status, body = await _post(gw, "response_incomplete", stream)
    assert status == 200
    assert body == _sent("response_incomplete", stream)
    ended = await wait_for_end(gw)
    response = _response("response_incomplete", stream)
    assert ended["status"] == "incomplete"
    assert ended["error_type"] == "response_incomplete"
    assert response["incomplete_details"]["reason"] in ended["error_message"]
    assert ended["upstream_status"] == 200
    _tokens(by_kind(await gw.records(), "token_usage"), response)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "blocking"])
async def test_failed_response_is_relayed_and_ends_failed(
    make_gateway: GatewayFactory, upstream: FakeUpstream, stream: bool
) -> None:
    gw = await _gateway(make_gateway, upstream)
    status, body = await _post(gw, "response_failed", stream)
    assert status == 200
    assert body == _sent("response_failed", stream)
    ended = await wait_for_end(gw)
    response = _response("response_failed", stream)
    assert ended["status"] == "failed"
    assert (ended["error_type"], ended["error_message"]) == (
        response["error"]["code"],
        response["error"]["message"],
    )
    _tokens(by_kind(await gw.records(), "token_usage"), response)


def _client_calls(name: str, stream: bool) -> list[tuple[str, str, str]]:
    """``(name, call_id, item id)`` of the fixture response's client calls, in order."""
    return [
        (item["name"], item["call_id"], item["id"])
        for item in _response(name, stream)["output"]
        if item["type"] in ("function_call", "custom_tool_call")
    ]


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "blocking"])
async def test_client_calls_are_recorded_with_their_item_id(
    make_gateway: GatewayFactory, upstream: FakeUpstream, stream: bool
) -> None:
    gw = await _gateway(make_gateway, upstream)
    status, _ = await _post(gw, "client_tools_parallel", stream)
    assert status == 200
    ended = await wait_for_end(gw)
    assert ended["status"] == "completed"
    calls = by_kind(await gw.records(), "tool_usage")
    expected = _client_calls("client_tools_parallel", stream)
    assert len(expected) == 2
    assert [(c["tool"], c["tool_call_id"], c["item_id"]) for c in calls] == expected


def list_templates(owner: str) -> str:
    """The templates ``owner`` may use."""
    return "docker"


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "blocking"])
async def test_injected_calls_are_recorded_with_their_item_id(
    make_gateway: GatewayFactory, upstream: FakeUpstream, stream: bool
) -> None:
    [(call_id, item_id)] = [
        (i["call_id"], i["id"])
        for i in _response("injected_loop", stream)["output"]
        if i["type"] == "function_call"
    ]
    server = McpTestServer()
    server.add_tool(list_templates)
    async with running_mcp_server(server) as url:
        gw = await _gateway(make_gateway, upstream, mcp_servers=[{"id": "coder", "url": url}])
        status, _ = await _post(gw, "injected_loop", stream, follow=True)
    assert status == 200
    assert len(upstream.requests) == 2
    [tool] = by_kind(await gw.records(), "tool_usage")
    assert (tool["tool"], tool["injected"], tool["invocation_error"]) == (
        "list_templates",
        True,
        "",
    )
    assert (tool["tool_call_id"], tool["item_id"]) == (call_id, item_id)


async def test_the_control_plane_gets_item_ids_and_the_incomplete_end(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await _gateway(make_gateway, upstream, control_token=CONTROL_TOKEN)
    assert (await _post(gw, "client_tools_parallel", True))[0] == 200
    assert (await _post(gw, "response_incomplete", False))[0] == 200
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        stub: Stub = control_pb2_grpc.ControlServiceStub(channel)
        records = await _usage(stub, 2)
    calls = [r.tool_usage for r in records if r.WhichOneof("record") == "tool_usage"]
    assert [(c.tool, c.tool_call_id, c.item_id) for c in calls] == _client_calls(
        "client_tools_parallel", True
    )
    ends = [r.interception_ended for r in records if r.WhichOneof("record") == "interception_ended"]
    assert [e.status for e in ends] == ["completed", "incomplete"]
    assert ends[1].error_type == "response_incomplete"


async def _usage(stub: Stub, interceptions: int, within: float = 10.0) -> list[pb.UsageRecord]:
    """StreamUsage's records until ``interceptions`` interceptions have ended."""
    call = stub.StreamUsage(pb.StreamUsageRequest(), metadata=CONTROL_METADATA, timeout=within)
    records: list[pb.UsageRecord] = []
    try:
        async for batch in call:
            records.extend(batch.records)
            ended = [r for r in records if r.WhichOneof("record") == "interception_ended"]
            if len(ended) >= interceptions:
                break
    finally:
        call.cancel()
    return records
