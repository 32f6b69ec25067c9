"""OpenAI Responses as the shell sees it: ``/v1/responses`` and ``/v1/responses/compact`` (pure).

Both share everything but their path and name; a compaction request gets no injected tools.
"""

from __future__ import annotations

import dataclasses

from gateway.intercept.dialect import Dialect, Injected, ToolShapes
from gateway.intercept.openai.provider import OPENAI
from gateway.intercept.responses.blocking import BlockingTurns
from gateway.intercept.responses.events import KEEPALIVE, error_event, relayed_error_event
from gateway.intercept.responses.request import ResponsesRequest, parse_request
from gateway.intercept.responses.stream import ResponsesStream
from gateway.intercept.responses.tools import (
    continuation,
    function_call_error,
    function_call_output,
    function_tool,
    inject_tools,
    refuse_tools,
)

_TOOLS = ToolShapes(
    definition=function_tool,
    inject=inject_tools,
    result=function_call_output,
    error=function_call_error,
    continuation=continuation,
)


def _stream(
    interception_id: str, request: ResponsesRequest, injected: Injected | None
) -> ResponsesStream:
    return ResponsesStream(
        interception_id,
        request.prompt,
        injected,
        request.client_parallel_tool_calls,
        request.store,
    )


def _blocking(
    interception_id: str, request: ResponsesRequest, injected: Injected | None
) -> BlockingTurns:
    return BlockingTurns(
        interception_id,
        request.prompt,
        injected,
        request.client_parallel_tool_calls,
        request.store,
    )


RESPONSES = Dialect(
    name="responses",
    provider=OPENAI,
    path="/v1/responses",
    parse_request=parse_request,
    stream=_stream,
    blocking=_blocking,
    error_event=error_event,
    relayed_error_event=relayed_error_event,
    keepalive=KEEPALIVE,
    terminal_event="response.completed",
    tools=_TOOLS,
)


def parse_compaction(body: bytes) -> ResponsesRequest:
    """A compaction request: validated like any, but with no prompt of its own to record (its
    last user item is the conversation's, recorded when it was asked)."""
    return dataclasses.replace(parse_request(body), prompt=None)


# Codex's remote compaction: relayed and accounted like any response, but no prompt of its own
# and no injected tools (the shell skips them; its inject refuses them all the same).
COMPACT = dataclasses.replace(
    RESPONSES,
    name="responses_compact",
    path="/v1/responses/compact",
    parse_request=parse_compaction,
    tools=dataclasses.replace(_TOOLS, inject=refuse_tools),
    injects_tools=False,
)
