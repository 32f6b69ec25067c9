"""Parse and validate an Anthropic Messages request body without rebuilding it (pure).

The body stays the bytes the client sent: unknown fields, key order and whitespace all reach the
provider untouched. Parsing only serves validation, routing (``stream``, ``model``) and the records
(prompt, correlating tool-call id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Raised by every dialect's parser (the shell catches it): re-exported for this one's callers.
from gateway.intercept.dialect import RequestError as RequestError
from gateway.intercept.dialect import json_object, required_model


@dataclass(slots=True)  # not frozen: built on every request (see gateway.records)
class MessagesRequest:
    """A validated Messages request: the raw body plus what the gateway needs to know about it."""

    body: bytes
    parsed: dict[str, Any]
    model: str
    stream: bool
    prompt: str | None
    correlating_tool_call_id: str | None


_ONLY_OBJECTS = frozenset({dict})  # orjson builds every JSON object as exactly a dict


def parse_request(body: bytes) -> MessagesRequest:
    """Validate ``body``; raise :class:`RequestError` (400) naming the offending field."""
    parsed = json_object(body)
    model = required_model(parsed)
    messages = parsed.get("messages")
    if messages is None:
        raise RequestError(400, "messages: field required")
    if not isinstance(messages, list):
        raise RequestError(400, "messages: expected an array")
    if not _ONLY_OBJECTS.issuperset(map(type, messages)):
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise RequestError(400, f"messages.{i}: expected an object")
    stream = parsed.get("stream", False)
    if stream is not False and stream is not True:
        raise RequestError(400, "stream: expected a boolean")
    max_tokens = parsed.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise RequestError(400, "max_tokens: expected an integer")
    prompt: str | None = None
    tool_call_id: str | None = None
    if messages:
        last = messages[-1]
        content = last.get("content")
        if isinstance(content, str):
            if last.get("role") == "user":
                prompt = content
        elif isinstance(content, list):
            prompt = last_user_prompt(messages)
            tool_call_id = correlating_tool_call_id(messages)
    return MessagesRequest(body, parsed, model, stream, prompt, tool_call_id)


def last_user_prompt(messages: list[Any]) -> str | None:
    """The text of the last message when it is the user's: a string, or its last text block."""
    if not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for block in reversed(content):
            if isinstance(block, dict) and block.get("type") == "text":
                text = block.get("text")
                if isinstance(text, str):
                    return text
    return None


def correlating_tool_call_id(messages: list[Any]) -> str | None:
    """The ``tool_use_id`` of the last ``tool_result`` in the last message, linking turns."""
    if not messages or not isinstance(messages[-1], dict):
        return None
    content = messages[-1].get("content")
    if not isinstance(content, list):
        return None
    for block in reversed(content):
        if isinstance(block, dict) and block.get("type") == "tool_result":
            tool_use_id = block.get("tool_use_id")
            if isinstance(tool_use_id, str) and tool_use_id:
                return tool_use_id
    return None
