"""The official openai SDK through the gateway gets what it gets from the provider directly.

Chat Completions and Responses, async and sync, blocking, ``create(stream=True)`` and the SDK's
``.stream()`` helpers. Each scenario replays the same (synthetic) fixture section twice against
the same fake upstream: once direct, once through the gateway. The results must be equal but for
the documented rewrite (a chat completion's id becomes the interception id; Responses ids are
never rewritten), and the spool must hold the records the fixture implies, computed from the
fixture's own usage objects.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import zstandard

from gateway.testing import Reply, load_txtar
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    by_kind,
    metric_value,
    wait_for_end,
)

OPENAI_KEY = "sk-central-openai-0123456789abcdef"
MODES = [
    "async_blocking",
    "async_create_stream",
    "async_stream_helper",
    "sync_blocking",
    "sync_create_stream",
    "sync_stream_helper",
]
CHAT_SCENARIOS = ["text", "parallel_tools", "reasoning_cached"]
RESPONSES_SCENARIOS = [
    "text",
    "client_tools_parallel",
    "reasoning_summary",
    "cached_tokens",
    "custom_tool",
    "unknown_item",
]


def openai_provider(upstream_url: str, **extra: Any) -> dict[str, Any]:
    """Settings of an ``openai`` provider in front of ``upstream_url`` with the central key."""
    return {
        "name": "openai",
        "type": "openai",
        "base_url": upstream_url + "/v1",
        "api_key": OPENAI_KEY,
        **extra,
    }


async def start_openai(make_gateway: GatewayFactory, upstream_url: str, **kw: Any) -> Gateway:
    """A gateway whose only provider is ``openai``."""
    return await make_gateway(providers=[openai_provider(upstream_url)], **kw)


def gateway_base(gw: Gateway) -> str:
    """What an OpenAI SDK takes as ``base_url`` to go through the gateway."""
    return f"{gw.root}/openai/v1"


def direct_base(gw: Gateway) -> str:
    """``base_url`` of the fake provider itself."""
    return f"{gw.upstream.url}/v1"


def openai_fixture(api: str, scenario: str) -> tuple[dict[str, str], dict[str, Any]]:
    fx = load_txtar(FIXTURES / "openai" / api / f"{scenario}.txtar")
    return fx, orjson.loads(fx["request"])


def sdk_kwargs(fn: Callable[..., Any], body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as arguments of the SDK method ``fn``; what it does not know goes in extra_body."""
    known = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in body.items() if k in known and k != "stream"}
    extra = {k: v for k, v in body.items() if k not in known and k != "stream"}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def data_payloads(section: str) -> list[dict[str, Any]]:
    """The JSON ``data:`` payloads of an SSE section, in order (``[DONE]`` left out)."""
    out = []
    for line in section.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


def final_object(section: str, key: str | None = None) -> dict[str, Any]:
    """A blocking section's body, or the last SSE payload carrying ``key`` (unwrapped)."""
    if not section.lstrip().startswith(("event:", "data:")):
        body: dict[str, Any] = orjson.loads(section)
        return body
    found = [p for p in data_payloads(section) if key is None or p.get(key)]
    return found[-1][key] if key else found[-1]


# -- running the SDK -------------------------------------------------------------------------


async def run_sdk(
    base_url: str, key: str, mode: str, call: Callable[[Any, str], Any], **client_kw: Any
) -> Any:
    """``call(client, mode)`` with an async client, or a sync one in a thread (the gateway
    runs in this loop). ``call`` returns a plain JSON-like value to compare."""
    if mode.startswith("async"):
        async with openai.AsyncOpenAI(
            base_url=base_url, api_key=key, max_retries=0, **client_kw
        ) as client:
            return await call(client, mode)

    def sync() -> Any:
        with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, **client_kw) as client:
            return call(client, mode)

    return await asyncio.to_thread(sync)


