"""What an operator scraping ``/metrics`` sees: real SDK traffic, the records, the spool.

Every value is read over HTTP from the daemon's metrics listener. Each test starts its own
gateway, whose data-plane counters start at zero (the spool and push counters are process-wide,
so those are compared with a baseline).
"""

from __future__ import annotations

import asyncio
import gzip
import secrets
import time
from typing import Any

import aiohttp
import grpc
import orjson
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from control.v1 import control_pb2 as pb
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.observe import TOKEN_TYPES
from gateway.testing import FakeUpstream, Reply, load_txtar
from tests.conftest import (
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    anthropic_provider,
    by_kind,
    wait_for_end,
)
from tests.sdk import final_message

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
TEXT_REQUEST: dict[str, Any] = orjson.loads(TEXT["request"])
ROUTE = {"provider": "anthropic", "api": "messages"}
HISTOGRAMS = (
    "aibridged_interception_duration_seconds",
    "aibridged_time_to_first_byte_seconds",
    "aibridged_gateway_overhead_seconds",
)


async def scrape(gw: Gateway, **headers: str) -> list[Sample]:
    """Every sample the metrics listener serves now."""
    async with aiohttp.ClientSession() as http, http.get(gw.metrics_url, headers=headers) as r:
        assert r.status == 200
        text = await r.text()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def matching(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    return sum(s.value for s in matching(samples, name, **labels))


def fixture(scenario: str) -> tuple[dict[str, str], dict[str, Any]]:
    fx = load_txtar(FIXTURES / "anthropic" / f"{scenario}.txtar")
    return fx, orjson.loads(fx["request"])


async def post(gw: Gateway, body: dict[str, Any]) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gw.url}/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}) as r,
    ):
        await r.read()
        return r.status


async def test_label_sets_exist_before_any_traffic(gateway: Gateway) -> None:
    samples = await scrape(gateway)
    for name in (
        "aibridged_interceptions_inflight",
        "aibridged_client_disconnects_total",
        "aibridged_time_to_first_byte_seconds_count",
        "aibridged_gateway_overhead_seconds_count",
    ):
        [sample] = matching(samples, name, **ROUTE)
        assert sample.value == 0
    for status in ("completed", "failed", "client_disconnected"):
        [sample] = matching(
            samples, "aibridged_interception_duration_seconds_count", **ROUTE, status=status
        )
        assert sample.value == 0
    for kind in ("providers", "api_keys", "mcp_servers", "mcp_tokens"):
        assert matching(samples, "aibridged_control_applied_version", kind=kind)
        assert matching(samples, "aibridged_control_last_push_timestamp_seconds", kind=kind)
    assert matching(samples, "aibridged_usage_records_dropped_total", reason="queue_full")
    assert matching(samples, "aibridged_build_info")[0].labels["version"]
    assert total(samples, "process_cpu_seconds_total") > 0
    assert matching(samples, "python_info")
    assert matching(samples, "aibridged_usage_spool_records")
    assert matching(samples, "aibridged_usage_oldest_unacked_age_seconds")


