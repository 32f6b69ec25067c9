"""Composition root: build the state, spool and servers; ordered startup and graceful shutdown.

Startup: spool (recovers unacked records) -> gRPC control plane (data plane NOT_SERVING until
configured) -> metrics listener -> data plane. Shutdown (SIGTERM/SIGINT): readiness and gRPC
health go NOT_SERVING, the data plane stops accepting and waits up to ``shutdown_grace`` for
in-flight streams (those still open then end with an error event), their records are flushed to
the spool, open ``StreamUsage`` calls send what is left and return, then gRPC stops and the spool
closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from control.server import ControlServer, TlsFiles, check_bindable, load_tls
from control.servicer import ControlServicer
from control.spool import Spool
from gateway.config import ConfigError, Settings, host_port
from gateway.exposition import DATA_PLANE
from gateway.logs import EventLog
from gateway.observe import GatewayStats
from gateway.proxy.app import Readiness, build_app
from gateway.proxy.client_writer import OPEN_STREAMS
from gateway.proxy.metrics_app import build_metrics_app
from gateway.proxy.server_timeouts import DataPlaneRunner, TimedRunner
from gateway.state import Snapshot, StateHolder, unset_key_envs
from gateway.tools.mcp_pool import McpPool
from gateway.trace_settings import TraceSettingsError, trace_export

if TYPE_CHECKING:
    from gateway.tracing import Tracing

log = logging.getLogger("aibridged")


async def _start_site(runner: web.AppRunner, listen: str, setting: str) -> int:
    """Listen on ``HOST:PORT`` or ``unix:PATH``; return the TCP port (0 for unix sockets).

    A failure is a :class:`ConfigError` naming ``setting`` (the port is in use, ...).
    """
    try:
        if listen.startswith("unix:"):
            await web.UnixSite(runner, listen[5:]).start()
            return 0
        host, port = host_port(listen)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot listen on {listen}: {_reason(exc)}") from None
    return port or int(runner.addresses[-1][1])


def _reason(exc: OSError) -> str:
    # uvloop words a bind failure "error while attempting to bind on address (...): address
    # already in use"; the address is in our message already.
    return (exc.strerror or str(exc)).rpartition("): ")[2]


async def _open_spool(spool: Spool, path: object) -> None:
    try:
        await spool.start()
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"spool_path: cannot open {path}: {reason}") from None


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
    stats: GatewayStats
    metrics_runner: web.AppRunner | None = None
    metrics_port: int = 0
    tracing: Tracing | None = None

    @classmethod
    async def start(cls, settings: Settings) -> Daemon:
        """Start every listener in order; return once the data plane accepts connections.

        What only starting reveals (invalid state, an unreadable token or TLS file, a port in
        use, a spool that cannot be opened) is a :class:`ConfigError` naming the setting, raised
        once whatever had started is stopped again (nothing is left running).
        """
        # Checked before anything starts, so most mistakes need no clean-up at all.
        state = StateHolder(Snapshot.from_settings(settings))
        token = settings.control_bearer()
        tls = None
        if token is not None:
            tls = load_tls(
                settings.control_tls_cert_file,
                settings.control_tls_key_file,
                settings.control_tls_client_ca_file,
            )
            check_bindable(settings.control_listen)
        readiness = Readiness(state)
        stop_streams = asyncio.Event()
        try:
            export = trace_export(os.environ)
        except TraceSettingsError as exc:
            raise ConfigError(str(exc)) from None
        async with contextlib.AsyncExitStack() as started:
            tracing = None
            if export is not None:
                # Imported only now: with tracing off, nothing of OpenTelemetry is loaded.
                from gateway.tracing import Tracing

                tracing = Tracing(export)
                started.push_async_callback(tracing.close)
            spool = Spool(
                settings.spool_path,
                max_records=settings.spool_max_records,
                max_age=settings.spool_max_age,
                flush_timeout=settings.spool_flush_timeout,
            )
            await _open_spool(spool, settings.spool_path)
            started.push_async_callback(spool.close)
            mcp_pool = McpPool(
                call_timeout=settings.mcp_call_timeout,
                list_timeout=settings.mcp_list_timeout,
                list_ttl=settings.mcp_list_ttl,
            )
            started.push_async_callback(mcp_pool.close)
            mcp_pool.configure(state.current.mcp_servers, state.current.mcp_tokens)
            control = None
            if token is not None:
                control = await cls._start_control(
                    settings, token, tls, state, spool, readiness, stop_streams, mcp_pool, started
                )
            daemon = await cls._start_listeners(
                settings, state, spool, readiness, control, stop_streams, mcp_pool, started, tracing
            )
            # Started: from here on, Daemon.stop owns the shutdown.
            started.pop_all()
        # gRPC health reads readiness live; Watch streams hear of the change from this.
        readiness.listening = True
        if control is not None:
            await control.set_ready(readiness.ready)
        daemon._log_startup()
        return daemon

    @classmethod
    async def _start_listeners(
        cls,
        settings: Settings,
        state: StateHolder,
        spool: Spool,
        readiness: Readiness,
        control: ControlServer | None,
        stop_streams: asyncio.Event,
        mcp_pool: McpPool,
        started: contextlib.AsyncExitStack,
        tracing: Tracing | None,
    ) -> Daemon:
        """The metrics listener, then the data plane; their clean-up goes on ``started``."""
        metrics_runner, metrics_port = None, 0
        if settings.metrics_enabled:
            # GET only: its handler reads no body, so only the head and idle time need bounds.
            metrics_runner = TimedRunner(
                build_metrics_app(),
                header_timeout=settings.client_header_timeout,
                keepalive_timeout=settings.client_keepalive_timeout,
                access_log=None,
            )
            await metrics_runner.setup()
            started.push_async_callback(metrics_runner.cleanup)
            metrics_port = await _start_site(
                metrics_runner, settings.metrics_listen, "metrics_listen"
            )

        stats = GatewayStats(
            settings.metrics_model_pattern,
            settings.metrics_max_models,
            settings.metrics_actor_labels,
        )
        app = build_app(settings, state, spool, readiness, mcp_pool, stats, tracing)
        runner = DataPlaneRunner(
            app,
            header_timeout=settings.client_header_timeout,
            keepalive_timeout=settings.client_keepalive_timeout,
            # Bodies are decoded by handlers.read_body, bounded by their decoded size.
            auto_decompress=False,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=settings.shutdown_grace,
            handler_cancellation=False,
        )
        await runner.setup()
        # Also closes the upstream session the app opened (no "Unclosed client session").
        started.push_async_callback(runner.cleanup)
        port = await _start_site(runner, settings.listen, "listen")
        # The metrics serve this daemon's counters, state and spool from now on; per-request
        # log lines are written in batches from its loop.
        DATA_PLANE.attach(stats, state, spool)
        EventLog.bind(asyncio.get_running_loop())
        return cls(
            settings,
            spool,
            state,
            readiness,
            runner,
            port,
            control,
            stop_streams,
            mcp_pool,
            stats,
            metrics_runner,
            metrics_port,
            tracing,
        )

    @staticmethod
    async def _start_control(
        settings: Settings,
        token: str,
        tls: TlsFiles | None,
        state: StateHolder,
        spool: Spool,
        readiness: Readiness,
        stop_streams: asyncio.Event,
        mcp_pool: McpPool,
        started: contextlib.AsyncExitStack,
    ) -> ControlServer:
        """Build and start the control plane; its clean-up goes on ``started`` before it starts,
        so a start that fails half-way (after the gRPC server started) still stops it."""
        holder: list[ControlServer] = []
        pending: set[asyncio.Task[None]] = set()

        def on_change() -> None:
            # Runs inside a push RPC: MCP connections follow the new servers and tokens (the
            # next request uses them), and health Watch streams hear of the new readiness.
            mcp_pool.configure(state.current.mcp_servers, state.current.mcp_tokens)
            task = asyncio.get_running_loop().create_task(holder[0].set_ready(readiness.ready))
            pending.add(task)
            task.add_done_callback(pending.discard)

        def ready() -> bool:
            return readiness.ready

        servicer = ControlServicer(state, spool, stop_streams, on_change, time.time(), ready)
        control = ControlServer(servicer, token, settings.control_listen, tls, ready)
        started.push_async_callback(control.stop, 0)
        holder.append(control)
        await control.start(readiness.ready)
        return control

    def _log_startup(self) -> None:
        # Logged once started: a start-up failure is a single line on stderr, nothing before it.
        snap = self.state.current
        if self.control is None:
            log.info("control plane disabled: no control_token or control_token_file configured")
        # What to give clients as their base URL: a wildcard address is reached over loopback.
        listen, via = self.settings.listen, ""
        if listen.startswith("unix:"):
            root, via = "http://localhost", f" (over {listen})"
        else:
            host = host_port(listen)[0]
            host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            root = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        urls = " ".join(f"{root}/{name}" for name in snap.providers) or root
        log.info(
            "aibridged serving: clients use %s%s",
            urls,
            via,
            extra={
                "listen": self.settings.listen,
                "port": self.port,
                "control": self.control.address if self.control else "disabled",
                "metrics": self.settings.metrics_listen if self.metrics_runner else "disabled",
                "spool": str(self.settings.spool_path),
                "providers": ",".join(snap.providers),
                "tracing": self.tracing.export.describe() if self.tracing else "off",
            },
        )
        if snap.personal_mode:
            log.info(
                "personal mode: no gateway keys configured; clients' own provider keys are "
                "forwarded (BYOK) and every interception is recorded in the spool"
            )
        if not snap.configured:
            log.info("waiting for the control plane's first state push before serving requests")
        self._log_missing_keys(snap)

    def _log_missing_keys(self, snap: Snapshot) -> None:
        """Say which providers have no central key, at the level the mode makes it deserve.

        Personal mode expects none (each client brings its own): INFO. With gateway keys, a
        request without the client's own key gets 401: WARNING, now rather than at the first
        request. Managed by a host: its pushes bring the providers, nothing to say.
        """
        if snap.managed:
            return
        for provider, variable in unset_key_envs(self.settings).items():
            extra = {"provider": provider, "unset": variable}
            if snap.personal_mode:
                log.info("provider has no central key: clients send their own", extra=extra)
            elif snap.allow_byok:
                log.warning(
                    "provider has no central key: requests get 401 unless the client sends its "
                    f"own provider key in {self.settings.byok_header}",
                    extra=extra,
                )
            else:
                log.warning(
                    "provider has no central key and allow_byok is off: every request gets 401",
                    extra=extra,
                )

    async def stop(self) -> None:
        """Graceful shutdown in the order of the module docstring."""
        self.readiness.shutting_down = True
        if self.control is not None:
            await self.control.begin_shutdown()
        # aiohttp waits up to shutdown_grace for in-flight requests, then cuts them silently:
        # streams still open when the grace is over are ended first, each with an error event
        # and its records (the relay does it when told by ``OpenStreams.end_all``).
        try:
            cleanup = asyncio.ensure_future(self.runner.cleanup())
            done, _ = await asyncio.wait({cleanup}, timeout=self.settings.shutdown_grace)
            if not done:
                ended = self.runner.app[OPEN_STREAMS].end_all()
                if ended:
                    log.warning(
                        "shutdown grace over: ending open streams", extra={"streams": ended}
                    )
            await cleanup
            await self.mcp_pool.close()
            await self.spool.flush()
            self.stop_streams.set()
            if self.control is not None:
                await self.control.stop(self.settings.control_grace)
            if self.metrics_runner is not None:
                await self.metrics_runner.cleanup()
            await self.spool.close()
            if self.tracing is not None:
                # Every interception has ended: their spans go out before the process does.
                await self.tracing.close()
        finally:
            # Whatever failed above, the last access lines (the streams shutdown ended) are
            # written and the metrics let go of this daemon.
            DATA_PLANE.detach(self.stats)
            EventLog.bind(None)
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
    """Run until SIGTERM or SIGINT, then shut down gracefully.

    A start-up failure is a :class:`ConfigError` (an OSError no step named becomes one).
    """
    try:
        daemon = await Daemon.start(settings)
    except OSError as exc:
        raise ConfigError(f"cannot start: {exc.strerror or exc}") from None
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