def chat_call(kwargs: dict[str, Any]) -> Callable[[Any, str], Any]:
    """What one mode of Chat Completions gives the client: the completion (blocking, helper)
    or every chunk (``create(stream=True)``), dumped."""

    async def run_async(client: openai.AsyncOpenAI, mode: str) -> Any:
        chat = client.chat.completions
        if mode.endswith("blocking"):
            return (await chat.create(**kwargs)).model_dump(warnings=False)
        if mode.endswith("create_stream"):
            return [
                c.model_dump(warnings=False) async for c in await chat.create(**kwargs, stream=True)
            ]
        async with chat.stream(**kwargs) as stream:
            return (await stream.get_final_completion()).model_dump(warnings=False)

    def run_sync(client: openai.OpenAI, mode: str) -> Any:
        chat = client.chat.completions
        if mode.endswith("blocking"):
            return chat.create(**kwargs).model_dump(warnings=False)
        if mode.endswith("create_stream"):
            return [c.model_dump(warnings=False) for c in chat.create(**kwargs, stream=True)]
        with chat.stream(**kwargs) as stream:
            return stream.get_final_completion().model_dump(warnings=False)

    return lambda client, mode: (
        run_async(client, mode) if mode.startswith("async") else run_sync(client, mode)
    )


def responses_call(kwargs: dict[str, Any]) -> Callable[[Any, str], Any]:
    """What one mode of Responses gives the client: the response or every event, dumped."""

    async def run_async(client: openai.AsyncOpenAI, mode: str) -> Any:
        if mode.endswith("blocking"):
            return (await client.responses.create(**kwargs)).model_dump(warnings=False)
        if mode.endswith("create_stream"):
            events = await client.responses.create(**kwargs, stream=True)
            return [e.model_dump(warnings=False) async for e in events]
        async with client.responses.stream(**kwargs) as stream:
            return (await stream.get_final_response()).model_dump(warnings=False)

    def run_sync(client: openai.OpenAI, mode: str) -> Any:
        if mode.endswith("blocking"):
            return client.responses.create(**kwargs).model_dump(warnings=False)
        if mode.endswith("create_stream"):
            return [
                e.model_dump(warnings=False) for e in client.responses.create(**kwargs, stream=True)
            ]
        with client.responses.stream(**kwargs) as stream:
            return stream.get_final_response().model_dump(warnings=False)

    return lambda client, mode: (
        run_async(client, mode) if mode.startswith("async") else run_sync(client, mode)
    )


def ids_replaced(result: Any, new_id: str) -> Any:
    """A chat result with its completion id (or every chunk's) set to ``new_id``."""
    if isinstance(result, list):
        return [dict(chunk, id=new_id) for chunk in result]
    return dict(result, id=new_id)


def result_ids(result: Any) -> set[str]:
    return {c["id"] for c in result} if isinstance(result, list) else {result["id"]}


# -- expectations from the fixtures ---------------------------------------------------------


def chat_usage(section: str) -> dict[str, int]:
    """The normalised token usage one chat section reports (records' arithmetic)."""
    usage = final_object(section, "usage") if section.lstrip().startswith("data:") else None
    usage = usage or final_object(section)["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {
        "input": usage["prompt_tokens"] - cached,
        "cache_read": cached,
        "output": usage["completion_tokens"],
        "reasoning": usage["completion_tokens_details"]["reasoning_tokens"],
    }


def chat_section_id(section: str) -> str:
    return str((data_payloads(section) or [final_object(section)])[0]["id"])


def chat_tool_calls(section: str) -> list[tuple[str, str, str]]:
    """``(name, id, arguments)`` of every tool call of a chat section, streamed or not."""
    if not section.lstrip().startswith("data:"):
        calls = final_object(section)["choices"][0]["message"].get("tool_calls") or []
        return [(c["function"]["name"], c["id"], c["function"]["arguments"]) for c in calls]
    slots: dict[int, list[str]] = {}
    for chunk in data_payloads(section):
        for choice in chunk.get("choices", []):
            for frag in choice["delta"].get("tool_calls") or []:
                slot = slots.setdefault(frag["index"], ["", "", ""])
                slot[0] = frag.get("function", {}).get("name") or slot[0]
                slot[1] = frag.get("id") or slot[1]
                slot[2] += frag.get("function", {}).get("arguments", "")
    return [(s[0], s[1], s[2]) for _, s in sorted(slots.items())]


