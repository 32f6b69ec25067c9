"""Conformance with real recorded OpenAI traffic (``../shared/fixtures/aibridge/openai``).

The folder is reference data outside the project: read in place, never copied; skipped when
absent. Each scenario runs direct and through the gateway against the same replayed bytes: Chat
Completions bytes must be the provider's but for the completion id (the interception id) and the
usage-only chunk nobody asked for; Responses bytes must be the provider's, unchanged. The
spool's records are checked against the numbers in the fixture itself. Injected-tool scenarios
run against a real MCP server offering the tool the recording expects.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import (
    GATEWAY_KEY,
    SHARED_FIXTURES,
    Gateway,
    GatewayFactory,
    by_kind,
    replayed_sections,
    wait_for_end,
)
from tests.integration.test_openai_loop import chat_text, chat_usage_object, strip_none, usage_sum
from tests.integration.test_openai_sdk import (
    OPENAI_KEY,
    chat_call,
    chat_prompt,
    chat_section_id,
    chat_tool_calls,
    chat_usage,
    data_payloads,
    direct_base,
    gateway_base,
    ids_replaced,
    openai_provider,
    responses_call,
    responses_final,
    responses_prompt,
    responses_usage,
    run_sdk,
    sdk_kwargs,
    start_openai,
    tokens_of,
)
from tests.mcp_server import McpTestServer, running_mcp_server

FOLDER = SHARED_FIXTURES / "openai"
CHAT_FILES = sorted((FOLDER / "chatcompletions").glob("*.txtar"))
RESPONSES_FILES = sorted((FOLDER / "responses").glob("*/*.txtar"))
pytestmark = pytest.mark.skipif(not CHAT_FILES + RESPONSES_FILES, reason=f"{FOLDER} is absent")
SECTIONS = ("streaming", "non-streaming")


def _cases(files: list[Path], injected: bool) -> list[Any]:
    """(file, section) of every recorded exchange; ``injected``: the two-turn ones instead."""
    cases = [
        pytest.param(path, section, id=f"{path.parent.name}/{path.stem}-{section}")
        for path in files
        for section, fx in ((s, load_txtar(path)) for s in SECTIONS)
        if section in fx and (f"{section}/tool-call" in fx) == injected
    ]
    return cases or [pytest.param(None, None, id="none")]


async def post(base: str, path: str, body: dict[str, Any], key: str) -> tuple[int, str, bytes]:
    """POST ``body`` to ``base + path``: status, media type and the exact bytes received."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return r.status, r.content_type, await r.read()


def error_payload(section: str) -> dict[str, Any] | None:
    """The in-stream error a recorded stream ends with (Chat's ``{"error":…}`` chunk or a
    Responses ``error`` event, flat or nested), as ``{"type", "message"}``; None if none."""
    if not section.lstrip().startswith(("event:", "data:")):
        return None
    for payload in data_payloads(section):
        if payload.get("type") == "error" or ("error" in payload and "choices" not in payload):
            nested = payload.get("error")
            err: dict[str, Any] = nested if isinstance(nested, dict) else payload
            return {"type": err.get("code") or err.get("type"), "message": err["message"]}
    return None


def without_usage_chunk(raw: bytes) -> bytes:
    """A chat stream as the provider sends it to a client that did not ask for
    ``stream_options.include_usage``: no usage-only chunk (``choices: []``) and no
    ``"usage":null`` on the other chunks (the recordings asked for usage; the gateway hides both
    from such a client)."""
    return b"".join(
        event.replace(b',"usage":null', b"")
        for event in split_events(raw)
        if not (b'"choices":[]' in event and b'"usage":{' in event)
    )


async def check_passthrough(gw: Gateway, reply: Reply) -> None:
    """A capture without a request (the models list): relayed byte for byte, nothing recorded."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{gateway_base(gw)}/models", headers={"Authorization": f"Bearer {GATEWAY_KEY}"}
        ) as resp,
    ):
        assert (resp.status, await resp.read()) == (reply.status, reply.body)
    [sent] = gw.upstream.requests
    assert (sent.method, sent.path) == ("GET", "/v1/models")
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert await gw.records() == []


async def check_failure(
    gw: Gateway, section: str, reply: Reply, direct: tuple[int, str, bytes]
) -> None:
    """An upstream error before the stream (status and body kept) or inside it (relayed as it
    came): the interception ends failed with the provider's own type and message."""
    ended = await wait_for_end(gw)
    records = await gw.records()
    assert ended["status"] == "failed"
    if reply.status >= 400:
        assert direct[:2] == (reply.status, "application/json")
        error = orjson.loads(reply.body)["error"]
        assert (ended["upstream_status"], ended["error_type"], ended["error_message"]) == (
            reply.status,
            error["type"],
            error["message"],
        )
        assert by_kind(records, "token_usage") == []
        return
    error = error_payload(section)
    assert error is not None
    assert (ended["error_type"], ended["error_message"]) == (error["type"], error["message"])
    assert by_kind(records, "token_usage") == []  # the stream broke off before any usage


