"""The project's own OpenAI fixtures that ``test_openai_sdk.py`` does not replay.

A Chat Completions call of a client's custom (free-form) tool, and upstream errors before any
output (HTTP 400 and 429 with OpenAI's error body and rate-limit headers) for both APIs,
streaming and blocking. The client is the official ``openai`` SDK or raw aiohttp; only the
provider is simulated, replaying the (synthetic) fixture sections. Every expectation is taken
from the fixture itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageCustomToolCall

from gateway.testing import Reply
from tests.conftest import GATEWAY_KEY, Gateway, GatewayFactory, by_kind, wait_for_end
from tests.integration.test_openai_sdk import (
    chat_prompt,
    chat_section_id,
    chat_usage,
    data_payloads,
    direct_base,
    final_object,
    gateway_base,
    ids_replaced,
    openai_fixture,
    post_raw,
    result_ids,
    run_sdk,
    sdk_kwargs,
    start_openai,
    tokens_of,
)

CHAT_MODES = ["async_blocking", "async_create_stream", "sync_blocking", "sync_create_stream"]
ERROR_SCENARIOS = ["pre_stream_rate_limit", "pre_stream_invalid_request"]
PATHS = {"chat": "/chat/completions", "responses": "/responses"}
# The exception class the SDK raises for each status (openai._exceptions).
SDK_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    429: openai.RateLimitError,
}


# -- expectations from the fixtures ---------------------------------------------------------


def custom_calls(section: str) -> list[tuple[str, str, str]]:
    """``(name, id, input)`` of every custom tool call of a chat section, streamed or not."""
    if not section.lstrip().startswith("data:"):
        calls = final_object(section)["choices"][0]["message"]["tool_calls"]
        return [(c["custom"]["name"], c["id"], c["custom"]["input"]) for c in calls]
    slots: dict[int, list[str]] = {}
    for chunk in data_payloads(section):
        for choice in chunk["choices"]:
            for frag in choice["delta"].get("tool_calls") or []:
                slot = slots.setdefault(frag["index"], ["", "", ""])
                custom = frag.get("custom", {})
                slot[0] = custom.get("name") or slot[0]
                slot[1] = frag.get("id") or slot[1]
                slot[2] += custom.get("input", "")
    return [(s[0], s[1], s[2]) for _, s in sorted(slots.items())]


def relayed(headers: Mapping[str, str]) -> dict[str, str]:
    """The provider's request id, retry and rate-limit headers: what a client backs off by."""
    return {
        name.lower(): value
        for name, value in headers.items()
        if name.lower() in ("x-request-id", "retry-after", "retry-after-ms")
        or name.lower().startswith("x-ratelimit-")
    }


def media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


# -- Chat Completions: a custom tool call ---------------------------------------------------


def sdk_custom_calls(result: Any) -> list[tuple[str, str, str, str]]:
    """``(class, name, id, input)`` of the custom calls the SDK gave: typed calls of a
    completion, or the stream's ``type: custom`` deltas joined per index."""
    if not isinstance(result, list):
        return [
            (type(c).__name__, c.custom.name, c.id, c.custom.input)
            for c in result.choices[0].message.tool_calls or []
        ]
    slots: dict[int, list[str]] = {}
    for chunk in result:
        for choice in chunk.choices:
            for frag in choice.delta.tool_calls or []:
                # The SDK types stream deltas as function calls only: ``custom`` is an extra.
                custom = (frag.model_extra or {}).get("custom") or {}
                slot = slots.setdefault(frag.index, ["", "", "", ""])
                slot[0] = frag.type or slot[0]
                slot[1] = custom.get("name") or slot[1]
                slot[2] = frag.id or slot[2]
                slot[3] += custom.get("input", "")
    return [(s[0], s[1], s[2], s[3]) for _, s in sorted(slots.items())]


def chat_objects(kwargs: dict[str, Any]) -> Callable[[Any, str], Any]:
    """The SDK objects one mode of Chat Completions gives the client: the completion or
    every chunk."""

    async def run_async(client: openai.AsyncOpenAI, mode: str) -> Any:
        chat = client.chat.completions
        if mode.endswith("blocking"):
            return await chat.create(**kwargs)
        return [c async for c in await chat.create(**kwargs, stream=True)]

    def run_sync(client: openai.OpenAI, mode: str) -> Any:
        chat = client.chat.completions
        if mode.endswith("blocking"):
            return chat.create(**kwargs)
        return list(chat.create(**kwargs, stream=True))

    return lambda client, mode: (
        run_async(client, mode) if mode.startswith("async") else run_sync(client, mode)
    )


def dumped(result: Any) -> Any:
    if isinstance(result, list):
        return [c.model_dump(warnings=False) for c in result]
    return result.model_dump(warnings=False)


