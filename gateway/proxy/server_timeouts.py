"""Client read timeouts for the data plane's HTTP server, and a watch on file descriptors.

aiohttp's server closes a connection that stays idle between requests (``keepalive_timeout``) but
has no limit on how long a request's headers may take: a client sending one byte now and then
(slowloris) holds its connection, and its descriptor, for ever. Here the keep-alive timer that
aiohttp already keeps per connection does both jobs (a request whose head arrives whole moves no
timer):

- a new connection must complete its first request's headers within ``header_timeout``;
- between requests the connection may stay idle ``keepalive_timeout``, but once bytes of the next
  request arrive, its headers must be complete within ``header_timeout`` of them.

The body timeout is applied where the body is read (``handlers.read_body``). A body that breaks
HTTP's framing (a bad chunk) fails that read at once: aiohttp's parser would queue the error as the
next request, leaving the handler to wait for the rest of a body that cannot come.

The metrics listener gets the header and keep-alive timeouts too (``TimedRunner``).

At the descriptor limit, uvloop (libuv) accepts and closes new connections without a word and
asyncio logs a traceback every second; ``DescriptorWatch`` says it once, rate-limited.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway.access_log import log_refused
from gateway.intercept.dialects import UNROUTED

log = logging.getLogger("aibridged.server")

# What reading a request body raises when the body breaks HTTP's framing (C parser, Python parser).
MALFORMED_BODY = (HttpProcessingError, RequestPayloadError)


def malformed_request_text(detail: str | None) -> str:
    """The client's message for a request the HTTP parser refused (its first line of detail)."""
    first = (detail or "").partition("\n")[0][:200]
    return f"malformed HTTP request: {first}" if first else "malformed HTTP request"


# The gist of the parse errors whose message quotes the request's bytes (a header line may hold a
# key): the log gets these words instead.
_PARSE_GISTS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "request line or header too long"),
    (InvalidHeader, "invalid header"),
    (BadHttpMethod, "invalid method"),
    (BadStatusLine, "invalid request line"),
    (InvalidURLError, "invalid request target"),
    (TransferEncodingError, "invalid chunked body"),
)


def parse_error_reason(exc: BaseException | None, message: str | None) -> str:
    """The access line's reason for a request the HTTP parser refused: its gist, never the
    request's bytes (the client's message may quote them; the log must not)."""
    for kind, gist in _PARSE_GISTS:
        if isinstance(exc, kind):
            if kind is BadHttpMethod and "HTTPS traffic" in (message or ""):
                gist = "HTTPS traffic on an HTTP port"
            return f"malformed HTTP request: {gist}"
    # The other messages are fixed words, or llhttp's reason followed by ":" and the bytes.
    return malformed_request_text((message or "").partition(":")[0][:100])


class TimedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with a deadline on request headers.

    Uses aiohttp's own keep-alive timer (``_keepalive_handle``, ``_next_keepalive_close_time``,
    ``_process_keepalive``), which closes the connection only while it waits for a request's
    headers: a deadline earlier than aiohttp's replaces it.
    """

    __slots__ = ("_body", "_head_deadline", "_header_timeout")

    def __init__(self, manager: Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        # The body of the latest request parsed, which is the one the parser is reading.
        self._body: StreamReader | None = None
        # The deadline of a request head that had begun to arrive (see _process_keepalive).
        self._head_deadline = -1.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start serving; the first request's headers are due within the header timeout."""
        super().connection_made(transport)
        self._headers_due(self._loop.time() + self._header_timeout)

    def data_received(self, data: bytes) -> None:
        """Parse ``data``; bytes of a request whose headers are still incomplete start its clock.

        A request that arrives whole (the usual case) completes the waiter here and costs one
        check; only a partial request on a kept-alive connection moves the timer. Then one test
        more (for a packet that starts a request: a type check and a store, to know its body).
        """
        RequestHandler.data_received(self, data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._headers_due(self._loop.time() + self._header_timeout)
            self._head_deadline = self._next_keepalive_close_time
        messages = self._messages
        if messages:
            message, payload = messages[-1]
            if type(message) is _ErrInfo:
                self._body_failed(message)
            else:
                self._body = payload

    def _body_failed(self, error: _ErrInfo) -> None:
        # aiohttp's C parser queues an error found in a body as a request of its own: the body's
        # reader would wait for more until client_body_timeout. Fail the body instead.
        payload, self._body = self._body, None
        if payload is None or payload.is_eof() or payload.exception() is not None:
            return  # the error is in a request of its own, answered as such
        # Nothing after the error can be read: no lingering read once the request is answered.
        self._lingering_time = 0.0
        if not self._request_in_progress and payload._waiter is not None:
            # aiohttp's lingering read of a body its handler left unread (the handler answered
            # already): end it quietly, as it would log an error raised into it.
            payload.feed_eof()
        else:
            payload.set_exception(error.exc)

    def _headers_due(self, deadline: float) -> None:
        handle = self._keepalive_handle
        if self._force_close or (
            handle is not None and deadline >= self._next_keepalive_close_time
        ):
            return
        self._next_keepalive_close_time = deadline
        if handle is not None:
            handle.cancel()
        self._keepalive_handle = self._loop.call_at(deadline, self._process_keepalive)

    def _process_keepalive(self) -> None:
        # A connection cut while a request's head was arriving gets an access line; one merely
        # idle (no byte of a request yet, or kept alive after one) closes without a word. After
        # a response aiohttp sets a new close time: a head deadline recorded earlier is stale.
        due = self._next_keepalive_close_time
        transport = self.transport
        closing = self._force_close
        super()._process_keepalive()
        if self._force_close and not closing and due == self._head_deadline:
            peer = transport.get_extra_info("peername") if transport is not None else None
            remote = peer[0] if isinstance(peer, (tuple, list)) else ""
            log_refused("", "", remote, 408, "request headers not received in time")

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """What aiohttp answers by itself (a request it cannot parse): an error in the shape of
        unrouted requests (``UNROUTED``: no route is known yet).

        aiohttp would answer in plain text and log a traceback, which any client can cause on
        every connection; a malformed request gets an access line instead, with the gist of the
        parse error (no traceback: its message may quote a header's value). A 500 here is a bug
        in the gateway, logged with its traceback.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("response already started: cannot answer with an error")
        if status >= 500:
            # Handlers shape their own failures and let client disconnects propagate to here.
            if isinstance(exc, ConnectionError):
                log.debug("client gone", exc_info=exc)
            else:
                log.error("unhandled error in the HTTP server", exc_info=exc)
                log_refused(
                    request.method, request.path, request.remote, status, "internal gateway error"
                )
            text = "internal gateway error"
        else:
            # Nothing of the request was parsed: no method or path to log.
            log_refused("", "", request.remote, status, parse_error_reason(exc, message))
            text = malformed_request_text(message)
        response = web.Response(
            status=status, body=UNROUTED.error_body(status, text), content_type="application/json"
        )
        response.force_close()
        return response

    def abandon_body(self) -> None:
        """Close the connection after the current response, without reading the rest of the body.

        For a client too slow to send its body: aiohttp would otherwise keep reading it for
        ``lingering_time`` after answering.
        """
        self._lingering_time = 0.0


def abandon_body(request: web.BaseRequest) -> None:
    """See :meth:`TimedRequestHandler.abandon_body` (a no-op under another protocol)."""
    protocol = request.protocol
    if isinstance(protocol, TimedRequestHandler):
        protocol.abandon_body()


class TimedServer(Server):
    """An aiohttp ``Server`` whose connections are :class:`TimedRequestHandler`."""

    def __init__(self, made: Server, header_timeout: float) -> None:
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        """The protocol of one new connection."""
        return TimedRequestHandler(
            self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs
        )


class TimedRunner(web.AppRunner):
    """``web.AppRunner`` with the header and keep-alive timeouts on its connections."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=keepalive_timeout, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> Server:
        made = await super()._make_server()
        return TimedServer(made, self._header_timeout)


class DataPlaneRunner(TimedRunner):
    """:class:`TimedRunner` with the descriptor watch while it runs."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._watch: DescriptorWatch | None = None

    async def setup(self) -> None:
        """Build the server and start watching descriptors."""
        await super().setup()
        self._watch = DescriptorWatch(asyncio.get_running_loop())
        self._watch.start()

    async def cleanup(self) -> None:
        """Stop watching, then aiohttp's graceful cleanup."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        await super().cleanup()


# asyncio's message when accept() fails for want of descriptors or memory (selector_events.py).
_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


class DescriptorWatch:
    """Logs at most once per ``every`` seconds that the process has run out of descriptors.

    Two sources: asyncio's accept failures (through the loop's exception handler, whose own
    traceback per failure is replaced), and a probe that opens and closes one descriptor every
    ``interval`` seconds, since uvloop refuses connections at the limit without telling anyone.
    Once a probe interval passes without a failure, one line says descriptors are available again.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval: float = 1.0, every: float = 10.0
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._every = every
        self._failures = 0  # since the last ERROR line
        self._failed_since_probe = False
        self._next_log = 0.0
        self._reported = False  # an ERROR line awaits its "available again"
        self._probe_handle: asyncio.TimerHandle | None = None
        self._previous: Any = None

    def start(self) -> None:
        """Install the exception-handler filter and start probing."""
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._exception_handler)
        self._probe_handle = self._loop.call_later(self._interval, self._probe)

    def stop(self) -> None:
        """Stop probing.

        The exception-handler filter stays for the loop's life: asyncio retries a failed accept
        a second later, once per connection it could not accept, and those retries still fire
        after the listener has closed (each one an error with a traceback, by the thousand).
        """
        if self._probe_handle is not None:
            self._probe_handle.cancel()
            self._probe_handle = None

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ACCEPT_EXHAUSTED:
            self._failed()
        elif _is_stale_accept_retry(context):
            log.debug("accept retry on a closed listener ignored")
        elif self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _probe(self) -> None:
        try:
            fd = os.open(os.devnull, os.O_RDONLY)
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                self._failed()
        else:
            os.close(fd)
            if self._reported and not self._failed_since_probe:
                self._reported = False
                log.warning("file descriptors available again: accepting connections")
        self._failed_since_probe = False
        self._probe_handle = self._loop.call_later(self._interval, self._probe)

    def _failed(self) -> None:
        self._failures += 1
        self._failed_since_probe = True
        now = self._loop.time()
        if now < self._next_log:
            return
        self._next_log = now + self._every
        self._reported = True
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error(
            "out of file descriptors: new connections are refused "
            "(raise the open files limit, or look for clients holding connections)",
            extra={"limit": soft, "failures": self._failures},
        )
        self._failures = 0


def _is_stale_accept_retry(context: dict[str, Any]) -> bool:
    # asyncio's BaseSelectorEventLoop._start_serving, rescheduled after an accept failure, meeting
    # the listening socket closed since (its fileno is -1).
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    return isinstance(context.get("exception"), ValueError) and (
        getattr(callback, "__name__", "") == "_start_serving"
    )