def chat_prompt(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else str(content[-1]["text"])


def responses_final(section: str) -> dict[str, Any]:
    """The final response object of a Responses section (terminal event or blocking body)."""
    return (
        final_object(section, "response")
        if section.lstrip().startswith("event:")
        else (final_object(section))
    )


def responses_usage(response: dict[str, Any]) -> dict[str, int]:
    usage = response["usage"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    return {
        "input": usage["input_tokens"] - cached,
        "cache_read": cached,
        "output": usage["output_tokens"],
        "reasoning": usage["output_tokens_details"]["reasoning_tokens"],
    }


def tokens_of(record: dict[str, Any]) -> dict[str, int]:
    return {k: record[k] for k in ("input", "cache_read", "output", "reasoning")}


def responses_prompt(body: dict[str, Any]) -> str:
    items = body["input"]
    if isinstance(items, str):
        return items
    content = items[-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p["type"] == "input_text")


# -- Chat Completions ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", CHAT_SCENARIOS)
async def test_chat_result_equals_direct_but_for_the_id(
    make_gateway: GatewayFactory, upstream: Any, scenario: str, mode: str
) -> None:
    fx, body = openai_fixture("chat", scenario)
    streaming = not mode.endswith("blocking")
    section = fx["streaming" if streaming else "non-streaming"]
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(section)
    gw.upstream.enqueue(reply, reply)
    extra = {"stream_options": {"include_usage": True}} if streaming else {}
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").chat.completions.create, body) | extra

    direct = await run_sdk(direct_base(gw), "sk-direct", mode, chat_call(kwargs))
    via = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, chat_call(kwargs))

    records = await gw.records()
    [started] = by_kind(records, "interception_started")
    iid = started["interception_id"]
    assert result_ids(via) == {iid}
    assert via == ids_replaced(direct, iid)
    assert (started["model"], started["streaming"]) == (body["model"], streaming)
    assert [
        (e["interception_id"], e["status"]) for e in by_kind(records, "interception_ended")
    ] == [(iid, "completed")]
    [tokens] = by_kind(records, "token_usage")
    assert tokens["msg_id"] == chat_section_id(section)
    assert tokens_of(tokens) == chat_usage(section)
    [prompt] = by_kind(records, "prompt_usage")
    assert prompt["prompt"] == chat_prompt(body)
    tools = by_kind(records, "tool_usage")
    assert [(t["tool"], t["tool_call_id"], t["args"]) for t in tools] == chat_tool_calls(section)
    assert all(not t["injected"] for t in tools)
    # What went upstream: the central key, never the gateway's, and usage asked for.
    sent = gw.upstream.requests[-1]
    assert (sent.path, sent.headers["authorization"]) == (
        "/v1/chat/completions",
        f"Bearer {OPENAI_KEY}",
    )
    assert GATEWAY_KEY not in str(dict(sent.headers))


@pytest.mark.parametrize(
    "mode", ["async_create_stream", "sync_create_stream", "async_stream_helper"]
)
async def test_chat_usage_chunk_hidden_when_the_client_did_not_ask(
    make_gateway: GatewayFactory, upstream: Any, mode: str
) -> None:
    fx, body = openai_fixture("chat", "reasoning_cached")
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(fx["streaming"])
    gw.upstream.enqueue(reply, reply)
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").chat.completions.create, body)

    direct = await run_sdk(direct_base(gw), "sk-direct", mode, chat_call(kwargs))
    via = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, chat_call(kwargs))

    [started] = by_kind(await gw.records(), "interception_started")
    iid = started["interception_id"]
    if mode.endswith("create_stream"):
        # The direct replay has the usage-only chunk; the gateway hides exactly that one.
        shown = [c for c in direct if c["usage"] is None]
        assert len(shown) == len(direct) - 1
        assert via == ids_replaced(shown, iid)
    else:
        assert direct["usage"] is not None
        assert via["usage"] is None
        assert dict(via, usage=None) == dict(direct, id=iid, usage=None)
    # The gateway asked for usage itself and recorded it.
    assert orjson.loads(gw.upstream.requests[-1].body)["stream_options"] == {"include_usage": True}
    [tokens] = by_kind(await gw.records(), "token_usage")
    assert tokens_of(tokens) == chat_usage(fx["streaming"])


