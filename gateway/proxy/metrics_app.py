"""``GET /metrics`` on its own listener, rendered off the event loop."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.metrics import REGISTRY


async def metrics(_: web.Request) -> web.Response:
    """The Prometheus text exposition of the daemon's registry."""
    # Rendering a large registry takes milliseconds: keep it off the loop that relays streams.
    body = await asyncio.to_thread(generate_latest, REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_metrics_app() -> web.Application:
    """The metrics listener's app."""
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
