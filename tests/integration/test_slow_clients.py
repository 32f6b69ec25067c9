"""Slow and idle clients (slowloris) are disconnected; slow providers and long streams are not.

Timeouts are set small (a fraction of a second) so that the tests are fast; the bounds on how
long a disconnection may take are loose on purpose (a loaded CI machine is slow), but far below
aiohttp's own keep-alive timeout of an hour, which is what the gateway had before.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path

import aiohttp
import anthropic
import pytest
from anthropic.types import MessageParam

from gateway.testing import FakeUpstream, Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY, Gateway, GatewayFactory, by_kind
from tests.processes import DaemonProcess
from tests.raw_http import assert_anthropic_error, assert_no_errors_logged, parse_response

MODEL = "claude-sonnet-4-5"
TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
BODY = json.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
).encode()
# Far below aiohttp's default keep-alive (3630 s), far above the timeouts under test.
CLOSED_WITHIN = 8.0

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(gw: Gateway) -> Streams:
    return await asyncio.open_connection("127.0.0.1", gw.daemon.port)


async def closed_after(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    start = time.monotonic()
    async with asyncio.timeout(CLOSED_WITHIN):
        data = await reader.read()
    return time.monotonic() - start, data


def read(log: Path) -> str:
    return log.read_text()


async def logged(log: Path, text: str, within: float = 10.0) -> None:
    """Wait until the daemon's log holds ``text``."""
    async with asyncio.timeout(within):
        while text not in read(log):  # noqa: ASYNC110 (another process writes the file)
            await asyncio.sleep(0.1)


