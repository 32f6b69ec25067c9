"""The gRPC control plane end to end: a host pushes state, the data plane follows, usage flows out.

A real ``grpc.aio`` client on the generated stubs drives the running daemon; the official
``anthropic`` SDK is the data-plane client. Pushes swap state atomically (requests in flight keep
their snapshot), bad pushes are refused whole, and ``StreamUsage`` delivers each interception's
records to the host.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import anthropic
import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from control.v1 import control_pb2 as pb
from control.v1 import control_pb2_grpc
from gateway.testing import Reply, load_txtar, split_events
from tests.conftest import (
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    Gateway,
    GatewayFactory,
    metric_value,
)

if TYPE_CHECKING:
    from control.v1.control_pb2_grpc import ControlServiceAsyncStub as Stub

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
REQUEST: dict[str, Any] = orjson.loads(TEXT["request"])
USAGE = orjson.loads(TEXT["non-streaming"])["usage"]


def _streamed_usage(section: str) -> dict[str, int]:
    """Input tokens of ``message_start`` and output tokens of the last ``message_delta``."""
    data = [
        orjson.loads(line[5:])
        for event in split_events(section.encode())
        for line in event.splitlines()
        if line.startswith(b"data:")
    ]
    start = next(d for d in data if d["type"] == "message_start")["message"]["usage"]
    delta = [d for d in data if d["type"] == "message_delta"][-1]["usage"]
    return {"input_tokens": start["input_tokens"], "output_tokens": delta["output_tokens"]}


# Each section is its own request: expectations come from the section the upstream replayed.
STREAM_USAGE = _streamed_usage(TEXT["streaming"])
ANSWER = orjson.loads(TEXT["non-streaming"])["content"][0]["text"]
N_EVENTS = len(split_events(TEXT["streaming"].encode()))

PROVIDER_KEY = "sk-pushed-1"
CLIENT_KEY = "gw-pushed-key"
CLIENT_SHA = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
DATA_PLANE = "aibridge.data.v1.DataPlane"
CONTROL_SERVICE = "aibridge.control.v1.ControlService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KINDS = ["interception_started", "prompt_usage", "token_usage", "interception_ended"]


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
async def managed(make_gateway: GatewayFactory) -> AsyncIterator[tuple[Gateway, Stub]]:
    """A gateway that serves only what the host pushes (nothing yet), and a control stub."""
    gw = await make_gateway(
        control_token=CONTROL_TOKEN, require_control=True, providers=[], api_keys=[]
    )
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        yield gw, control_pb2_grpc.ControlServiceStub(channel)


def provider(api_key: str, base_url: str, **kw: Any) -> pb.Provider:
    fields: dict[str, Any] = {"name": "anthropic", "type": pb.PROVIDER_TYPE_ANTHROPIC}
    return pb.Provider(**{**fields, "base_url": base_url, "api_key": api_key, **kw})


async def put_providers(stub: Stub, gw: Gateway, version: int, api_key: str) -> int:
    req = pb.PutProvidersRequest(
        config_version=version, providers=[provider(api_key, gw.upstream.url)]
    )
    resp = await stub.PutProviders(req, metadata=CONTROL_METADATA)
    return resp.applied_version


async def put_keys(stub: Stub, version: int, *, revoke: bool = False) -> int:
    actor = pb.Actor(id="u-42", username="bob", metadata={"team": "infra"})
    keys = [] if revoke else [pb.ApiKey(key_id="k-1", key_sha256=CLIENT_SHA, actor=actor)]
    req = pb.PutApiKeysRequest(config_version=version, api_keys=keys)
    return (await stub.PutApiKeys(req, metadata=CONTROL_METADATA)).applied_version


async def configure(stub: Stub, gw: Gateway) -> None:
    assert await put_providers(stub, gw, 1, PROVIDER_KEY) == 1
    assert await put_keys(stub, 1) == 1


async def status(stub: Stub) -> pb.GetStatusResponse:
    return await stub.GetStatus(pb.GetStatusRequest(), metadata=CONTROL_METADATA)


async def collect(
    stub: Stub, n: int, resume_after: int = 0, epoch: str = "", within: float = 10.0
) -> tuple[list[pb.UsageRecord], set[str]]:
    """Read StreamUsage until ``n`` records arrived (and the epochs of their batches)."""
    call = stub.StreamUsage(
        pb.StreamUsageRequest(resume_after=resume_after, epoch=epoch), metadata=CONTROL_METADATA
    )
    records: list[pb.UsageRecord] = []
    epochs: set[str] = set()
    try:
        async with asyncio.timeout(within):
            async for batch in call:
                records.extend(batch.records)
                if batch.records:
                    epochs.add(batch.epoch)
                if len(records) >= n:
                    break
    finally:
        call.cancel()
    return records, epochs


def sdk(gw: Gateway, key: str = CLIENT_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)


async def ask(gw: Gateway, key: str = CLIENT_KEY) -> anthropic.types.Message:
    """One blocking SDK request (the upstream's reply is enqueued here)."""
    gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    async with sdk(gw, key) as client:
        return await client.messages.create(
            model=REQUEST["model"], max_tokens=REQUEST["max_tokens"], messages=REQUEST["messages"]
        )


async def open_stream(
    client: anthropic.AsyncAnthropic,
) -> anthropic.AsyncStream[anthropic.types.RawMessageStreamEvent]:
    """Send the request streamed; the SDK's event stream."""
    return await client.messages.create(
        model=REQUEST["model"],
        max_tokens=REQUEST["max_tokens"],
        messages=REQUEST["messages"],
        stream=True,
    )


async def ask_streamed(gw: Gateway) -> list[str]:
    gw.upstream.enqueue(Reply.from_section(TEXT["streaming"]))
    async with sdk(gw) as client:
        stream = await open_stream(client)
        return [event.type async for event in stream]


async def assert_serves(gw: Gateway) -> None:
    message = await ask(gw)
    assert message.content[0].type == "text"
    assert message.content[0].text == ANSWER


async def post_raw(gw: Gateway, headers: dict[str, str]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gw.url}/v1/messages", json=REQUEST, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def readyz(gw: Gateway) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{gw.root}/readyz") as resp:
        return resp.status


