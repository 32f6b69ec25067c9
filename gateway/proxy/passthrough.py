"""Passthrough routes: an allow-list of provider endpoints relayed byte for byte, not recorded."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.auth import Authenticated, authenticate
from gateway.intercept.passthrough_paths import (
    ANTHROPIC_PASSTHROUGH,
    ID,
    reencode_query,
    upstream_path,
)
from gateway.proxy.handlers import (
    Services,
    _provider_in,
    anthropic_error,
    read_body,
    route_not_found,
)
from gateway.proxy.upstream import (
    SKIP_AUTO_HEADERS,
    relayed_response_headers,
    upstream_request_headers,
)
from gateway.proxy.upstream_failure import (
    UPSTREAM_ERRORS,
    UpstreamFailure,
    redirected,
    stream_broken,
    unreachable,
)

log = logging.getLogger("aibridged.passthrough")

# Response headers that describe the body as relayed (no decompression happens on this path).
_BODY_HEADERS = ("Content-Type", "Content-Encoding")


def passthrough_routes() -> dict[str, list[str]]:
    """The allow-list as router patterns grouped by path, in order: ``{path: [methods]}``.

    The router only dispatches (an id route takes any rest of the path, so other methods get
    405); :func:`upstream_path` decides on the raw path what is allowed.
    """
    routes: dict[str, list[str]] = {}
    for method, route in ANTHROPIC_PASSTHROUGH:
        path = "/" + "/".join("{rest:.+}" if s is ID else s for s in route)
        routes.setdefault(path, []).append(method)
    return routes


async def passthrough(services: Services, request: web.Request) -> web.StreamResponse:
    """Relay one allow-listed request upstream with the provider credential injected."""
    provider = _provider_in(services.state.current, request)
    if isinstance(provider, web.Response):
        return provider
    # The raw path (never normalised, still percent-encoded): "/{provider}/v1/...".
    raw_path = request.rel_url.raw_path
    path = upstream_path(request.method, raw_path[raw_path.find("/", 1) :])
    if path is None:
        return route_not_found(request)
    auth = authenticate(request.headers, services.state.current, provider, services.byok_header)
    if not isinstance(auth, Authenticated):
        return anthropic_error(auth.status, auth.message)
    body = await read_body(services, request)
    if isinstance(body, web.Response):
        return body
    headers = upstream_request_headers(request.headers, auth.credential, services.stripped_headers)
    url = provider.url(path, reencode_query(request.rel_url.raw_query_string))
    try:
        # A redirect would carry the credential to wherever its Location points: never followed.
        resp = await services.session.request(
            request.method,
            url,
            data=body or None,
            headers=headers,
            allow_redirects=False,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )
    except UPSTREAM_ERRORS as exc:
        return _failed(request, path, unreachable(exc))
    async with resp:
        # 304 answers the client's own conditional GET: it points nowhere.
        if 300 <= resp.status < 400 and resp.status != 304:
            return _failed(request, path, redirected(resp.status))
        out_headers = relayed_response_headers(resp.headers)
        for name in _BODY_HEADERS:
            if name in resp.headers:
                out_headers[name] = resp.headers[name]
        out = web.StreamResponse(status=resp.status, headers=out_headers)
        await out.prepare(request)
        # Failures writing to the client propagate (a disconnect); upstream ones are caught.
        while True:
            try:
                chunk = await resp.content.readany()
            except UPSTREAM_ERRORS as exc:
                _log(request, path, stream_broken(exc))
                # The status line is sent: a second answer would land inside this body. A cut
                # connection shows the client a broken body at once instead.
                if request.transport is not None:
                    request.transport.abort()
                return out
            if not chunk:
                break
            await out.write(chunk)
        await out.write_eof()
        return out


def _log(request: web.Request, path: str, failure: UpstreamFailure) -> None:
    # The detail may name the upstream's address (never a credential): log only.
    log.warning(
        "passthrough %s %s: %s: %s", request.method, path, failure.error_type, failure.detail
    )


def _failed(request: web.Request, path: str, failure: UpstreamFailure) -> web.Response:
    """Log ``failure`` and answer it before anything was sent to the client."""
    _log(request, path, failure)
    return anthropic_error(failure.status, failure.client_message)
