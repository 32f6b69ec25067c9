"""The gRPC server: ControlService behind a bearer-token check, plus health and reflection."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control.v1 import control_pb2, control_pb2_grpc

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
]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every control RPC whose ``authorization`` metadata is not the control token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._deny: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
            self._unauthenticated
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
        if method.endswith("/StreamUsage"):
            return grpc.unary_stream_rpc_method_handler(self._unauthenticated_stream)
        return self._deny

    @staticmethod
    async def _unauthenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing control token")

    @staticmethod
    async def _unauthenticated_stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing control token")


def _credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    if cert is None or key is None:
        return None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


class ControlServer:
    """Owns the grpc.aio server (create it inside the running loop)."""

    def __init__(
        self,
        servicer: control_pb2_grpc.ControlServiceServicer,
        token: str,
        address: str,
        tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
    ) -> None:
        self.server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(token)], options=_SERVER_OPTIONS
        )
        control_pb2_grpc.add_ControlServiceServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        credentials = _credentials(*tls)
        # grpc wants unix:// or unix:/abs/path; our setting uses unix:/path like the data plane.
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot listen on {address}")
        self.address = address

    async def start(self, data_plane_ready: bool) -> None:
        """Start serving; the data plane's health follows ``set_ready``."""
        await self.server.start()
        await self.health.set(CONTROL_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.set_ready(data_plane_ready)

    async def set_ready(self, ready: bool) -> None:
        """Report the data plane's readiness over gRPC health."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(DATA_PLANE_SERVICE, status)

    async def begin_shutdown(self) -> None:
        """Tell probes we are going (NOT_SERVING everywhere) while RPCs still work."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Stop accepting RPCs; running ones get ``grace`` seconds."""
        await self.server.stop(grace)
