"""OpenAI Responses in-stream errors and keep-alive (pure).

A Responses stream reports an error with an ``error`` event whose payload is the SDK's
``ResponseErrorEvent`` (``type``, ``code``, ``message``, ``param``, ``sequence_number``); the
SDKs raise on it. The API defines no keep-alive event: an SSE comment, which every SSE parser
skips, keeps the connection alive.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.intercept.openai.provider import openai_error
from gateway.intercept.responses.output import text_of
from gateway.sse import encode

KEEPALIVE = b": ping\n\n"


def error_event(status: int, message: str, sequence_number: int = 0) -> bytes:
    """An ``error`` event for a fault found after the stream began (``status``: the one it
    would have had before, which picks the code)."""
    err = openai_error(status, message)
    return _event(err.get("code") or err.get("type"), message, None, sequence_number)


def relayed_error_event(body: bytes, sequence_number: int = 0) -> bytes:
    """An ``error`` event carrying the provider's own error body (a refused continuation)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return _event(
            "upstream_error", body[:500].decode("utf-8", "replace"), None, sequence_number
        )
    message = err.get("message")
    return _event(
        err.get("code") or err.get("type") or "upstream_error",
        message if isinstance(message, str) else "",
        err.get("param") if isinstance(err.get("param"), str) else None,
        sequence_number,
    )


def _event(code: Any, message: str, param: str | None, sequence_number: int) -> bytes:
    payload = {
        "type": "error",
        "code": text_of(code) or "upstream_error",
        "message": message,
        "param": param,
        "sequence_number": sequence_number,
    }
    return encode("error", orjson.dumps(payload))
