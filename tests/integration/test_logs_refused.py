"""Access lines for the refusals no handler logs: requests the HTTP server cannot parse, heads
cut by the header timeout, the health endpoints' 405, handler failures; and event lines that
wait, never lost, while stderr (a non-blocking pipe) cannot take them."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.logs import FLUSH_EVERY, JsonFormatter, _Direct
from gateway.testing import FakeUpstream
from tests.conftest import GATEWAY_KEY, Gateway, GatewayFactory
from tests.processes import AIBRIDGED, DaemonProcess, clean_env, wait_healthy
from tests.raw_http import exchange, parse_response, request_bytes

SECRET = "sk-ant-secret-in-a-malformed-request-0123456789"

# Requests the HTTP parser refuses, each with SECRET in a header value or the request line, and
# the gist their access line gives (never the bytes).
MALFORMED = [
    pytest.param(
        f"POST /anthropic/v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {SECRET}\x00\r\n\r\n",
        "Invalid header value char",
        id="nul-in-value",
    ),
    pytest.param(
        f"GET /anthropic/v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {SECRET}{'a' * 9000}\r\n\r\n",
        "request line or header too long",
        id="header-too-long",
    ),
    pytest.param(
        f"GET /anthropic/v1/models HTTP/1.1\r\nHost: gw\r\nbad name {SECRET}: 1\r\n\r\n",
        "Invalid header token",
        id="bad-name",
    ),
    pytest.param(
        f"GET /?key={SECRET} HTTP/9.x\r\nHost: gw\r\n\r\n",
        "invalid request line",
        id="bad-version",
    ),
    pytest.param(
        f"G{SECRET}@T / HTTP/1.1\r\nHost: gw\r\n\r\n",
        "invalid method",
        id="bad-method",
    ),
    pytest.param(
        f"GET /a{SECRET}\x7f HTTP/1.1\r\nHost: gw\r\n\r\n",
        "invalid request target",
        id="bad-target",
    ),
    pytest.param(
        "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET,
        "HTTPS traffic on an HTTP port",
        id="tls",
    ),
]


def access(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access lines logged, as their fields."""
    return [
        {"message": r.getMessage(), **r.__dict__}
        for r in caplog.records
        if r.name == "aibridged.access"
    ]


