"""Retries before the first byte: invisible to the client but for the time they take."""

from __future__ import annotations

import time

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.testing import FakeUpstream, Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY, GatewayFactory, anthropic_provider, by_kind

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
OVERLOADED = Reply(
    status=529,
    headers={"Content-Type": "application/json", "retry-after-ms": "10"},
    body=b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
)


def provider(upstream: FakeUpstream, max_retries: int) -> list[dict[str, object]]:
    return [anthropic_provider(upstream.url, max_retries=max_retries)]


async def post(url: str, stream: bool) -> tuple[int, bytes]:
    body = dict(orjson.loads(TEXT["request"]), stream=stream)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}) as r,
    ):
        return r.status, await r.read()


async def test_overloaded_upstream_is_retried_before_the_stream_starts(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(providers=provider(upstream, 2))
    upstream.enqueue(OVERLOADED, OVERLOADED, Reply.from_section(TEXT["streaming"]))
    status, body = await post(gw.url, stream=True)
    assert status == 200
    assert body.rstrip().endswith(b'"message_stop"}')
    assert len(upstream.requests) == 3
    [ended] = by_kind(await gw.records(), "interception_ended")
    assert ended["status"] == "completed"


async def test_retries_exhausted_relays_the_last_error(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(providers=provider(upstream, 1))
    upstream.enqueue(OVERLOADED, OVERLOADED, Reply.from_section(TEXT["non-streaming"]))
    status, body = await post(gw.url, stream=False)
    assert (status, body) == (529, OVERLOADED.body)
    assert len(upstream.requests) == 2


async def test_no_retry_by_default_and_never_on_client_errors(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway()
    upstream.enqueue(OVERLOADED)
    assert (await post(gw.url, stream=False))[0] == 529
    gw2 = await make_gateway(providers=provider(upstream, 3))
    bad = Reply(status=400, headers={"Content-Type": "application/json"}, body=b"{}")
    upstream.enqueue(bad)
    assert (await post(gw2.url, stream=False))[0] == 400
    assert len(upstream.requests) == 2


class TimedUpstream(FakeUpstream):
    """The fake provider, noting when each request arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        return await super()._handle(request)


@pytest.mark.parametrize(
    ("name", "value", "at_least", "below"),
    [
        # Back-off alone would wait 0.375-0.5 s before the first retry.
        ("Retry-After-Ms", "10", 0.0, 0.3),
        ("Retry-After-Ms", "1500", 1.4, 5.0),
        ("RETRY-AFTER", "1", 0.9, 5.0),
    ],
)
async def test_retry_waits_what_the_provider_asks_whatever_the_header_case(
    make_gateway: GatewayFactory, name: str, value: str, at_least: float, below: float
) -> None:
    timed = TimedUpstream()
    await timed.start()
    try:
        gw = await make_gateway(providers=provider(timed, 1))
        busy = Reply(
            status=529,
            headers={"Content-Type": "application/json", name: value},
            body=OVERLOADED.body,
        )
        timed.enqueue(busy, Reply.from_section(TEXT["non-streaming"]))
        status, _ = await post(gw.url, stream=False)
    finally:
        await timed.close()

    assert status == 200
    first, second = timed.arrivals
    assert at_least <= second - first < below
