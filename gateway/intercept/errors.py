"""Provider-shaped error bodies for faults the gateway itself detects (pure)."""

from __future__ import annotations

import orjson

from gateway.sse import encode

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    # The gateway's own: a client too slow to send its body.
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


def anthropic_error_type(status: int) -> str:
    """The Anthropic ``error.type`` that goes with an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "api_error")


def anthropic_error_body(status: int, message: str) -> bytes:
    """``{"type":"error","error":{"type":...,"message":...}}`` as Anthropic answers errors."""
    return orjson.dumps(
        {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    )


def anthropic_error_event(status: int, message: str) -> bytes:
    """An SSE ``error`` event for a fault found after the stream has started; ``status`` is the
    one the fault would have had before (it picks the error type)."""
    return encode("error", anthropic_error_body(status, message))


def anthropic_relayed_error_event(body: bytes) -> bytes:
    """An SSE ``error`` event carrying the provider's own error body (a refused continuation)."""
    return encode("error", body)


def parse_error_body(body: bytes) -> tuple[str, str]:
    """Best-effort ``(type, message)`` from a provider error body, for the end record."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "upstream_error", body[:200].decode("utf-8", "replace")
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("type") or "upstream_error"), str(err.get("message") or "")
    return "upstream_error", body[:200].decode("utf-8", "replace")
