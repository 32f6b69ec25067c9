"""The intercepted routes' handler: thin glue from an HTTP request to a dialect and the relay.

One handler serves every intercepted route, bound at startup to the route's ``Dialect``
(``gateway.intercept.dialect``); it names no provider's types.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.access_log import log_refused
from gateway.auth import Authenticated, authenticate
from gateway.identity import client_session_id, detect_client
from gateway.intercept.dialect import Dialect, ParsedRequest, ProviderApi, RequestError, ToolShapes
from gateway.intercept.dialects import DIALECTS, UNROUTED, provider_apis
from gateway.intercept.loop import AgenticLoop
from gateway.intercept.passthrough_paths import reencode_query
from gateway.observe import GatewayStats, Observation
from gateway.ports import UsageSink
from gateway.proxy.errors import (
    error_response,
    failure_response,
    method_not_allowed,
    route_not_found,
)
from gateway.proxy.loop_runner import LoopRunner
from gateway.proxy.relay import Interception, RelayOptions
from gateway.proxy.request_body import BodyError, decode_body
from gateway.proxy.server_timeouts import MALFORMED_BODY, abandon_body, malformed_request_text
from gateway.proxy.tool_loop import ToolLoop
from gateway.proxy.upstream import upstream_request_headers
from gateway.proxy.upstream_failure import UPSTREAM_ERRORS
from gateway.records import InterceptionStarted, new_interception_id
from gateway.state import Provider, Snapshot, StateHolder
from gateway.tools.mcp_pool import McpPool

if TYPE_CHECKING:
    from gateway.tracing import Tracing

log = logging.getLogger("aibridged.handlers")


@dataclass(frozen=True, slots=True)
class Services:
    """What handlers need, wired once by the app factory."""

    state: StateHolder
    sink: UsageSink
    session_ref: list[aiohttp.ClientSession]
    relay: RelayOptions
    byok_header: str
    # Client request headers never forwarded upstream (the BYOK header included).
    stripped_headers: frozenset[str]
    max_body_bytes: int
    mcp_pool: McpPool | None = None
    small_model: re.Pattern[str] = re.compile("haiku", re.IGNORECASE)
    max_tool_iterations: int = 10
    # Longest wait for the next piece of a request body (client_body_timeout).
    body_timeout: float = 60.0
    # Longest time the whole body may take (client_body_total_timeout).
    body_total_timeout: float = 300.0
    # The serving loop, set with the session (asking asyncio for it costs a syscall each time).
    loop_ref: list[asyncio.AbstractEventLoop] = field(default_factory=list)
    # What the metrics and the per-request log lines count.
    stats: GatewayStats = field(default_factory=GatewayStats)
    # Spans of interceptions, when tracing is on (``gateway.trace_settings``).
    tracing: Tracing | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared upstream session (created inside the running loop)."""
        return self.session_ref[0]


async def _tool_loop(
    services: Services,
    snapshot: Snapshot,
    auth: Authenticated,
    parsed: ParsedRequest,
    interception_id: str,
    shapes: ToolShapes,
    sink: Observation,
) -> ToolLoop | None:
    """The injected tools for this request, already added to ``parsed.parsed``; None if none.

    Requests for the small/fast model (titles, summaries) get no tools, streaming or not.
    """
    if services.mcp_pool is None or services.small_model.search(parsed.model):
        return None
    loop = await ToolLoop.prepare(
        services.mcp_pool,
        snapshot,
        auth.actor.id,
        interception_id,
        sink,
        shapes,
        services.stats,
        sink.trace,
    )
    if loop is None or not loop.inject(parsed.parsed):
        return None
    return loop


def not_configured(api: ProviderApi) -> web.Response:
    """The 503 before the control plane's first state push."""
    return error_response(
        api, 503, "gateway not configured yet: waiting for the control plane's first state push"
    )


def refused(request: web.Request, response: web.Response, reason: str) -> web.Response:
    """``response``, the answer to a request refused before it became an interception, once
    its log line is written (``reason``: what the client was told, or its gist)."""
    log_refused(request.method, request.path, request.remote, response.status, reason)
    return response


def refuse(request: web.Request, api: ProviderApi, status: int, message: str) -> web.Response:
    """Refuse ``request`` with ``status`` and ``message`` in ``api``'s shape, logged."""
    return refused(request, error_response(api, status, message), message)


# The provider types' shared parts, by type: the shape of a provider's errors off its routes.
_PROVIDER_APIS = provider_apis(DIALECTS)


def shape_of(snapshot: Snapshot, name: str, default: ProviderApi = UNROUTED) -> ProviderApi:
    """The error shape of the provider called ``name`` (its type's), else ``default``."""
    provider = snapshot.providers.get(name)
    if provider is None:
        return default
    return _PROVIDER_APIS.get(provider.type, default)


