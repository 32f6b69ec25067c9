"""Parse and validate an OpenAI Responses request body without rebuilding it (pure).

The body stays the bytes the client sent: unknown item types, tool types, ``include``,
``store``, ``previous_response_id`` and the like reach the provider untouched. Parsing only
serves validation, routing (``stream``, ``model``) and the records (prompt, correlating tool
call id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.intercept.dialect import RequestError, json_object

# Input items answering a tool call: a request ending with them continues a tool exchange.
_TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})


@dataclass(slots=True)  # not frozen: built on every request (see gateway.records)
class ResponsesRequest:
    """A validated Responses request: the raw body plus what the gateway needs to know."""

    body: bytes
    parsed: dict[str, Any]
    model: str
    stream: bool
    prompt: str | None
    correlating_tool_call_id: str | None
    # ``parallel_tool_calls`` as the client sent it (None: unset), read before injection turns it
    # off: the rewriters show the client its own value in the responses that echo it.
    client_parallel_tool_calls: Any = None
    # False when the client sent ``store: false``: no response id can be chained from, so the
    # rewriters show the first turn's id throughout (the SDK's stream helper requires one id).
    store: bool = True


def parse_request(body: bytes) -> ResponsesRequest:
    """Validate ``body``; raise :class:`RequestError` (400) with a clear message."""
    parsed = json_object(body)
    model = parsed.get("model")
    if model is None:
        # A stored prompt (``prompt``) may carry the model: the provider decides.
        model = ""
    elif not isinstance(model, str):
        raise RequestError(400, "model: expected a string")
    if parsed.get("background") is True:
        # A background response is polled later through GET /v1/responses/{id}: its usage
        # would never pass through the gateway, so it could not be accounted.
        raise RequestError(
            400,
            "background: background responses are not supported through the gateway; "
            "send the request without background: true",
        )
    items = parsed.get("input")
    return ResponsesRequest(
        body,
        parsed,
        model,
        parsed.get("stream") is True,
        last_user_prompt(items),
        correlating_tool_call_id(items),
        parsed.get("parallel_tool_calls"),
        parsed.get("store") is not False,
    )


def last_user_prompt(items: Any) -> str | None:
    """The user's prompt: a string ``input``, or the text of the last item when it is the user's.

    A content array gives the ``text`` of every ``input_text`` part, joined with newlines.
    """
    if isinstance(items, str):
        return items
    if not isinstance(items, list) or not items:
        return None
    last = items[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") == "input_text"
        and isinstance(part.get("text"), str)
    ]
    return "\n".join(texts) if texts else None


def correlating_tool_call_id(items: Any) -> str | None:
    """The ``call_id`` of the last input item when it answers a tool call (function or custom)."""
    if not isinstance(items, list) or not items:
        return None
    last = items[-1]
    if not isinstance(last, dict):
        return None
    kind = last.get("type")
    # Any JSON value may come: an object or array is unhashable.
    if not isinstance(kind, str) or kind not in _TOOL_OUTPUTS:
        return None
    call_id = last.get("call_id")
    return call_id if isinstance(call_id, str) and call_id else None