async def test_sdk_traffic_is_counted_as_the_records_say(gateway: Gateway) -> None:
    requests = 0
    for scenario in ("text", "thinking", "client_tool", "cache_tokens"):
        fx, body = fixture(scenario)
        for mode, section in (
            ("async_stream_helper", "streaming"),
            ("async_blocking", "non-streaming"),
        ):
            gateway.upstream.enqueue(Reply.from_section(fx[section]))
            await final_message(gateway.url, GATEWAY_KEY, mode, body)
            requests += 1
            samples = await scrape(gateway)
            # Each histogram is observed exactly once per request, streamed or not.
            for name in HISTOGRAMS:
                assert total(samples, f"{name}_count", **ROUTE) == requests, name
            assert matching(samples, "aibridged_interceptions_inflight", **ROUTE)[0].value == 0

    records = await gateway.records()
    tokens = by_kind(records, "token_usage")
    assert len(tokens) == requests
    for kind in TOKEN_TYPES:
        expected = sum(t[kind] for t in tokens)
        assert total(samples, "aibridged_tokens_total", provider="anthropic", type=kind) == expected
    # The fixtures exercise every type the Messages API reports.
    for kind in ("input", "output", "cache_read", "cache_write", "cache_write_5m"):
        assert total(samples, "aibridged_tokens_total", type=kind) > 0, kind
    model = TEXT_REQUEST["model"]
    per_model = sum(
        t["output"] for t in tokens if t["interception_id"] in _of_model(records, model)
    )
    assert total(samples, "aibridged_tokens_total", model=model, type="output") == per_model

    completed = total(samples, "aibridged_interceptions_total", **ROUTE, status="completed")
    assert completed == requests == len(by_kind(records, "interception_ended"))
    assert total(samples, "aibridged_upstream_requests_total", **ROUTE, code="200") == requests
    assert total(samples, "aibridged_prompts_total") == len(by_kind(records, "prompt_usage"))
    client_calls = [t for t in by_kind(records, "tool_usage") if not t["injected"]]
    assert client_calls
    assert total(samples, "aibridged_tool_calls_total", injected="false") == len(client_calls)
    # The gateway's own time is a part of each request's.
    overhead = total(samples, "aibridged_gateway_overhead_seconds_sum", **ROUTE)
    assert 0 < overhead < total(samples, "aibridged_interception_duration_seconds_sum", **ROUTE)


def _of_model(records: list[Any], model: str) -> set[str]:
    return {
        s["interception_id"]
        for s in by_kind(records, "interception_started")
        if s["model"] == model
    }


async def test_overhead_leaves_out_the_wait_on_the_provider(gateway: Gateway) -> None:
    delay = 0.5
    for section in ("streaming", "non-streaming"):
        reply = Reply.from_section(TEXT[section])
        reply.first_byte_delay = delay
        gateway.upstream.enqueue(reply)
        mode = "async_stream_helper" if section == "streaming" else "async_blocking"
        await final_message(gateway.url, GATEWAY_KEY, mode, TEXT_REQUEST)
    samples = await scrape(gateway)
    bucket = "aibridged_time_to_first_byte_seconds_bucket"
    # The first byte waited for the provider's: no request got it sooner.
    assert total(samples, bucket, **ROUTE, le="0.25") == 0
    assert total(samples, bucket, **ROUTE, le="+Inf") == 2
    # Yet the gateway's own time is far below that wait (generous bound for a loaded VM).
    overhead = "aibridged_gateway_overhead_seconds_bucket"
    assert total(samples, overhead, **ROUTE, le="0.25") == 2