async def health(target: str, service: str) -> int:
    """gRPC health of ``service``, asked without any metadata."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = cast(Any, health_pb2_grpc.HealthStub(channel))
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(resp.status)


async def wait_health(target: str, service: str, want: int, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if await health(target, service) == want:
                return
            await asyncio.sleep(0.02)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """The AioRpcError an awaitable call (or a streaming call, when iterated) raises."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return caught.value


def upstream_key(gw: Gateway, index: int = -1) -> list[str]:
    return gw.upstream.requests[index].headers.getall("x-api-key")


# -- tests -------------------------------------------------------------------------------------


async def test_push_then_serve_and_stream_usage(managed: tuple[Gateway, Stub]) -> None:
    gw, stub = managed
    assert await readyz(gw) == 503
    assert await health(gw.control_target, DATA_PLANE) == NOT_SERVING
    assert not (await status(stub)).ready
    code, body = await post_raw(gw, {"x-api-key": CLIENT_KEY})
    assert code == 503
    assert body["type"] == "error"
    assert body["error"]["type"]
    # Providers alone are not enough: the host must push client keys too.
    assert await put_providers(stub, gw, 1, PROVIDER_KEY) == 1
    assert await readyz(gw) == 503
    assert await put_keys(stub, 1) == 1

    assert await readyz(gw) == 200
    await wait_health(gw.control_target, DATA_PLANE, SERVING)
    st = await status(stub)
    assert st.ready
    events = await ask_streamed(gw)
    assert events[-1] == "message_stop"
    await assert_serves(gw)
    assert [upstream_key(gw, i) for i in (0, 1)] == [[PROVIDER_KEY], [PROVIDER_KEY]]

    records, epochs = await collect(stub, 8)
    assert epochs == {st.spool_epoch}
    seqs = [r.seq for r in records]
    assert seqs == sorted(set(seqs)), seqs
    assert len({r.record_id for r in records}) == len(records)
    assert seqs == [r.seq for r in await gw.records()]  # exactly what the spool holds
    by_icpt: dict[str, list[pb.UsageRecord]] = {}
    for r in records:
        by_icpt.setdefault(r.interception_id, []).append(r)
    assert len(by_icpt) == 2
    streaming = []
    for recs in by_icpt.values():
        kinds = [r.WhichOneof("record") for r in recs]
        assert sorted(map(str, kinds)) == sorted(KINDS)
        assert (kinds[0], kinds[-1]) == ("interception_started", "interception_ended")
        started = recs[0].interception_started
        assert (started.actor.id, started.actor.username) == ("u-42", "bob")
        assert dict(started.actor.metadata) == {"team": "infra"}
        assert started.credential_kind == pb.CREDENTIAL_KIND_CENTRALIZED
        # The masked key (tiered by length: 2 code points per end for 11), never the key.
        assert started.credential_hint == "sk...-1"
        assert PROVIDER_KEY not in str(recs[0])
        streaming.append(started.streaming)
        [usage] = [r.token_usage for r in recs if r.HasField("token_usage")]
        expected = STREAM_USAGE if started.streaming else USAGE
        assert (usage.input_tokens, usage.output_tokens) == (
            expected["input_tokens"],
            expected["output_tokens"],
        )
        [prompt] = [r.prompt_usage for r in recs if r.HasField("prompt_usage")]
        assert prompt.prompt == REQUEST["messages"][0]["content"][0]["text"]
        assert recs[-1].interception_ended.status == "completed"
    assert sorted(streaming) == [False, True]


