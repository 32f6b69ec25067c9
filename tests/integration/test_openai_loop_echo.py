"""Injected MCP tools on the Responses API: the response objects the client sees echo its own
``tools`` and ``parallel_tool_calls``, not the request the gateway sent (real MCP server,
official openai SDK, synthetic fixture whose provider echoes the injected request as OpenAI
does)."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from gateway.testing import FakeUpstream, Reply
from tests.conftest import GATEWAY_KEY, GatewayFactory, replayed_sections
from tests.integration.test_openai_loop import list_templates, start, strip_none
from tests.integration.test_openai_sdk import (
    gateway_base,
    openai_fixture,
    responses_call,
    responses_final,
    run_sdk,
    sdk_kwargs,
)
from tests.mcp_server import McpTestServer, running_mcp_server

FX, REQUEST = openai_fixture("responses", "injected_loop_echo")
INJECTED = "bmcp_coder_list_templates"
# The client's own ``parallel_tool_calls``: unset (the provider's default, on), on, off.
CLIENT_PARALLEL: list[dict[str, Any]] = [
    {},
    {"parallel_tool_calls": True},
    {"parallel_tool_calls": False},
]


def echoed(response: dict[str, Any]) -> tuple[list[Any], Any]:
    """The ``tools`` and ``parallel_tool_calls`` a response object shows, SDK defaults aside."""
    return [strip_none(t) for t in response["tools"]], response["parallel_tool_calls"]


@pytest.mark.parametrize("client", CLIENT_PARALLEL, ids=["unset", "on", "off"])
@pytest.mark.parametrize("mode", ["async_create_stream", "sync_create_stream", "async_blocking"])
async def test_client_sees_its_own_tools_and_parallel_tool_calls(
    make_gateway: GatewayFactory, upstream: FakeUpstream, mode: str, client: dict[str, Any]
) -> None:
    streaming = not mode.endswith("blocking")
    sections = [FX[t] for t in replayed_sections(streaming, follow=True)]
    # The synthetic provider echoes the injected request, as OpenAI does.
    for section in sections:
        assert INJECTED in str(responses_final(section)["tools"])
        assert responses_final(section)["parallel_tool_calls"] is False
    request = {**REQUEST, **client}
    expected = (request["tools"], request.get("parallel_tool_calls", True))
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.create, request)
    server = McpTestServer()
    server.add_tool(list_templates)
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, upstream, "coder", url)
        gw.upstream.enqueue(*(Reply.from_section(s) for s in sections))
        result = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, responses_call(kwargs))

    # The loop ran: the provider got the injected tool, parallel calls off, and a second turn.
    first, _ = (orjson.loads(r.body) for r in gw.upstream.requests)
    assert INJECTED in [t["name"] for t in first["tools"]]
    assert first["parallel_tool_calls"] is False
    if streaming:
        shown = [e["response"] for e in result if "response" in e]
        kinds = [e["type"] for e in result if "response" in e]
        assert kinds == ["response.created", "response.in_progress", "response.completed"]
        assert result[-1]["type"] == "response.completed"
    else:
        shown = [result]
    for response in shown:
        assert echoed(response) == expected