def head(method: str, target: str, length: int | None = None, close: bool = False) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: gw",
        f"x-api-key: {GATEWAY_KEY}",
        "content-type: application/json",
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_half_sent_headers_are_cut_after_header_timeout(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(client_header_timeout=0.5, client_keepalive_timeout=30)
    reader, writer = await connect(gw)
    writer.write(b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: ")

    elapsed, data = await closed_after(reader)

    assert data == b""
    assert elapsed >= 0.4
    assert gw.upstream.requests == []
    writer.close()


async def test_connection_that_sends_nothing_is_cut_after_header_timeout(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(client_header_timeout=0.5, client_keepalive_timeout=30)
    reader, writer = await connect(gw)

    elapsed, data = await closed_after(reader)

    assert data == b""
    assert elapsed >= 0.4
    writer.close()


async def test_headers_dripped_byte_by_byte_are_cut(make_gateway: GatewayFactory) -> None:
    # Each byte comes well within the timeout: only a deadline on the whole head stops this.
    gw = await make_gateway(client_header_timeout=0.6, client_keepalive_timeout=30)
    reader, writer = await connect(gw)
    request = head("GET", "/anthropic/v1/models")

    async def drip() -> None:
        for byte in request:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        elapsed, data = await closed_after(reader)
    finally:
        dripping.cancel()
    assert data == b""
    assert elapsed < len(request) * 0.05  # cut before the head was complete
    assert gw.upstream.requests == []
    writer.close()


async def test_next_request_on_kept_alive_connection_gets_header_timeout(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(client_header_timeout=0.5, client_keepalive_timeout=30)
    reader, writer = await connect(gw)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    async with asyncio.timeout(5):
        first = await reader.readuntil(b'{"status": "ok"}')
    assert first.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(1.0)  # idle longer than the header timeout: still open (keep-alive)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: ")  # then half a request

    elapsed, data = await closed_after(reader)

    assert data == b""
    assert elapsed >= 0.4
    assert elapsed < 5  # the header timeout, not the 30 s keep-alive
    writer.close()


async def test_idle_keepalive_connection_is_closed(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(client_header_timeout=10, client_keepalive_timeout=0.5)
    reader, writer = await connect(gw)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")

    elapsed, data = await closed_after(reader)

    response, rest = parse_response(data)
    assert response.status == 200
    assert rest == b""
    assert elapsed >= 0.4
    writer.close()


@pytest.mark.parametrize(
    "target", ["/anthropic/v1/messages", "/anthropic/v1/messages/count_tokens"]
)
async def test_half_sent_body_gets_408_after_body_timeout(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    gw = await make_gateway(client_body_timeout=0.5, client_keepalive_timeout=30)
    reader, writer = await connect(gw)
    writer.write(head("POST", target, len(BODY)) + BODY[:10])

    elapsed, data = await closed_after(reader)

    response, _ = parse_response(data)
    message = assert_anthropic_error(response, 408, "timeout_error")
    assert "0.5 s" in message
    assert response.headers["connection"] == "close"
    assert elapsed >= 0.4
    assert gw.upstream.requests == []
    assert await gw.records() == []
    assert_no_errors_logged(caplog)
    writer.close()


async def test_body_sent_in_pieces_within_the_timeout_is_served(
    make_gateway: GatewayFactory,
) -> None:
    # The body timeout bounds each wait for more of the body, not the whole upload.
    gw = await make_gateway(client_body_timeout=1.0)
    gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    reader, writer = await connect(gw)
    writer.write(head("POST", "/anthropic/v1/messages", len(BODY), close=True))
    for i in range(0, len(BODY), 16):
        await asyncio.sleep(0.1)
        writer.write(BODY[i : i + 16])

    _, data = await closed_after(reader)

    response, _ = parse_response(data)
    assert response.status == 200, response
    assert gw.upstream.requests[0].body == BODY
    writer.close()


async def test_body_trickled_past_the_total_timeout_gets_408(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Each piece comes within client_body_timeout, but a byte at a time would hold the
    # connection for as long as the client likes without the total bound.
    gw = await make_gateway(client_body_timeout=0.5, client_body_total_timeout=1.5)
    reader, writer = await connect(gw)
    writer.write(head("POST", "/anthropic/v1/messages", len(BODY)))

    async def trickle() -> None:
        for i in range(len(BODY)):
            await asyncio.sleep(0.2)
            writer.write(BODY[i : i + 1])

    dripping = asyncio.create_task(trickle())
    try:
        elapsed, data = await closed_after(reader)
    finally:
        dripping.cancel()
    response, _ = parse_response(data)
    message = assert_anthropic_error(response, 408, "timeout_error")
    assert "1.5 s in all" in message
    assert 1.2 <= elapsed < 8
    assert gw.upstream.requests == []
    assert_no_errors_logged(caplog)
    writer.close()


async def test_metrics_listener_cuts_half_sent_and_idle_connections(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(client_header_timeout=0.5, client_keepalive_timeout=0.5)
    port = gw.daemon.metrics_port
    half_reader, half_writer = await asyncio.open_connection("127.0.0.1", port)
    half_writer.write(b"GET /metrics HTTP/1.1\r\nHost: ")
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")

    half_elapsed, half_data = await closed_after(half_reader)
    _, idle_data = await closed_after(idle_reader)

    assert half_data == b""
    assert half_elapsed >= 0.4
    response, rest = parse_response(idle_data)
    assert response.status == 200
    assert b"aibridged_" in response.body
    assert rest == b""
    half_writer.close()
    idle_writer.close()


async def test_long_stream_and_slow_provider_are_not_cut(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        client_header_timeout=0.3, client_body_timeout=0.3, client_keepalive_timeout=0.3
    )
    # A stream lasting several times every client timeout, then a provider that takes its time.
    stream = Reply.from_section(TEXT["streaming"], event_delay=0.1)
    slow = Reply.from_section(TEXT["non-streaming"])
    slow.first_byte_delay = 1.0
    gw.upstream.enqueue(stream, slow)
    client = anthropic.AsyncAnthropic(api_key=GATEWAY_KEY, base_url=gw.url, max_retries=0)
    said: list[MessageParam] = [{"role": "user", "content": "hi"}]

    start = time.monotonic()
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=said) as events:
        streamed = await events.get_final_message()
    assert time.monotonic() - start > 1.0
    blocking = await client.messages.create(model=MODEL, max_tokens=64, messages=said)
    await client.close()

    assert streamed.stop_reason == "end_turn"
    assert blocking.stop_reason == "end_turn"
    ended = by_kind(await gw.records(), "interception_ended")
    assert [e["status"] for e in ended] == ["completed", "completed"]


async def test_daemon_process_cuts_half_sent_headers(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # The real daemon, on uvloop (the tests above run the gateway in pytest's asyncio loop).
    daemon = DaemonProcess(tmp_path, upstream.url, client_header_timeout=0.5)
    await daemon.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: gw\r\n")
        elapsed, data = await closed_after(reader)
        assert data == b""
        assert elapsed >= 0.4
        writer.close()
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0
        await daemon.close()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_out_of_descriptors_is_logged_once_and_daemon_recovers(
    tmp_path: Path, upstream: FakeUpstream, event_loop: str
) -> None:
    # uvloop (through libuv) accepts and closes connections at the descriptor limit without a
    # word; asyncio logs a traceback every second. The daemon's open-files limit is lowered to a
    # few above what it uses, then more connections are opened than that.
    daemon = DaemonProcess(tmp_path, upstream.url, client_header_timeout=60, event_loop=event_loop)
    await daemon.start()
    held: list[asyncio.StreamWriter] = []
    try:
        pid = daemon.proc.pid
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 8, hard))
        for _ in range(30):
            _, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            held.append(writer)
        log = tmp_path / "daemon-0.log"
        await logged(log, "out of file descriptors")
        await asyncio.sleep(3)  # still out of descriptors: the line is not repeated
        assert read(log).count("out of file descriptors") == 1

        for writer in held:
            writer.close()
        held.clear()
        async with aiohttp.ClientSession() as http, asyncio.timeout(15):
            while True:
                try:
                    async with http.get(f"{daemon.root}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        await logged(log, "file descriptors available again")
        daemon.terminate()
        assert await daemon.wait() == 0
        text = read(log)
        assert "Traceback" not in text
        assert text.count(" ERROR ") == 1
        assert text.count("file descriptors available again") == 1
        line = next(x for x in text.splitlines() if "out of file descriptors" in x)
        assert "ERROR" in line
        assert f"limit={in_use + 8}" in line
    finally:
        for writer in held:
            writer.close()
        await daemon.close()