def everything(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as the daemon's JSON formatter writes it (tracebacks included)."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(r) for r in caplog.records)


async def send(port: int, data: bytes, within: float = 10.0) -> bytes:
    """``data`` on a new connection; all the server sent until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(within):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(("request_", "gist"), MALFORMED)
async def test_request_the_server_cannot_parse_gets_one_line_without_its_bytes(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, request_: str, gist: str
) -> None:
    caplog.set_level(logging.DEBUG)

    response, _ = parse_response(await send(gateway.daemon.port, request_.encode("latin-1")))

    assert response.status == 400
    [line] = access(caplog)
    assert line["message"] == "request refused"
    assert (line["status"], line["method"], line["path"]) == (400, "", "")
    assert line["reason"] == f"malformed HTTP request: {gist}"
    assert line["remote"] == "127.0.0.1"
    # Not in the access line, nor in any other line (a debug traceback quoting the header).
    assert SECRET not in everything(caplog)
    assert gateway.upstream.requests == []


async def test_daemon_logs_malformed_requests_and_health_405_as_json(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    daemon = DaemonProcess(tmp_path, upstream.url, log_format="json", log_level="debug")
    await daemon.start()
    try:
        for param in MALFORMED:
            request_ = param.values[0]
            assert isinstance(request_, str)
            response, _ = parse_response(await send(daemon.port, request_.encode("latin-1")))
            assert response.status == 400
        async with aiohttp.ClientSession() as http:
            for method in ("POST", "DELETE"):
                async with http.request(method, f"{daemon.root}/healthz") as r:
                    assert r.status == 405
            async with http.post(f"{daemon.root}/readyz", headers={"x-api-key": SECRET}) as r:
                assert r.status == 405
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0
        await daemon.close()
    log = (tmp_path / "daemon-0.log").read_text()

    assert SECRET not in log
    lines = [orjson.loads(line) for line in log.splitlines()]
    refused = [line for line in lines if line["message"] == "request refused"]
    assert all(line["logger"] == "aibridged.access" for line in refused)
    assert [(line["status"], line["reason"]) for line in refused] == [
        *((400, f"malformed HTTP request: {p.values[1]}") for p in MALFORMED),
        (405, "method not allowed"),
        (405, "method not allowed"),
        (405, "method not allowed"),
    ]
    assert [(line["method"], line["path"]) for line in refused[-3:]] == [
        ("POST", "/healthz"),
        ("DELETE", "/healthz"),
        ("POST", "/readyz"),
    ]


async def test_head_cut_by_the_header_timeout_gets_one_line(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway(client_header_timeout=0.5, client_keepalive_timeout=1.0)
    port = gw.daemon.port
    caplog.set_level(logging.DEBUG)

    # Half a head, holding a key: cut, one line (408), without the key.
    assert (
        await send(port, f"POST /anthropic/v1/messages HTTP/1.1\r\nx-api-key: {SECRET}".encode())
        == b""
    )
    # A connection that sends nothing: cut without a line (a load balancer's TCP probe).
    assert await send(port, b"") == b""
    # A head in two pieces, answered, then idle until the keep-alive timeout: no line either.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    await asyncio.sleep(0.1)
    writer.write(b"Host: gw\r\n\r\n")
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")

    lines = access(caplog)
    assert [(line["status"], line["reason"], line["method"], line["path"]) for line in lines] == [
        (408, "request headers not received in time", "", "")
    ]
    assert lines[0]["remote"] == "127.0.0.1"
    assert SECRET not in everything(caplog)


FAILURES = [
    pytest.param(RuntimeError("boom"), 500, "internal gateway error", id="unexpected"),
    pytest.param(web.HTTPGone(reason="Really Gone"), 410, "Really Gone", id="http-410"),
    pytest.param(web.HTTPNotFound(), 404, "route not supported", id="http-404"),
    pytest.param(web.HTTPMethodNotAllowed("GET", ["POST"]), 405, "method not allowed", id="405"),
]
# A failure before an interception starts, on each kind of route: (method, path, module).
FAILING = [
    pytest.param("POST", "/anthropic/v1/messages", "handlers", id="messages"),
    pytest.param("GET", "/anthropic/v1/models", "passthrough", id="passthrough"),
]


@pytest.mark.parametrize(("method", "path", "module"), FAILING)
@pytest.mark.parametrize(("exc", "status", "reason"), FAILURES)
async def test_handler_failure_gets_one_line(
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    module: str,
    exc: Exception,
    status: int,
    reason: str,
) -> None:
    def fail(*_: object) -> None:
        raise exc

    monkeypatch.setattr(f"gateway.proxy.{module}.authenticate", fail)
    caplog.set_level(logging.INFO)

    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{gateway.root}{path}", headers={"x-api-key": GATEWAY_KEY}) as r,
    ):
        assert r.status == status

    [line] = access(caplog)
    assert (line["status"], line["reason"], line["method"], line["path"]) == (
        status,
        reason,
        method,
        path,
    )


async def test_readyz_failure_gets_one_line(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gateway.daemon.readiness, "state", None)
    caplog.set_level(logging.INFO)

    response = await exchange(
        gateway.daemon.port, b"GET /readyz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )

    assert response.status == 500
    [line] = access(caplog)
    assert (line["status"], line["reason"], line["path"]) == (
        500,
        "internal gateway error",
        "/readyz",
    )


# -- stderr that cannot take the lines now ---------------------------------------------------------


@contextmanager
def nonblocking_pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose write end is non-blocking (as a slow reader's stderr may be)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    os.set_blocking(read_fd, False)
    try:
        yield read_fd, write_fd
    finally:
        for fd in (read_fd, write_fd):
            with suppress(OSError):  # the write end is the daemon's, closed already
                os.close(fd)


async def read_slowly(fd: int, until: bytes, within: float = 30.0) -> bytes:
    """Read ``fd`` 4 KiB at a time with pauses, until EOF or ``until`` has arrived (with the rest
    of its line)."""
    got = bytearray()
    async with asyncio.timeout(within):
        while until not in got or not got.endswith(b"\n"):
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            if not data:
                break
            got += data
            await asyncio.sleep(0.002)
    return bytes(got)


async def test_daemon_lines_wait_for_a_slow_stderr_and_all_arrive_in_order(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # The daemon's stderr is a non-blocking pipe nobody reads while it serves 600 refusals
    # (about 150 KB of lines: the pipe holds 64 KiB).
    daemon = DaemonProcess(tmp_path, upstream.url, log_format="json")
    count = 600
    pad = "p" * 150
    with nonblocking_pipe() as (read_fd, write_fd):
        proc = await asyncio.create_subprocess_exec(
            AIBRIDGED, "serve", "--config", str(daemon.config), env=clean_env(), stderr=write_fd
        )
        os.close(write_fd)
        try:
            # The startup lines fit in the pipe; then nobody reads for a while.
            await wait_healthy(daemon.port, proc)
            async with aiohttp.ClientSession() as http:
                for n in range(count):
                    async with http.get(f"{daemon.root}/{pad}/{n}") as r:
                        assert r.status == 404
            await asyncio.sleep(3 * FLUSH_EVERY)  # the daemon's flushes meet a full pipe
            last = f"/{pad}/{count - 1}".encode()
            data = await read_slowly(read_fd, last)
            proc.terminate()
            assert await proc.wait() == 0
            data += await read_slowly(read_fd, b"\x00never")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    lines = [orjson.loads(line) for line in data.splitlines()]
    refused = [line["path"] for line in lines if line["message"] == "request refused"]
    assert refused == [f"/{pad}/{n}" for n in range(count)]
    assert not [line for line in lines if "dropped" in line["message"]]


@asynccontextmanager
async def direct_on(write_fd: int) -> AsyncIterator[_Direct]:
    """A :class:`_Direct` writing JSON lines to ``write_fd``, flushed from the running loop."""
    # A text stream over the fd, like sys.stderr (opening a pipe's fd does not block).
    stream = os.fdopen(write_fd, "w", closefd=False)
    direct = _Direct(logging.StreamHandler(stream), as_json=True, level=logging.INFO)
    direct.loop = asyncio.get_running_loop()
    direct.thread = threading.get_ident()
    try:
        yield direct
    finally:
        direct.loop = None
        stream.close()


def numbered(start: int, stop: int) -> list[bytes]:
    return [
        orjson.dumps({"n": n, "pad": "x" * 200}, option=orjson.OPT_APPEND_NEWLINE)
        for n in range(start, stop)
    ]


async def test_lines_past_the_bound_are_counted_and_told_once_stderr_takes_lines_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_Direct, "BLOCKED_MAX", 100_000)
    with nonblocking_pipe() as (read_fd, write_fd):
        async with direct_on(write_fd) as direct:
            # 1000 lines of ~215 bytes: the pipe takes 64 KiB, 100 KB more are kept, the rest
            # dropped, whole lines only.
            for line in numbered(0, 1000):
                direct.add(line)
            direct.flush()
            # The notice is written once what was kept is: then come the lines added since.
            data = await read_slowly(read_fd, b'"dropped_bytes"')
            for line in numbered(1000, 1010):
                direct.add(line)
            data += await read_slowly(read_fd, b'"n":1009,')

    lines = [orjson.loads(line) for line in data.splitlines()]
    [notice] = [line for line in lines if "n" not in line]
    assert notice["level"] == "WARNING"
    assert notice["message"] == "log lines dropped: stderr was not writable"
    at = lines.index(notice)
    kept = [line["n"] for line in lines[:at]]
    after = [line["n"] for line in lines[at + 1 :]]
    assert kept == list(range(len(kept)))
    assert 300 < len(kept) < 900
    assert notice["dropped_lines"] == 1000 - len(kept)
    assert notice["dropped_bytes"] == sum(len(line) for line in numbered(len(kept), 1000))
    assert after == list(range(1000, 1010))


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_405_gets_one_line(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    caplog.set_level(logging.INFO)

    response = await exchange(gateway.daemon.port, request_bytes("PUT", path, []))

    assert response.status == 405
    [line] = access(caplog)
    assert (line["status"], line["reason"], line["method"], line["path"]) == (
        405,
        "method not allowed",
        "PUT",
        path,
    )


async def test_a_failure_after_the_interception_started_gets_only_its_end_line(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A gateway fault once the interception started: its end line says so (failed, with the
    # error type); a second line, "request refused", would count one request twice.
    def fail(*_: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("gateway.proxy.relay.Interception.post_again", fail)
    caplog.set_level(logging.INFO)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.root}/anthropic/v1/messages",
            headers={"x-api-key": GATEWAY_KEY},
            data=b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}',
        ) as r,
    ):
        assert r.status == 500
    [line] = access(caplog)
    assert (line["message"], line["status"], line["error_type"]) == (
        "interception ended",
        "failed",
        "gateway_error",
    )