# -- Chat Completions --------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "section"), _cases(CHAT_FILES, injected=False))
async def test_recorded_chat_scenario(
    make_gateway: GatewayFactory, upstream: Any, path: Path, section: str
) -> None:
    fx = load_txtar(path)
    reply = Reply.from_section(fx[section])
    gw = await start_openai(make_gateway, upstream.url)
    gw.upstream.default = reply
    if "request" not in fx:
        await check_passthrough(gw, reply)
        return

    streaming = section == "streaming"
    body = dict(orjson.loads(fx["request"]), stream=streaming)
    direct = await post(direct_base(gw), "/chat/completions", body, "sk-direct")
    through = await post(gateway_base(gw), "/chat/completions", body, GATEWAY_KEY)
    [started] = by_kind(await gw.records(), "interception_started")
    iid = started["interception_id"]
    assert (started["provider"], started["model"], started["streaming"]) == (
        "openai",
        body["model"],
        streaming,
    )
    failed = reply.status >= 400 or error_payload(fx[section]) is not None
    expected = direct[2]
    if reply.status < 400:
        expected = expected.replace(chat_section_id(fx[section]).encode(), iid.encode())
    if streaming:
        expected = without_usage_chunk(expected)
    assert through == (direct[0], direct[1], expected)
    if failed:
        await check_failure(gw, fx[section], reply, direct)
        return

    ended = await wait_for_end(gw)
    records = await gw.records()
    assert (ended["interception_id"], ended["status"]) == (iid, "completed")
    [tokens] = by_kind(records, "token_usage")
    assert (tokens["msg_id"], tokens_of(tokens)) == (
        chat_section_id(fx[section]),
        chat_usage(fx[section]),
    )
    [prompt] = by_kind(records, "prompt_usage")
    assert prompt["prompt"] == chat_prompt(body)
    tools = by_kind(records, "tool_usage")
    assert [(t["tool"], t["tool_call_id"], t["args"]) for t in tools] == chat_tool_calls(
        fx[section]
    )
    assert not any(t["injected"] for t in tools)
    sent = gw.upstream.requests[1]
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    forced = {"stream_options": {"include_usage": True}} if streaming else {}
    assert orjson.loads(sent.body) == body | forced

    # The official SDK agrees (asking for usage itself, so nothing is hidden from it).
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").chat.completions.create, body) | forced
    for mode in ("async_create_stream", "sync_stream_helper") if streaming else ("async_blocking",):
        sdk_direct = await run_sdk(direct_base(gw), "sk-direct", mode, chat_call(kwargs))
        sdk_via = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, chat_call(kwargs))
        [*_, last] = by_kind(await gw.records(), "interception_started")
        assert sdk_via == ids_replaced(sdk_direct, last["interception_id"]), mode


def coder_list_workspaces(owner: str) -> str:
    """List the workspaces of a user (a stand-in for the Coder MCP server's tool)."""
    return f"workspaces of {owner}: bob (dd711d5c-83c6-4c08-a0af-b73055906e8c)"


def coder_list_templates() -> str:
    """List the templates of the deployment (a stand-in for the Coder MCP server's tool)."""
    return "templates: codex-test (d85cac35-15a1-4bde-97d9-1f3e4b851246), docker"


def coder_template_version_parameters(template_version_id: str) -> str:
    """The parameters of a template version (a stand-in for the Coder MCP server's tool)."""
    return f"parameters of {template_version_id}: jetbrains_ides"


CODER_TOOLS: list[Callable[..., str]] = [
    coder_list_workspaces,
    coder_list_templates,
    coder_template_version_parameters,
]


async def run_injected(
    make_gateway: GatewayFactory, upstream: Any, sections: list[str], call: Any, mode: str
) -> tuple[Gateway, Any, str]:
    """The recorded two turns through a gateway whose MCP server ``coder`` offers the Coder
    tools the recording called: what the SDK got, and the MCP server's URL."""
    server = McpTestServer("coder")
    for tool in CODER_TOOLS:
        server.add_tool(tool)
    async with running_mcp_server(server) as url:
        gw = await make_gateway(
            providers=[openai_provider(upstream.url)], mcp_servers=[{"id": "coder", "url": url}]
        )
        gw.upstream.enqueue(*(Reply.from_section(s) for s in sections))
        result = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, call)
    return gw, result, url


