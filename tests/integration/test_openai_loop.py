"""Injected MCP tools on the OpenAI APIs: run server-side inside one client request (real MCP
server, official openai SDK, synthetic fixtures)."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from gateway.testing import FakeUpstream, Reply
from tests.conftest import GATEWAY_KEY, Gateway, GatewayFactory, by_kind, replayed_sections
from tests.integration.test_openai_sdk import (
    chat_call,
    chat_section_id,
    chat_usage,
    data_payloads,
    gateway_base,
    openai_fixture,
    openai_provider,
    responses_call,
    responses_final,
    responses_usage,
    run_sdk,
    sdk_kwargs,
    tokens_of,
)
from tests.mcp_server import McpTestServer, running_mcp_server

CHAT_FX, CHAT_REQUEST = openai_fixture("chat", "injected_loop")
RESP_FX, RESP_REQUEST = openai_fixture("responses", "injected_loop")
TEMPLATES = "docker, kubernetes"


def list_templates(owner: str) -> str:
    """The templates ``owner`` may use."""
    return TEMPLATES


async def start(
    make_gateway: GatewayFactory, upstream: FakeUpstream, server: str, url: str
) -> Gateway:
    return await make_gateway(
        providers=[openai_provider(upstream.url)], mcp_servers=[{"id": server, "url": url}]
    )


def summed(sections: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(s[k] for s in sections) for k in sections[0]}


def strip_none(value: Any) -> Any:
    """A dumped SDK object without the ``None`` fields the SDK adds for absent keys."""
    if isinstance(value, dict):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_none(v) for v in value]
    return value


def usage_sum(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Usage objects added field by field (nested ones too), as a client sees a loop's total."""
    out: dict[str, Any] = {}
    for key, value in objects[0].items():
        if isinstance(value, dict):
            out[key] = usage_sum([o[key] for o in objects])
        else:
            out[key] = sum(o[key] for o in objects)
    return out


def chat_usage_object(section: str) -> dict[str, Any]:
    if section.lstrip().startswith("data:"):
        return next(p["usage"] for p in reversed(data_payloads(section)) if p.get("usage"))
    usage: dict[str, Any] = orjson.loads(section)["usage"]
    return usage


def chat_text(section: str) -> str:
    if not section.lstrip().startswith("data:"):
        return str(orjson.loads(section)["choices"][0]["message"]["content"] or "")
    return "".join(
        c["delta"].get("content") or "" for p in data_payloads(section) for c in p["choices"]
    )


@pytest.mark.parametrize(
    "mode", ["async_create_stream", "sync_create_stream", "async_stream_helper", "sync_blocking"]
)
async def test_chat_injected_tool_runs_and_client_sees_one_answer(
    make_gateway: GatewayFactory, upstream: FakeUpstream, mode: str
) -> None:
    streaming = not mode.endswith("blocking")
    turns = replayed_sections(streaming, follow=True)
    sections = [CHAT_FX[t] for t in turns]
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").chat.completions.create, CHAT_REQUEST)
    if streaming:
        kwargs["stream_options"] = {"include_usage": True}
    async with running_mcp_server(McpTestServer()) as url:
        gw = await start(make_gateway, upstream, "tools", url)
        gw.upstream.enqueue(*(Reply.from_section(s) for s in sections))
        result = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, chat_call(kwargs))

    records = await gw.records()
    [started] = by_kind(records, "interception_started")
    total = usage_sum([chat_usage_object(s) for s in sections])
    if mode.endswith("create_stream"):
        # One coherent stream: the interception's id on every chunk, both turns' text, no
        # tool call, one finish and one usage chunk with the loop's totals.
        assert {c["id"] for c in result} == {started["interception_id"]}
        choices = [ch for c in result for ch in c["choices"]]
        assert all(ch["delta"]["tool_calls"] is None for ch in choices)
        assert "".join(ch["delta"]["content"] or "" for ch in choices) == "".join(
            chat_text(s) for s in sections
        )
        assert [ch["finish_reason"] for ch in choices if ch["finish_reason"]] == ["stop"]
        [usage] = [c["usage"] for c in result if c["usage"]]
        assert strip_none(usage) == total
    else:
        [choice] = result["choices"]
        assert result["id"] == started["interception_id"]
        assert choice["message"]["tool_calls"] is None
        assert choice["finish_reason"] == "stop"
        # A stream has shown the first turn's words already; a blocking answer is the last turn.
        shown = sections if streaming else sections[1:]
        assert choice["message"]["content"] == "".join(chat_text(s) for s in shown)
        assert strip_none(result["usage"]) == total

    # The provider was offered the tool, and got its result in the continuation.
    first, follow = (orjson.loads(r.body) for r in gw.upstream.requests)
    assert "bmcp_tools_add" in [t["function"]["name"] for t in first["tools"]]
    assert first["parallel_tool_calls"] is False
    assistant, tool_result = follow["messages"][-2:]
    [call] = assistant["tool_calls"]
    assert call["function"]["name"] == "bmcp_tools_add"
    assert orjson.loads(call["function"]["arguments"]) == {"a": 2, "b": 3}
    assert (tool_result["role"], tool_result["tool_call_id"]) == ("tool", call["id"])
    assert tool_result["content"] == "5"

    [tool] = by_kind(records, "tool_usage")
    assert (tool["tool"], tool["injected"], tool["server_url"]) == ("add", True, url)
    assert (tool["tool_call_id"], orjson.loads(tool["args"])) == (call["id"], {"a": 2, "b": 3})
    assert tool["invocation_error"] == ""
    tokens = by_kind(records, "token_usage")
    assert [t["msg_id"] for t in tokens] == [chat_section_id(s) for s in sections]
    assert [tokens_of(t) for t in tokens] == [chat_usage(s) for s in sections]
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"