async def test_chat_mid_stream_error_reaches_the_sdk(
    make_gateway: GatewayFactory, upstream: Any
) -> None:
    fx, body = openai_fixture("chat", "mid_stream_error")
    gw = await start_openai(make_gateway, upstream.url)
    gw.upstream.enqueue(Reply.from_section(fx["streaming"]))
    [error] = [p["error"] for p in data_payloads(fx["streaming"]) if "error" in p]
    text = ""
    async with openai.AsyncOpenAI(
        base_url=gateway_base(gw), api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        stream = await client.chat.completions.create(**body, stream=True)
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
    assert caught.value.message == error["message"]
    assert text == "Once upon"
    ended = await wait_for_end(gw)
    assert ended["status"] == "failed"
    assert ended["error_message"] == error["message"]


# -- Responses -------------------------------------------------------------------------------


# The SDK's stream helper dumps an item type it does not know (unknown_item) with warnings.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", RESPONSES_SCENARIOS)
async def test_responses_result_equals_direct(
    make_gateway: GatewayFactory, upstream: Any, scenario: str, mode: str
) -> None:
    fx, body = openai_fixture("responses", scenario)
    streaming = not mode.endswith("blocking")
    section = fx["streaming" if streaming else "non-streaming"]
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(section)
    gw.upstream.enqueue(reply, reply)
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.create, body)

    direct = await run_sdk(direct_base(gw), "sk-direct", mode, responses_call(kwargs))
    via = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, responses_call(kwargs))

    assert via == direct  # ids included: never rewritten
    records = await gw.records()
    [started] = by_kind(records, "interception_started")
    iid = started["interception_id"]
    assert (started["model"], started["streaming"]) == (body["model"], streaming)
    assert [
        (e["interception_id"], e["status"]) for e in by_kind(records, "interception_ended")
    ] == [(iid, "completed")]
    final = responses_final(section)
    [tokens] = by_kind(records, "token_usage")
    assert tokens["msg_id"] == final["id"]
    assert tokens_of(tokens) == responses_usage(final)
    [prompt] = by_kind(records, "prompt_usage")
    assert (prompt["prompt"], prompt["msg_id"]) == (responses_prompt(body), final["id"])
    calls = [i for i in final["output"] if i["type"] in ("function_call", "custom_tool_call")]
    tools = by_kind(records, "tool_usage")
    assert [(t["tool"], t["tool_call_id"]) for t in tools] == [
        (c["name"], c["call_id"]) for c in calls
    ]
    for tool, call in zip(tools, calls, strict=True):
        raw = call["arguments"] if call["type"] == "function_call" else call["input"]
        assert orjson.loads(tool["args"]) == (
            orjson.loads(raw) if call["type"] == "function_call" else raw
        )
    thoughts = [
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
    assert [t["content"] for t in by_kind(records, "model_thought")] == thoughts
    sent = gw.upstream.requests[-1]
    assert (sent.path, sent.headers["authorization"]) == ("/v1/responses", f"Bearer {OPENAI_KEY}")


async def post_raw(
    gw: Gateway, path: str, body: bytes, **headers: str
) -> tuple[int, bytes, dict[str, str]]:
    """POST ``body`` to the gateway's openai route with the gateway key; status, bytes, headers."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(
            f"{gateway_base(gw)}{path}",
            data=body,
            headers={
                "Authorization": f"Bearer {GATEWAY_KEY}",
                "Content-Type": "application/json",
                **headers,
            },
        ) as r,
    ):
        return r.status, await r.read(), dict(r.headers)


@pytest.mark.parametrize("section", ["streaming", "non-streaming"])
async def test_responses_bytes_are_the_providers(
    make_gateway: GatewayFactory, upstream: Any, section: str
) -> None:
    fx, body = openai_fixture("responses", "reasoning_summary")
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(fx[section])
    gw.upstream.enqueue(reply)
    raw = orjson.dumps(dict(body, stream=section == "streaming"))
    status, received, _ = await post_raw(gw, "/responses", raw)
    assert (status, received) == (200, reply.body)
    assert gw.upstream.requests[0].body == raw


@pytest.mark.parametrize(
    ("scenario", "status", "error_type"),
    [
        ("response_failed", "failed", "server_error"),
        ("response_incomplete", "incomplete", "response_incomplete"),
    ],
)
async def test_responses_failed_or_incomplete_is_relayed_and_recorded(
    make_gateway: GatewayFactory, upstream: Any, scenario: str, status: str, error_type: str
) -> None:
    fx, body = openai_fixture("responses", scenario)
    gw = await start_openai(make_gateway, upstream.url)
    gw.upstream.enqueue(Reply.from_section(fx["streaming"]))
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.create, body)
    async with openai.AsyncOpenAI(
        base_url=gateway_base(gw), api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        events = [e async for e in await client.responses.create(**kwargs, stream=True)]
    final = responses_final(fx["streaming"])
    assert events[-1].type == f"response.{final['status']}"
    assert events[-1].to_dict(warnings=False)["response"] == final
    ended = await wait_for_end(gw)
    records = await gw.records()
    assert (ended["status"], ended["error_type"]) == (status, error_type)
    if final["error"]:
        assert ended["error_message"] == final["error"]["message"]
    else:
        assert final["incomplete_details"]["reason"] in ended["error_message"]
    [tokens] = by_kind(records, "token_usage")
    assert tokens_of(tokens) == responses_usage(final)


async def test_responses_mid_stream_error_is_relayed_and_recorded(
    make_gateway: GatewayFactory, upstream: Any
) -> None:
    fx, body = openai_fixture("responses", "mid_stream_error")
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(fx["streaming"])
    gw.upstream.enqueue(reply)
    status, received, _ = await post_raw(gw, "/responses", orjson.dumps(body))
    assert (status, received) == (200, reply.body)
    [error] = [p for p in data_payloads(fx["streaming"]) if p["type"] == "error"]
    ended = await wait_for_end(gw)
    assert (ended["status"], ended["error_type"], ended["error_message"]) == (
        "failed",
        error["code"],
        error["message"],
    )
    assert by_kind(await gw.records(), "token_usage") == []  # cut before any usage


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_compaction_is_relayed_and_accounted(
    make_gateway: GatewayFactory, upstream: Any, mode: str
) -> None:
    fx, body = openai_fixture("responses", "compact")
    # A history that ends with a user message (older Codex builds send no compaction_trigger).
    later = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]}
    body = dict(body, input=[*body["input"][:-1], later])
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(fx["non-streaming"])
    gw.upstream.enqueue(reply, reply)
    kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.compact, body)

    def call(client: Any, _: str) -> Any:
        async def run() -> Any:
            return (await client.responses.compact(**kwargs)).model_dump(warnings=False)

        if isinstance(client, openai.AsyncOpenAI):
            return run()
        return client.responses.compact(**kwargs).model_dump(warnings=False)

    direct = await run_sdk(direct_base(gw), "sk-direct", mode, call)
    via = await run_sdk(gateway_base(gw), GATEWAY_KEY, mode, call)
    assert via == direct
    assert gw.upstream.requests[-1].path == "/v1/responses/compact"
    assert orjson.loads(gw.upstream.requests[-1].body) == orjson.loads(gw.upstream.requests[0].body)
    records = await gw.records()
    final = orjson.loads(fx["non-streaming"])
    [tokens] = by_kind(records, "token_usage")
    assert (tokens["msg_id"], tokens_of(tokens)) == (final["id"], responses_usage(final))
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"
    # The history's last user item was recorded when it was asked: not again for its compaction.
    assert by_kind(records, "prompt_usage") == []


async def test_background_response_refused_before_any_upstream_call(
    make_gateway: GatewayFactory, upstream: Any
) -> None:
    gw = await start_openai(make_gateway, upstream.url)
    async with openai.AsyncOpenAI(
        base_url=gateway_base(gw), api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="gpt-4.1", input="hi", background=True)
    assert caught.value.status_code == 400
    assert "background" in caught.value.message
    raw = orjson.dumps({"model": "gpt-4.1", "input": "hi", "background": True})
    status, received, headers = await post_raw(gw, "/responses", raw)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    error = orjson.loads(received)
    assert list(error) == ["error"]
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error"
    assert gw.upstream.requests == []


# -- errors and passthrough -------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_wrong_gateway_key_is_refused_in_openai_shape(
    make_gateway: GatewayFactory, upstream: Any, api: str
) -> None:
    gw = await start_openai(make_gateway, upstream.url)
    _, body = openai_fixture(api, "text")
    async with openai.AsyncOpenAI(
        base_url=gateway_base(gw), api_key="gw-wrong-key-000000000000", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            if api == "chat":
                await client.chat.completions.create(**body)
            else:
                await client.responses.create(**body)
    assert caught.value.status_code == 401
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert "gw-wrong-key" not in caught.value.message
    assert gw.upstream.requests == []


UPSTREAM_ERRORS = [
    (429, openai.RateLimitError, "rate_limit_exceeded", "Rate limit reached for gpt-4.1."),
    (500, openai.InternalServerError, "server_error", "The server had an error."),
]


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize(("status", "exc", "code", "message"), UPSTREAM_ERRORS)
async def test_upstream_error_relayed_with_its_status_and_body(
    make_gateway: GatewayFactory,
    upstream: Any,
    api: str,
    status: int,
    exc: type[openai.APIStatusError],
    code: str,
    message: str,
) -> None:
    gw = await start_openai(make_gateway, upstream.url)
    _, body = openai_fixture(api, "text")
    error = {"message": message, "type": code, "param": None, "code": code}
    gw.upstream.enqueue(
        Reply(status, {"Content-Type": "application/json"}, orjson.dumps({"error": error}))
    )
    async with openai.AsyncOpenAI(
        base_url=gateway_base(gw), api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        with pytest.raises(exc) as caught:
            if api == "chat":
                await client.chat.completions.create(**body, stream=True)
            else:
                await client.responses.create(**body)
    assert caught.value.status_code == status
    assert caught.value.body == error
    ended = await wait_for_end(gw)
    assert (ended["status"], ended["upstream_status"]) == ("failed", status)


async def test_models_list_passes_through_with_the_central_key(
    make_gateway: GatewayFactory, upstream: Any
) -> None:
    gw = await start_openai(make_gateway, upstream.url)
    models = {
        "object": "list",
        "data": [{"id": "gpt-4.1", "object": "model", "created": 1, "owned_by": "openai"}],
    }
    gw.upstream.enqueue(Reply(200, {"Content-Type": "application/json"}, orjson.dumps(models)))
    async with openai.AsyncOpenAI(
        base_url=gateway_base(gw), api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        listed = [m.id async for m in client.models.list()]
    assert listed == ["gpt-4.1"]
    [sent] = gw.upstream.requests
    assert (sent.method, sent.path) == ("GET", "/v1/models")
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not any(GATEWAY_KEY in value for value in sent.headers.values())


# -- metrics and request encoding -------------------------------------------------------------


async def test_metrics_count_both_apis_and_the_recorded_tokens(
    make_gateway: GatewayFactory, upstream: Any
) -> None:
    gw = await start_openai(make_gateway, upstream.url)
    chat_fx, chat_body = openai_fixture("chat", "reasoning_cached")
    resp_fx, resp_body = openai_fixture("responses", "cached_tokens")
    gw.upstream.enqueue(
        Reply.from_section(chat_fx["streaming"]),
        Reply.from_section(chat_fx["non-streaming"]),
        Reply.from_section(resp_fx["streaming"]),
    )
    chat_kwargs = sdk_kwargs(openai.OpenAI(api_key="x").chat.completions.create, chat_body)
    resp_kwargs = sdk_kwargs(openai.OpenAI(api_key="x").responses.create, resp_body)
    base = gateway_base(gw)
    await run_sdk(base, GATEWAY_KEY, "async_create_stream", chat_call(chat_kwargs))
    await run_sdk(base, GATEWAY_KEY, "sync_blocking", chat_call(chat_kwargs))
    await run_sdk(base, GATEWAY_KEY, "async_stream_helper", responses_call(resp_kwargs))

    url = gw.metrics_url
    for api, count in (("chat", 2), ("responses", 1)):
        labels = {"provider": "openai", "api": api, "status": "completed"}
        assert await metric_value(url, "aibridged_interceptions_total", **labels) == count
    records = await gw.records()
    tokens = by_kind(records, "token_usage")
    assert len(tokens) == 3

    def started_with(model: str) -> set[str]:
        started = by_kind(records, "interception_started")
        return {s["interception_id"] for s in started if s["model"] == model}

    for kind in ("input", "output", "cache_read", "reasoning"):
        expected = sum(t[kind] for t in tokens)
        assert expected > 0
        for model in {chat_body["model"], resp_body["model"]}:
            of_model = sum(t[kind] for t in tokens if t["interception_id"] in started_with(model))
            labels = {"provider": "openai", "model": model, "type": kind}
            assert await metric_value(url, "aibridged_tokens_total", **labels) == of_model, kind


async def test_zstd_compressed_responses_body_is_decoded_and_relayed(
    make_gateway: GatewayFactory, upstream: Any
) -> None:
    fx, body = openai_fixture("responses", "unknown_item")
    gw = await start_openai(make_gateway, upstream.url)
    reply = Reply.from_section(fx["streaming"])
    gw.upstream.enqueue(reply)
    raw = orjson.dumps(body)
    # Two frames, as a streaming compressor may write them.
    packed = zstandard.compress(raw[:40]) + zstandard.compress(raw[40:])
    status, received, _ = await post_raw(gw, "/responses", packed, **{"Content-Encoding": "zstd"})
    assert (status, received) == (200, reply.body)
    [sent] = gw.upstream.requests
    assert sent.body == raw
    assert "content-encoding" not in sent.headers
    records = await gw.records()
    [prompt] = by_kind(records, "prompt_usage")
    assert prompt["prompt"] == responses_prompt(body)
    [ended] = by_kind(records, "interception_ended")
    assert ended["status"] == "completed"
