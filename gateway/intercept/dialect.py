"""The seam between the data plane's shell and one API dialect (pure).

A dialect (Anthropic Messages; OpenAI Chat Completions and Responses next) is a folder of pure
code under ``gateway/intercept/`` plus one :class:`Dialect` registered in
``gateway.intercept.dialects``. The shell (handler, relay, loop runner, tool loop, passthrough)
holds a ``Dialect`` and calls what it holds; it never imports a dialect's modules nor names a
provider's types, so every dialect gets the same guarantees (records, retries, error handling,
shutdown, the agentic loop).

What belongs to a provider type rather than to one of its APIs (how its keys go upstream, its
error body, the endpoints relayed as they are) is a :class:`ProviderApi`, shared by the dialects
of that type: a route's gateway-side errors take the shape of the provider type it belongs to.

The shell resolves a route's ``Dialect`` once, at startup: per request it only reads attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from gateway.intercept.passthrough_paths import PassthroughRoute
from gateway.intercept.rewriter import BlockingRewriter, StreamRewriter
from gateway.tools.naming import ToolRef


class RequestError(Exception):
    """The client sent a body the gateway refuses; carries the HTTP status and a clear message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_object(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object; :class:`RequestError` (400) saying why it is none."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Only a body that failed to parse can be blank: checked here, not on every request.
        if not body.strip():
            raise RequestError(400, "request body is empty: expected a JSON object") from None
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise RequestError(400, "request body must be a JSON object")
    return parsed


def required_model(parsed: dict[str, Any]) -> str:
    """The request's ``model``, a non-empty string; :class:`RequestError` (400) otherwise."""
    model = parsed.get("model")
    if model is None:
        raise RequestError(400, "model: field required")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model: expected a non-empty string")
    return model


class ParsedRequest(Protocol):
    """A validated request body, as the shell uses it (``Dialect.parse_request``)."""

    @property
    def body(self) -> bytes:
        """The bytes the client sent, forwarded as they are when nothing is injected."""
        ...

    @property
    def parsed(self) -> dict[str, Any]:
        """The body as JSON, which tool injection and continuations change in place."""
        ...

    @property
    def model(self) -> str:
        """The model the client asked for."""
        ...

    @property
    def stream(self) -> bool:
        """Whether the client asked for a stream."""
        ...

    @property
    def prompt(self) -> str | None:
        """The user's last prompt, for its record."""
        ...

    @property
    def correlating_tool_call_id(self) -> str | None:
        """The tool call the request answers, linking it to the interception that made it."""
        ...


@dataclass(frozen=True, slots=True, eq=False)
class KeyScheme:
    """How a provider API key travels upstream: ``header: prefix + key``.

    A value that already starts with ``Bearer `` (an OAuth token) goes as ``Authorization``
    whatever the scheme.
    """

    header: str
    prefix: str
    # Where a client of this provider type sends its own key, for the messages that ask for one.
    label: str


@dataclass(frozen=True, slots=True, eq=False)
class ProviderApi:
    """What the dialects of one provider type share."""

    # The provider type in the configuration ("anthropic", "openai").
    type: str
    keys: KeyScheme
    # ``error_body(status, message)``: a gateway-side error response's body, in this shape.
    error_body: Callable[[int, str], bytes]
    # Endpoints relayed byte for byte with the central key (``passthrough_paths``).
    passthrough: tuple[PassthroughRoute, ...]
    # What a provider's base URL already ends with, by this type's convention (OpenAI's:
    # ``https://api.openai.com/v1``): a route's path goes upstream without it.
    base_path: str = ""

    def upstream(self, path: str) -> str:
        """The path to append to a provider's base URL for the route path ``path``."""
        return path.removeprefix(self.base_path) if self.base_path else path


# Whether a tool name the model called designates an injected tool.
Injected = Callable[[str], bool]
_Rewriter = TypeVar("_Rewriter")


def prompt_only(
    make: Callable[[str, str | None, Injected | None], _Rewriter],
) -> Callable[[str, Any, Injected | None], _Rewriter]:
    """``make(interception_id, prompt, injected)`` as a ``Dialect.stream`` or ``.blocking``
    factory, for rewriters that need nothing of the request but its prompt."""

    def made(interception_id: str, request: Any, injected: Injected | None) -> _Rewriter:
        return make(interception_id, request.prompt, injected)

    return made


@dataclass(frozen=True, slots=True, eq=False)
class ToolShapes:
    """A dialect's side of injected tools: their definitions, results and the continuation."""

    # ``definition(tool_id, ref)``: the request's tool entry for an injected tool.
    definition: Callable[[str, ToolRef], dict[str, Any]]
    # ``inject(body, definitions)``: add them to the parsed request in place; ValueError (and
    # the body untouched) when its shape forbids it.
    inject: Callable[[dict[str, Any], Sequence[dict[str, Any]]], None]
    # ``result(call_id, mcp_content, is_error)``: the result item answering a call.
    result: Callable[[str, Sequence[Mapping[str, Any]], bool], dict[str, Any]]
    # ``error(call_id, message)``: the result item of a call that produced no result.
    error: Callable[[str, str], dict[str, Any]]
    # ``continuation(request, assistant, results)``: the next upstream request body.
    continuation: Callable[[dict[str, Any], Any, Sequence[Any]], bytes]


@dataclass(frozen=True, slots=True, eq=False)
class Dialect:
    """One intercepted API: everything the shell needs of it, and nothing more."""

    # For logs and tests ("messages").
    name: str
    provider: ProviderApi
    # The route's path after the provider prefix (``/v1/messages``); upstream, after the
    # provider's base URL, less the provider type's ``base_path``.
    path: str
    # ``parse_request(body)``: the validated request; raises :class:`RequestError`.
    parse_request: Callable[[bytes], ParsedRequest]
    # ``stream(interception_id, request, injected)``: a stream's rewriter (``request``: what
    # ``parse_request`` returned).
    stream: Callable[[str, Any, Injected | None], StreamRewriter]
    # ``blocking(interception_id, request, injected)``: a blocking response's rewriter.
    blocking: Callable[[str, Any, Injected | None], BlockingRewriter]
    # ``error_event(status, message)``: an in-stream error for a fault found after the stream
    # began (``status``: the HTTP status the fault would have had before).
    error_event: Callable[[int, str], bytes]
    # ``relayed_error_event(body)``: an in-stream error carrying the provider's own error body
    # (a continuation the provider refused once the stream had begun).
    relayed_error_event: Callable[[bytes], bytes]
    # Sent to a stream's client after ``ping_interval`` of silence; its SDKs must ignore it.
    keepalive: bytes
    # The event that ends a whole stream ("message_stop"), named when a stream lacks it.
    terminal_event: str
    tools: ToolShapes
    # Whether injected tools are offered at all (a compaction request calls none).
    injects_tools: bool = True

    @property
    def upstream_path(self) -> str:
        """The path appended to the provider's base URL."""
        return self.provider.upstream(self.path)
