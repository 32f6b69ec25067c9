"""SDK-driven helpers shared by the integration tests: run a request, check its records."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import orjson
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message

from control.spool import SpooledRecord
from tests.conftest import by_kind

MODES = [
    "async_stream_helper",
    "async_create_stream",
    "async_blocking",
    "sync_stream_helper",
    "sync_create_stream",
    "sync_blocking",
]


async def run_async(client: anthropic.AsyncAnthropic, mode: str, body: dict[str, Any]) -> Message:
    if mode == "async_stream_helper":
        async with client.messages.stream(**body) as stream:
            return await stream.get_final_message()
    if mode == "async_create_stream":
        events = await client.messages.create(**body, stream=True)
        snapshot = None
        json_bufs: dict[int, Any] = {}
        async for event in events:
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
        assert snapshot is not None
        return snapshot
    message: Message = await client.messages.create(**body)
    return message


def run_sync(client: anthropic.Anthropic, mode: str, body: dict[str, Any]) -> Message:
    if mode == "sync_stream_helper":
        with client.messages.stream(**body) as stream:
            return stream.get_final_message()
    if mode == "sync_create_stream":
        events = client.messages.create(**body, stream=True)
        snapshot = None
        json_bufs: dict[int, Any] = {}
        for event in events:
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
        assert snapshot is not None
        return snapshot
    message: Message = client.messages.create(**body)
    return message


def sdk_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """The request body as SDK arguments; fields the SDK may not know travel in ``extra_body``."""
    known = ("model", "max_tokens", "messages", "tools", "system", "thinking")
    kwargs = {k: body[k] for k in known if k in body}
    extra = {k: v for k, v in body.items() if k not in known and k != "stream"}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


async def final_message(base_url: str, api_key: str, mode: str, body: dict[str, Any]) -> Message:
    """Run ``body`` with the official SDK in ``mode`` and return the SDK's final message."""
    body = sdk_kwargs(body)
    if mode.startswith("async"):
        async with anthropic.AsyncAnthropic(
            base_url=base_url, api_key=api_key, max_retries=0
        ) as client:
            return await run_async(client, mode, body)

    def call() -> Message:
        with anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0) as client:
            return run_sync(client, mode, body)

    # The gateway runs in this loop: a blocking client must run in a thread.
    return await asyncio.to_thread(call)


def expected_prompt(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    texts = [block["text"] for block in content if block.get("type") == "text"]
    return str(texts[-1])


def assert_records_match(
    records: list[SpooledRecord], body: dict[str, Any], direct: Message, gateway_id: str
) -> None:
    """The spool holds exactly one interception whose records match the provider's message."""
    [started] = by_kind(records, "interception_started")
    assert started["interception_id"] == gateway_id
    assert started["model"] == body["model"]
    ended = by_kind(records, "interception_ended")
    assert [(e["interception_id"], e["status"]) for e in ended] == [(gateway_id, "completed")]

    usage = direct.usage
    [tokens] = by_kind(records, "token_usage")
    assert tokens["msg_id"] == direct.id
    assert (tokens["input"], tokens["output"]) == (usage.input_tokens, usage.output_tokens)
    assert tokens["cache_read"] == (usage.cache_read_input_tokens or 0)
    assert tokens["cache_write"] == (usage.cache_creation_input_tokens or 0)
    split = usage.cache_creation
    assert tokens["cache_write_5m"] == (split.ephemeral_5m_input_tokens if split else 0)
    assert tokens["cache_write_1h"] == (split.ephemeral_1h_input_tokens if split else 0)

    [prompt] = by_kind(records, "prompt_usage")
    assert prompt["prompt"] == expected_prompt(body)
    assert prompt["msg_id"] == direct.id

    tool_blocks = [b for b in direct.content if b.type == "tool_use"]
    tools = by_kind(records, "tool_usage")
    assert [(t["tool"], t["tool_call_id"]) for t in tools] == [(b.name, b.id) for b in tool_blocks]
    assert [orjson.loads(t["args"]) for t in tools] == [b.input for b in tool_blocks]
    assert all(t["injected"] is False for t in tools)

    thoughts = [b.thinking for b in direct.content if b.type == "thinking" and b.thinking]
    assert [t["content"] for t in by_kind(records, "model_thought")] == thoughts
    assert all(t["source"] == "thinking" for t in by_kind(records, "model_thought"))
