"""Compressed request bodies: decoded by the gateway, bounded by their decoded size.

What reaches the provider is the decoded body without ``Content-Encoding``; a corrupt body is a
400, an encoding the gateway does not decode a 415, and a small body that decodes past
``max_body_bytes`` (a "bomb") a 413 that costs the gateway no memory to speak of.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx2
import pytest
import zstandard
from anthropic.types import Message, MessageParam

from gateway.testing import Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY, Gateway, GatewayFactory, by_kind
from tests.raw_http import (
    RawResponse,
    assert_anthropic_error,
    assert_no_errors_logged,
    exchange,
    request_bytes,
)

MODEL = "claude-sonnet-4-5"
TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
BODY = json.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Compress me, " * 200}],
    }
).encode()
KEY = (b"x-api-key", GATEWAY_KEY.encode())
JSON = (b"content-type", b"application/json")
MESSAGES = "/anthropic/v1/messages"
COUNT_TOKENS = "/anthropic/v1/messages/count_tokens"


def gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def zlib_deflate(data: bytes) -> bytes:
    return zlib.compress(data)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


# (Content-Encoding as sent, how the body was encoded)
ENCODINGS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("gzip", gzip),
    ("x-gzip", gzip),
    ("deflate", zlib_deflate),
    ("deflate", raw_deflate),
    ("zstd", zstd),
    ("ZSTD", zstd),
    ("gzip, zstd", lambda d: zstd(gzip(d))),
    ("identity", lambda d: d),
]
IDS = ["gzip", "x-gzip", "deflate", "raw-deflate", "zstd", "upper-case", "stacked", "identity"]


async def post(
    gw: Gateway, target: str, body: bytes, encoding: str | None
) -> tuple[int, bytes, dict[str, str]]:
    headers = [KEY, JSON]
    if encoding is not None:
        headers.append((b"content-encoding", encoding.encode()))
    response = await exchange(gw.daemon.port, request_bytes("POST", target, headers, body))
    return response.status, response.body, response.headers


@pytest.mark.parametrize(("encoding", "encode"), ENCODINGS, ids=IDS)
@pytest.mark.parametrize("target", [MESSAGES, COUNT_TOKENS])
async def test_compressed_body_reaches_provider_decoded(
    gateway: Gateway,
    caplog: pytest.LogCaptureFixture,
    encoding: str,
    encode: Callable[[bytes], bytes],
    target: str,
) -> None:
    reply = (
        Reply.from_section(TEXT["non-streaming"])
        if target == MESSAGES
        else Reply(headers={"Content-Type": "application/json"}, body=b'{"input_tokens": 612}')
    )
    gateway.upstream.enqueue(reply)
    compressed = encode(BODY)

    response = await exchange(
        gateway.daemon.port,
        request_bytes(
            "POST", target, [KEY, JSON, (b"content-encoding", encoding.encode())], compressed
        ),
    )

    assert response.status == 200, response
    (sent,) = gateway.upstream.requests
    assert sent.body == BODY
    assert "Content-Encoding" not in sent.headers
    assert sent.headers["Content-Length"] == str(len(BODY))
    assert_no_errors_logged(caplog)


async def test_encodings_on_two_header_lines_are_both_decoded(gateway: Gateway) -> None:
    # Two Content-Encoding lines mean the same as one "gzip, zstd" line (RFC 9110 5.3).
    gateway.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    twice = zstd(gzip(BODY))
    codings = [(b"content-encoding", b"gzip"), (b"content-encoding", b"zstd")]
    response = await exchange(
        gateway.daemon.port, request_bytes("POST", MESSAGES, [KEY, JSON, *codings], twice)
    )
    assert response.status == 200, response
    (sent,) = gateway.upstream.requests
    assert sent.body == BODY


async def test_query_reaches_the_provider_as_the_client_encoded_it(gateway: Gateway) -> None:
    gateway.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
    response = await exchange(
        gateway.daemon.port,
        request_bytes("POST", MESSAGES + "?beta=%23frag&x=a%2526b", [KEY, JSON], BODY),
    )
    assert response.status == 200, response
    (sent,) = gateway.upstream.requests
    # The fake provider decodes the query once, as any server does.
    assert sent.query == "beta=#frag&x=a%26b"


class CompressingTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport that sends every request body compressed, as Codex does with zstd."""

    def __init__(self, encoding: str, encode: Callable[[bytes], bytes]) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self._encoding = encoding
        self._encode = encode

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Compress the body, then send it."""
        body = self._encode(await request.aread())
        headers = httpx2.Headers(request.headers)
        headers["Content-Encoding"] = self._encoding
        headers["Content-Length"] = str(len(body))
        compressed = httpx2.Request(
            request.method,
            request.url,
            headers=headers,
            content=body,
            extensions=request.extensions,
        )
        return await self._inner.handle_async_request(compressed)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._inner.aclose()


@pytest.mark.parametrize(("encoding", "encode"), [("zstd", zstd), ("gzip", gzip)])
@pytest.mark.parametrize("stream", [True, False])
async def test_sdk_with_compressed_requests(
    gateway: Gateway, encoding: str, encode: Callable[[bytes], bytes], stream: bool
) -> None:
    gateway.upstream.enqueue(Reply.from_section(TEXT["streaming" if stream else "non-streaming"]))
    http = httpx2.AsyncClient(transport=CompressingTransport(encoding, encode))
    client = anthropic.AsyncAnthropic(
        api_key=GATEWAY_KEY, base_url=gateway.url, http_client=http, max_retries=0
    )
    said: list[MessageParam] = [{"role": "user", "content": "hi"}]

    message: Message
    if stream:
        async with client.messages.stream(model=MODEL, max_tokens=64, messages=said) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.create(model=MODEL, max_tokens=64, messages=said)
    await client.close()

    assert message.stop_reason == "end_turn"
    (sent,) = gateway.upstream.requests
    assert json.loads(sent.body)["messages"] == said
    assert "Content-Encoding" not in sent.headers
    (ended,) = by_kind(await gateway.records(), "interception_ended")
    assert ended["status"] == "completed"


CORRUPT = [
    ("gzip", b"\x1f\x8b\x08\x00not really gzip at all"),
    ("gzip", gzip(BODY)[:-20]),  # truncated
    ("gzip", gzip(BODY) + b"trailing"),
    ("deflate", b"\x78\x9c" + b"\xff" * 40),
    ("zstd", b"\x28\xb5\x2f\xfd garbage after the magic number"),
    ("zstd", zstd(BODY)[:-10]),  # truncated
    ("zstd", b"plain JSON sent as zstd"),
]


@pytest.mark.parametrize(("encoding", "body"), CORRUPT)
@pytest.mark.parametrize("target", [MESSAGES, COUNT_TOKENS])
async def test_corrupt_body_is_400(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, encoding: str, body: bytes, target: str
) -> None:
    status, out, headers = await post(gateway, target, body, encoding)

    message = assert_anthropic_error(
        RawResponse(status, headers, out), 400, "invalid_request_error"
    )
    assert encoding in message
    assert gateway.upstream.requests == []
    assert await gateway.records() == []
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, br", "snappy, gzip", "x-\xff"])
@pytest.mark.parametrize("target", [MESSAGES, COUNT_TOKENS])
async def test_unsupported_encoding_is_415(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, encoding: str, target: str
) -> None:
    headers = [KEY, JSON, (b"content-encoding", encoding.encode("latin-1"))]
    response = await exchange(
        gateway.daemon.port, request_bytes("POST", target, headers, gzip(BODY))
    )

    message = assert_anthropic_error(response, 415, "invalid_request_error")
    assert "gzip, deflate, zstd" in message
    assert gateway.upstream.requests == []
    assert_no_errors_logged(caplog)


def gzip_bomb(mib: int) -> bytes:
    """``mib`` MiB of zeros in one gzip member (about 1 KiB per MiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(mib)) + c.flush()


