"""Relay one intercepted call: upstream request, stream or blocking response, records.

This is the only place that turns upstream I/O failures into client responses, so every path
ends the interception with exactly one ``InterceptionEnded`` record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.intercept.errors import anthropic_error_body, anthropic_error_event, parse_error_body
from gateway.intercept.messages.blocking import BlockingTurns
from gateway.intercept.messages.stream import MessagesStream
from gateway.ports import UsageSink
from gateway.proxy.client_writer import CLIENT_GONE, ClientWriter, OnClientLeft
from gateway.proxy.upstream import auto_headers_to_skip, relayed_header_items
from gateway.records import EndStatus, InterceptionEnded
from gateway.retry import retry_delay, should_retry
from gateway.sse import FrameTooLarge, SSEFramer

if TYPE_CHECKING:
    from gateway.proxy.tool_loop import ToolLoop

log = logging.getLogger("aibridged.relay")

# Set on every relayed stream (never relayed from upstream: see ``relayed_header_items``).
_STREAM_HEADERS = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))

# Raised by aiohttp when the upstream connection breaks before or during the response.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """Knobs of the relay, from settings."""

    ping_interval: float
    on_client_disconnect: str
    disconnect_drain_timeout: float


@dataclass(slots=True)
class Outcome:
    """How the interception ended, for the end record."""

    status: EndStatus = "completed"
    error_type: str = ""
    error_message: str = ""
    upstream_status: int = 0

    def fail(self, error_type: str, message: str) -> None:
        """Mark the interception failed (first failure wins)."""
        if self.status == "completed":
            self.status = "failed"
            self.error_type, self.error_message = error_type, message


class Interception:
    """One client request on an intercepted route, from upstream call to end record."""

    def __init__(
        self,
        interception_id: str,
        sink: UsageSink,
        session: aiohttp.ClientSession,
        options: RelayOptions,
        loop: asyncio.AbstractEventLoop,
        url: str,
        headers: CIMultiDict[str],
        max_retries: int,
    ) -> None:
        """``url``, ``headers`` and ``max_retries``: where this interception's upstream calls go
        (the first and every continuation)."""
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
        self.sink.submit(
            InterceptionEnded(self.id, o.status, o.error_type, o.error_message, o.upstream_status)
        )

    async def complete(self) -> None:
        """End the interception and wait until its records are durable.

        Called before the client gets the last byte of its response: a response the client saw
        complete always has its records in the spool, even if the process is killed right after.
        """
        self.end()
        await self.sink.persist()

    async def post_again(self, body: bytes) -> aiohttp.ClientResponse:
        """POST ``body`` to the interception's upstream endpoint, retrying (before anything
        reached the client) per ``gateway.retry``."""
        max_retries = self._max_retries
        post = functools.partial(
            self.session.post,
            self._url,
            data=body,
            headers=self._headers,
            skip_auto_headers=self._skip_auto_headers,
            auto_decompress=True,
        )
        attempt = 0
        while True:
            delay_headers: Mapping[str, str] = {}
            try:
                try:
                    resp = await post()
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # A stale pooled connection fails before any byte of the response: always
                    # safe to retry once, whatever the retry budget.
                    resp = await post()
            except UPSTREAM_ERRORS:
                if attempt >= max_retries:
                    raise
            else:
                if attempt >= max_retries or not should_retry(resp.status, resp.headers):
                    return resp
                delay_headers = dict(resp.headers)
                resp.release()
            delay = retry_delay(attempt, delay_headers, random.random())
            attempt += 1
            log.info(
                "retrying upstream call",
                extra={"interception_id": self.id, "attempt": attempt, "delay": round(delay, 3)},
            )
            await asyncio.sleep(delay)

    def unreachable(self, exc: BaseException) -> web.Response:
        """The upstream could not be reached: 502 in Anthropic's shape."""
        detail = describe_upstream_error(exc)
        self.outcome.fail("upstream_unreachable", detail)
        log.warning("upstream unreachable", extra={"interception_id": self.id, "error": detail})
        return _json(502, anthropic_error_body(502, f"upstream provider unreachable: {detail}"))

    async def upstream_error(self, resp: aiohttp.ClientResponse) -> web.Response:
        """Relay an upstream error response with its status and body."""
        body = await resp.read()
        self.outcome.upstream_status = resp.status
        self.outcome.fail(*parse_error_body(body))
        out = web.Response(status=resp.status, body=body, headers=_relayed(resp))
        out.content_type = resp.content_type or "application/json"
        return out

    async def blocking(
        self,
        resp: aiohttp.ClientResponse,
        turns: BlockingTurns,
        loop: ToolLoop | None = None,
        body: dict[str, Any] | None = None,
    ) -> web.Response:
        """A JSON response: record it, run injected tools while the model calls them, answer."""
        first = resp
        try:
            while True:
                try:
                    raw = await resp.read()
                except UPSTREAM_ERRORS as exc:
                    return self.unreachable(exc)
                self.outcome.upstream_status = resp.status
                result = turns.feed(raw)
                for record in result.records:
                    self.sink.submit(record)
                if result.error:
                    self.outcome.fail("invalid_upstream_response", result.error)
                if loop is not None:
                    loop.record_skipped(result.skipped_calls)
                if loop is None or body is None or not result.tool_calls:
                    break
                if turns.turns >= loop.max_iterations:
                    self.outcome.fail("tool_loop_limit", loop.limit_message())
                    return _json(502, anthropic_error_body(502, loop.limit_message()))
                results = await loop.run(result.tool_calls)
                assert result.assistant is not None
                payload = loop.continuation(body, result.assistant, results)
                if resp is not first:
                    resp.release()
                try:
                    resp = await self.post_again(payload)
                except UPSTREAM_ERRORS as exc:
                    return self.unreachable(exc)
                if resp.status >= 400:
                    return await self.upstream_error(resp)
            out = web.Response(status=resp.status, body=result.body, headers=_relayed(resp))
            out.content_type = resp.content_type or "application/json"
            return out
        finally:
            if resp is not first:
                resp.release()

    async def stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        rewriter: MessagesStream,
        continuation: Continuation | None = None,
    ) -> web.StreamResponse:
        """Relay an SSE stream event by event, with keep-alive pings and disconnect handling."""
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
        writer = ClientWriter(out, options.ping_interval, left, loop)
        try:
            await out.prepare(request)
        except CLIENT_GONE:
            writer.mark_gone()
        tail = b""
        current = resp
        try:
            if not writer.gone:
                writer.start_pinger()
            while True:
                left.resp = current
                tail = await self._pump(current, SSEFramer(), rewriter, writer)
                if continuation is None or writer.gone:
                    break
                # Pings keep the client's connection alive while injected tools run.
                following = await continuation.next_response(rewriter, lambda: writer.gone)
                if following is None:
                    break
                await writer.write(tail)
                tail = b""
                if isinstance(following, bytes):
                    tail = following
                    break
                if current is not resp:
                    current.release()
                current = following
        except UPSTREAM_ERRORS as exc:
            if not writer.gone:
                detail = describe_upstream_error(exc)
                self.outcome.fail("upstream_stream_broken", detail)
                await writer.write(anthropic_error_event(f"upstream stream broken: {detail}"))
        except FrameTooLarge as exc:
            self.outcome.fail("upstream_frame_too_large", str(exc))
            await writer.write(anthropic_error_event(str(exc)))
        except Exception as exc:
            # The stream has started: a gateway fault can only be reported in-stream.
            log.exception("relay failed", extra={"interception_id": self.id})
            self.outcome.fail("gateway_error", type(exc).__name__)
            await writer.write(anthropic_error_event("internal gateway error"))
        finally:
            if current is not resp:
                current.release()
            writer.stop_pinger()
            left.cancel()
            for record in rewriter.finish():
                self.sink.submit(record)
        if left.timed_out:
            log.warning("drain after disconnect timed out", extra={"interception_id": self.id})
        if rewriter.error is not None:
            self.outcome.fail(rewriter.error.type, rewriter.error.message)
        elif not rewriter.message_stopped and not writer.gone:
            self.outcome.fail("incomplete_stream", "upstream stream ended before message_stop")
        if writer.gone:
            self.outcome.status = "client_disconnected"
        await self.complete()
        await writer.close(tail)
        return out

    async def _pump(
        self,
        resp: aiohttp.ClientResponse,
        framer: SSEFramer,
        rewriter: MessagesStream,
        writer: ClientWriter,
    ) -> bytes:
        """Relay the stream; return the tail held back from the client (see ``complete``).

        Once the client is gone, writes become no-ops and the loop keeps reading so the final
        usage is recorded; OnClientLeft bounds that drain (or cancels at once).
        """
        tail = b""
        async for chunk in resp.content.iter_any():
            data = rewriter.feed_chunk(framer, chunk)
            if data is None:
                continue
            for record in rewriter.take_records():
                self.sink.submit(record)
            if rewriter.stop_relayed or tail:
                # message_stop ends an Anthropic stream: it goes out with the end of the
                # body, once the interception's records are durable.
                tail += data
            elif data:
                await writer.write(data)
        last = framer.flush()
        if last is not None:
            tail += rewriter.feed(last)
        return tail


class Continuation(Protocol):
    """Continues a stream whose turn ended in injected tool calls (see ``tool_loop``)."""

    async def next_response(
        self, rewriter: MessagesStream, client_gone: Callable[[], bool]
    ) -> aiohttp.ClientResponse | bytes | None:
        """The next upstream response; bytes (an error event) to end; None when final."""
        ...


def _relayed(resp: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    return relayed_header_items(resp.headers)


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def describe_upstream_error(exc: BaseException) -> str:
    """A short, client-safe description of an upstream I/O failure."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:300]