async def test_revoke_keys_gives_401_never_personal_mode(managed: tuple[Gateway, Stub]) -> None:
    gw, stub = managed
    await configure(stub, gw)
    await assert_serves(gw)
    assert await put_keys(stub, 2, revoke=True) == 2

    with pytest.raises(anthropic.AuthenticationError) as caught:
        await ask(gw)
    assert caught.value.status_code == 401
    # Personal mode would forward a provider key, or use the central key for a keyless client.
    for headers in ({}, {"x-api-key": "sk-ant-personal-abcdefghijkl"}):
        code, body = await post_raw(gw, headers)
        assert code == 401, body
        assert body["error"]["type"] == "authentication_error"
    assert len(gw.upstream.requests) == 1
    assert (await status(stub)).api_key_count == 0


async def test_rotate_provider_key(managed: tuple[Gateway, Stub]) -> None:
    gw, stub = managed
    await configure(stub, gw)
    await assert_serves(gw)
    assert upstream_key(gw) == [PROVIDER_KEY]
    assert await put_providers(stub, gw, 2, "sk-pushed-2") == 2

    await assert_serves(gw)
    assert upstream_key(gw) == ["sk-pushed-2"]
    started = [r.payload for r in await gw.records() if r.kind == "interception_started"]
    assert [s["credential_hint"] for s in started] == ["sk...-1", "sk...-2"]


async def test_push_never_disturbs_stream_in_flight(managed: tuple[Gateway, Stub]) -> None:
    gw, stub = managed
    await configure(stub, gw)
    gw.upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=0.1))
    types: list[str] = []
    text: list[str] = []
    sent_at_push = -1
    async with sdk(gw) as client:
        stream = await open_stream(client)
        async for event in stream:
            types.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text.append(event.delta.text)
            if len(types) == 1:
                assert await put_providers(stub, gw, 2, "sk-pushed-2") == 2
                assert await put_keys(stub, 2, revoke=True) == 2
                sent_at_push = gw.upstream.events_sent
    assert 0 < sent_at_push < N_EVENTS  # the pushes landed mid-stream
    assert gw.upstream.events_sent == N_EVENTS
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    assert types.count("content_block_delta") == 8
    assert "".join(text) == ANSWER
    assert upstream_key(gw) == [PROVIDER_KEY]  # the snapshot taken when the request began

    records, _ = await collect(stub, 4)
    assert records[-1].interception_ended.status == "completed"
    [usage] = [r.token_usage for r in records if r.HasField("token_usage")]
    assert usage.output_tokens == STREAM_USAGE["output_tokens"]
    with pytest.raises(anthropic.AuthenticationError):
        await ask(gw)
    assert len(gw.upstream.requests) == 1