def check_injected_call(
    records: list[dict[str, Any]], call: dict[str, Any], url: str, follow_input: str
) -> None:
    """One injected tool record for the recorded call, and its MCP result fed back."""
    [tool] = records
    name = call["name"].removeprefix("bmcp_coder_")
    assert (tool["tool"], tool["injected"], tool["server_url"]) == (name, True, url)
    assert tool["tool_call_id"] == call["call_id"]
    assert orjson.loads(tool["args"]) == orjson.loads(call["arguments"])
    assert tool["invocation_error"] == ""
    tool_fn = next(t for t in CODER_TOOLS if t.__name__ == name)
    assert tool_fn(**orjson.loads(call["arguments"])) in follow_input


@pytest.mark.parametrize(("path", "section"), _cases(CHAT_FILES, injected=True))
async def test_recorded_chat_injected_tool(
    make_gateway: GatewayFactory, upstream: Any, path: Path, section: str
) -> None:
    fx = load_txtar(path)
    streaming = section == "streaming"
    sections = [fx[s] for s in replayed_sections(streaming, follow=True)]
    body = orjson.loads(fx["request"])
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").chat.completions.create, body)
    if streaming:
        kwargs["stream_options"] = {"include_usage": True}
    mode = "async_create_stream" if streaming else "async_blocking"
    gw, result, url = await run_injected(make_gateway, upstream, sections, chat_call(kwargs), mode)

    records = await gw.records()
    [started] = by_kind(records, "interception_started")
    iid = started["interception_id"]
    # What the client sees: one completion, the loop's usage (the reference's 105 output tokens).
    total = usage_sum([chat_usage_object(s) for s in sections])
    if streaming:
        assert {c["id"] for c in result} == {iid}
        choices = [ch for c in result for ch in c["choices"]]
        assert all(ch["delta"]["tool_calls"] is None for ch in choices)
        text = "".join(ch["delta"]["content"] or "" for ch in choices)
        assert text == "".join(chat_text(s) for s in sections)
        assert [ch["finish_reason"] for ch in choices if ch["finish_reason"]] == ["stop"]
        [usage] = [c["usage"] for c in result if c["usage"]]
    else:
        assert result["id"] == iid
        [choice] = result["choices"]
        assert choice["message"]["tool_calls"] is None
        assert choice["message"]["content"] == chat_text(sections[-1])
        usage = result["usage"]
    assert strip_none(usage) == total
    assert usage["completion_tokens"] == 105

    first, follow = (orjson.loads(r.body) for r in gw.upstream.requests)
    assert first["parallel_tool_calls"] is False
    [(name, call_id, arguments)] = chat_tool_calls(sections[0])
    assert name in [t["function"]["name"] for t in first["tools"]]
    assistant, tool_result = follow["messages"][-2:]
    assert [c["id"] for c in assistant["tool_calls"]] == [call_id]
    assert (tool_result["role"], tool_result["tool_call_id"]) == ("tool", call_id)
    call = {"name": name, "call_id": call_id, "arguments": arguments}
    check_injected_call(by_kind(records, "tool_usage"), call, url, str(tool_result["content"]))

    tokens = by_kind(records, "token_usage")
    assert [t["msg_id"] for t in tokens] == [chat_section_id(s) for s in sections]
    assert [tokens_of(t) for t in tokens] == [chat_usage(s) for s in sections]
    assert sum(t["input"] for t in tokens) == 5047  # the reference's recorded total
    [prompt] = by_kind(records, "prompt_usage")
    assert prompt["prompt"] == chat_prompt(body)
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"


# -- Responses ---------------------------------------------------------------------------------