def zstd_bomb(mib: int) -> bytes:
    """``mib`` MiB of zeros in one zstd frame (about 32 bytes per MiB)."""
    c = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(mib)) + c.flush()


def reset_peak_rss_kib() -> int:
    """Start this process's peak RSS again from its current RSS (Linux); that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return peak_rss_kib()


def peak_rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


@pytest.mark.parametrize(
    ("encoding", "bomb"),
    [("gzip", lambda: gzip_bomb(300)), ("zstd", lambda: zstd_bomb(1024))],
    ids=["gzip-300MiB", "zstd-1GiB"],
)
@pytest.mark.parametrize("target", [MESSAGES, COUNT_TOKENS])
async def test_bomb_is_413_without_memory_growth(
    make_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    encoding: str,
    bomb: Callable[[], bytes],
    target: str,
) -> None:
    limit = 8 << 20
    gw = await make_gateway(max_body_bytes=limit)
    body = bomb()
    assert len(body) < 512 << 10  # well within the limit as sent
    before = reset_peak_rss_kib()

    status, out, headers = await post(gw, target, body, encoding)

    grown_mib = (peak_rss_kib() - before) / 1024
    message = assert_anthropic_error(RawResponse(status, headers, out), 413, "request_too_large")
    assert str(limit) in message
    # The decoded body up to the limit, held once (aiohttp's own decoding held ~10x as much).
    assert grown_mib < 2 * limit / (1 << 20), f"peak RSS grew by {grown_mib:.1f} MiB"
    assert gw.upstream.requests == []
    assert await gw.records() == []
    assert_no_errors_logged(caplog)


async def test_body_at_limit_once_decoded_is_accepted(make_gateway: GatewayFactory) -> None:
    body = json.dumps(
        {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [], "pad": "x" * 4000}
    ).encode()
    gw = await make_gateway(max_body_bytes=len(body))
    gw.upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))

    status, _, _ = await post(gw, MESSAGES, gzip(body), "gzip")
    assert status == 200
    assert gw.upstream.requests[0].body == body

    status, out, _ = await post(gw, MESSAGES, gzip(body + b" "), "gzip")
    assert status == 413, out