async def test_bad_control_input_is_refused_and_data_plane_keeps_serving(
    managed: tuple[Gateway, Stub],
) -> None:
    gw, stub = managed
    await configure(stub, gw)
    wrong = (("authorization", "Bearer not-the-control-token"),)
    err = await rpc_error(stub.GetStatus(pb.GetStatusRequest(), metadata=wrong))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    await assert_serves(gw)
    err = await rpc_error(stub.StreamUsage(pb.StreamUsageRequest(), metadata=wrong))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    await assert_serves(gw)
    good_push = pb.PutProvidersRequest(
        config_version=9, providers=[provider("sk-evil-000000", gw.upstream.url)]
    )
    err = await rpc_error(stub.PutProviders(good_push))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await status(stub)).providers_version == 1
    await assert_serves(gw)
    assert upstream_key(gw) == [PROVIDER_KEY]

    assert await put_providers(stub, gw, 3, PROVIDER_KEY) == 3
    err = await rpc_error(
        stub.PutProviders(
            pb.PutProvidersRequest(
                config_version=2, providers=[provider("sk-stale-0000", gw.upstream.url)]
            ),
            metadata=CONTROL_METADATA,
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await status(stub)).providers_version == 3
    await assert_serves(gw)
    assert upstream_key(gw) == [PROVIDER_KEY]
    assert await put_providers(stub, gw, 3, PROVIDER_KEY) == 3  # same version: idempotent
    await assert_serves(gw)

    server = pb.McpServer(id="docs", url="http://127.0.0.1:9/mcp")
    ok = pb.PutMcpServersRequest(config_version=1, servers=[server])
    await stub.PutMcpServers(ok, metadata=CONTROL_METADATA)
    bad_regex = pb.McpServer(id="other", url="http://127.0.0.1:9/mcp", tool_deny_regex="(")
    bad = pb.PutMcpServersRequest(config_version=2, servers=[bad_regex, server])
    err = await rpc_error(stub.PutMcpServers(bad, metadata=CONTROL_METADATA))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "servers[0].tool_deny_regex" in (err.details() or "")
    st = await status(stub)
    assert (st.mcp_servers_version, st.mcp_server_count) == (1, 1)
    await assert_serves(gw)

    for field, bad_provider in (
        ("providers[0].type", provider("sk-x-00000000", gw.upstream.url, type=0)),
        ("providers[0].base_url", provider("sk-x-00000000", "http//no-scheme.example")),
    ):
        req = pb.PutProvidersRequest(config_version=4, providers=[bad_provider])
        err = await rpc_error(stub.PutProviders(req, metadata=CONTROL_METADATA))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (err.details() or "")
        assert (await status(stub)).providers_version == 3
        await assert_serves(gw)
        assert upstream_key(gw) == [PROVIDER_KEY]


async def test_get_status_never_returns_a_secret(managed: tuple[Gateway, Stub]) -> None:
    gw, stub = managed
    secrets = ["sk-provider-secret-abcdef123456", "mcp-header-secret-77", "mcp-token-secret-88"]
    providers = [
        provider(secrets[0], gw.upstream.url),
        provider(secrets[0], gw.upstream.url, name="second", type=pb.PROVIDER_TYPE_OPENAI),
    ]
    await stub.PutProviders(
        pb.PutProvidersRequest(config_version=5, providers=providers), metadata=CONTROL_METADATA
    )
    await put_keys(stub, 6)
    servers = [
        pb.McpServer(id=i, url=f"https://{i}.example/mcp", headers={"X-Secret": secrets[1]})
        for i in ("a", "b")
    ]
    await stub.PutMcpServers(
        pb.PutMcpServersRequest(config_version=7, servers=servers), metadata=CONTROL_METADATA
    )
    tokens = [
        pb.McpAccessToken(actor_id=a, server_id=s, token=secrets[2])
        for a, s in (("u-42", "a"), ("u-42", "b"), ("u-7", "a"))
    ]
    await stub.PutMcpAccessTokens(
        pb.PutMcpAccessTokensRequest(config_version=8, tokens=tokens), metadata=CONTROL_METADATA
    )

    st = await status(stub)
    assert (st.providers_version, st.api_keys_version) == (5, 6)
    assert (st.mcp_servers_version, st.mcp_tokens_version) == (7, 8)
    assert (st.provider_count, st.api_key_count) == (2, 1)
    assert (st.mcp_server_count, st.mcp_token_count) == (2, 3)
    assert st.ready
    raw, text = st.SerializeToString(), str(st)
    for secret in [*secrets, CONTROL_TOKEN, CLIENT_KEY, CLIENT_SHA]:
        assert secret.encode() not in raw
        assert secret not in text


async def test_ack_usage(managed: tuple[Gateway, Stub]) -> None:
    gw, stub = managed
    await configure(stub, gw)
    await assert_serves(gw)
    records, _ = await collect(stub, 4)
    epoch, last = (await status(stub)).spool_epoch, records[-1].seq
    assert len(records) == 4

    other = await stub.AckUsage(
        pb.AckUsageRequest(epoch="another-epoch", acked_through=last), metadata=CONTROL_METADATA
    )
    assert (other.removed, other.spool_depth) == (0, 4)
    acked = await stub.AckUsage(
        pb.AckUsageRequest(epoch=epoch, acked_through=last), metadata=CONTROL_METADATA
    )
    assert (acked.removed, acked.spool_depth) == (4, 0)
    assert (await status(stub)).spool_depth == 0
    assert await gw.records() == []
    err = await rpc_error(
        stub.AckUsage(
            pb.AckUsageRequest(epoch=epoch, acked_through=last + 1), metadata=CONTROL_METADATA
        )
    )
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_health_and_reflection_need_no_token(managed: tuple[Gateway, Stub]) -> None:
    gw, _ = managed
    assert await health(gw.control_target, CONTROL_SERVICE) == SERVING
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        stub = cast(Any, reflection_pb2_grpc.ServerReflectionStub(cast(Any, channel)))
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async with asyncio.timeout(5):
            resp = await call.read()
        call.cancel()
    names = {s.name for s in resp.list_services_response.service}
    assert {CONTROL_SERVICE, "grpc.health.v1.Health"} <= names


async def test_control_plane_disabled_without_token(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    assert gw.daemon.control is None
    # Standalone: the configured gateway key and central provider key still serve.
    message = await ask(gw, GATEWAY_KEY)
    assert message.content[0].type == "text"


async def pushes(gw: Gateway, outcome: str) -> float:
    """How many provider pushes had this outcome, as the Prometheus endpoint counts them."""
    return await metric_value(
        gw.metrics_url, "aibridged_control_pushes_total", kind="providers", outcome=outcome
    )


async def test_push_metrics(managed: tuple[Gateway, Stub]) -> None:
    gw, stub = managed
    # The registry is process-wide: other tests' pushes count too, so compare with a baseline.
    applied_before, stale_before = await pushes(gw, "applied"), await pushes(gw, "stale")
    await put_providers(stub, gw, 2, PROVIDER_KEY)
    applied = await pushes(gw, "applied")
    assert applied >= 1
    assert applied - applied_before == 1

    err = await rpc_error(
        stub.PutProviders(pb.PutProvidersRequest(config_version=1), metadata=CONTROL_METADATA)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await pushes(gw, "stale") - stale_before == 1
    assert await pushes(gw, "applied") == applied