def expected_tools(final: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """(name, call id, item id, arguments) of every client tool call of a final response."""
    out = []
    for item in final["output"]:
        if item["type"] == "function_call":
            out.append((item["name"], item["call_id"], item["id"], orjson.loads(item["arguments"])))
        elif item["type"] == "custom_tool_call":
            out.append((item["name"], item["call_id"], item["id"], item["input"]))
    return out


def expected_thoughts(final: dict[str, Any]) -> list[str]:
    """Reasoning summaries and commentary of a final response, in order."""
    return [
        part["text"]
        for item in final["output"]
        for part in (
            item.get("summary", [])
            if item["type"] == "reasoning"
            else item["content"]
            if item.get("phase") == "commentary"
            else []
        )
    ]


@pytest.mark.parametrize(("path", "section"), _cases(RESPONSES_FILES, injected=False))
async def test_recorded_responses_scenario(
    make_gateway: GatewayFactory, upstream: Any, path: Path, section: str
) -> None:
    fx = load_txtar(path)
    reply = Reply.from_section(fx[section])
    gw = await start_openai(make_gateway, upstream.url)
    gw.upstream.default = reply
    streaming = section == "streaming"
    body = orjson.loads(fx["request"])
    if body.get("stream", False) != streaming:
        body["stream"] = streaming
    direct = await post(direct_base(gw), "/responses", body, "sk-direct")
    through = await post(gateway_base(gw), "/responses", body, GATEWAY_KEY)
    assert through == direct  # ids included: Responses bytes are never rewritten
    [started] = by_kind(await gw.records(), "interception_started")
    assert (started["model"], started["streaming"]) == (body["model"], streaming)
    sent = gw.upstream.requests[1]
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent.body == gw.upstream.requests[0].body  # relayed untouched
    if reply.status >= 400 or error_payload(fx[section]) is not None:
        await check_failure(gw, fx[section], reply, direct)
        return

    final = responses_final(fx[section])
    ended = await wait_for_end(gw)
    records = await gw.records()
    assert (ended["interception_id"], ended["status"]) == (started["interception_id"], "completed")
    [tokens] = by_kind(records, "token_usage")
    assert (tokens["msg_id"], tokens_of(tokens)) == (final["id"], responses_usage(final))
    [prompt] = by_kind(records, "prompt_usage")
    assert (prompt["prompt"], prompt["msg_id"]) == (responses_prompt(body), final["id"])
    tools = by_kind(records, "tool_usage")
    assert [
        (t["tool"], t["tool_call_id"], t["item_id"], orjson.loads(t["args"])) for t in tools
    ] == expected_tools(final)
    assert not any(t["injected"] for t in tools)
    assert [t["content"] for t in by_kind(records, "model_thought")] == expected_thoughts(final)

    # The official SDK agrees, in its streaming helper too.
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.create, body)
    for mode in ("async_create_stream", "sync_stream_helper") if streaming else ("async_blocking",):
        sdk_direct = await run_sdk(direct_base(gw), "sk-direct", mode, responses_call(kwargs))
        sdk_via = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, responses_call(kwargs))
        assert sdk_via == sdk_direct, mode


@pytest.mark.parametrize(("path", "section"), _cases(RESPONSES_FILES, injected=True))
async def test_recorded_responses_injected_tool(
    make_gateway: GatewayFactory, upstream: Any, path: Path, section: str
) -> None:
    """``create(stream=True)``: the SDK's ``.stream()`` helper refuses a final response whose id
    differs from ``response.created``'s, which a loop's must (the client chains from it)."""
    fx = load_txtar(path)
    streaming = section == "streaming"
    sections = [fx[s] for s in replayed_sections(streaming, follow=True)]
    finals = [responses_final(s) for s in sections]
    body = orjson.loads(fx["request"])
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.create, body)
    mode = "async_create_stream" if streaming else "async_blocking"
    call = responses_call(kwargs)
    gw, result, url = await run_injected(make_gateway, upstream, sections, call, mode)

    # One response: every visible item of both turns, the injected call hidden, the last
    # upstream response's id, usage summed over the turns.
    visible = [i for f in finals for i in f["output"] if i["type"] != "function_call"]
    if streaming:
        types = [e["type"] for e in result]
        assert (types.count("response.created"), types[-1]) == (1, "response.completed")
        assert [e["sequence_number"] for e in result] == list(range(len(result)))
        added = [e for e in result if e["type"] == "response.output_item.added"]
        assert [e["output_index"] for e in added] == list(range(len(visible)))
        assert [e["item"]["id"] for e in added] == [i["id"] for i in visible]
        assert all((e.get("item") or {}).get("type") != "function_call" for e in result)
        text = "".join(e["delta"] for e in result if e["type"] == "response.output_text.delta")
        assert text == visible[-1]["content"][0]["text"]
        final = result[-1]["response"]
    else:
        final = result
    assert final["id"] == finals[-1]["id"]
    assert [i["id"] for i in final["output"]] == [i["id"] for i in visible]
    assert strip_none(final["usage"]) == usage_sum([f["usage"] for f in finals])

    first, follow = (orjson.loads(r.body) for r in gw.upstream.requests)
    assert first["parallel_tool_calls"] is False
    [recorded] = [i for i in finals[0]["output"] if i["type"] == "function_call"]
    assert recorded["name"] in [t["name"] for t in first["tools"]]
    [output] = [i for i in follow["input"] if i.get("type") == "function_call_output"]
    assert output["call_id"] == recorded["call_id"]
    records = await gw.records()
    check_injected_call(by_kind(records, "tool_usage"), recorded, url, str(output["output"]))
    tokens = by_kind(records, "token_usage")
    assert [t["msg_id"] for t in tokens] == [f["id"] for f in finals]
    assert [tokens_of(t) for t in tokens] == [responses_usage(f) for f in finals]
    [prompt] = by_kind(records, "prompt_usage")
    assert prompt["prompt"] == responses_prompt(body)
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"