async def unknown_route(services: Services, request: web.Request) -> web.Response:
    """The catch-all route's 404 (no route), logged: in the shape of the provider the path's
    first segment names, so an OpenAI client gets OpenAI's (bind ``services``)."""
    segments = request.path.split("/", 2)  # "*" (OPTIONS *) has no segment
    api = shape_of(services.state.current, segments[1] if len(segments) > 1 else "")
    return refused(request, route_not_found(api, request), "route not supported")


def provider_of(
    snapshot: Snapshot, request: web.Request, api: ProviderApi
) -> Provider | web.Response:
    """The provider the path names when it is of ``api``'s type; else the answer (503, 404),
    logged."""
    if not snapshot.configured:
        return refused(request, not_configured(api), "not configured yet")
    provider = snapshot.providers.get(request.match_info["provider"])
    if provider is None or provider.type != api.type:
        return refused(request, route_not_found(api, request), "unknown provider")
    return provider


async def read_body(
    services: Services, request: web.Request, api: ProviderApi
) -> bytes | web.Response:
    """The request body, decoded as its ``Content-Encoding`` says; else the error to answer
    (in ``api``'s shape).

    413 past ``max_body_bytes`` (as sent, or once decoded), 400 for a body that is not valid in
    its encoding or breaks HTTP's framing (a bad chunk), 415 for an encoding the gateway does not
    decode, 408 when the client leaves more than ``client_body_timeout`` between two reads. The
    server does not decompress (the runner turns it off): decoding here bounds the decoded size
    as it goes.
    """
    limit = services.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _too_large(request, api, limit)
    content = request.content
    chunks: list[bytes] = []
    size = 0
    deadline = 0.0
    try:
        while True:
            # What has arrived is taken without a timer: most bodies are whole by now.
            chunk = content.read_nowait()
            if not chunk:
                if content.is_eof():
                    break
                loop = services.loop_ref[0]
                if not deadline:
                    deadline = loop.time() + services.body_total_timeout
                wait = min(services.body_timeout, deadline - loop.time())
                try:
                    async with asyncio.timeout(wait):
                        chunk = await content.readany()
                except TimeoutError:
                    return _body_timed_out(services, request, api)
                if not chunk:
                    break
            size += len(chunk)
            if size > limit:
                return _too_large(request, api, limit)
            chunks.append(chunk)
    except MALFORMED_BODY as exc:
        return _body_malformed(request, exc, api)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    # Every Content-Encoding line (all are stripped upstream): two lines mean "gzip, zstd".
    codings = request.headers.getall("Content-Encoding", ())
    if not codings:
        return body
    try:
        return decode_body(body, ", ".join(codings), limit)
    except BodyError as exc:
        return refuse(request, api, exc.status, exc.message)


def _too_large(request: web.Request, api: ProviderApi, limit: int) -> web.Response:
    return refuse(request, api, 413, f"request body exceeds the gateway limit of {limit} bytes")


def _body_timed_out(services: Services, request: web.Request, api: ProviderApi) -> web.Response:
    # The client is too slow to send its body: answer, then close without reading the rest.
    abandon_body(request)
    response = refuse(
        request,
        api,
        408,
        f"request body not received in time (at most {services.body_timeout:g} s between reads,"
        f" {services.body_total_timeout:g} s in all)",
    )
    response.force_close()
    return response


def _body_malformed(request: web.Request, exc: Exception, api: ProviderApi) -> web.Response:
    # Nothing after a broken chunk can be framed: answer, then close without reading on.
    detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    log.debug("malformed request body: %s", detail.partition("\n")[0][:200])
    abandon_body(request)
    response = refuse(request, api, 400, malformed_request_text(detail))
    response.force_close()
    return response


