"""Traces an operator's collector receives: real OTLP receivers, real SDK traffic, the spool.

Tracing is configured as in production, from the standard ``OTEL_*`` variables read when the
daemon starts; the receivers are real OTLP endpoints (gRPC and HTTP/protobuf). ``Daemon.stop``
flushes every span, so a test stops the gateway before reading what the collector got.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from gateway.config import ConfigError
from gateway.testing import FakeUpstream, Reply, load_txtar, split_events
from tests.conftest import (
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    anthropic_provider,
    by_kind,
    wait_for_end,
)
from tests.mcp_server import McpTestServer, running_mcp_server
from tests.otlp_receiver import (
    CLIENT,
    SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
    otlp_receiver,
)
from tests.processes import free_port

REPO = Path(__file__).resolve().parents[2]
SERVER_SPAN = "Intercept.ProcessRequest"
UPSTREAM_SPAN = "Intercept.ProcessRequest.Upstream"
LIST_TOOLS_SPAN = "Intercept.ProcessRequest.ListTools"
TOOL_CALL_SPAN = "Intercept.ProcessRequest.ToolCall"

CACHE = load_txtar(FIXTURES / "anthropic" / "cache_tokens.txtar")
TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
ADD = load_txtar(FIXTURES / "anthropic" / "injected_add.txtar")
# Synthetic: an Anthropic-shaped internal error, retried by the gateway quickly.
API_ERROR = Reply(
    status=500,
    headers={"Content-Type": "application/json", "retry-after-ms": "10"},
    body=b'{"type":"error","error":{"type":"api_error","message":"Internal server error"}}',
)


def request_of(fx: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(fx["request"])
    return body


def trace_env(
    monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver | tuple[str, str], **extra: str
) -> None:
    """Point the daemon about to start at ``receiver`` (or an ``(endpoint, protocol)``),
    exporting every 50 ms."""
    endpoint, protocol = (
        receiver if isinstance(receiver, tuple) else (receiver.endpoint, receiver.protocol)
    )
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


async def stop_and_collect(gw: Gateway, receiver: OtlpReceiver) -> list[ReceivedSpan]:
    """Stop the daemon (which flushes every span) and return what the receiver got."""
    await gw.daemon.stop()
    return receiver.spans()


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def one_server_span(spans: list[ReceivedSpan]) -> ReceivedSpan:
    servers = named(spans, SERVER_SPAN)
    assert len(servers) == 1, [s.name for s in spans]
    [server] = servers
    assert server.kind == SERVER
    return server


def upstream_children(spans: list[ReceivedSpan], server: ReceivedSpan) -> list[ReceivedSpan]:
    """The upstream spans, each checked to be a CLIENT child of ``server``, in start order."""
    ups = sorted(named(spans, UPSTREAM_SPAN), key=lambda s: s.start_ns)
    for up in ups:
        assert up.kind == CLIENT
        assert (up.trace_id, up.parent_span_id) == (server.trace_id, server.span_id)
    return ups


def traceparent(headers: Any) -> tuple[str, str, str, str]:
    version, trace_id, span_id, flags = str(headers["traceparent"]).split("-")
    return version, trace_id, span_id, flags


def token_sums(records: list[Any]) -> dict[str, int]:
    tokens = by_kind(records, "token_usage")
    return {k: sum(t[k] for t in tokens) for k in ("input", "output", "cache_read", "cache_write")}


async def test_streamed_request_continues_the_clients_trace_over_grpc(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    delay = 0.05
    async with otlp_receiver("grpc") as rx:
        trace_env(monkeypatch, rx)
        gw = await make_gateway()
        gw.upstream.enqueue(Reply.from_section(CACHE["streaming"], event_delay=delay))
        async with (
            anthropic.AsyncAnthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0) as client,
            client.messages.stream(
                **request_of(CACHE),
                extra_headers={"traceparent": f"00-{client_trace}-{client_span}-01"},
            ) as stream,
        ):
            message = await stream.get_final_message()
        await wait_for_end(gw)
        records = await gw.records()
        spans = await stop_and_collect(gw, rx)

    server = one_server_span(spans)
    assert (server.trace_id, server.parent_span_id) == (client_trace, client_span)
    [up] = upstream_children(spans, server)
    # The provider saw the upstream span as its parent, not the client's span.
    [received] = gw.upstream.requests
    assert traceparent(received.headers) == ("00", client_trace, up.span_id, "01")
    assert len(received.headers.getall("traceparent")) == 1

    [started] = by_kind(records, "interception_started")
    [ended] = by_kind(records, "interception_ended")
    usage = token_sums(records)
    assert usage["cache_read"] and usage["cache_write"], "the fixture exercises the cache"
    attrs = server.attributes
    expected = {
        "interception_id": started["interception_id"],
        "provider": "anthropic",
        "api": "messages",
        "model": request_of(CACHE)["model"],
        "actor_id": "u-1",
        "client": started["client"],
        "streaming": True,
        "request_path": "/anthropic/v1/messages",
        "gen_ai.system": "anthropic",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": request_of(CACHE)["model"],
        "gen_ai.usage.input_tokens": usage["input"],
        "gen_ai.usage.output_tokens": usage["output"],
        "gen_ai.usage.cache_read.input_tokens": usage["cache_read"],
        "gen_ai.usage.cache_creation.input_tokens": usage["cache_write"],
        "aibridged.status": "completed",
        "aibridged.upstream_status": 200,
    }
    assert {k: attrs.get(k) for k in expected} == expected
    assert (usage["input"], usage["output"]) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    assert ended["status"] == "completed"
    assert server.status_code != STATUS_ERROR
    assert "error.type" not in attrs

    assert up.attributes == {
        "http.request.method": "POST",
        "url.full": f"{gw.upstream.url}/v1/messages",
        "server.address": "127.0.0.1",
        "server.port": gw.upstream.port,
        "http.response.status_code": 200,
    }
    assert up.status_code != STATUS_ERROR
    # The upstream span ends when the response head arrives: the fake provider then still
    # paces every further event (13 x 50 ms), so the interception outlives it by about that
    # long; half of it leaves room for a slow loop taking the head late.
    paced = (len(split_events(CACHE["streaming"].encode())) - 1) * delay
    assert server.start_ns <= up.start_ns
    assert server.end_ns - up.end_ns >= paced / 2 * 1e9

    assert server.resource["service.name"] == "aibridged"
    assert server.resource.get("service.version")
    assert {s.scope for s in spans} == {"aibridged"}


async def test_injected_tool_call_spans_share_the_interception(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver("grpc") as rx, running_mcp_server(McpTestServer()) as url:
        trace_env(monkeypatch, rx)
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}])
        gw.upstream.enqueue(
            Reply.from_section(ADD["streaming"]), Reply.from_section(ADD["streaming/tool-call"])
        )
        async with (
            anthropic.AsyncAnthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0) as client,
            client.messages.stream(**request_of(ADD)) as stream,
        ):
            await stream.get_final_message()
        records = await gw.records()
        spans = await stop_and_collect(gw, rx)

    server = one_server_span(spans)
    assert server.parent_span_id == ""
    assert {s.trace_id for s in spans} == {server.trace_id}
    assert server.attributes["aibridged.status"] == "completed"
    usage = token_sums(records)
    assert server.attributes["gen_ai.usage.input_tokens"] == usage["input"]
    assert server.attributes["gen_ai.usage.output_tokens"] == usage["output"]

    [listing] = named(spans, LIST_TOOLS_SPAN)
    [call] = named(spans, TOOL_CALL_SPAN)
    for span in (listing, call):
        assert span.kind == CLIENT
        assert span.parent_span_id == server.span_id
    injected = [t for t in orjson.loads(gw.upstream.requests[0].body)["tools"]]
    assert listing.attributes["mcp_tool_count"] == len(injected) > 0
    assert listing.end_ns <= call.start_ns
    assert {
        k: call.attributes.get(k)
        for k in (
            "mcp_server_name",
            "mcp_server_url",
            "mcp_tool_name",
            "gen_ai.operation.name",
            "mcp_outcome",
        )
    } == {
        "mcp_server_name": "tools",
        "mcp_server_url": url,
        "mcp_tool_name": "add",
        "gen_ai.operation.name": "execute_tool",
        "mcp_outcome": "ok",
    }
    assert call.attributes.get("gen_ai.tool.name") in ("add", "bmcp_tools_add")
    assert call.status_code != STATUS_ERROR

    # One upstream span per turn, the tool call between them; each turn's request names its own.
    first, second = upstream_children(spans, server)
    assert first.end_ns <= call.start_ns and call.end_ns <= second.start_ns
    sent = [traceparent(r.headers)[1:3] for r in gw.upstream.requests]
    assert sent == [(server.trace_id, first.span_id), (server.trace_id, second.span_id)]
    assert len(spans) == 5, [s.name for s in spans]


async def test_blocking_request_without_traceparent_is_a_root_span_over_http(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver("http/protobuf") as rx:
        # Nothing is exported on schedule within the test: only Daemon.stop's flush sends them.
        trace_env(
            monkeypatch, rx, OTEL_SERVICE_NAME="edge-gateway", OTEL_BSP_SCHEDULE_DELAY="600000"
        )
        gw = await make_gateway()
        gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
        ) as client:
            message = await client.messages.create(**request_of(TEXT))
        records = await gw.records()
        spans = await stop_and_collect(gw, rx)
        exports = rx.exports()

    assert exports and all(e["Content-Type"] == "application/x-protobuf" for e in exports)
    server = one_server_span(spans)
    assert server.parent_span_id == ""
    [up] = upstream_children(spans, server)
    [received] = gw.upstream.requests
    assert traceparent(received.headers)[1:3] == (server.trace_id, up.span_id)
    [started] = by_kind(records, "interception_started")
    assert server.attributes["interception_id"] == started["interception_id"]
    assert server.attributes["streaming"] is False
    assert server.attributes["gen_ai.usage.output_tokens"] == message.usage.output_tokens
    assert server.resource["service.name"] == "edge-gateway"


async def test_upstream_errors_mark_every_attempt_and_the_interception(
    make_gateway: GatewayFactory, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver("grpc") as rx:
        trace_env(monkeypatch, rx)
        gw = await make_gateway(providers=[anthropic_provider(upstream.url, max_retries=1)])
        upstream.enqueue(API_ERROR, API_ERROR)
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
        ) as client:
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(**request_of(TEXT))
        ended = await wait_for_end(gw)
        spans = await stop_and_collect(gw, rx)

    assert len(upstream.requests) == 2
    assert ended["status"] != "completed" and ended["error_type"]
    server = one_server_span(spans)
    assert server.status_code == STATUS_ERROR
    assert server.attributes["error.type"] == ended["error_type"]
    assert server.attributes["aibridged.status"] == ended["status"]
    assert server.attributes["aibridged.upstream_status"] == 500
    attempts = upstream_children(spans, server)
    assert len(attempts) == 2
    for attempt in attempts:
        assert attempt.status_code == STATUS_ERROR
        assert attempt.attributes["http.response.status_code"] == 500
        assert attempt.attributes["error.type"] == "500"
    first, retry = attempts
    assert first.attributes.get("http.request.resend_count", 0) == 0
    assert retry.attributes["http.request.resend_count"] == 1
    sent = [traceparent(r.headers)[2] for r in upstream.requests]
    assert sent == [first.span_id, retry.span_id]


async def test_unreachable_upstream_is_an_errored_attempt_without_a_response(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver("grpc") as rx:
        trace_env(monkeypatch, rx)
        closed = f"http://127.0.0.1:{free_port()}"
        gw = await make_gateway(providers=[anthropic_provider(closed)])
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
        ) as client:
            with pytest.raises(anthropic.APIStatusError):
                await client.messages.create(**request_of(TEXT))
        ended = await wait_for_end(gw)
        spans = await stop_and_collect(gw, rx)

    server = one_server_span(spans)
    assert server.status_code == STATUS_ERROR
    assert server.attributes["error.type"] == ended["error_type"]
    assert "aibridged.upstream_status" not in server.attributes
    [attempt] = upstream_children(spans, server)
    assert attempt.status_code == STATUS_ERROR
    assert "http.response.status_code" not in attempt.attributes
    # The exception's class name, never its text (which names the address).
    error_type = attempt.attributes["error.type"]
    assert error_type.isidentifier(), error_type
    assert attempt.attributes["url.full"] == f"{closed}/v1/messages"


async def test_mid_stream_error_fails_the_interception_not_the_attempt(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = load_txtar(FIXTURES / "anthropic" / "mid_stream_error.txtar")
    async with otlp_receiver("http/protobuf") as rx:
        trace_env(monkeypatch, rx)
        gw = await make_gateway()
        gw.upstream.enqueue(Reply.from_section(fx["streaming"]))
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{gw.url}/v1/messages",
                json=dict(request_of(fx), stream=True),
                headers={"x-api-key": GATEWAY_KEY},
            ) as resp,
        ):
            assert resp.status == 200
            assert b"overloaded_error" in await resp.read()
        ended = await wait_for_end(gw)
        records = await gw.records()
        spans = await stop_and_collect(gw, rx)

    assert ended["status"] != "completed"
    server = one_server_span(spans)
    assert server.status_code == STATUS_ERROR
    assert server.attributes["aibridged.status"] == ended["status"]
    assert server.attributes["error.type"] == (ended["error_type"] or ended["status"])
    # What arrived before the error is counted.
    assert server.attributes["gen_ai.usage.input_tokens"] == token_sums(records)["input"] > 0
    [attempt] = upstream_children(spans, server)
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.status_code != STATUS_ERROR


async def test_failing_tool_and_small_model_requests(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail = load_txtar(FIXTURES / "anthropic" / "loop_fail.txtar")
    small = dict(request_of(TEXT), model="claude-haiku-4-5")
    async with otlp_receiver("grpc") as rx, running_mcp_server(McpTestServer()) as url:
        trace_env(monkeypatch, rx)
        gw = await make_gateway(mcp_servers=[{"id": "tools", "url": url}])
        gw.upstream.enqueue(
            Reply.from_section(TEXT["non-streaming"]),
            Reply.from_section(fail["non-streaming"]),
            Reply.from_section(fail["non-streaming/tool-call"]),
        )
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
        ) as client:
            await client.messages.create(**small)
            await client.messages.create(**request_of(fail))
        spans = await stop_and_collect(gw, rx)

    by_trace: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    assert len(by_trace) == 2
    small_trace, tool_trace = sorted(by_trace.values(), key=lambda t: one_server_span(t).start_ns)
    # The small model gets no tools: nothing is listed.
    assert sorted(s.name for s in small_trace) == [SERVER_SPAN, UPSTREAM_SPAN]
    assert one_server_span(small_trace).attributes["model"] == "claude-haiku-4-5"

    server = one_server_span(tool_trace)
    assert server.attributes["aibridged.status"] == "completed"
    assert server.status_code != STATUS_ERROR
    assert len(named(tool_trace, LIST_TOOLS_SPAN)) == 1
    [call] = named(tool_trace, TOOL_CALL_SPAN)
    assert call.parent_span_id == server.span_id
    assert call.attributes["mcp_tool_name"] == "fail"
    assert call.attributes["mcp_outcome"] == "tool_error"
    assert call.status_code == STATUS_ERROR
    assert len(upstream_children(tool_trace, server)) == 2


async def test_refused_and_malformed_traceparent_requests(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver("http/protobuf") as rx:
        trace_env(monkeypatch, rx)
        gw = await make_gateway()
        gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
        async with aiohttp.ClientSession() as http:
            # Refused before any interception: no server span.
            async with http.post(
                f"{gw.url}/v1/messages",
                json=request_of(TEXT),
                headers={"x-api-key": "not-a-key", "traceparent": "garbage"},
            ) as refused:
                assert refused.status == 401
            async with http.post(
                f"{gw.url}/v1/messages?beta=true",
                json=request_of(TEXT),
                headers={"x-api-key": GATEWAY_KEY, "traceparent": "garbage"},
            ) as served:
                assert served.status == 200
                assert (await served.json())["type"] == "message"
        spans = await stop_and_collect(gw, rx)

    server = one_server_span(spans)
    assert server.parent_span_id == ""
    [up] = upstream_children(spans, server)
    [received] = gw.upstream.requests
    assert traceparent(received.headers)[1:3] == (server.trace_id, up.span_id)
    # The query went upstream, but not into the span.
    assert received.query == "beta=true"
    assert up.attributes["url.full"] == f"{gw.upstream.url}/v1/messages"


async def test_concurrent_requests_each_continue_their_own_trace(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    parents = {secrets.token_hex(16): secrets.token_hex(8) for _ in range(4)}
    async with otlp_receiver("grpc") as rx:
        trace_env(monkeypatch, rx)
        gw = await make_gateway()
        gw.upstream.enqueue(
            *(Reply.from_section(TEXT["streaming"], event_delay=0.01) for _ in parents)
        )
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
        ) as client:

            async def one(trace_id: str, span_id: str) -> None:
                async with client.messages.stream(
                    **request_of(TEXT), extra_headers={"traceparent": f"00-{trace_id}-{span_id}-01"}
                ) as stream:
                    await stream.get_final_message()

            await asyncio.gather(*(one(t, s) for t, s in parents.items()))
        spans = await stop_and_collect(gw, rx)

    servers = named(spans, SERVER_SPAN)
    assert {s.trace_id: s.parent_span_id for s in servers} == parents
    ups = {s.span_id: s for s in named(spans, UPSTREAM_SPAN)}
    servers_by_id = {s.span_id: s for s in servers}
    assert len(ups) == len(parents)
    for request in gw.upstream.requests:
        _, trace_id, span_id, _ = traceparent(request.headers)
        up = ups[span_id]
        assert up.trace_id == trace_id == servers_by_id[up.parent_span_id].trace_id


async def test_client_leaving_mid_stream_ends_the_span_as_the_record_says(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver("http/protobuf") as rx:
        trace_env(monkeypatch, rx)
        gw = await make_gateway()
        gw.upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=0.05))
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{gw.url}/v1/messages",
                json=dict(request_of(TEXT), stream=True),
                headers={"x-api-key": GATEWAY_KEY},
            )
            assert b"message_start" in await resp.content.readany()
            resp.close()
        ended = await wait_for_end(gw)
        spans = await stop_and_collect(gw, rx)

    assert ended["status"] == "client_disconnected"
    server = one_server_span(spans)
    assert server.attributes["aibridged.status"] == "client_disconnected"
    assert server.status_code == STATUS_ERROR
    assert server.attributes["error.type"] == (ended["error_type"] or ended["status"])
    [up] = upstream_children(spans, server)
    assert up.attributes["http.response.status_code"] == 200


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_a_collector_that_is_down_costs_the_requests_nothing(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    down = (f"http://127.0.0.1:{free_port()}", protocol)
    trace_env(monkeypatch, down, OTEL_EXPORTER_OTLP_TIMEOUT="1")
    gw = await make_gateway()
    gw.upstream.enqueue(*(Reply.from_section(TEXT["non-streaming"]) for _ in range(2)))
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        for _ in range(2):
            message = await client.messages.create(**request_of(TEXT))
            assert message.type == "message"
    # Shutdown gives up on the spans within the exporter's timeout (generous bound).
    await asyncio.wait_for(gw.daemon.stop(), 8)


async def test_unknown_traces_exporter_is_a_startup_error(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with otlp_receiver("grpc") as rx:
        trace_env(monkeypatch, rx, OTEL_TRACES_EXPORTER="zipkin")
        with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
            await make_gateway()


# Runs one blocking request through a daemon started in a fresh interpreter, then prints the
# status the client got and every opentelemetry module the process imported.
_ONE_REQUEST = """
import asyncio, json, sys

