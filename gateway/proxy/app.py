"""The data-plane ``web.Application``: routes, error shaping, health, upstream session."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gateway.config import Settings
from gateway.intercept.dialects import DIALECTS, UNROUTED, provider_apis
from gateway.observe import GatewayStats
from gateway.ports import UsageSink
from gateway.proxy.client_writer import OPEN_STREAMS
from gateway.proxy.errors import Handler, provider_shaped, wrong_method
from gateway.proxy.handlers import Services, intercept, unknown_route
from gateway.proxy.passthrough import passthrough, passthrough_routes, wrong_passthrough_method
from gateway.proxy.relay import RelayOptions
from gateway.proxy.upstream import make_session, stripped_headers
from gateway.state import StateHolder
from gateway.tools.mcp_pool import McpPool

if TYPE_CHECKING:
    from gateway.tracing import Tracing


class Readiness:
    """Ready when the data plane listens, the state can serve (standalone, or pushed by the
    host) and it is not shutting down.

    The one source of readiness: ``/readyz``, the gRPC health of the data plane and
    ``GetStatus.ready`` all read ``ready``, so they agree at every moment.
    """

    def __init__(self, state: StateHolder) -> None:
        self.state = state
        # Set by the daemon once the data-plane listener is up: gRPC health is served earlier.
        self.listening = False
        self.shutting_down = False

    @property
    def ready(self) -> bool:
        """Whether load balancers should send traffic."""
        return self.listening and self.state.current.configured and not self.shutting_down


READY = web.AppKey("ready", Readiness)


class AnyTarget(web.PlainResource):
    """Matches every request target: registered last, it answers what no other route serves.

    A ``/{tail:.*}`` route would miss ``OPTIONS *`` (a target without a leading slash) and
    paths holding a newline (``%0A``). Indexed under ``/``, the router tries it after every other
    resource (the router can reach no resource at all for an empty path, the absolute form
    ``GET http://host HTTP/1.1``: that one gets aiohttp's plain 404).
    """

    def __init__(self, handler: Handler) -> None:
        super().__init__("/")
        self.route = self.add_route("*", handler)

    async def resolve(
        self, request: web.Request
    ) -> tuple[web.UrlMappingMatchInfo | None, set[str]]:
        """Every request matches."""
        return web.UrlMappingMatchInfo({}, self.route), set()


def build_app(
    settings: Settings,
    state: StateHolder,
    sink: UsageSink,
    readiness: Readiness,
    mcp_pool: McpPool | None = None,
    stats: GatewayStats | None = None,
    tracing: Tracing | None = None,
) -> web.Application:
    """Wire routes and the upstream session's lifetime to the app (``stats``: what the
    metrics read, a fresh set when None; ``tracing``: the daemon's, when traces are on)."""
    # No middleware (it costs every request two coroutines): handlers are wrapped once here, or
    # shape their own failures (intercept, passthrough), and the router answers unknown routes
    # and methods. Every route is bound to its dialect or provider type here, once.
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[READY] = readiness
    session_ref: list[aiohttp.ClientSession] = []
    services = Services(
        state=state,
        sink=sink,
        session_ref=session_ref,
        relay=RelayOptions(
            ping_interval=settings.ping_interval,
            on_client_disconnect=settings.on_client_disconnect,
            disconnect_drain_timeout=settings.disconnect_drain_timeout,
        ),
        byok_header=settings.byok_header.lower(),
        stripped_headers=stripped_headers(settings.byok_header),
        max_body_bytes=settings.max_body_bytes,
        mcp_pool=mcp_pool,
        small_model=re.compile(settings.small_model_pattern, re.IGNORECASE),
        max_tool_iterations=settings.mcp_max_iterations,
        body_timeout=settings.client_body_timeout,
        body_total_timeout=settings.client_body_total_timeout,
        stats=stats if stats is not None else GatewayStats(),
        tracing=tracing,
    )

    app[OPEN_STREAMS] = services.relay.streams

    async def upstream_session(_: web.Application) -> AsyncIterator[None]:
        session = make_session(settings.upstream_connect_timeout, settings.upstream_idle_timeout)
        session_ref.append(session)
        services.loop_ref.append(asyncio.get_running_loop())
        yield
        await session.close()

    app.cleanup_ctx.append(upstream_session)
    router = app.router
    # aiohttp tries a resource's routes in order; a "*" route after a path's methods answers the
    # others with 405 (without it, resolution would go on to the catch-all and answer 404).
    health_405 = functools.partial(wrong_method, UNROUTED)
    router.add_get("/healthz", provider_shaped(healthz))
    router.add_route("*", "/healthz", health_405)
    router.add_get("/readyz", provider_shaped(readyz))
    router.add_route("*", "/readyz", health_405)
    # The route table: one handler for every intercepted API, bound to its dialect. Any method:
    # the handler answers 405 itself, in its provider type's shape.
    for dialect in DIALECTS.values():
        handler = functools.partial(intercept, services, dialect)
        router.add_route("*", "/{provider}" + dialect.path, handler)
    # Each provider type's passthrough allow-list (a path two types list is one route).
    for path, route in passthrough_routes(provider_apis(DIALECTS).values()).items():
        relay = functools.partial(passthrough, services, route)
        for method in route.methods:
            router.add_route(method, "/{provider}" + path, relay)
        refuse = functools.partial(wrong_passthrough_method, services, route)
        router.add_route("*", "/{provider}" + path, refuse)
    router.register_resource(AnyTarget(functools.partial(unknown_route, services)))
    return app


async def healthz(_: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: false while shutting down (and, later, until the host's first state push)."""
    if request.app[READY].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)