async def intercept(
    services: Services, dialect: Dialect, request: web.Request
) -> web.StreamResponse:
    """``POST /{provider}<dialect.path>``: an intercepted API call (bind ``services`` and the
    route's ``dialect`` once, at startup)."""
    # The gateway's own time (``gateway.observe``): from here to the first upstream call,
    # reading the body and listing MCP tools left out.
    started = perf_counter()
    api = dialect.provider
    ended = False  # once the interception's end line is logged, a failure needs no other
    try:
        snapshot = services.state.current
        provider = provider_of(snapshot, request, api)
        if isinstance(provider, web.Response):
            return provider
        if request.method != "POST":
            if request.headers.get("Upgrade", "").lower() == "websocket":
                # Codex tries a WebSocket first; a 426 makes it use HTTP at once (other
                # refusals cost it several reconnects).
                return refuse(
                    request, api, 426, "WebSocket is not supported here: send the request over HTTP"
                )
            return refused(request, method_not_allowed(api, request), "method not allowed")
        request_headers = request.headers
        auth = authenticate(request_headers, snapshot, provider, api.keys, services.byok_header)
        if not isinstance(auth, Authenticated):
            return refuse(request, api, auth.status, auth.message)
        reading = perf_counter()
        body = await read_body(services, request, api)
        if isinstance(body, web.Response):
            return body
        resumed = perf_counter()
        try:
            parsed = dialect.parse_request(body)
        except RequestError as exc:
            return refuse(request, api, exc.status, exc.message)

        interception_id = new_interception_id()
        client = detect_client(request_headers)
        actor = auth.actor
        credential = auth.credential
        # Built before the start record: from it on, only Interception.end may end the request.
        # Re-encoded like the passthrough's: a decoded query would lose "%23..." to a fragment.
        url = provider.url(dialect.upstream_path, reencode_query(request.rel_url.raw_query_string))
        headers = upstream_request_headers(
            request_headers,
            credential,
            services.stripped_headers,
            actor=actor if provider.send_actor_headers else None,
        )
        services.sink.submit(
            InterceptionStarted(
                interception_id=interception_id,
                provider=provider.type,
                provider_name=provider.name,
                model=parsed.model,
                actor_id=actor.id,
                username=actor.username,
                actor_metadata=dict(actor.metadata),
                client=client,
                user_agent=request_headers.get("User-Agent", ""),
                client_session_id=client_session_id(client, request_headers, parsed.parsed),
                correlating_tool_call_id=parsed.correlating_tool_call_id,
                credential_kind=credential.kind,
                credential_hint=credential.hint,
                streaming=parsed.stream,
            )
        )
        stats = services.stats
        # The sink of every later record of this interception: it counts them.
        sink = Observation(
            stats,
            services.sink,
            stats.route(provider.name, dialect.name),
            interception_id,
            parsed.model,
            actor.id,
            client,
            parsed.stream,
            started,
            reading - started,
        )
        tracing = services.tracing
        if tracing is not None:
            sink.trace = tracing.interception(
                request_headers,
                started,
                {
                    "interception_id": interception_id,
                    "provider": provider.name,
                    "api": dialect.name,
                    "model": parsed.model,
                    "actor_id": actor.id,
                    "client": client,
                    "streaming": parsed.stream,
                    "request_path": request.path,
                    "gen_ai.system": provider.type,
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": parsed.model,
                },
            )
        icpt = Interception(
            dialect,
            interception_id,
            sink,
            services.session_ref[0],
            services.relay,
            services.loop_ref[0],
            url,
            headers,
            provider.max_retries,
        )
        try:
            tools = None
            if services.mcp_pool is not None and snapshot.mcp_servers and dialect.injects_tools:
                listing = perf_counter()
                tools = await _tool_loop(
                    services, snapshot, auth, parsed, interception_id, dialect.tools, sink
                )
                resumed += perf_counter() - listing
            runner: LoopRunner | None = None
            body, injected = parsed.body, None
            if tools is not None:
                try:
                    body = orjson.dumps(parsed.parsed)
                except orjson.JSONEncodeError:
                    # Nested deeper than orjson writes (254 levels; it reads 1024): the body
                    # goes as the client sent it, without the tools.
                    log.warning(
                        "tools not injected: the request nests too deeply to re-encode",
                        extra={"interception_id": interception_id},
                    )
                else:
                    injected = tools.is_injected
                    driver = AgenticLoop(
                        parsed.parsed, services.max_tool_iterations, dialect.tools.continuation
                    )
                    runner = LoopRunner(driver, tools, icpt)
            response: web.StreamResponse
            sink.busy += perf_counter() - resumed
            try:
                resp = await icpt.post_again(body)
            except UPSTREAM_ERRORS as exc:
                response = icpt.unreachable(exc)
            else:
                async with resp:
                    if resp.status >= 400:
                        response = await icpt.upstream_error(resp)
                    elif parsed.stream and resp.content_type == "text/event-stream":
                        rewriter = dialect.stream(interception_id, parsed, injected)
                        return await icpt.stream(request, resp, rewriter, runner)
                    else:
                        turns = dialect.blocking(interception_id, parsed, injected)
                        response = await icpt.blocking(resp, turns, runner)
            await icpt.complete()
            return response
        except asyncio.CancelledError:
            icpt.outcome.fail("cancelled", "request cancelled before it completed")
            raise
        except Exception as exc:
            icpt.outcome.fail("gateway_error", type(exc).__name__)
            raise
        finally:
            icpt.end()
            ended = True
    except Exception as exc:
        # Shaped here, not by a wrapper: the hot route gets no extra coroutine layer.
        shaped = failure_response(api, request, exc, access_line=not ended)
        if shaped is None:
            raise
        return shaped