@pytest.mark.parametrize("mode", ["async_create_stream", "sync_create_stream", "async_blocking"])
async def test_responses_injected_tool_runs_and_client_sees_one_response(
    make_gateway: GatewayFactory, upstream: FakeUpstream, mode: str
) -> None:
    """``create(stream=True)``: the SDK's ``.stream()`` helper refuses a stream whose final
    ``response.completed`` carries another id than ``response.created`` ("Lifecycle response
    identity changed"), which the loop's must (it is the id the client chains from)."""
    streaming = not mode.endswith("blocking")
    turns = replayed_sections(streaming, follow=True)
    sections = [RESP_FX[t] for t in turns]
    finals = [responses_final(s) for s in sections]
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.create, RESP_REQUEST)
    server = McpTestServer()
    server.add_tool(list_templates)
    async with running_mcp_server(server) as url:
        gw = await start(make_gateway, upstream, "coder", url)
        gw.upstream.enqueue(*(Reply.from_section(s) for s in sections))
        result = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, responses_call(kwargs))

    # One response: every visible item of both turns, the injected call hidden, the last
    # upstream response's id, usage summed over the turns.
    visible = [i for f in finals for i in f["output"] if i["type"] != "function_call"]
    total = usage_sum([f["usage"] for f in finals])
    if streaming:
        types = [e["type"] for e in result]
        assert types.count("response.created") == 1
        assert types[-1] == "response.completed"
        seqs = [e["sequence_number"] for e in result]
        assert seqs == list(range(len(result)))
        added = [e for e in result if e["type"] == "response.output_item.added"]
        assert [e["output_index"] for e in added] == list(range(len(visible)))
        assert [e["item"]["id"] for e in added] == [i["id"] for i in visible]
        assert all(e.get("item", {}).get("type") != "function_call" for e in result)
        text = "".join(e["delta"] for e in result if e["type"] == "response.output_text.delta")
        assert text == visible[-1]["content"][0]["text"]
        final = result[-1]["response"]
    else:
        final = result
    assert final["id"] == finals[-1]["id"]
    assert [i["id"] for i in final["output"]] == [i["id"] for i in visible]
    assert strip_none(final["usage"]) == total

    first, follow = (orjson.loads(r.body) for r in gw.upstream.requests)
    assert "bmcp_coder_list_templates" in [t["name"] for t in first["tools"]]
    assert first["parallel_tool_calls"] is False
    [output] = [i for i in follow["input"] if i.get("type") == "function_call_output"]
    assert output["call_id"] == "call_inj_1"
    assert TEMPLATES in str(output["output"])

    records = await gw.records()
    [tool] = by_kind(records, "tool_usage")
    assert (tool["tool"], tool["injected"], tool["server_url"]) == ("list_templates", True, url)
    assert (tool["tool_call_id"], orjson.loads(tool["args"])) == ("call_inj_1", {"owner": "me"})
    assert tool["invocation_error"] == ""
    tokens = by_kind(records, "token_usage")
    assert [t["msg_id"] for t in tokens] == [f["id"] for f in finals]
    assert [tokens_of(t) for t in tokens] == [responses_usage(f) for f in finals]
    assert [t["content"] for t in by_kind(records, "model_thought")] == ["Need templates."]
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"
