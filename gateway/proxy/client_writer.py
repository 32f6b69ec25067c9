"""The client side of a relayed stream: writes, keep-alive pings, noticing it is gone, and
ending it when the gateway shuts down."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


class OpenStreams:
    """The tasks relaying a stream right now, so that a shutdown can end them properly.

    When ``shutdown_grace`` is over, ``end_all`` cancels each; the relay takes that cancellation
    (``closing`` is set) as the order to send its client an error event, end the body and write
    its records, while the connection is still open. Left to the server, they would be cut
    with no event at all.
    """

    __slots__ = ("_tasks", "closing")

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[Any]) -> None:
        """A stream starts being relayed by ``task``."""
        self._tasks.add(task)

    def discard(self, task: asyncio.Task[Any]) -> None:
        """``task``'s stream is over (whatever the reason)."""
        self._tasks.discard(task)

    def end_all(self) -> int:
        """Tell every open stream to end now (the gateway is shutting down); how many there were."""
        self.closing = True
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)


# Where ``Daemon.stop`` finds the data plane's open streams.
OPEN_STREAMS = web.AppKey("open_streams", OpenStreams)


class OnClientLeft:
    """What happens to the upstream when the client disconnects: drain (bounded) or cancel."""

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        mode: str,
        drain_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.resp = resp
        self._mode = mode
        self._drain_timeout = drain_timeout
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self.timed_out = False

    def __call__(self) -> None:
        if self._mode == "cancel":
            # Closing the upstream connection is what stops generation (and billing).
            self.resp.close()
            return
        self._timer = self._loop.call_later(self._drain_timeout, self._expire)

    def _expire(self) -> None:
        self.timed_out = True
        self.resp.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class ClientWriter:
    """Writes to the client, sends pings after silence, and notices when the client is gone."""

    def __init__(
        self,
        out: web.StreamResponse,
        ping_interval: float,
        on_gone: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        ping: bytes,
    ) -> None:
        """``loop``: the running loop (passed in: asking for it costs a syscall per stream);
        ``ping``: the dialect's keep-alive bytes."""
        self.out = out
        self.gone = False
        self.closed = False
        self._on_gone = on_gone
        self._interval = ping_interval
        self._ping = ping
        self._loop = loop
        self._last_write = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._ping_task: asyncio.Task[None] | None = None

    async def write(self, data: bytes) -> None:
        if self.gone or self.closed or not data:
            return
        try:
            await self.out.write(data)
        except CLIENT_GONE:
            self.mark_gone()
            return
        self._last_write = self._loop.time()

    async def close(self, data: bytes) -> None:
        """Send ``data`` and the end of the body together; later writes are dropped."""
        if self.gone or self.closed:
            return
        self.closed = True
        self.stop_pinger()
        try:
            await self.out.write_eof(data)
        except CLIENT_GONE:
            self.mark_gone()

    def mark_gone(self) -> None:
        if not self.gone:
            self.gone = True
            self._on_gone()

    def start_pinger(self) -> None:
        # A timer, not a task per stream: it fires once per interval and only writes when the
        # stream has been silent that long (the relay just stamps _last_write).
        self._timer = self._loop.call_later(self._interval, self._check_idle)

    def stop_pinger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ping_task is not None:
            self._ping_task.cancel()
            self._ping_task = None

    def _check_idle(self) -> None:
        if self.gone or self.closed:
            return
        idle = self._loop.time() - self._last_write
        if idle >= self._interval and (self._ping_task is None or self._ping_task.done()):
            self._ping_task = self._loop.create_task(self.write(self._ping))
            idle = 0.0
        self._timer = self._loop.call_later(self._interval - idle, self._check_idle)