@pytest.mark.parametrize("mode", CHAT_MODES)
async def test_chat_custom_tool_call_reaches_the_sdk_as_a_custom_call(
    make_gateway: GatewayFactory, upstream: Any, mode: str
) -> None:
    fx, body = openai_fixture("chat", "custom_tool")
    streaming = not mode.endswith("blocking")
    section = fx["streaming" if streaming else "non-streaming"]
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(section)
    gw.upstream.enqueue(reply, reply)
    extra = {"stream_options": {"include_usage": True}} if streaming else {}
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").chat.completions.create, body) | extra

    direct = await run_sdk(direct_base(gw), "sk-direct", mode, chat_objects(kwargs))
    via = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, chat_objects(kwargs))

    expected = custom_calls(section)
    assert expected  # the fixture has a custom call
    kind = "custom" if streaming else ChatCompletionMessageCustomToolCall.__name__
    assert sdk_custom_calls(via) == [(kind, *call) for call in expected]
    records = await gw.records()
    [started] = by_kind(records, "interception_started")
    iid = started["interception_id"]
    assert result_ids(dumped(via)) == {iid}
    assert dumped(via) == ids_replaced(dumped(direct), iid)
    [ended] = by_kind(records, "interception_ended")
    assert (ended["interception_id"], ended["status"]) == (iid, "completed")
    [tokens] = by_kind(records, "token_usage")
    assert (tokens["msg_id"], tokens_of(tokens)) == (chat_section_id(section), chat_usage(section))
    [prompt] = by_kind(records, "prompt_usage")
    assert prompt["prompt"] == chat_prompt(body)


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "blocking"])
async def test_chat_custom_tool_call_is_recorded(
    make_gateway: GatewayFactory, upstream: Any, streaming: bool
) -> None:
    fx, body = openai_fixture("chat", "custom_tool")
    section = fx["streaming" if streaming else "non-streaming"]
    gw = await start_openai(make_gateway, upstream.url)
    gw.upstream.enqueue(Reply.from_section(section))
    status, _, _ = await post_raw(gw, PATHS["chat"], orjson.dumps(dict(body, stream=streaming)))
    assert status == 200
    await wait_for_end(gw)
    tools = by_kind(await gw.records(), "tool_usage")
    # Args are JSON text, as for Responses custom calls: the free-form input as a JSON string.
    assert [(t["tool"], t["tool_call_id"], orjson.loads(t["args"])) for t in tools] == [
        (name, call_id, text) for name, call_id, text in custom_calls(section)
    ]
    assert all(t["msg_id"] == chat_section_id(section) and not t["injected"] for t in tools)


# -- errors before any output -----------------------------------------------------------------


async def ended_records(gw: Gateway, count: int, within: float = 10.0) -> list[dict[str, Any]]:
    """The ``interception_ended`` records, once the spool holds ``count`` of them."""
    async with asyncio.timeout(within):
        while True:
            ended = by_kind(await gw.records(), "interception_ended")
            if len(ended) >= count:
                return ended
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "blocking"])
@pytest.mark.parametrize("scenario", ERROR_SCENARIOS)
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_pre_stream_error_reaches_the_client_as_the_provider_sent_it(
    make_gateway: GatewayFactory, upstream: Any, api: str, scenario: str, streaming: bool
) -> None:
    fx, body = openai_fixture(api, scenario)
    reply = Reply.from_section(
        fx["http-error/streaming" if streaming else "http-error/non-streaming"]
    )
    error = orjson.loads(reply.body)["error"]
    gw = await start_openai(make_gateway, upstream.url)
    gw.upstream.enqueue(reply, reply)

    async with openai.AsyncOpenAI(
        base_url=gateway_base(gw), api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        create = client.chat.completions.create if api == "chat" else client.responses.create
        with pytest.raises(openai.APIStatusError) as caught:
            await create(**sdk_kwargs(create, body), stream=streaming)
    exc = caught.value
    assert type(exc) is SDK_ERRORS[reply.status]
    assert exc.status_code == reply.status
    assert exc.body == error
    assert (exc.type, exc.code, exc.param) == (error["type"], error["code"], error["param"])
    assert error["message"] in exc.message
    assert relayed(exc.response.headers) == relayed(reply.headers)

    raw = orjson.dumps(dict(body, stream=streaming))
    status, received, headers = await post_raw(gw, PATHS[api], raw)
    assert (status, received) == (reply.status, reply.body)
    # The media type is kept (a charset parameter is not: JSON is UTF-8 whatever it says).
    assert media_type(headers["Content-Type"]) == media_type(reply.headers["Content-Type"])
    assert relayed(headers) == relayed(reply.headers)

    # One upstream call per client request: an error is relayed, not retried.
    assert [r.path for r in gw.upstream.requests] == [f"/v1{PATHS[api]}"] * 2
    assert orjson.loads(gw.upstream.requests[1].body)["model"] == body["model"]
    ended = await ended_records(gw, 2)
    assert [
        (e["status"], e["upstream_status"], e["error_type"], e["error_message"]) for e in ended
    ] == [("failed", reply.status, error["type"], error["message"])] * 2
    records = await gw.records()
    assert by_kind(records, "token_usage") == []
    assert [s["streaming"] for s in by_kind(records, "interception_started")] == [streaming] * 2
