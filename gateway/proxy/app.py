"""The data-plane ``web.Application``: routes, error shaping, health, upstream session."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway.config import Settings
from gateway.ports import UsageSink
from gateway.proxy.handlers import Services, anthropic_error, messages
from gateway.proxy.passthrough import ANTHROPIC_PASSTHROUGH, passthrough
from gateway.proxy.relay import RelayOptions
from gateway.proxy.upstream import make_session, stripped_headers
from gateway.state import StateHolder
from gateway.tools.mcp_pool import McpPool

log = logging.getLogger("aibridged.app")


class Readiness:
    """Ready when the state can serve (standalone, or pushed by the host) and not shutting down."""

    def __init__(self, state: StateHolder) -> None:
        self.state = state
        self.shutting_down = False

    @property
    def ready(self) -> bool:
        """Whether load balancers should send traffic."""
        return self.state.current.configured and not self.shutting_down


READY = web.AppKey("ready", Readiness)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def provider_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No traceback and no HTML reach a client: every failure gets the provider's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"route not supported: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = exc.reason
        return anthropic_error(exc.status, message)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return anthropic_error(500, "internal gateway error")


def build_app(
    settings: Settings,
    state: StateHolder,
    sink: UsageSink,
    readiness: Readiness,
    mcp_pool: McpPool | None = None,
) -> web.Application:
    """Wire routes and the upstream session's lifetime to the app."""
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[provider_shaped_errors]
    )
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
    )

    async def upstream_session(_: web.Application) -> AsyncIterator[None]:
        session = make_session(settings.upstream_connect_timeout, settings.upstream_idle_timeout)
        session_ref.append(session)
        services.loop_ref.append(asyncio.get_running_loop())
        yield
        await session.close()

    app.cleanup_ctx.append(upstream_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{provider}/v1/messages", functools.partial(messages, services))
    for method, path in ANTHROPIC_PASSTHROUGH:
        app.router.add_route(method, "/{provider}" + path, functools.partial(passthrough, services))
    return app


async def healthz(_: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: false while shutting down (and, later, until the host's first state push)."""
    if request.app[READY].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)
