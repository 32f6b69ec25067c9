"""Readiness has one answer: ``/readyz``, the gRPC health of ``aibridge.data.v1.DataPlane`` and
``GetStatus.ready`` agree at every moment, before the host's first push and during the drain.

Before, ``GetStatus`` reported ready through the whole drain while ``/readyz`` and gRPC health
said otherwise. Also here: what the README says of a request without ``max_tokens`` (forwarded,
the provider answers) is what happens.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.v1 import control_pb2 as pb
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.config import load_settings
from gateway.daemon import Daemon
from gateway.testing import FakeUpstream, Reply, load_txtar, split_events
from tests.conftest import (
    ALICE,
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    anthropic_provider,
)

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
DATA_PLANE = "aibridge.data.v1.DataPlane"
SERVING = health_pb2.HealthCheckResponse.SERVING


class Probes:
    """The three readiness reports of one daemon, as a load balancer and a host see them."""

    def __init__(self, daemon: Daemon, channel: grpc.aio.Channel) -> None:
        self.root = f"http://127.0.0.1:{daemon.port}"
        # The stubs package types HealthStub for sync channels only.
        self.health = cast(Any, health_pb2_grpc.HealthStub(channel))
        self.control = ControlServiceStub(channel)
        # A new connection per probe, as kubelet makes: a drained listener refuses it.
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def readyz(self) -> bool:
        try:
            async with self.http.get(f"{self.root}/readyz") as resp:
                assert resp.status in (200, 503)
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False  # not listening (any more): what a probe counts as not ready

    async def grpc_health(self) -> bool:
        req = health_pb2.HealthCheckRequest(service=DATA_PLANE)
        response: health_pb2.HealthCheckResponse = await self.health.Check(req, timeout=5)
        return response.status == SERVING

    async def status_ready(self) -> bool:
        req = pb.GetStatusRequest()
        return (await self.control.GetStatus(req, metadata=CONTROL_METADATA, timeout=5)).ready

    async def sample(self) -> bool | None:
        """The readiness all three agree on; None when it changed while sampling (or is gone).

        gRPC health is read before and after the others: when it did not change in between,
        nothing did (readiness changes at most once in each phase of these tests).
        """
        try:
            before = await self.grpc_health()
            readyz = await self.readyz()
            status = await self.status_ready()
            after = await self.grpc_health()
        except grpc.aio.AioRpcError as exc:
            # The drain is over and the control plane has stopped: nothing left to compare.
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return None
        if before != after:
            return None
        assert (readyz, status) == (before, before), (
            f"/readyz={readyz} GetStatus.ready={status} gRPC health={before}"
        )
        return before

    async def close(self) -> None:
        await self.http.close()


class Daemons:
    """Daemons with their control plane on, each stopped once: by the test or at the end."""

    def __init__(self, tmp_path: Path, upstream: FakeUpstream) -> None:
        self.tmp_path = tmp_path
        self.upstream = upstream
        self.running: list[Daemon] = []

    async def start(self, **overrides: Any) -> Daemon:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "control_listen": "127.0.0.1:0",
            "control_token": CONTROL_TOKEN,
            "spool_path": self.tmp_path / f"spool-{len(self.running)}.db",
            "providers": [anthropic_provider(self.upstream.url)],
            "api_keys": [ALICE],
            "shutdown_grace": 20.0,
            **overrides,
        }
        daemon = await Daemon.start(load_settings(None, **settings))
        self.running.append(daemon)
        return daemon

    async def stop(self, daemon: Daemon) -> None:
        self.running.remove(daemon)
        await daemon.stop()


@pytest.fixture
async def daemons(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Daemons]:
    for name in ("AIBRIDGED_PROVIDERS", "AIBRIDGED_API_KEYS", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    started = Daemons(tmp_path, upstream)
    yield started
    for daemon in list(started.running):
        await started.stop(daemon)


async def test_ready_reports_agree_during_the_drain(
    daemons: Daemons, upstream: FakeUpstream
) -> None:
    daemon = await daemons.start()
    assert daemon.control is not None
    events = len(split_events(TEXT["streaming"].encode()))
    # Long enough to sample the drain many times; the grace covers it with room to spare.
    upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=2.0 / events))
    body = dict(orjson.loads(TEXT["request"]), stream=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.control.port}") as channel:
        probes = Probes(daemon, channel)
        try:
            assert await probes.sample() is True
            async with aiohttp.ClientSession() as http:
                resp = await http.post(
                    f"http://127.0.0.1:{daemon.port}/anthropic/v1/messages",
                    json=body,
                    headers={"x-api-key": GATEWAY_KEY},
                )
                first = await resp.content.readany()
                assert b"message_start" in first
                stopping = asyncio.ensure_future(daemons.stop(daemon))
                during: list[bool | None] = []
                reading = asyncio.ensure_future(resp.read())
                # Sample while the stream is still open (the drain is waiting for it).
                while not reading.done():
                    during.append(await probes.sample())
                rest = await reading
                await stopping
        finally:
            await probes.close()
    assert (first + rest).rstrip().endswith(b'"message_stop"}')
    agreed = [s for s in during if s is not None]
    assert len(agreed) >= 3, during
    assert not any(agreed), "the data plane reported ready while draining"


async def test_ready_reports_agree_before_and_after_the_first_push(
    daemons: Daemons, upstream: FakeUpstream
) -> None:
    daemon = await daemons.start(require_control=True, providers=[], api_keys=[])
    assert daemon.control is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.control.port}") as channel:
        probes = Probes(daemon, channel)
        try:
            assert [await probes.sample() for _ in range(3)] == [False] * 3
            provider = pb.Provider(
                name="anthropic",
                type=pb.PROVIDER_TYPE_ANTHROPIC,
                base_url=upstream.url,
                api_key="sk-pushed",
            )
            await probes.control.PutProviders(
                pb.PutProvidersRequest(config_version=1, providers=[provider]),
                metadata=CONTROL_METADATA,
            )
            # Providers alone do not make it ready: keys are needed too.
            assert [await probes.sample() for _ in range(3)] == [False] * 3
            key = pb.ApiKey(
                key_sha256=hashlib.sha256(GATEWAY_KEY.encode()).hexdigest(),
                actor=pb.Actor(id="u-1"),
            )
            await probes.control.PutApiKeys(
                pb.PutApiKeysRequest(config_version=1, api_keys=[key]), metadata=CONTROL_METADATA
            )
            # Ready in all three at once, from the first sample after the push returned.
            assert [await probes.sample() for _ in range(3)] == [True] * 3
        finally:
            await probes.close()


# -- README and behaviour ---------------------------------------------------------------------


async def test_missing_max_tokens_is_forwarded_and_the_provider_answers(gateway: Gateway) -> None:
    """README: a request without ``max_tokens`` goes to the provider, whose answer is relayed."""
    error = b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}'  # noqa: E501 - synthetic provider reply
    gateway.upstream.enqueue(
        Reply(status=400, headers={"Content-Type": "application/json"}, body=error)
    )
    body = orjson.loads(TEXT["request"])
    del body["max_tokens"]
    raw = orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.url}/v1/messages", data=raw, headers={"x-api-key": GATEWAY_KEY}
        ) as resp,
    ):
        assert resp.status == 400
        assert await resp.read() == error
    assert gateway.upstream.requests[-1].body == raw
