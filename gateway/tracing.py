"""OpenTelemetry traces of interceptions (imported only when ``gateway.trace_settings`` says on).

One server span per interception (``Intercept.ProcessRequest``, the child of an incoming W3C
``traceparent``), a client span per upstream attempt (``Intercept.ProcessRequest.Upstream``,
whose context goes upstream as ``traceparent``), and a span per MCP tool listing and per
injected tool call. The spans are passed along explicitly (an :class:`InterceptionTrace` per
interception), never through the global context: the request path pays for tracing only when
it is on, and the SDK's global tracer provider is left alone (an embedding application may
have its own).

Spans are batched and exported from the SDK's own thread (``BatchSpanProcessor``, tuned by
``OTEL_BSP_*``); the exporters read ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout,
certificates) themselves. :meth:`Tracing.close` flushes them at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, MutableMapping
from time import perf_counter, time_ns
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context

from gateway import __version__
from gateway.trace_settings import TraceExport

log = logging.getLogger("aibridged.tracing")

SERVER_SPAN = "Intercept.ProcessRequest"
UPSTREAM_SPAN = "Intercept.ProcessRequest.Upstream"
LIST_TOOLS_SPAN = "Intercept.ProcessRequest.ListTools"
TOOL_CALL_SPAN = "Intercept.ProcessRequest.ToolCall"
# Longest error description a span carries (an upstream's message may be long).
_DESCRIPTION = 300


def _exporter(export: TraceExport) -> SpanExporter:
    # Each exporter reads OTEL_EXPORTER_OTLP_* (endpoint, headers, timeout, TLS) itself.
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def _resource() -> Resource:
    """The service's resource: ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES``, else
    ``aibridged``, with the version."""
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "aibridged"}))
    return resource


class Tracing:
    """The daemon's tracer: makes an :class:`InterceptionTrace` per interception."""

    def __init__(self, export: TraceExport, exporter: SpanExporter | None = None) -> None:
        """Spans go to ``exporter``, by default the OTLP exporter ``export`` names. The sampler
        comes from ``OTEL_TRACES_SAMPLER`` (parent-based, always on, by default)."""
        self.export = export
        self._provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(export)))
        self._tracer = self._provider.get_tracer("aibridged", __version__)

    def interception(
        self,
        incoming: Mapping[str, str],
        started: float,
        attributes: dict[str, str | bool],
    ) -> InterceptionTrace | None:
        """The server span of an interception that arrived at ``perf_counter`` time
        ``started`` with headers ``incoming`` (their ``traceparent`` is its parent)."""
        start = time_ns() - int((perf_counter() - started) * 1e9)
        try:
            span = self._tracer.start_span(
                SERVER_SPAN,
                context=extract(incoming),
                kind=SpanKind.SERVER,
                attributes=attributes,
                start_time=start,
            )
        except Exception:
            # Called after the start record: nothing may stop the interception from ending.
            log.warning("could not start the interception's span", exc_info=True)
            return None
        return InterceptionTrace(self._tracer, span)

    async def close(self) -> None:
        """Export what is pending and stop (bounded by the exporter's own timeout)."""
        await asyncio.to_thread(self._provider.shutdown)


def _upstream_attributes(url: str) -> dict[str, str | int]:
    parts = urlsplit(url)
    attributes: dict[str, str | int] = {
        "http.request.method": "POST",
        # Without the query: it is the client's, and may be long.
        "url.full": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        "server.address": parts.hostname or "",
    }
    port = parts.port or (443 if parts.scheme == "https" else 80)
    attributes["server.port"] = port
    return attributes


class ChildSpan:
    """A span an interception opens for one piece of work (an upstream attempt, an MCP call)."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def ended(self, status: int, error: BaseException | None = None) -> None:
        """End an upstream attempt's span: the response head's ``status``, or ``error``."""
        span = self.span
        if status:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        else:
            kind = type(error).__name__ if error is not None else "no_response"
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
        span.end()

    def listed(self, tools: int) -> None:
        """End a tool listing's span: ``tools`` listed."""
        self.span.set_attribute("mcp_tool_count", tools)
        self.span.end()

    def called(self, outcome: str, error: str) -> None:
        """End a tool call's span: ``outcome`` as the metrics count it, ``error`` its text."""
        span = self.span
        span.set_attribute("mcp_outcome", outcome)
        if outcome != "ok":
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR, error[:_DESCRIPTION]))
        span.end()


class InterceptionTrace:
    """The spans of one interception: its server span and the children the relay opens."""

    __slots__ = ("_context", "_tracer", "_upstream", "span")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context: Context = set_span_in_context(span)
        self._upstream: dict[str, dict[str, str | int]] = {}

    def _child(self, name: str, attributes: Mapping[str, str | int | bool]) -> ChildSpan:
        return ChildSpan(
            self._tracer.start_span(
                name, context=self._context, kind=SpanKind.CLIENT, attributes=attributes
            )
        )

    def upstream(self, url: str, headers: MutableMapping[str, str], attempt: int) -> ChildSpan:
        """The span of one upstream attempt; its ``traceparent`` goes into ``headers``."""
        attributes = self._upstream.get(url)
        if attributes is None:
            attributes = self._upstream[url] = _upstream_attributes(url)
        child = self._child(UPSTREAM_SPAN, attributes)
        if attempt:
            child.span.set_attribute("http.request.resend_count", attempt)
        inject(headers, context=set_span_in_context(child.span))
        return child

    def listing(self) -> ChildSpan:
        """The span of listing the actor's MCP tools (end it with ``listed``)."""
        return self._child(LIST_TOOLS_SPAN, {})

    def tool_call(self, server_id: str, server_url: str, tool: str) -> ChildSpan:
        """The span of one injected tool call (end it with ``called``)."""
        return self._child(
            TOOL_CALL_SPAN,
            {
                "mcp_server_name": server_id,
                "mcp_server_url": server_url,
                "mcp_tool_name": tool,
                "gen_ai.tool.name": tool,
                "gen_ai.operation.name": "execute_tool",
            },
        )

    def end(
        self,
        status: str,
        error_type: str,
        error_message: str,
        upstream_status: int,
        tokens: tuple[int, int, int, int],
    ) -> None:
        """End the server span as the end record says; ``tokens``: input, output, cache read
        and cache write summed over the interception's usage records."""
        span = self.span
        input_tokens, output_tokens, cache_read, cache_write = tokens
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": input_tokens,
                "gen_ai.usage.output_tokens": output_tokens,
                "gen_ai.usage.cache_read.input_tokens": cache_read,
                "gen_ai.usage.cache_creation.input_tokens": cache_write,
                "aibridged.status": status,
            }
        )
        if upstream_status:
            span.set_attribute("aibridged.upstream_status", upstream_status)
        if status == "incomplete":
            # Cut at a limit the client set: an answer, not an error.
            span.set_attribute("aibridged.incomplete_reason", error_message[:_DESCRIPTION])
        elif status != "completed":
            span.set_attribute("error.type", error_type or status)
            span.set_status(Status(StatusCode.ERROR, error_message[:_DESCRIPTION] or None))
        span.end()
