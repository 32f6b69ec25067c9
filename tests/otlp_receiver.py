"""Real OTLP trace receivers (gRPC and HTTP/protobuf) that collect the spans exported to them.

Each receiver runs in its own thread and event loop, as a collector runs in its own process: an
exporter flushing synchronously from the gateway's loop can never wait on the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from gateway.testing import LoopbackServer

Protocol = Literal["grpc", "http/protobuf"]
T = TypeVar("T")

SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
STATUS_ERROR = Status.StatusCode.STATUS_CODE_ERROR


def plain(value: AnyValue) -> Any:
    """An OTLP attribute value as a Python value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [plain(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP key/values as a dict."""
    kv: list[KeyValue] = list(pairs)
    return {p.key: plain(p.value) for p in kv}


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, with its resource and instrumentation scope."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    scope: str
    start_ns: int
    end_ns: int


@dataclass
class Collected:
    """Spans received so far, and how the exports arrived (thread-safe)."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: ExportTraceServiceRequest, meta: dict[str, str]) -> None:
        received = [
            ReceivedSpan(
                name=span.name,
                kind=span.kind,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                attributes=attributes(span.attributes),
                status_code=span.status.code,
                status_message=span.status.message,
                resource=attributes(rs.resource.attributes),
                scope=ss.scope.name,
                start_ns=span.start_time_unix_nano,
                end_ns=span.end_time_unix_nano,
            )
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]
        with self.lock:
            self.spans.extend(received)
            self.exports.append(meta)


class _GrpcTraceService(TraceServiceServicer):
    def __init__(self, collected: Collected) -> None:
        self.collected = collected

    async def Export(
        self, request: ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ExportTraceServiceResponse:
        meta = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.collected.add(request, meta)
        return ExportTraceServiceResponse()


class _HttpTraceReceiver(LoopbackServer):
    def __init__(self, collected: Collected) -> None:
        super().__init__()
        self.collected = collected

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST" or request.path != "/v1/traces":
            return web.Response(status=404)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.collected.add(ExportTraceServiceRequest.FromString(body), dict(request.headers))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


class OtlpReceiver:
    """A started receiver: ``endpoint`` for ``OTEL_EXPORTER_OTLP_ENDPOINT``, then the spans."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.collected = Collected()
        self.endpoint = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._grpc: grpc.aio.Server | None = None
        self._http: _HttpTraceReceiver | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def start(self) -> OtlpReceiver:
        """Listen on an ephemeral loopback port, in the receiver's thread."""
        self._thread.start()
        port = await self._run(self._start())
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def _start(self) -> int:
        if self.protocol == "grpc":
            self._grpc = grpc.aio.server()
            service = _GrpcTraceService(self.collected)
            add_TraceServiceServicer_to_server(service, self._grpc)  # type: ignore[no-untyped-call]
            port = self._grpc.add_insecure_port("127.0.0.1:0")
            await self._grpc.start()
            return port
        self._http = await _HttpTraceReceiver(self.collected).start()
        return self._http.port

    async def close(self) -> None:
        """Stop listening and end the thread."""
        await self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 5)
        self._loop.close()

    async def _close(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(None)
        if self._http is not None:
            await self._http.close()

    def spans(self, scope: str | None = "aibridged") -> list[ReceivedSpan]:
        """The spans received so far (of one instrumentation scope unless ``scope`` is None)."""
        with self.collected.lock:
            spans = list(self.collected.spans)
        return [s for s in spans if scope is None or s.scope == scope]

    def exports(self) -> list[dict[str, str]]:
        """Request metadata (gRPC) or headers (HTTP) of each export received."""
        with self.collected.lock:
            return list(self.collected.exports)


@contextlib.asynccontextmanager
async def otlp_receiver(protocol: Protocol) -> AsyncIterator[OtlpReceiver]:
    """``async with otlp_receiver("grpc") as rx:`` a started receiver, closed after."""
    receiver = await OtlpReceiver(protocol).start()
    try:
        yield receiver
    finally:
        await receiver.close()
