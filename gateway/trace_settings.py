"""Whether traces are on, and how they are exported, from the standard ``OTEL_*`` variables (pure).

Decided without importing OpenTelemetry: when tracing is off, nothing of it is imported
(``gateway.tracing`` is, only when this says so).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

PROTOCOLS = ("grpc", "http/protobuf")
# The OpenTelemetry specification's default protocol for OTLP exporters.
DEFAULT_PROTOCOL = "http/protobuf"


class TraceSettingsError(ValueError):
    """An ``OTEL_*`` variable the gateway cannot honour; the message names it."""


@dataclass(frozen=True, slots=True)
class TraceExport:
    """Where spans go: the OTLP protocol and, for the startup line, the endpoint."""

    protocol: str
    # As given (the exporters read it themselves), "" for the exporter's default.
    endpoint: str

    def describe(self) -> str:
        """``OTLP <protocol> to <endpoint>``, the endpoint without credentials or query."""
        return f"OTLP {self.protocol} to {safe_endpoint(self.endpoint) or 'the default endpoint'}"


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() == "true"


def trace_export(environ: Mapping[str, str]) -> TraceExport | None:
    """How to export spans per ``environ``; None when tracing is off.

    On when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_ENDPOINT``) or ``OTEL_TRACES_EXPORTER=otlp``; off when
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Raises
    :class:`TraceSettingsError` for an exporter or protocol the gateway does not ship.
    """
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return None
    exporters = {
        name.strip().lower()
        for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip()
    }
    if "none" in exporters:
        return None
    unknown = exporters - {"otlp"}
    if unknown:
        raise TraceSettingsError(
            f"OTEL_TRACES_EXPORTER: {', '.join(sorted(unknown))} is not supported"
            " (aibridged exports traces over OTLP: use otlp or none)"
        )
    endpoint = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or ""
    ).strip()
    if not endpoint and not exporters:
        return None
    variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    protocol = environ.get(variable, "").strip()
    if not protocol:
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = environ.get(variable, "").strip() or DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        raise TraceSettingsError(
            f"{variable}: {protocol!r} is not supported (use {' or '.join(PROTOCOLS)})"
        )
    return TraceExport(protocol, endpoint)


def safe_endpoint(endpoint: str) -> str:
    """``endpoint`` without user information, query or fragment (safe to log)."""
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return "(unparseable endpoint)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
