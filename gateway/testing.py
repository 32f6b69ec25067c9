"""Test helpers shipped with the gateway: a txtar reader and a fake upstream provider.

The fake upstream is a real aiohttp server on loopback that replays recorded responses byte for
byte (SSE streams event by event, with optional pacing) and remembers every request it received,
so tests can assert what reached the "provider".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

_MARKER_PREFIX = "-- "
_MARKER_SUFFIX = " --"


def parse_txtar(text: str) -> tuple[str, dict[str, str]]:
    """Split a txtar archive into its leading comment and ``{section name: content}``."""
    comment: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] = comment
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if stripped.startswith(_MARKER_PREFIX) and stripped.endswith(_MARKER_SUFFIX):
            name = stripped[len(_MARKER_PREFIX) : -len(_MARKER_SUFFIX)].strip()
            if name:
                current = sections.setdefault(name, [])
                continue
        current.append(line)
    return "".join(comment), {k: "".join(v) for k, v in sections.items()}


def load_txtar(path: Path) -> dict[str, str]:
    """The sections of a txtar file."""
    return parse_txtar(path.read_text())[1]


@dataclass
class Reply:
    """One scripted upstream response."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sse: bool = False
    event_delay: float = 0.0
    first_byte_delay: float = 0.0
    # Stop after this many SSE events and hold the connection open (simulates a stalled stream).
    hang_after: int | None = None
    # Close the connection abruptly after this many SSE events.
    cut_after: int | None = None

    @classmethod
    def from_section(cls, text: str, *, event_delay: float = 0.0) -> Reply:
        """A reply from a fixture section: raw HTTP (``HTTP/...``), SSE text, or a JSON body."""
        if text.startswith("HTTP/"):
            return _raw_http(text)
        stripped = text.lstrip()
        if stripped.startswith("event:") or stripped.startswith("data:"):
            return cls(
                headers={"Content-Type": "text/event-stream; charset=utf-8"},
                body=text.encode(),
                sse=True,
                event_delay=event_delay,
            )
        return cls(headers={"Content-Type": "application/json"}, body=text.strip().encode())


def _raw_http(text: str) -> Reply:
    head, _, body = text.partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    raw = body.encode()
    length = headers.pop("Content-Length", None)
    raw = raw[: int(length)] if length is not None else raw.rstrip(b"\n")
    return Reply(status=status, headers=headers, body=raw)


def split_events(body: bytes) -> list[bytes]:
    """Split an SSE body into events, each keeping its exact bytes (terminator included)."""
    events: list[bytes] = []
    start = 0
    while True:
        end = body.find(b"\n\n", start)
        if end < 0:
            if body[start:].strip():
                events.append(body[start:])
            return events
        events.append(body[start : end + 2])
        start = end + 2


@dataclass(frozen=True)
class ReceivedRequest:
    """A request as the fake upstream saw it."""

    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes


class LoopbackServer:
    """An HTTP server on an ephemeral ``127.0.0.1`` port whose ``_handle`` answers every path."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> Self:
        """Listen on an ephemeral loopback port."""
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert self._runner.addresses
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()


class FakeUpstream(LoopbackServer):
    """A scripted provider on ``127.0.0.1``: ``enqueue`` replies, read ``requests`` after."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ReceivedRequest] = []
        self.replies: deque[Reply] = deque()
        self.default: Reply | None = None
        self.events_sent = 0
        self.finished = asyncio.Event()

    def enqueue(self, *replies: Reply) -> None:
        """Replies to give, in order, to the next requests."""
        self.replies.extend(replies)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            ReceivedRequest(
                request.method,
                request.path,
                request.query_string,
                CIMultiDictProxy(CIMultiDict(request.headers)),
                body,
            )
        )
        reply = self.replies.popleft() if self.replies else self.default
        if reply is None:
            return web.json_response({"error": "no scripted reply"}, status=599)
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        if not reply.sse:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        out = web.StreamResponse(status=reply.status, headers=reply.headers)
        await out.prepare(request)
        try:
            for n, event in enumerate(split_events(reply.body)):
                if reply.hang_after is not None and n >= reply.hang_after:
                    await asyncio.sleep(3600)
                if reply.cut_after is not None and n >= reply.cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return out
                if reply.event_delay and n:
                    await asyncio.sleep(reply.event_delay)
                await out.write(event)
                self.events_sent += 1
            await out.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            return out
        finally:
            self.finished.set()
        return out


@contextlib.asynccontextmanager
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    """``async with fake_upstream() as up:`` a started :class:`FakeUpstream`."""
    upstream = await FakeUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.close()
