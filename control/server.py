"""The gRPC server: ControlService behind a bearer-token check, plus health and reflection."""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control.v1 import control_pb2, control_pb2_grpc
from gateway.config import ConfigError, host_port

log = logging.getLogger("aibridged.control")

CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name
# Health service name of the data plane: NOT_SERVING until it can serve requests.
DATA_PLANE_SERVICE = "aibridge.data.v1.DataPlane"
# Probes and tooling must work without the control token.
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

_SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # gRPC sets SO_REUSEPORT by default: a second daemon on the same control port would then
    # share it silently (each getting some of the host's calls) instead of failing to start.
    ("grpc.so_reuseport", 0),
]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every control RPC whose ``authorization`` metadata is not the control token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        # One refusal, wrapped for each call shape (StreamUsage is the only streaming RPC).
        self._deny: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
            _unauthenticated
        )
        self._deny_stream: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(
            _unauthenticated
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method or ""
        if method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        log.warning("control RPC refused: bad or missing bearer token", extra={"method": method})
        return self._deny_stream if method.endswith("/StreamUsage") else self._deny


async def _unauthenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing control token")


@dataclass(frozen=True)
class TlsFiles:
    """The control plane's certificate chain, private key and optional client CA, as read."""

    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)


def load_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
    """Read and check the TLS files; :class:`ConfigError` names the setting at fault.

    Checked here with the ``ssl`` module because gRPC would only fail when binding, with its
    own log lines and no word of which file.
    """
    if cert is None or key is None:
        return None
    files = TlsFiles(
        _read("control_tls_cert_file", cert),
        _read("control_tls_key_file", key),
        _read("control_tls_client_ca_file", client_ca) if client_ca else None,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The callback refuses an encrypted key rather than prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        if b"CERTIFICATE" not in files.cert:
            where = "control_tls_cert_file"
        elif b"PRIVATE KEY" not in files.key:
            where = "control_tls_key_file"
        else:  # both look right on their own: they do not belong together
            where = "control_tls_cert_file, control_tls_key_file"
        raise ConfigError(
            f"{where}: not a usable PEM certificate chain and private key: {_reason(exc)}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"control_tls_client_ca_file: not a usable PEM CA certificate: {_reason(exc)}"
            ) from None
    return files


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def check_bindable(address: str) -> None:
    """:class:`ConfigError` naming ``control_listen`` when ``address`` cannot be bound.

    gRPC reports a failed bind as a RuntimeError plus a log line of its own on stderr; trying
    the address first gives one clear line instead (a race with another process binding it in
    between is still caught, less prettily, by ControlServer).
    """
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:").removeprefix("//"))
        if not path.parent.is_dir():
            raise ConfigError(
                f"control_listen: cannot listen on {address}: no directory {path.parent}"
            )
        # gRPC replaces a socket left by an earlier run, but nothing else.
        if path.exists() and not path.is_socket():
            raise ConfigError(
                f"control_listen: cannot listen on {address}: {path} exists and is not a socket"
            )
        return
    host, port = host_port(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # Like gRPC: SO_REUSEADDR, so a port in TIME_WAIT is not reported as taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"control_listen: cannot listen on {address}: {reason}") from None


def _credentials(tls: TlsFiles | None) -> grpc.ServerCredentials | None:
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.client_ca is not None,
    )


class _Health(health.aio.HealthServicer):
    """Health whose data-plane status is read from ``ready`` at each Check.

    A stored status is updated by a task after each change; read live, a probe of the data
    plane's gRPC health and ``/readyz`` give the same answer at every moment.
    """

    def __init__(self, ready: Callable[[], bool] | None) -> None:
        super().__init__()
        self._ready = ready

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if self._ready is not None and request.service == DATA_PLANE_SERVICE:
            return _response(self._ready())
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response


def _response(ready: bool) -> health_pb2.HealthCheckResponse:
    return health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.SERVING
        if ready
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


class ControlServer:
    """Owns the grpc.aio server (create it inside the running loop)."""

    def __init__(
        self,
        servicer: control_pb2_grpc.ControlServiceServicer,
        token: str,
        address: str,
        tls: TlsFiles | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """``ready``, when given, is the data plane's readiness, read at each health Check."""
        self.server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(token)], options=_SERVER_OPTIONS
        )
        control_pb2_grpc.add_ControlServiceServicer_to_server(servicer, self.server)
        self.health = _Health(ready)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        credentials = _credentials(tls)
        # grpc wants unix:// or unix:/abs/path; our setting uses unix:/path like the data plane.
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # gRPC's "Failed to bind to address ..."
            raise ConfigError(f"control_listen: cannot listen on {address}") from None
        if self.port == 0 and not address.startswith("unix:"):
            raise ConfigError(f"control_listen: cannot listen on {address}")
        self.address = address

    async def start(self, data_plane_ready: bool) -> None:
        """Start serving; the data plane's health follows ``set_ready``."""
        await self.server.start()
        await self.health.set(CONTROL_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.set_ready(data_plane_ready)

    async def set_ready(self, ready: bool) -> None:
        """Report the data plane's readiness to health Watch streams (Check reads it live)."""
        await self.health.set(DATA_PLANE_SERVICE, _response(ready).status)

    async def begin_shutdown(self) -> None:
        """Tell probes we are going (NOT_SERVING everywhere) while RPCs still work."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Stop accepting RPCs; running ones get ``grace`` seconds."""
        await self.server.stop(grace)
