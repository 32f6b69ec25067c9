"""Passthrough routes: an allow-list of provider endpoints relayed byte for byte, not recorded."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from gateway.auth import Authenticated, authenticate
from gateway.intercept.dialect import ProviderApi
from gateway.intercept.passthrough_paths import ID, reencode_query, upstream_path
from gateway.proxy.errors import (
    error_response,
    failure_response,
    method_not_allowed,
    route_not_found,
)
from gateway.proxy.handlers import Services, not_configured, read_body, refuse, refused
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
from gateway.state import Provider, Snapshot

log = logging.getLogger("aibridged.passthrough")

# Response headers that describe the body as relayed (no decompression happens on this path).
_BODY_HEADERS = ("Content-Type", "Content-Encoding")


@dataclass(frozen=True, slots=True)
class PassthroughPath:
    """One router path of the allow-lists, and the provider types that list it."""

    methods: tuple[str, ...]
    # By provider type: whose allow-list decides, and whose shape its errors take.
    apis: Mapping[str, ProviderApi]
    # The shape of errors when the path names no provider of those types (the first that
    # listed it).
    default: ProviderApi
    # The ``route`` label of the metrics: the path with ``{id}`` for the client's segment.
    label: str


def passthrough_routes(apis: Iterable[ProviderApi]) -> dict[str, PassthroughPath]:
    """Every provider type's allow-list as router patterns, in order: ``{path: PassthroughPath}``.

    The router only dispatches (an id route takes any rest of the path, so other methods get
    405); :func:`upstream_path` decides on the raw path what the provider's type allows.
    """
    methods: dict[str, list[str]] = {}
    by_path: dict[str, dict[str, ProviderApi]] = {}
    labels: dict[str, str] = {}
    for api in apis:
        for method, route in api.passthrough:
            path = "/" + "/".join("{rest:.+}" if s is ID else s for s in route)
            labels.setdefault(path, "/" + "/".join("{id}" if s is ID else s for s in route))
            listed = methods.setdefault(path, [])
            if method not in listed:
                listed.append(method)
            by_path.setdefault(path, {}).setdefault(api.type, api)
    return {
        path: PassthroughPath(tuple(methods[path]), types, next(iter(types.values())), labels[path])
        for path, types in by_path.items()
    }


def _provider_of(
    snapshot: Snapshot, request: web.Request, path: PassthroughPath
) -> tuple[Provider, ProviderApi] | web.Response:
    """The provider the path names and its type's API, if that type lists the path; else the
    answer (503, 404), logged."""
    if not snapshot.configured:
        return refused(request, not_configured(path.default), "not configured yet")
    provider = snapshot.providers.get(request.match_info["provider"])
    api = path.apis.get(provider.type) if provider is not None else None
    if provider is None or api is None:
        return refused(request, route_not_found(path.default, request), "unknown provider")
    return provider, api


async def wrong_passthrough_method(
    services: Services, path: PassthroughPath, request: web.Request
) -> web.Response:
    """The 405 for a method ``path`` does not serve, in the shape of the provider it names."""
    found = _provider_of(services.state.current, request, path)
    api = path.default if isinstance(found, web.Response) else found[1]
    return refused(request, method_not_allowed(api, request), "method not allowed")


async def passthrough(
    services: Services, path: PassthroughPath, request: web.Request
) -> web.StreamResponse:
    """Relay one allow-listed request upstream with the provider credential injected."""
    api = path.default
    try:
        found = _provider_of(services.state.current, request, path)
        if isinstance(found, web.Response):
            return found
        provider, api = found
        return await _relay(services, request, provider, api, path.label)
    except Exception as exc:
        shaped = failure_response(api, request, exc)
        if shaped is None:
            raise
        return shaped


async def _relay(
    services: Services, request: web.Request, provider: Provider, api: ProviderApi, route: str
) -> web.StreamResponse:
    # The raw path (never normalised, still percent-encoded): "/{provider}/v1/...".
    raw_path = request.rel_url.raw_path
    path = upstream_path(api.passthrough, request.method, raw_path[raw_path.find("/", 1) :])
    if path is None:
        return refused(request, route_not_found(api, request), "route not supported")
    auth = authenticate(
        request.headers, services.state.current, provider, api.keys, services.byok_header
    )
    if not isinstance(auth, Authenticated):
        return refuse(request, api, auth.status, auth.message)
    body = await read_body(services, request, api)
    if isinstance(body, web.Response):
        return body
    headers = upstream_request_headers(request.headers, auth.credential, services.stripped_headers)
    url = provider.url(api.upstream(path), reencode_query(request.rel_url.raw_query_string))
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
        services.stats.passthrough_done(provider.name, route, "error")
        return _failed(api, request, path, unreachable(exc))
    services.stats.passthrough_done(provider.name, route, resp.status)
    async with resp:
        # 304 answers the client's own conditional GET: it points nowhere.
        if 300 <= resp.status < 400 and resp.status != 304:
            return _failed(api, request, path, redirected(resp.status))
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


def _failed(
    api: ProviderApi, request: web.Request, path: str, failure: UpstreamFailure
) -> web.Response:
    """Log ``failure`` and answer it before anything was sent to the client."""
    _log(request, path, failure)
    return error_response(api, failure.status, failure.client_message)