async def test_model_label_is_bounded(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(metrics_max_models=5)
    gw.upstream.default = Reply.from_section(TEXT["non-streaming"])
    models = [f"model-{secrets.token_hex(6)}" for _ in range(100)]
    odd = ["has space", "x" * 101, "new\nline"]  # not the pattern: never a label
    for model in [*odd, *models]:
        assert await post(gw, dict(TEXT_REQUEST, model=model)) == 200
    samples = await scrape(gw)
    ended = matching(samples, "aibridged_interceptions_total", **ROUTE)
    assert {s.labels["model"] for s in ended} == {*models[:5], "other"}
    assert total(samples, "aibridged_interceptions_total", model="other") == 95 + len(odd)
    tokens = matching(samples, "aibridged_tokens_total")
    assert {s.labels["model"] for s in tokens} == {*models[:5], "other"}


async def test_spool_gauges_are_right_without_a_host(make_gateway: GatewayFactory) -> None:
    started = time.time()
    gw = await make_gateway(control_token=CONTROL_TOKEN)  # no host connects
    samples = await scrape(gw)
    assert total(samples, "aibridged_usage_spool_records") == 0
    assert total(samples, "aibridged_usage_oldest_unacked_age_seconds") == 0
    for _ in range(3):
        gw.upstream.enqueue(Reply.from_section(TEXT["streaming"]))
        await final_message(gw.url, GATEWAY_KEY, "async_stream_helper", TEXT_REQUEST)
    records = await gw.records()
    samples = await scrape(gw)
    assert total(samples, "aibridged_usage_spool_records") == len(records) >= 12
    age = total(samples, "aibridged_usage_oldest_unacked_age_seconds")
    assert 0 < age <= time.time() - started + 1

    # The host stores them all: nothing waits any more.
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        stub = ControlServiceStub(channel)
        await stub.AckUsage(
            pb.AckUsageRequest(epoch=gw.daemon.spool.epoch, acked_through=records[-1].seq),
            metadata=CONTROL_METADATA,
        )
        samples = await scrape(gw)
        assert total(samples, "aibridged_usage_spool_records") == 0
        assert total(samples, "aibridged_usage_oldest_unacked_age_seconds") == 0
        # A push shows in the applied version and its time.
        pushed = time.time()
        await stub.PutApiKeys(
            pb.PutApiKeysRequest(
                config_version=7,
                api_keys=[pb.ApiKey(key_sha256="ab" * 32, actor=pb.Actor(id="u-9"))],
            ),
            metadata=CONTROL_METADATA,
        )
    samples = await scrape(gw)
    assert total(samples, "aibridged_control_applied_version", kind="api_keys") == 7
    last = total(samples, "aibridged_control_last_push_timestamp_seconds", kind="api_keys")
    assert pushed - 1 <= last <= time.time() + 1


async def test_retries_disconnects_and_passthrough_are_counted(
    make_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await make_gateway(providers=[anthropic_provider(upstream.url, max_retries=1)])
    overloaded = Reply(status=529, headers={"Content-Type": "application/json"}, body=b"{}")
    gw.upstream.enqueue(overloaded, Reply.from_section(TEXT["non-streaming"]))
    assert await post(gw, TEXT_REQUEST) == 200

    # A client that leaves mid-stream.
    gw.upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=0.2))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{gw.url}/v1/messages",
            json=dict(TEXT_REQUEST, stream=True),
            headers={"x-api-key": GATEWAY_KEY},
        )
        assert b"message_start" in await resp.content.readany()
        resp.close()
    await _wait_for_ends(gw, 2)

    gw.upstream.enqueue(Reply(headers={"Content-Type": "application/json"}, body=b'{"data":[]}'))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.url}/v1/models", headers={"x-api-key": GATEWAY_KEY}) as r,
    ):
        assert r.status == 200

    samples = await scrape(gw)
    assert total(samples, "aibridged_upstream_requests_total", **ROUTE, code="529") == 1
    assert total(samples, "aibridged_upstream_requests_total", **ROUTE, code="200") == 2
    assert total(samples, "aibridged_client_disconnects_total", **ROUTE) == 1
    assert total(samples, "aibridged_interceptions_total", status="client_disconnected") == 1
    assert total(samples, "aibridged_interceptions_inflight", **ROUTE) == 0
    passthrough = matching(samples, "aibridged_passthrough_total", provider="anthropic")
    assert [(s.labels["route"], s.labels["code"], s.value) for s in passthrough] == [
        ("/v1/models", "200", 1)
    ]


async def _wait_for_ends(gw: Gateway, count: int) -> None:
    await wait_for_end(gw)
    deadline = time.monotonic() + 10
    while len(by_kind(await gw.records(), "interception_ended")) < count:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_openmetrics_and_gzip_on_request(gateway: Gateway) -> None:
    accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.get(gateway.metrics_url, headers={"Accept": accept, "Accept-Encoding": "gzip"}) as r,
    ):
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(await r.read()).decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE aibridged_interceptions counter" in text
    plain = await scrape(gateway)
    assert matching(plain, "aibridged_interceptions_inflight", **ROUTE)


async def test_actor_label_only_when_asked(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(metrics_actor_labels=True)
    gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    assert await post(gw, TEXT_REQUEST) == 200
    samples = await scrape(gw)
    [ended] = matching(samples, "aibridged_interceptions_total", **ROUTE)
    assert ended.labels["actor"] == "u-1"
    assert all(s.labels["actor"] == "u-1" for s in matching(samples, "aibridged_tokens_total"))
