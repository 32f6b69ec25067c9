"""Parse a Chat Completions request body without rebuilding it (pure).

The body stays the bytes the client sent, with one exception: a streaming request must carry
``stream_options.include_usage: true``, or the provider reports no usage at all. When the client
did not ask for it, the gateway does, patching the bytes as little as it can, and remembers that
it did (``client_usage``) so the stream rewriter hides the usage-only chunk from that client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.intercept.dialect import RequestError, json_object, required_model

# Appended inside the closing brace of a body that has no ``stream_options``: every other byte
# of the client's body is kept.
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}'


@dataclass(slots=True)  # not frozen: built on every request (see gateway.records)
class ChatRequest:
    """A parsed Chat Completions request: the body to forward plus what the gateway needs."""

    body: bytes
    parsed: dict[str, Any]
    model: str
    stream: bool
    prompt: str | None
    correlating_tool_call_id: str | None
    # Whether the client itself asked for the usage chunk (``stream_options.include_usage``).
    client_usage: bool = False


def parse_request(body: bytes) -> ChatRequest:
    """Validate ``body`` (a JSON object with a ``model`` string); raise :class:`RequestError`.

    Nothing else is refused: unknown fields, and fields of the wrong type, go to the provider,
    which answers them in its own words.
    """
    parsed = json_object(body)
    model = required_model(parsed)
    stream = parsed.get("stream") is True
    messages = parsed.get("messages")
    prompt: str | None = None
    tool_call_id: str | None = None
    if isinstance(messages, list) and messages:
        prompt = last_user_prompt(messages)
        tool_call_id = correlating_tool_call_id(messages)
    client_usage = False
    if stream:
        body, client_usage = force_include_usage(body, parsed)
    return ChatRequest(body, parsed, model, stream, prompt, tool_call_id, client_usage)


def force_include_usage(body: bytes, parsed: dict[str, Any]) -> tuple[bytes, bool]:
    """Make a streaming request ask for usage; ``(body to forward, whether the client asked)``.

    ``parsed`` is changed to match, so that a re-encoded body (injected tools, continuations)
    asks for it too. A body without ``stream_options`` gets it appended; one whose
    ``stream_options`` lacks ``include_usage: true`` is re-encoded (key order kept). A
    ``stream_options`` of another type than an object is the client's error, left to the
    provider.
    """
    options = parsed.get("stream_options", _ABSENT)
    if options is _ABSENT:
        parsed["stream_options"] = {"include_usage": True}
        end = body.rstrip().rfind(b"}")
        return body[:end] + _INCLUDE_USAGE + body[end:], False
    if options is None:
        parsed["stream_options"] = {"include_usage": True}
        return _encode(parsed), False
    if not isinstance(options, dict):
        return body, False
    if options.get("include_usage") is True:
        return body, True
    options["include_usage"] = True
    return _encode(parsed), False


def _encode(parsed: dict[str, Any]) -> bytes:
    """``parsed`` re-encoded; RequestError if it nests deeper than orjson writes (255 levels):
    forwarded unpatched, it would have the provider report no usage."""
    try:
        return orjson.dumps(parsed)
    except TypeError:
        raise RequestError(400, "request body nests too deeply (over 254 levels)") from None


_ABSENT: Any = object()


def last_user_prompt(messages: list[Any]) -> str | None:
    """The last message's text when it is the user's: a non-empty string content, or the last
    ``text`` part of its content (reference §3.2)."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content or None
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    return text
    return None


def correlating_tool_call_id(messages: list[Any]) -> str | None:
    """The ``tool_call_id`` of the last message when it is a tool result, linking turns."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "tool":
        return None
    call_id = last.get("tool_call_id")
    return call_id if isinstance(call_id, str) and call_id else None
