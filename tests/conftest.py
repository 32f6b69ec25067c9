"""Shared fixtures: a fake upstream provider, a running gateway, the fixture files, metrics."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, ParsedMessage
from prometheus_client.parser import text_string_to_metric_families

from control.spool import SpooledRecord
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.config import load_settings
from gateway.daemon import Daemon
from gateway.testing import FakeUpstream, load_txtar, split_events

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "aibridge"

CONTROL_TOKEN = "control-token-for-tests-0123456789"
CONTROL_METADATA = (("authorization", f"Bearer {CONTROL_TOKEN}"),)
GATEWAY_KEY = "gw-alice-key-0123456789"
UPSTREAM_KEY = "sk-ant-central-key-abcdefghijklmnop"
ALICE = {"key": GATEWAY_KEY, "actor_id": "u-1", "username": "alice", "metadata": {"team": "core"}}


def anthropic_provider(base_url: str, **extra: Any) -> dict[str, Any]:
    """Settings of the default provider with the central key, ``extra`` fields added."""
    return {
        "name": "anthropic",
        "type": "anthropic",
        "base_url": base_url,
        "api_key": UPSTREAM_KEY,
        **extra,
    }


def recorded_sse_streams() -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every fixture Anthropic SSE stream (synthetic; HTTP errors left out)."""
    streams = []
    for path in sorted((FIXTURES / "anthropic").glob("*.txtar")):
        text = load_txtar(path).get("streaming")
        if text is not None and not text.startswith("HTTP/"):
            streams.append((path.stem, text.encode()))
    return streams


_MESSAGE_EVENTS = frozenset(
    {
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    }
)


def replayed_sections(streaming: bool, *, follow: bool = False) -> list[str]:
    """Fixture sections one run replays: the first turn and, with ``follow``, the turn after an
    injected tool call (``streaming/tool-call``)."""
    key = "streaming" if streaming else "non-streaming"
    return [key, f"{key}/tool-call"] if follow else [key]


def fixture_message(section: str) -> Message:
    """The message one fixture section describes, as a client ends up with it.

    Each section has its own id and usage, so a test takes its expectations from the section it
    replays, never from its sibling: a blocking section is the JSON body itself, a streaming
    one is folded by the SDK's accumulator (an ``error`` event leaves what arrived before it).
    """
    if not section.lstrip().startswith(("event:", "data:")):
        return Message.model_validate_json(section)
    snapshot: ParsedMessage[None] | None = None
    json_bufs: dict[int, bytes] = {}
    for raw in split_events(section.encode()):
        lines = raw.splitlines()
        name = next((ln[6:].strip().decode() for ln in lines if ln.startswith(b"event:")), "")
        if name in _MESSAGE_EVENTS:
            [data] = [ln[5:] for ln in lines if ln.startswith(b"data:")]
            event: Any = orjson.loads(data)
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None, "the section has no message_start"
    return snapshot


def fixture_usage(fx: dict[str, str], sections: Iterable[str]) -> dict[str, int]:
    """What the spool's ``token_usage`` records of a run replaying ``sections`` add up to."""
    total = dict.fromkeys(("input", "output", "cache_read", "cache_write"), 0)
    for name in sections:
        usage = fixture_message(fx[name]).usage
        total["input"] += usage.input_tokens
        total["output"] += usage.output_tokens
        total["cache_read"] += usage.cache_read_input_tokens or 0
        total["cache_write"] += usage.cache_creation_input_tokens or 0
    return total


async def metric_value(url: str, name: str, **labels: str) -> float:
    """The first sample ``name`` with these labels that the Prometheus endpoint serves, else 0."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@dataclass
class Gateway:
    """A daemon running in the test's loop, plus its upstream."""

    daemon: Daemon
    upstream: FakeUpstream

    @property
    def url(self) -> str:
        """Base URL clients use for the default provider (``/anthropic``)."""
        return f"http://127.0.0.1:{self.daemon.port}/anthropic"

    @property
    def root(self) -> str:
        """Base URL of the data plane."""
        return f"http://127.0.0.1:{self.daemon.port}"

    @property
    def control_target(self) -> str:
        """``host:port`` of the gRPC control plane (needs ``control_token`` in the settings)."""
        assert self.daemon.control is not None, "start the gateway with control_token=..."
        return f"127.0.0.1:{self.daemon.control.port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus endpoint."""
        return f"http://127.0.0.1:{self.daemon.metrics_port}/metrics"

    async def records(self) -> list[SpooledRecord]:
        """Every record committed to the spool so far (waits for pending writes)."""
        await self.daemon.spool.flush()
        return await self.daemon.spool.read_after(0, 1_000_000)


GatewayFactory = Callable[..., Coroutine[Any, Any, Gateway]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A started fake provider."""
    up = await FakeUpstream().start()
    yield up
    await up.close()


@pytest.fixture
async def make_gateway(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[GatewayFactory]:
    """Start a gateway in front of ``upstream``; keyword arguments override settings."""
    for name in list(os.environ):
        if name.startswith("AIBRIDGED_") or name == "ANTHROPIC_API_KEY":
            monkeypatch.delenv(name)
    started: list[Daemon] = []

    async def start(**overrides: Any) -> Gateway:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "control_listen": "127.0.0.1:0",
            "spool_path": tmp_path / f"spool-{len(started)}.db",
            "providers": [anthropic_provider(upstream.url)],
            "api_keys": [ALICE],
            "shutdown_grace": 2.0,
        }
        settings.update(overrides)
        daemon = await Daemon.start(load_settings(None, **settings))
        started.append(daemon)
        return Gateway(daemon, upstream)

    yield start
    for daemon in started:
        await daemon.stop()
    if any(daemon.mcp_pool.connections_opened for daemon in started):
        # The MCP SDK's HTTP clients are finalised by the garbage collector: do it while this
        # test's loop still runs, not in a later test whose loop is closed (an unraisable
        # "Event loop is closed" there would fail an unrelated test).
        gc.collect()
        await asyncio.sleep(0)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    """A gateway with default test settings (one gateway key for alice, a central key)."""
    return await make_gateway()


async def wait_for_end(gw: Gateway, within: float = 10.0) -> dict[str, Any]:
    """The first ``interception_ended`` record, once the spool has it."""
    async with asyncio.timeout(within):
        while True:
            ended = by_kind(await gw.records(), "interception_ended")
            if ended:
                return ended[0]
            await asyncio.sleep(0.05)


def by_kind(records: list[SpooledRecord], kind: str) -> list[dict[str, Any]]:
    """Payloads of the records of one kind, in spool order."""
    return [r.payload for r in records if r.kind == kind]


@pytest.fixture
async def control(
    make_gateway: GatewayFactory,
) -> AsyncIterator[tuple[Gateway, ControlServiceStub]]:
    """A gateway with its gRPC control plane on, and a stub authenticated with the token."""
    gw = await make_gateway(control_token=CONTROL_TOKEN)
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        yield gw, ControlServiceStub(channel)
