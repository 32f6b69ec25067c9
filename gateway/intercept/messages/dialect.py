"""Anthropic Messages as the shell sees it: the provider type and the dialect (pure)."""

from __future__ import annotations

from gateway.intercept.dialect import Dialect, KeyScheme, ProviderApi, ToolShapes, prompt_only
from gateway.intercept.errors import (
    anthropic_error_body,
    anthropic_error_event,
    anthropic_relayed_error_event,
)
from gateway.intercept.messages.blocking import BlockingTurns
from gateway.intercept.messages.request import parse_request
from gateway.intercept.messages.stream import MessagesStream
from gateway.intercept.messages.tools import continuation
from gateway.intercept.passthrough_paths import ID, PassthroughRoute
from gateway.sse.keepalive import ANTHROPIC_PING
from gateway.tools.results import anthropic_tool_error, anthropic_tool_result
from gateway.tools.schema import anthropic_tool, inject_anthropic_tools

# Anthropic endpoints safe to relay with the central key: reads and token counting. Other methods
# on these paths get 405 (a central key may be an admin key).
PASSTHROUGH: tuple[PassthroughRoute, ...] = (
    ("GET", ("v1", "models")),
    ("GET", ("v1", "models", ID)),
    ("POST", ("v1", "messages", "count_tokens")),
)

ANTHROPIC = ProviderApi(
    type="anthropic",
    keys=KeyScheme(header="x-api-key", prefix="", label="x-api-key"),
    error_body=anthropic_error_body,
    passthrough=PASSTHROUGH,
)


MESSAGES = Dialect(
    name="messages",
    provider=ANTHROPIC,
    path="/v1/messages",
    parse_request=parse_request,
    stream=prompt_only(MessagesStream),
    blocking=prompt_only(BlockingTurns),
    error_event=anthropic_error_event,
    relayed_error_event=anthropic_relayed_error_event,
    keepalive=ANTHROPIC_PING,
    terminal_event="message_stop",
    tools=ToolShapes(
        definition=anthropic_tool,
        inject=inject_anthropic_tools,
        result=anthropic_tool_result,
        error=anthropic_tool_error,
        continuation=continuation,
    ),
)
