"""OpenAI Chat Completions as the shell sees it: the dialect (pure)."""

from __future__ import annotations

import orjson

from gateway.intercept.chat.blocking import ChatBlocking
from gateway.intercept.chat.request import ChatRequest, parse_request
from gateway.intercept.chat.stream import ChatStream
from gateway.intercept.chat.tools import (
    chat_tool,
    chat_tool_error,
    chat_tool_result,
    continuation,
    inject_chat_tools,
)
from gateway.intercept.dialect import Dialect, Injected, ToolShapes, prompt_only
from gateway.intercept.openai.provider import OPENAI, openai_data_error_event

# An SSE comment: every SSE parser skips it, the OpenAI SDKs included.
CHAT_KEEPALIVE = b": ping\n\n"


def relayed_error_event(body: bytes) -> bytes:
    """A ``data:`` chunk carrying the provider's own error body (a refused continuation).

    A ``data:`` field ends at a newline and providers pretty-print error bodies: a JSON body is
    put on one line (same document), anything else on one ``data:`` line per line of it.
    """
    body = body.strip()
    if b"\n" not in body and b"\r" not in body:
        return b"data: " + body + b"\n\n"
    try:
        return b"data: " + orjson.dumps(orjson.loads(body)) + b"\n\n"
    except orjson.JSONDecodeError:
        lines = body.splitlines()
        return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def stream_for(interception_id: str, request: ChatRequest, injected: Injected | None) -> ChatStream:
    """The stream rewriter of ``request``, hiding the usage chunk when the client did not ask."""
    return ChatStream(interception_id, request.prompt, injected, request.client_usage)


CHAT = Dialect(
    name="chat",
    provider=OPENAI,
    path="/v1/chat/completions",
    parse_request=parse_request,
    stream=stream_for,
    blocking=prompt_only(ChatBlocking),
    error_event=openai_data_error_event,
    relayed_error_event=relayed_error_event,
    keepalive=CHAT_KEEPALIVE,
    terminal_event="[DONE]",
    tools=ToolShapes(
        definition=chat_tool,
        inject=inject_chat_tools,
        result=chat_tool_result,
        error=chat_tool_error,
        continuation=continuation,
    ),
)
