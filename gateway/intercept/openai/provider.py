"""The ``openai`` provider type as the shell sees it: keys, error shape, passthrough (pure).

Chat Completions (``gateway.intercept.chat``) and Responses (``gateway.intercept.responses``)
share this :class:`ProviderApi`: a gateway-side error on either route is in OpenAI's shape.
"""

from __future__ import annotations

import orjson

from gateway.intercept.dialect import KeyScheme, ProviderApi
from gateway.intercept.passthrough_paths import ID, PassthroughRoute

# OpenAI's ``error.type`` by HTTP status, as its API answers them.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    426: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}
# ``error.code`` where OpenAI gives one for the status.
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}


def openai_error(status: int, message: str) -> dict[str, object]:
    """The ``error`` object of an OpenAI error body for ``status``."""
    return {
        "message": message,
        "type": _OPENAI_TYPES.get(status, "server_error"),
        "param": None,
        "code": _OPENAI_CODES.get(status),
    }


def openai_error_body(status: int, message: str) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI answers errors."""
    return orjson.dumps({"error": openai_error(status, message)})


def openai_data_error_event(status: int, message: str) -> bytes:
    """A ``data:`` line carrying an OpenAI error object, as Chat Completions streams report a
    fault after the stream began (the SDKs raise on a chunk with ``error``)."""
    return b"data: " + openai_error_body(status, message) + b"\n\n"


# OpenAI endpoints safe to relay with the central key: model reads, stored responses of the
# caller (read, delete, cancel, input items) and token counting. Anything else (files, batches,
# fine-tuning, admin endpoints) is never reached with a central key.
PASSTHROUGH: tuple[PassthroughRoute, ...] = (
    ("GET", ("v1", "models")),
    ("GET", ("v1", "models", ID)),
    ("GET", ("v1", "responses", ID)),
    ("DELETE", ("v1", "responses", ID)),
    ("GET", ("v1", "responses", ID, "input_items")),
    ("POST", ("v1", "responses", ID, "cancel")),
    ("POST", ("v1", "responses", "input_tokens")),
)

OPENAI = ProviderApi(
    type="openai",
    keys=KeyScheme(header="authorization", prefix="Bearer ", label="Authorization: Bearer"),
    error_body=openai_error_body,
    passthrough=PASSTHROUGH,
    # OpenAI base URLs end with the version (https://api.openai.com/v1, as its SDKs take them).
    base_path="/v1",
)
