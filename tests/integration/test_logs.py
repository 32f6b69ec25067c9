"""What an operator reading the daemon's log sees: one line per interception and per refused
request, JSON by default, no third-party chatter, and never a secret."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import orjson
import pytest

from control.v1 import control_pb2 as pb
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.logs import JsonFormatter
from gateway.testing import FakeUpstream, Reply, load_txtar
from tests.conftest import (
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    UPSTREAM_KEY,
    Gateway,
    fixture_usage,
)
from tests.mcp_server import McpTestServer, running_mcp_server
from tests.processes import DaemonProcess

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
AUTH = load_txtar(FIXTURES / "anthropic" / "loop_echo_auth.txtar")
BYOK_KEY = "sk-ant-byok-key-of-alice-0123456789abcdef"
WRONG_KEY = "gw-wrong-key-0123456789abcdef"
MCP_TOKEN = "mcp-token-of-alice-0123456789abcdef"
MCP_HEADER = "static-mcp-header-secret-0123456789"
SECRETS = (GATEWAY_KEY, UPSTREAM_KEY, BYOK_KEY, WRONG_KEY, MCP_TOKEN, MCP_HEADER, CONTROL_TOKEN)
ENDED_FIELDS = {
    "interception_id",
    "provider",
    "api",
    "model",
    "actor_id",
    "client",
    "streaming",
    "status",
    "upstream_status",
    "error_type",
    "duration_us",
    "ttfb_us",
    "overhead_us",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
}


def body(fx: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {**orjson.loads(fx["request"]), **extra}


async def raw(
    url: str, data: bytes, key: str = GATEWAY_KEY, method: str = "POST"
) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, data=data, headers={"x-api-key": key}) as r,
    ):
        return r.status, await r.read()


async def full_scenario(daemon: DaemonProcess, upstream: FakeUpstream) -> list[str]:
    """Every kind of traffic, with every kind of credential; the interception ids it made."""
    async with grpc.aio.insecure_channel(daemon.control_target) as channel:
        token = pb.McpAccessToken(actor_id="u-1", server_id="tools", token=MCP_TOKEN)
        await ControlServiceStub(channel).PutMcpAccessTokens(
            pb.PutMcpAccessTokensRequest(config_version=1, tokens=[token]),
            metadata=CONTROL_METADATA,
        )
    ids = []
    # The central key, streamed; the client's own key (BYOK), blocking.
    async with anthropic.AsyncAnthropic(
        base_url=daemon.url, api_key=GATEWAY_KEY, max_retries=0
    ) as client:
        upstream.enqueue(Reply.from_section(TEXT["streaming"]))
        async with client.messages.stream(**body(TEXT)) as stream:
            ids.append((await stream.get_final_message()).id)
    async with anthropic.AsyncAnthropic(
        base_url=daemon.url,
        api_key=GATEWAY_KEY,
        max_retries=0,
        default_headers={"x-aibridged-provider-key": BYOK_KEY},
    ) as client:
        upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
        ids.append((await client.messages.create(**body(TEXT))).id)
        # An injected tool that sees the actor's MCP token (the model gets it back).
        upstream.enqueue(
            Reply.from_section(AUTH["streaming"]), Reply.from_section(AUTH["streaming/tool-call"])
        )
        async with client.messages.stream(**body(AUTH)) as stream:
            ids.append((await stream.get_final_message()).id)
    messages = f"{daemon.url}/v1/messages"
    assert (await raw(messages, orjson.dumps(body(TEXT)), WRONG_KEY))[0] == 401
    assert (await raw(f"{daemon.root}/nowhere", b"", method="GET"))[0] == 404
    assert (await raw(messages, b"x" * 200_000))[0] == 413
    assert (await raw(messages, b"{not json"))[0] == 400
    upstream.enqueue(Reply(headers={"Content-Type": "application/json"}, body=b'{"data":[]}'))
    assert (await raw(f"{daemon.url}/v1/models", b"", method="GET"))[0] == 200
    return ids


async def test_daemon_logs_a_json_line_per_request_and_no_secret(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with running_mcp_server(McpTestServer()) as mcp_url:
        daemon = DaemonProcess(
            tmp_path,
            upstream.url,
            control=True,
            log_level="debug",  # everything the daemon can say
            log_format=None,  # unset: stderr is a file, so JSON
            max_body_bytes=100_000,
            mcp_servers=[{"id": "tools", "url": mcp_url, "headers": {"x-static": MCP_HEADER}}],
        )
        await daemon.start()
        try:
            ids = await full_scenario(daemon, upstream)
        finally:
            daemon.terminate()
            assert await daemon.wait() == 0
            await daemon.close()
    log = (tmp_path / "daemon-0.log").read_text()

    # No key, token or header value reached the log, whatever the level.
    for secret in SECRETS:
        assert secret not in log
    # stderr is a file: JSON, one object a line.
    lines = [orjson.loads(line) for line in log.splitlines()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    # MCP calls were made over httpx, whose INFO lines (one per HTTP request) stay out.
    assert not [line for line in lines if line["logger"].startswith(("httpx", "mcp", "client"))]
    assert "HTTP Request" not in log

    ended = [line for line in lines if line["message"] == "interception ended"]
    assert [line["interception_id"] for line in ended] == ids
    for line in ended:
        assert line.keys() >= ENDED_FIELDS
        assert line["level"] == "INFO"
        assert line["logger"] == "aibridged.access"
        assert (line["provider"], line["api"], line["actor_id"]) == ("anthropic", "messages", "u-1")
        assert (line["status"], line["upstream_status"], line["error_type"]) == (
            "completed",
            200,
            "",
        )
        assert line["model"] == "claude-sonnet-4-5"
        assert 0 < line["overhead_us"] <= line["duration_us"]
        assert 0 < line["ttfb_us"] <= line["duration_us"]
    assert [line["streaming"] for line in ended] == [True, False, True]
    usage = fixture_usage(TEXT, ["streaming"])
    first = ended[0]
    assert (first["input_tokens"], first["output_tokens"]) == (usage["input"], usage["output"])
    loop = fixture_usage(AUTH, ["streaming", "streaming/tool-call"])
    assert ended[2]["input_tokens"] == loop["input"]
    assert ended[2]["output_tokens"] == loop["output"]

    refused = [line for line in lines if line["message"] == "request refused"]
    assert [(line["status"], line["method"]) for line in refused] == [
        (401, "POST"),
        (404, "GET"),
        (413, "POST"),
        (400, "POST"),
    ]
    assert refused[0]["reason"] == "invalid gateway API key"
    assert refused[1]["path"] == "/nowhere"
    assert "limit of 100000 bytes" in refused[2]["reason"]
    assert all(line["remote"] == "127.0.0.1" for line in refused)


async def test_text_format_keeps_each_event_on_one_line(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    daemon = DaemonProcess(tmp_path, upstream.url, log_format="text")
    await daemon.start()
    try:
        upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
        # A model name is the client's to choose: a newline in it must not start a line.
        evil = 'claude "x"\ninterception ended status=completed'
        status, _ = await raw(f"{daemon.url}/v1/messages", orjson.dumps(body(TEXT, model=evil)))
        assert status == 200
        assert (await raw(f"{daemon.url}/v1/messages", b"{}", WRONG_KEY))[0] == 401
    finally:
        daemon.terminate()
        await daemon.wait()
    lines = (tmp_path / "daemon-0.log").read_text().splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+ ")
    assert all(stamp.match(line) for line in lines), lines
    [ended] = [line for line in lines if " aibridged.access interception ended " in line]
    assert f"model={evil!r}" in ended
    assert "status=completed" in ended
    assert re.search(r" duration_us=\d+ ", ended)
    [refused] = [line for line in lines if " aibridged.access request refused " in line]
    assert "status=401" in refused
    assert "reason='invalid gateway API key'" in refused
    assert WRONG_KEY not in "\n".join(lines)


async def test_records_in_process_carry_the_fields(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Embedded (no ``setup_logging``), the lines are ordinary ``logging`` records."""
    caplog.set_level(logging.DEBUG)
    gateway.upstream.enqueue(
        Reply(
            status=529,
            body=b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}',
        )
    )
    status, _ = await raw(f"{gateway.url}/v1/messages", orjson.dumps(body(TEXT)))
    assert status == 529
    assert (await raw(f"{gateway.url}/v1/messages", b"{}", WRONG_KEY))[0] == 401
    access = [r for r in caplog.records if r.name == "aibridged.access"]
    [ended] = [r for r in access if r.getMessage() == "interception ended"]
    fields = ended.__dict__
    assert fields.keys() >= ENDED_FIELDS
    assert (fields["status"], fields["upstream_status"]) == ("failed", 529)
    assert fields["error_type"] == "overloaded_error"
    [refused] = [r for r in access if r.getMessage() == "request refused"]
    assert refused.__dict__["status"] == 401
    formatter = JsonFormatter()
    text = "\n".join(formatter.format(r) for r in caplog.records)
    for secret in SECRETS:
        assert secret not in text
