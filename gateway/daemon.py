"""Composition root: build the state, spool and servers; ordered startup and graceful shutdown.

Shutdown order (SIGTERM/SIGINT): readiness goes false, the data plane stops accepting and waits
up to ``shutdown_grace`` for in-flight streams, then the spool is flushed and closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from control.spool import Spool
from gateway.config import Settings, host_port
from gateway.proxy.app import READY, build_app
from gateway.state import Snapshot, StateHolder

log = logging.getLogger("aibridged")


@dataclass
class Daemon:
    """A running gateway: what tests and ``aibridged serve`` start and stop."""

    settings: Settings
    spool: Spool
    state: StateHolder
    app: web.Application
    runner: web.AppRunner
    port: int

    @classmethod
    async def start(cls, settings: Settings) -> Daemon:
        """Open the spool, then start serving the data plane."""
        spool = Spool(settings.spool_path)
        await spool.start()
        state = StateHolder(Snapshot.from_settings(settings))
        app = build_app(settings, state, spool)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=settings.shutdown_grace,
            handler_cancellation=False,
        )
        await runner.setup()
        if settings.listen.startswith("unix:"):
            site: web.BaseSite = web.UnixSite(runner, settings.listen[5:])
            port = 0
        else:
            host, port = host_port(settings.listen)
            site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        if port == 0 and isinstance(site, web.TCPSite):
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            port = server.sockets[0].getsockname()[1]
        daemon = cls(settings, spool, state, app, runner, port)
        daemon._log_startup()
        return daemon

    def _log_startup(self) -> None:
        snap = self.state.current
        log.info(
            "aibridged serving",
            extra={
                "listen": self.settings.listen,
                "port": self.port,
                "spool": str(self.settings.spool_path),
                "providers": ",".join(snap.providers),
            },
        )
        if snap.personal_mode:
            log.info(
                "personal mode: no gateway keys configured; clients' own provider keys are "
                "forwarded (BYOK) and every interception is recorded in the spool"
            )

    async def stop(self) -> None:
        """Graceful shutdown: not ready, drain the data plane, flush and close the spool."""
        self.app[READY][0] = False
        await self.runner.cleanup()
        await self.spool.close()
        log.info("aibridged stopped", extra={"dropped_records": self.spool.dropped})


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    daemon = await Daemon.start(settings)
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
