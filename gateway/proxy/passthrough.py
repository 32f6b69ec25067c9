"""Passthrough routes: an allow-list of provider endpoints relayed byte for byte, not recorded."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import Authenticated, authenticate
from gateway.proxy.handlers import Services, anthropic_error, read_body, resolve_provider
from gateway.proxy.relay import UPSTREAM_ERRORS, describe_upstream_error
from gateway.proxy.upstream import (
    SKIP_AUTO_HEADERS,
    join_url,
    relayed_response_headers,
    upstream_request_headers,
)

# Response headers that describe the body as relayed (no decompression happens on this path).
_BODY_HEADERS = ("Content-Type", "Content-Encoding")

# Anthropic endpoints that are safe to relay with the central key: reads and token counting.
# Other methods on these paths get 405 (a central key may be an admin key).
ANTHROPIC_PASSTHROUGH = (
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{rest:.+}"),
    ("POST", "/v1/messages/count_tokens"),
)


def passthrough_routes() -> dict[str, list[str]]:
    """The allow-list grouped by path, in order: ``{path: [methods]}``."""
    routes: dict[str, list[str]] = {}
    for method, path in ANTHROPIC_PASSTHROUGH:
        routes.setdefault(path, []).append(method)
    return routes


async def passthrough(services: Services, request: web.Request) -> web.StreamResponse:
    """Relay one allow-listed request upstream with the provider credential injected."""
    provider = resolve_provider(services, request)
    if isinstance(provider, web.Response):
        return provider
    auth = authenticate(request.headers, services.state.current, provider, services.byok_header)
    if not isinstance(auth, Authenticated):
        return anthropic_error(auth.status, auth.message)
    body = await read_body(services, request)
    if isinstance(body, web.Response):
        return body
    headers = upstream_request_headers(request.headers, auth.credential, services.stripped_headers)
    path = request.path[len(provider.name) + 1 :]
    url = join_url(provider.base_url, path, request.query_string)
    try:
        async with services.session.request(
            request.method,
            url,
            data=body or None,
            headers=headers,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        ) as resp:
            out_headers = relayed_response_headers(resp.headers)
            for name in _BODY_HEADERS:
                if name in resp.headers:
                    out_headers[name] = resp.headers[name]
            out = web.StreamResponse(status=resp.status, headers=out_headers)
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
    except UPSTREAM_ERRORS as exc:
        detail = describe_upstream_error(exc)
        return anthropic_error(502, f"upstream provider unreachable: {detail}")