import aiohttp

from gateway.config import load_settings
from gateway.daemon import Daemon
from gateway.testing import FakeUpstream, Reply


async def main(job):
    upstream = await FakeUpstream().start()
    upstream.enqueue(Reply.from_section(job["reply"]))
    provider = dict(job["provider"], base_url=upstream.url)
    daemon = await Daemon.start(load_settings(None, providers=[provider], **job["settings"]))
    try:
        async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{daemon.port}/anthropic/v1/messages",
            json=job["request"],
            headers={"x-api-key": job["key"]},
        ) as resp:
            await resp.read()
            status = resp.status
    finally:
        await daemon.stop()
        await upstream.close()
    otel = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    print(json.dumps({"status": status, "otel": otel}))


asyncio.run(main(json.load(sys.stdin)))
"""


async def one_request_in_a_process(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    job = {
        "reply": TEXT["non-streaming"],
        "request": request_of(TEXT),
        "key": GATEWAY_KEY,
        "provider": anthropic_provider("http://placeholder.invalid"),
        "settings": {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "spool_path": str(tmp_path / "spool.db"),
            "api_keys": [{"key": GATEWAY_KEY, "actor_id": "u-1", "username": "alice"}],
        },
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ONE_REQUEST,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(job).encode()), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def process_env(**otel: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "AIBRIDGED_", "ANTHROPIC_"))
    }
    return dict(env, **otel)


@pytest.mark.parametrize(
    "otel",
    [{}, {"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}],
    ids=["no-otel-variable", "sdk-disabled", "exporter-none"],
)
async def test_tracing_off_imports_no_opentelemetry(tmp_path: Path, otel: dict[str, str]) -> None:
    async with otlp_receiver("http/protobuf") as rx:
        env = dict(otel, OTEL_BSP_SCHEDULE_DELAY="50")
        if otel:  # an endpoint is set, yet tracing is off
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        result = await one_request_in_a_process(tmp_path, process_env(**env))
        assert result == {"status": 200, "otel": []}
        assert rx.spans(scope=None) == []


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
async def test_an_endpoint_alone_turns_tracing_on_over_http_protobuf(
    tmp_path: Path, variable: str
) -> None:
    """The same process as above, but with an endpoint: the control that the check can fail,
    and the default protocol (http/protobuf, per the OTel spec)."""
    async with otlp_receiver("http/protobuf") as rx:
        # The signal-specific variable is the whole URL; the generic one a base URL.
        endpoint = rx.endpoint + ("/v1/traces" if "TRACES" in variable else "")
        env = process_env(**{variable: endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"})
        result = await one_request_in_a_process(tmp_path, env)
        spans = rx.spans()
    assert result["status"] == 200
    assert any(m.startswith("opentelemetry.sdk") for m in result["otel"])
    server = one_server_span(spans)
    assert server.resource["service.name"] == "aibridged"
    assert len(named(spans, UPSTREAM_SPAN)) == 1
