"""Composition root: build the state, spool and servers; ordered startup and graceful shutdown.

Startup: spool (recovers unacked records) -> gRPC control plane (data plane NOT_SERVING until
configured) -> metrics listener -> data plane. Shutdown (SIGTERM/SIGINT): readiness and gRPC
health go NOT_SERVING, the data plane stops accepting and waits up to ``shutdown_grace`` for
in-flight streams, their records are flushed to the spool, open ``StreamUsage`` calls send what
is left and return, then gRPC stops and the spool closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from dataclasses import dataclass

from aiohttp import web

from control.server import ControlServer
from control.servicer import ControlServicer
from control.spool import Spool
from gateway.config import Settings, host_port
from gateway.proxy.app import Readiness, build_app
from gateway.proxy.metrics_app import build_metrics_app
from gateway.state import Snapshot, StateHolder
from gateway.tools.mcp_pool import McpPool

log = logging.getLogger("aibridged")


async def _start_site(runner: web.AppRunner, listen: str) -> int:
    """Listen on ``HOST:PORT`` or ``unix:PATH``; return the TCP port (0 for unix sockets)."""
    if listen.startswith("unix:"):
        await web.UnixSite(runner, listen[5:]).start()
        return 0
    host, port = host_port(listen)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return port or int(runner.addresses[-1][1])


@dataclass
class Daemon:
    """A running gateway: what tests and ``aibridged serve`` start and stop."""

    settings: Settings
    spool: Spool
    state: StateHolder
    readiness: Readiness
    runner: web.AppRunner
    port: int
    control: ControlServer | None
    stop_streams: asyncio.Event
    mcp_pool: McpPool
    metrics_runner: web.AppRunner | None = None
    metrics_port: int = 0

    @classmethod
    async def start(cls, settings: Settings) -> Daemon:
        """Start every listener in order; return once the data plane accepts connections."""
        spool = Spool(
            settings.spool_path,
            max_records=settings.spool_max_records,
            max_age=settings.spool_max_age,
            flush_timeout=settings.spool_flush_timeout,
        )
        await spool.start()
        state = StateHolder(Snapshot.from_settings(settings))
        readiness = Readiness(state)
        stop_streams = asyncio.Event()
        mcp_pool = McpPool(
            call_timeout=settings.mcp_call_timeout,
            list_timeout=settings.mcp_list_timeout,
            list_ttl=settings.mcp_list_ttl,
        )
        mcp_pool.configure(state.current.mcp_servers, state.current.mcp_tokens)
        control = await cls._start_control(
            settings, state, spool, readiness, stop_streams, mcp_pool
        )

        metrics_runner, metrics_port = None, 0
        if settings.metrics_enabled:
            metrics_runner = web.AppRunner(build_metrics_app(), access_log=None)
            await metrics_runner.setup()
            metrics_port = await _start_site(metrics_runner, settings.metrics_listen)

        app = build_app(settings, state, spool, readiness, mcp_pool)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=settings.shutdown_grace,
            handler_cancellation=False,
        )
        await runner.setup()
        port = await _start_site(runner, settings.listen)
        daemon = cls(
            settings,
            spool,
            state,
            readiness,
            runner,
            port,
            control,
            stop_streams,
            mcp_pool,
            metrics_runner,
            metrics_port,
        )
        daemon._log_startup()
        return daemon

    @staticmethod
    async def _start_control(
        settings: Settings,
        state: StateHolder,
        spool: Spool,
        readiness: Readiness,
        stop_streams: asyncio.Event,
        mcp_pool: McpPool,
    ) -> ControlServer | None:
        token = settings.control_bearer()
        if token is None:
            log.info("control plane disabled: no control_token or control_token_file configured")
            return None
        holder: list[ControlServer] = []
        pending: set[asyncio.Task[None]] = set()

        def on_change() -> None:
            # Runs inside a push RPC: MCP connections follow the new servers and tokens (the
            # next request uses them), and gRPC health reports the data plane's readiness.
            mcp_pool.configure(state.current.mcp_servers, state.current.mcp_tokens)
            task = asyncio.get_running_loop().create_task(holder[0].set_ready(readiness.ready))
            pending.add(task)
            task.add_done_callback(pending.discard)

        servicer = ControlServicer(state, spool, stop_streams, on_change, time.time())
        tls = (
            settings.control_tls_cert_file,
            settings.control_tls_key_file,
            settings.control_tls_client_ca_file,
        )
        control = ControlServer(servicer, token, settings.control_listen, tls)
        holder.append(control)
        await control.start(readiness.ready)
        return control

    def _log_startup(self) -> None:
        snap = self.state.current
        log.info(
            "aibridged serving",
            extra={
                "listen": self.settings.listen,
                "port": self.port,
                "control": self.control.address if self.control else "disabled",
                "metrics": self.settings.metrics_listen if self.metrics_runner else "disabled",
                "spool": str(self.settings.spool_path),
                "providers": ",".join(snap.providers),
            },
        )
        if snap.personal_mode:
            log.info(
                "personal mode: no gateway keys configured; clients' own provider keys are "
                "forwarded (BYOK) and every interception is recorded in the spool"
            )
        if not snap.configured:
            log.info("waiting for the control plane's first state push before serving requests")

    async def stop(self) -> None:
        """Graceful shutdown in the order of the module docstring."""
        self.readiness.shutting_down = True
        if self.control is not None:
            await self.control.begin_shutdown()
        await self.runner.cleanup()
        await self.mcp_pool.close()
        await self.spool.flush()
        self.stop_streams.set()
        if self.control is not None:
            await self.control.stop(self.settings.control_grace)
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        await self.spool.close()
        log.info("aibridged stopped", extra={"dropped_records": self.spool.dropped})


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path as far as is safe.

    A relayed request allocates thousands of short-lived objects that reference counting frees;
    at the default threshold (700 net allocations) the collector would still run every request or
    so and rescan everything young. Objects alive after startup (modules, settings, the app) are
    frozen out of its sight, and the young generation is collected every 20k allocations.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(20_000, middle, old)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    daemon = await Daemon.start(settings)
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("already shutting down; in-flight requests get the rest of the grace")
            return
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    await daemon.stop()
