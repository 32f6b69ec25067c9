"""``GET /metrics`` on its own listener, rendered off the event loop.

The format follows the scraper's ``Accept`` header as prometheus_client's own handlers do
(OpenMetrics for Prometheus, which asks for it; the text format otherwise), gzip when the
scraper accepts it, ``name[]`` parameters restricting the families.
"""

from __future__ import annotations

import asyncio
import gzip

from aiohttp import hdrs, web
from prometheus_client.exposition import choose_encoder, gzip_accepted

from gateway.metrics import REGISTRY


def render(accept: str, compress: bool, names: list[str]) -> tuple[bytes, str]:
    """The exposition the ``Accept`` header asks for, and its content type."""
    encoder, content_type = choose_encoder(accept)
    registry = REGISTRY.restricted_registry(names) if names else REGISTRY
    body = encoder(registry)
    return (gzip.compress(body, compresslevel=1) if compress else body), content_type


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus exposition of the daemon's registry."""
    headers = request.headers
    accept = ",".join(headers.getall(hdrs.ACCEPT, ()))
    compress = gzip_accepted(headers.get(hdrs.ACCEPT_ENCODING, ""))
    names = request.query.getall("name[]", [])
    # Rendering a large registry takes milliseconds: keep it off the loop that relays streams.
    body, content_type = await asyncio.to_thread(render, accept, compress, names)
    out = web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})
    if compress:
        out.headers[hdrs.CONTENT_ENCODING] = "gzip"
    return out


def build_metrics_app() -> web.Application:
    """The metrics listener's app."""
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
