"""HTTP/1.1 over a raw socket: bytes no client library would send, and what the server did."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import pytest

Header = tuple[bytes, bytes]


def request_bytes(
    method: str, target: str, headers: list[Header], body: bytes = b"", *, close: bool = True
) -> bytes:
    """A request with ``Host``, ``Content-Length`` and (unless ``close=False``) ``Connection:
    close`` added; header values are sent byte for byte."""
    head = f"{method} {target} HTTP/1.1\r\nHost: gw\r\n".encode()
    if close:
        head += b"Connection: close\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n".encode()
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    return head + b"\r\n" + body


def chunked_head(target: str, headers: list[Header]) -> bytes:
    """The head of a ``POST`` to ``target`` whose body follows in chunks (see :func:`chunk`)."""
    head = f"POST {target} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n".encode()
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    return head + b"\r\n"


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (empty: the last chunk, which ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class RawResponse:
    """One response as read off the socket (chunked bodies de-chunked)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def parse_response(data: bytes) -> tuple[RawResponse, bytes]:
    """The first response in ``data`` and the bytes after it."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                rest = rest.partition(b"\r\n")[2]
                break
            body, rest = body + rest[:size], rest[size + 2 :]
    else:
        length = int(headers.get("content-length", len(rest)))
        body, rest = rest[:length], rest[length:]
    return RawResponse(int(status_line.split()[1]), headers, body), rest


async def exchange(port: int, request: bytes, within: float = 10.0) -> RawResponse:
    """Send ``request`` (with ``Connection: close``) and read the response to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(within):
            data = await reader.read()
    finally:
        writer.close()
    return parse_response(data)[0]


def assert_anthropic_error(response: RawResponse, status: int, error_type: str) -> str:
    """``response`` is ``status`` with an Anthropic error of ``error_type``; its message."""
    assert response.status == status, response
    assert response.headers["content-type"].startswith("application/json"), response
    obj = response.json()
    assert obj["type"] == "error", obj
    assert obj["error"]["type"] == error_type, obj
    message: str = obj["error"]["message"]
    assert "Traceback" not in message
    return message


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR line and no traceback was logged."""
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
