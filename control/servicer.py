"""``ControlService``: versioned state pushes, status, and the usage stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import grpc

from control.convert import (
    InvalidField,
    api_keys_from_proto,
    duration,
    mcp_servers_from_proto,
    mcp_tokens_from_proto,
    providers_from_proto,
)
from control.spool import Spool
from control.usage_stream import stream_usage
from control.v1 import control_pb2, control_pb2_grpc
from gateway.metrics import CONTROL_LAST_PUSH, CONTROL_PUSHES
from gateway.state import StaleVersion, StateHolder

log = logging.getLogger("aibridged.control")
Ctx = grpc.aio.ServicerContext[Any, Any]


class _FullStatePush(Protocol):
    @property
    def config_version(self) -> int: ...


R = TypeVar("R", bound=_FullStatePush)
D = TypeVar("D")


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    """Applies the host's pushes to the data plane's state and serves the usage spool."""

    def __init__(
        self,
        state: StateHolder,
        spool: Spool,
        stop: asyncio.Event,
        on_change: Callable[[], None],
        started_at: float,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """``ready`` is the data plane's readiness (what ``/readyz`` answers), for GetStatus."""
        self._state = state
        self._spool = spool
        self._stop = stop
        self._on_change = on_change
        self._started_at = started_at
        self._ready = ready or (lambda: self._state.current.configured and not self._stop.is_set())

    async def PutProviders(
        self, request: control_pb2.PutProvidersRequest, context: Ctx
    ) -> control_pb2.PutProvidersResponse:
        await self._put(
            context,
            "providers",
            request,
            providers_from_proto,
            lambda v, p: self._state.put_providers(v, p, request.allow_byok),
        )
        return control_pb2.PutProvidersResponse(applied_version=request.config_version)

    async def PutApiKeys(
        self, request: control_pb2.PutApiKeysRequest, context: Ctx
    ) -> control_pb2.PutApiKeysResponse:
        await self._put(context, "api_keys", request, api_keys_from_proto, self._state.put_api_keys)
        return control_pb2.PutApiKeysResponse(applied_version=request.config_version)

    async def PutMcpServers(
        self, request: control_pb2.PutMcpServersRequest, context: Ctx
    ) -> control_pb2.PutMcpServersResponse:
        await self._put(
            context, "mcp_servers", request, mcp_servers_from_proto, self._state.put_mcp_servers
        )
        return control_pb2.PutMcpServersResponse(applied_version=request.config_version)

    async def PutMcpAccessTokens(
        self, request: control_pb2.PutMcpAccessTokensRequest, context: Ctx
    ) -> control_pb2.PutMcpAccessTokensResponse:
        await self._put(
            context, "mcp_tokens", request, mcp_tokens_from_proto, self._state.put_mcp_tokens
        )
        return control_pb2.PutMcpAccessTokensResponse(applied_version=request.config_version)

    async def GetStatus(
        self, request: control_pb2.GetStatusRequest, context: Ctx
    ) -> control_pb2.GetStatusResponse:
        snap = self._state.current
        depth, oldest = await self._spool.stats()
        now = time.time()
        return control_pb2.GetStatusResponse(
            providers_version=snap.versions.providers,
            api_keys_version=snap.versions.api_keys,
            mcp_servers_version=snap.versions.mcp_servers,
            mcp_tokens_version=snap.versions.mcp_tokens,
            provider_count=len(snap.providers),
            api_key_count=len(snap.keys),
            mcp_server_count=len(snap.mcp_servers),
            mcp_token_count=len(snap.mcp_tokens),
            spool_depth=depth,
            oldest_unacked_age=duration(max(0.0, now - oldest) if oldest is not None else 0.0),
            uptime=duration(now - self._started_at),
            spool_epoch=self._spool.epoch,
            high_watermark=self._spool.high_watermark,
            dropped_records=self._spool.dropped,
            ready=self._ready(),
        )

    async def StreamUsage(
        self, request: control_pb2.StreamUsageRequest, context: Ctx
    ) -> AsyncIterator[control_pb2.StreamUsageResponse]:
        async for batch in stream_usage(request, self._spool, self._stop):
            yield batch

    async def AckUsage(
        self, request: control_pb2.AckUsageRequest, context: Ctx
    ) -> control_pb2.AckUsageResponse:
        removed = 0
        if request.epoch == self._spool.epoch:
            if request.acked_through > self._spool.high_watermark:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"acked_through {request.acked_through} is above the spool's high watermark "
                    f"{self._spool.high_watermark}",
                )
            removed = await self._spool.ack(request.acked_through)
        else:
            log.warning("ack for another spool epoch ignored", extra={"epoch": request.epoch})
        depth, _ = await self._spool.stats()
        return control_pb2.AckUsageResponse(removed=removed, spool_depth=depth)

    async def _put(
        self,
        context: Ctx,
        kind: str,
        request: R,
        convert: Callable[[R], D],
        apply: Callable[[int, D], object],
    ) -> None:
        """Validate a full-state push, apply it atomically, report the new readiness."""
        version = request.config_version
        try:
            state = convert(request)
        except InvalidField as exc:
            CONTROL_PUSHES.labels(kind, "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            apply(version, state)
        except StaleVersion as exc:
            CONTROL_PUSHES.labels(kind, "stale").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        CONTROL_PUSHES.labels(kind, "applied").inc()
        CONTROL_LAST_PUSH.labels(kind).set(time.time())
        log.info("state applied", extra={"kind": kind, "version": version})
        self._on_change()
