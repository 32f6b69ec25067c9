"""Relay one intercepted call: upstream request, stream or blocking response, records.

Upstream failures mean what ``upstream_failure`` says; this module turns them into the client's
response or in-stream error event, so every path ends the interception with exactly one
``InterceptionEnded`` record. With injected tools it carries out, turn after turn, what the
pure loop driver (``gateway.intercept.loop``) decides. It knows the API only through the
interception's ``Dialect``: its rewriters, error shapes, keep-alive and terminal event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.intercept.dialect import Dialect
from gateway.intercept.errors import parse_error_body
from gateway.intercept.loop import Finish, TurnEnded, UpstreamRefused
from gateway.intercept.outcome import Outcome
from gateway.intercept.rewriter import BlockingRewriter, StreamRewriter
from gateway.observe import Observation
from gateway.proxy.client_writer import CLIENT_GONE, ClientWriter, OnClientLeft, OpenStreams
from gateway.proxy.loop_runner import LoopRunner, client_present
from gateway.proxy.upstream import auto_headers_to_skip, relayed_header_items
from gateway.proxy.upstream_call import post
from gateway.proxy.upstream_failure import (
    UPSTREAM_ERRORS,
    UpstreamFailure,
    call_failed,
    record_failure,
    stream_broken,
)
from gateway.records import InterceptionEnded
from gateway.sse import FrameTooLarge, SSEFramer

log = logging.getLogger("aibridged.relay")

# Set on every relayed stream (never relayed from upstream: see ``relayed_header_items``).
_STREAM_HEADERS = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))

_SHUTDOWN = "the gateway is shutting down: the stream was ended before it completed"


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """Knobs of the relay, from settings."""

    ping_interval: float
    on_client_disconnect: str
    disconnect_drain_timeout: float
    # The streams being relayed, for the shutdown (``Daemon.stop``) to end them.
    streams: OpenStreams = field(default_factory=OpenStreams)


class Interception:
    """One client request on an intercepted route, from upstream call to end record."""

    # What ``_pump`` holds back from the client: the stream's last bytes (see ``stream``).
    _held: bytes

    def __init__(
        self,
        dialect: Dialect,
        interception_id: str,
        sink: Observation,
        session: aiohttp.ClientSession,
        options: RelayOptions,
        loop: asyncio.AbstractEventLoop,
        url: str,
        headers: CIMultiDict[str],
        max_retries: int,
    ) -> None:
        """``sink``: where its records go, which also counts them for the metrics and the log;
        ``url``, ``headers`` and ``max_retries``: where this interception's upstream calls go
        (the first and every continuation)."""
        self.dialect = dialect
        self.id = interception_id
        self.sink = sink
        self.session = session
        self.options = options
        self.loop = loop
        self.outcome = Outcome()
        self._ended = False
        self._url = url
        self._headers = headers
        self._max_retries = max_retries
        self._skip_auto_headers = auto_headers_to_skip(headers)

    def end(self) -> None:
        """Write the end record (once, synchronously: it must survive handler cancellation)."""
        if self._ended:
            return
        self._ended = True
        o = self.outcome
        sink = self.sink
        # Straight to the spool: an end record is counted by ``finish``.
        sink.spool.submit(
            InterceptionEnded(self.id, o.status, o.error_type, o.error_message, o.upstream_status)
        )
        sink.finish(o)

    async def complete(self) -> None:
        """End the interception and wait until its records are durable.

        Called before the client gets the last byte of its response: a response the client saw
        complete always has its records in the spool, even if the process is killed right after.
        """
        self.end()
        await self.sink.spool.persist()

    def post_again(self, body: bytes) -> Coroutine[Any, Any, aiohttp.ClientResponse]:
        """POST ``body`` to the interception's upstream endpoint (see ``upstream_call.post``:
        no redirects, retries before anything reached the client).

        Returns the call's coroutine rather than awaiting it: one coroutine less per request.
        """
        return post(
            self.session,
            self._url,
            body,
            self._headers,
            self._skip_auto_headers,
            self._max_retries,
            self.id,
            self.sink.route.upstream,
            self.sink.trace,
        )

    def upstream_failed(self, exc: BaseException, started: bool = False) -> UpstreamFailure:
        """Record an upstream call's failure on the end record and log it; what it means.

        ``started``: the response had begun (the stream broke) rather than never arrived.
        """
        failure = stream_broken(exc, self._url) if started else call_failed(exc, self._url)
        record_failure(failure, self.outcome, self.id)
        return failure

    def unreachable(self, exc: BaseException, started: bool = False) -> web.Response:
        """The upstream call failed before a response could be relayed (no connection, a reset,
        a redirect; ``started``: its body broke): 502 in the provider's shape, naming no
        address."""
        failure = self.upstream_failed(exc, started)
        return self._error(failure.status, failure.client_message)

    async def upstream_error(self, resp: aiohttp.ClientResponse) -> web.Response:
        """Relay an upstream error response with its status and body."""
        return _refused_response(await self.refusal(resp))

    async def refusal(self, resp: aiohttp.ClientResponse) -> UpstreamRefused:
        """Read an upstream error response (released after) and record it; the answer."""
        try:
            body = await resp.read()
        finally:
            resp.release()
        headers = tuple(relayed_header_items(resp.headers))
        refused = UpstreamRefused(
            resp.status,
            body,
            *parse_error_body(body),
            headers,
            # As sent (a charset parameter included), not aiohttp's parsed media type.
            resp.headers.get("Content-Type", ""),
        )
        self.outcome.upstream_status = resp.status
        self.outcome.fail(refused.error_type, refused.message)
        return refused

    async def blocking(
        self,
        resp: aiohttp.ClientResponse,
        turns: BlockingRewriter,
        runner: LoopRunner | None = None,
    ) -> web.Response:
        """A JSON response: record it, run injected tools while the loop goes on, answer."""
        first = resp
        try:
            while True:
                try:
                    raw = await resp.read()
                except UPSTREAM_ERRORS as exc:
                    return self.unreachable(exc, started=True)
                self.outcome.upstream_status = resp.status
                began = perf_counter()
                result = turns.feed(raw)
                for record in result.records:
                    self.sink.submit(record)
                self.sink.busy += perf_counter() - began
                if result.error:
                    # A 200 that is no message (an HTML page, junk) must not pass for an answer.
                    self.outcome.fail("invalid_upstream_response", result.error)
                    log.warning(
                        "upstream 200 response is not a message",
                        extra={"interception_id": self.id, "content_type": resp.content_type},
                    )
                    return self._error(502, result.error)
                if (reported := result.reported) is not None:
                    # A response that says it failed or stopped short is still the answer.
                    self.outcome.fail(reported.type, reported.message, reported.end_status)
                if runner is None:
                    break
                following = await runner.advance(TurnEnded(result.turn), client_present)
                if isinstance(following, Finish):
                    if following.error_type:
                        return self._loop_failed(following)
                    break
                if resp is not first:
                    resp.release()
                resp = following
            headers = relayed_header_items(resp.headers)
            out = web.Response(status=resp.status, body=result.body, headers=headers)
            out.headers["Content-Type"] = resp.headers.get("Content-Type") or "application/json"
            return out
        finally:
            if resp is not first:
                resp.release()

    async def stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        rewriter: StreamRewriter,
        runner: LoopRunner | None = None,
    ) -> web.StreamResponse:
        """Relay an SSE stream event by event, with keep-alive pings and disconnect handling."""
        began = perf_counter()
        self.outcome.upstream_status = resp.status
        up_headers = resp.headers
        # None of these three is allow-listed, so they are added, not replaced.
        headers = relayed_header_items(up_headers)
        headers.append(("Content-Type", up_headers.get("Content-Type", "text/event-stream")))
        headers += _STREAM_HEADERS
        out = web.StreamResponse(status=200, headers=headers)
        options = self.options
        loop = self.loop
        left = OnClientLeft(
            resp, options.on_client_disconnect, options.disconnect_drain_timeout, loop
        )
        dialect = self.dialect
        writer = ClientWriter(out, options.ping_interval, left, loop, dialect.keepalive)
        try:
            await out.prepare(request)
        except CLIENT_GONE:
            writer.mark_gone()
        obs = self.sink
        # The response head is written: the client has its first byte.
        obs.first_byte = head = perf_counter()
        obs.busy += head - began
        self._held = b""
        # An error event to send after the held bytes, when the stream fails.
        ending = b""
        current = resp
        streams = options.streams
        task = asyncio.current_task(loop)
        assert task is not None
        streams.add(task)
        # A failure after the terminal event (``stop_relayed``) costs the client nothing:
        # its message is whole, so the failure is not reported to it nor recorded.
        try:
            if not writer.gone:
                writer.start_pinger()
            while True:
                left.resp = current
                await self._pump(current, SSEFramer(), rewriter, writer)
                if runner is None:
                    break
                # Pings keep the client's connection alive while injected tools run.
                following = await runner.advance(
                    TurnEnded(rewriter.turn_result(), writer.gone), lambda: writer.gone
                )
                if isinstance(following, Finish):
                    if following.error_type:
                        ending = self._loop_failed_event(following)
                    break
                rewriter.next_turn()
                if current is not resp:
                    current.release()
                current = following
        except asyncio.CancelledError:
            if not streams.closing:
                raise
            # Ended by the shutdown (``OpenStreams.end_all``): the connection is still open.
            task.uncancel()
            if not rewriter.stop_relayed:
                self.outcome.fail(
                    "shutdown", "the stream was still open when shutdown_grace ran out"
                )
                ending = dialect.error_event(503, _SHUTDOWN)
        except UPSTREAM_ERRORS as exc:
            if not writer.gone and not rewriter.stop_relayed:
                failure = self.upstream_failed(exc, started=True)
                ending = dialect.error_event(failure.status, failure.client_message)
        except FrameTooLarge as exc:
            if not rewriter.stop_relayed:
                self.outcome.fail("upstream_frame_too_large", str(exc))
                ending = dialect.error_event(502, str(exc))
        except Exception as exc:
            # The stream has started: a gateway fault can only be reported in-stream.
            log.exception("relay failed", extra={"interception_id": self.id})
            if not rewriter.stop_relayed:
                self.outcome.fail("gateway_error", type(exc).__name__)
                ending = dialect.error_event(500, "internal gateway error")
        finally:
            obs.tail = perf_counter()
            streams.discard(task)
            if current is not resp:
                current.release()
            writer.stop_pinger()
            left.cancel()
            for record in rewriter.finish():
                self.sink.submit(record)
        if left.timed_out:
            log.warning("drain after disconnect timed out", extra={"interception_id": self.id})
        if (reported := rewriter.error) is not None:
            self.outcome.fail(reported.type, reported.message, reported.end_status)
        elif not rewriter.stop_relayed and not writer.gone and self.outcome.status == "completed":
            # Found once, here, not per chunk: the body ended (maybe mid-event) with no terminal
            # event, and nothing told the client yet. Such a stream is no whole response: the
            # client must not take it for one.
            lacking = f"upstream stream ended before {dialect.terminal_event}"
            log.warning(lacking, extra={"interception_id": self.id})
            self.outcome.fail("incomplete_stream", lacking)
            ending = dialect.error_event(502, lacking + ": the response is incomplete")
        if writer.gone:
            self.outcome.status = "client_disconnected"
        await self.complete()
        await writer.close(self._held + ending)
        return out

    def _error(self, status: int, message: str) -> web.Response:
        """A gateway-made error response, in the provider's shape."""
        body = self.dialect.provider.error_body(status, message)
        return web.Response(status=status, body=body, content_type="application/json")

    def _loop_failed(self, end: Finish) -> web.Response:
        """The answer of a blocking request whose loop failed: the provider's, else ours."""
        if end.refused is not None:
            return _refused_response(end.refused)
        return self._error(end.status, end.message)

    def _loop_failed_event(self, end: Finish) -> bytes:
        """The event ending a stream whose loop failed: the provider's error body, else ours."""
        if end.refused is not None:
            return self.dialect.relayed_error_event(end.refused.body)
        return self.dialect.error_event(end.status, end.message)

    async def _pump(
        self,
        resp: aiohttp.ClientResponse,
        framer: SSEFramer,
        rewriter: StreamRewriter,
        writer: ClientWriter,
    ) -> None:
        """Relay the stream, holding back its end in ``_held`` (see ``complete``).

        Once the client is gone, writes become no-ops and the loop keeps reading so the final
        usage is recorded; OnClientLeft bounds that drain (or cancels at once). Bytes left in
        the framer at the end are an event cut short: clients drop it (the SSE rule), so it is
        neither relayed nor read.
        """
        tail = b""
        sink = self.sink
        clock = perf_counter
        busy = 0.0
        try:
            async for chunk in resp.content.iter_any():
                began = clock()
                data = rewriter.feed_chunk(framer, chunk)
                if data is None:
                    busy += clock() - began
                    continue
                for record in rewriter.take_records():
                    sink.submit(record)
                busy += clock() - began
                if rewriter.stop_relayed or tail:
                    # The terminal event goes out with the end of the body, once
                    # the interception's records are durable.
                    tail += data
                elif data:
                    await writer.write(data)
        finally:
            # Kept when the upstream breaks after the terminal event: the response is whole.
            self._held = tail
            sink.busy += busy


def _refused_response(refused: UpstreamRefused) -> web.Response:
    """The provider's error answer, relayed with its status, body and relayable headers."""
    out = web.Response(status=refused.status, body=refused.body, headers=refused.headers)
    out.headers["Content-Type"] = refused.content_type or "application/json"
    return out
