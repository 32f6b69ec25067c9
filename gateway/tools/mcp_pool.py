"""Pooled MCP client connections (I/O shell): list an actor's tools, call them, reconnect.

One connection per (server, bearer token): actors without a token for a server share the
connection that carries only the server's static headers. Each connection is a long-lived
*owner task* that enters the SDK ``Client`` and leaves it again in that same task (anyio cancel
scopes require it); request handlers use the client from their own tasks.

Connections start lazily. A failed connect marks the connection down for an exponential backoff
with jitter, during which callers fail fast (``call``) or skip the server (``list_tools``). A
connection whose transport dies reconnects on next use; idle connections close themselves.
Secrets never reach a log line or a metric label: connections are keyed by the token's sha256
and logs name the server id only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx2
from mcp import Client, MCPError
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST, METHOD_NOT_FOUND, Implementation
from prometheus_client import Counter

from gateway import __version__
from gateway.metrics import REGISTRY
from gateway.state import McpServer, McpToken

_LOG = logging.getLogger(__name__)

MAX_LIST_PAGES = 100
_BASE_BACKOFF = 0.5  # seconds before the first reconnect attempt (before jitter)
_CLOSE_GRACE = 10.0  # seconds close() waits for owner tasks before cancelling them
_CLIENT_INFO = Implementation(name="aibridged", version=__version__)

MCP_SERVER_UNAVAILABLE = Counter(
    "aibridged_mcp_server_unavailable_total",
    "MCP servers left out of a tool listing because they were down, slow or failing.",
    ["mcp_server"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class McpToolInfo:
    """One tool as an MCP server lists it, as plain data."""

    server_id: str
    server_url: str
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class McpCallResult:
    """A tool's result: MCP content items as JSON dicts, and the result's ``isError``."""

    content: list[dict[str, Any]]
    is_error: bool


class McpCallError(Exception):
    """The call did not get a result: unknown server, server down, transport failure, timeout."""


_USERINFO = re.compile(r"://[^/@\s]+@")


def _describe(exc: BaseException, secret: str = "") -> str:
    """A one-line description of ``exc`` (groups flattened), without URL userinfo or ``secret``."""
    if isinstance(exc, BaseExceptionGroup):
        text = "; ".join(_describe(e) for e in exc.exceptions)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = _USERINFO.sub("://***@", text)
    return (text.replace(secret, "***") if secret else text)[:300]


def _broken(exc: BaseException) -> bool:
    """Whether ``exc`` means the session is unusable (as opposed to one failed request)."""
    if isinstance(exc, MCPError):
        return exc.code == CONNECTION_CLOSED or (
            exc.code == INVALID_REQUEST and "Session terminated" in str(exc)
        )
    return not isinstance(exc, TimeoutError)


class _Connection:
    """One MCP session for one (server, token), owned by its own task."""

    def __init__(self, pool: McpPool, server: McpServer, token: str) -> None:
        self.server = server
        self._token = token
        self.key = (server.id, hashlib.sha256(token.encode()).hexdigest() if token else "")
        self._pool = pool
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._drain_until = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self.inflight = 0
        self.last_used = time.monotonic()
        self.failures = 0
        self.down_until = 0.0
        self.last_error = ""
        self._tools: list[McpToolInfo] | None = None
        self._tools_expiry = 0.0
        self._generation = 0
        self._list_lock = asyncio.Lock()

    @property
    def retired(self) -> bool:
        """Stopped for good (config change, idle, broken, close): a new connection replaces it."""
        return self._stop.is_set()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The owner task, if one was started."""
        return self._task

    @property
    def running(self) -> bool:
        """Whether the owner task is alive (connecting, connected or closing)."""
        return self._task is not None and not self._task.done()

    def stop(self, drain: float) -> None:
        """Ask the owner to leave the session, after in-flight requests end (``drain`` s max)."""
        self._drain_until = time.monotonic() + drain
        self._stop.set()

    def invalidate(self) -> None:
        """Forget the cached tool listing (the server said its tools changed)."""
        self._generation += 1
        self._tools = None

    @contextmanager
    def use(self) -> Iterator[None]:
        """Count a request in flight (idle close and draining wait for it)."""
        self.inflight += 1
        self._idle.clear()
        self.last_used = time.monotonic()
        try:
            yield
        finally:
            self.inflight -= 1
            self.last_used = time.monotonic()
            if self.inflight == 0:
                self._idle.set()

    async def client(self, budget: float) -> Client:
        """The connected client, connecting first if needed (waits ``budget`` s at most)."""
        sid = self.server.id
        if self._client is not None and not self.retired:
            return self._client
        if self.retired:
            raise McpCallError(f"MCP server {sid!r}: connection closed")
        if not self.running:
            wait = self.down_until - time.monotonic()
            if wait > 0:
                raise McpCallError(
                    f"MCP server {sid!r} is unavailable (next attempt in {wait:.1f}s): "
                    f"{self.last_error}"
                )
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._own(), name=f"mcp-connection-{sid}")
        task, waiter = self._task, asyncio.ensure_future(self._ready.wait())
        assert task is not None
        try:
            await asyncio.wait({task, waiter}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._client is not None and not self.retired:
            return self._client
        if task.done() and self.last_error:
            raise McpCallError(f"MCP server {sid!r} is unavailable: {self.last_error}")
        raise McpCallError(f"MCP server {sid!r} did not connect within {budget:g}s")

    def describe(self, exc: BaseException) -> str:
        """``exc`` described for a log line or an error message (the token redacted)."""
        return _describe(exc, self._token)

    def _headers(self) -> dict[str, str]:
        headers = dict(self.server.headers)
        if self._token:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _own(self) -> None:
        """Owner task: enter the client, serve until stopped or idle, leave it (same task)."""
        pool, sid = self._pool, self.server.id
        connected = False
        try:
            async with AsyncExitStack() as stack:
                async with asyncio.timeout(pool.connect_timeout):
                    read = max(300.0, pool.call_timeout + 5.0)  # SSE responses may stay silent
                    http = await stack.enter_async_context(
                        httpx2.AsyncClient(
                            headers=self._headers(),
                            timeout=httpx2.Timeout(pool.connect_timeout, read=read),
                        )
                    )
                    client = await stack.enter_async_context(
                        Client(
                            streamable_http_client(self.server.url, http_client=http),
                            read_timeout_seconds=pool.connect_timeout,  # per call_tool overridden
                            message_handler=self._on_message,
                            client_info=_CLIENT_INFO,
                            cache=None,  # the pool keeps its own TTL'd listing
                        )
                    )
                connected = True
                self.failures, self.down_until, self.last_error = 0, 0.0, ""
                self.invalidate()
                self._client = client
                self._ready.set()
                _LOG.debug("MCP server %s: connected (%s)", sid, client.protocol_version)
                listener = asyncio.create_task(self._listen(client), name=f"mcp-listen-{sid}")
                try:
                    await self._serve()
                finally:
                    self._client = None
                    listener.cancel()
                    await asyncio.wait({listener}, timeout=1.0)
        except Exception as exc:
            self.last_error = self.describe(exc)
            if connected:
                _LOG.info("MCP server %s: connection lost: %s", sid, self.last_error)
            else:
                self.failures += 1
                ceiling = min(pool.max_backoff, _BASE_BACKOFF * 2 ** (self.failures - 1))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                self.down_until = time.monotonic() + delay
                _LOG.info(
                    "MCP server %s: connect failed (%s); next attempt in %.1fs",
                    sid,
                    self.last_error,
                    delay,
                )
        finally:
            self._client = None
            self._ready.set()
            pool._owner_exited(self)

    async def _serve(self) -> None:
        """Wait for a stop request or idleness, then for in-flight requests (bounded)."""
        ttl = self._pool.idle_ttl
        while not self._stop.is_set():
            remaining = self.last_used + ttl - time.monotonic()
            if remaining <= 0 and self.inflight == 0:
                _LOG.debug("MCP server %s: closing idle connection", self.server.id)
                self.stop(0.0)
                break
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(remaining, 0.05))
        while self.inflight and time.monotonic() < self._drain_until:  # close() shortens it
            with suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 0.1)

    async def _on_message(self, message: IncomingMessage) -> None:
        """Handshake-era servers announce tool changes as a notification on the session."""
        if getattr(message, "method", None) == "notifications/tools/list_changed":
            self.invalidate()

    async def _listen(self, client: Client) -> None:
        """On 2026-07-28 servers, drop the cached listing when a change event arrives.

        ``subscriptions/listen`` is the only way such servers announce changes; the stream is
        re-opened when it ends (events may have been missed, so the listing is dropped then
        too). Servers without it rely on the listing TTL.
        """
        tools = client.server_capabilities.tools
        if tools is None or not tools.list_changed:
            return
        delay = 1.0
        while True:
            try:
                async with client.listen(tools_list_changed=True) as subscription:
                    delay = 1.0
                    async for _event in subscription:
                        self.invalidate()
            except ListenNotSupportedError:
                return
            except MCPError as exc:
                if exc.code == METHOD_NOT_FOUND:
                    return
            except Exception as exc:
                _LOG.debug("MCP server %s: listen stream: %s", self.server.id, self.describe(exc))
            self.invalidate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._pool.max_backoff)

    async def tools(self, budget: float) -> list[McpToolInfo]:
        """The server's tools, from the cache while fresh, else listed (all pages)."""
        if self._tools is not None and time.monotonic() < self._tools_expiry:
            return self._tools
        async with self._list_lock:
            if self._tools is not None and time.monotonic() < self._tools_expiry:
                return self._tools
            with self.use():
                client = await self.client(budget)
                generation = self._generation
                try:
                    listed = await self._list_all(client)
                except Exception as exc:
                    if _broken(exc):
                        self._pool._retire(self, 0.0)
                    raise
            if generation == self._generation:
                self._tools = listed
                self._tools_expiry = time.monotonic() + self._pool.list_ttl
            return listed

    async def _list_all(self, client: Client) -> list[McpToolInfo]:
        server = self.server
        listed: list[McpToolInfo] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            listed.extend(
                McpToolInfo(
                    server.id, server.url, t.name, t.description or "", dict(t.input_schema)
                )
                for t in page.tools
            )
            cursor = page.next_cursor
            if not cursor:
                return listed
        _LOG.warning("MCP server %s: more than %d pages of tools", server.id, MAX_LIST_PAGES)
        return listed


class McpPool:
    """Per-(server, token) MCP connections shared by every request of the daemon."""

    def __init__(
        self,
        *,
        call_timeout: float = 60.0,
        list_timeout: float = 5.0,
        list_ttl: float = 300.0,
        max_backoff: float = 30.0,
        idle_ttl: float = 600.0,
    ) -> None:
        self.call_timeout = call_timeout
        self.list_timeout = list_timeout
        self.connect_timeout = min(list_timeout, call_timeout)
        self.list_ttl = list_ttl
        self.max_backoff = max_backoff
        self.idle_ttl = idle_ttl
        self._servers: Mapping[str, McpServer] = {}
        self._tokens: Mapping[tuple[str, str], McpToken] = {}
        self._conns: dict[tuple[str, str], _Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def configure(
        self, servers: Mapping[str, McpServer], tokens: Mapping[tuple[str, str], McpToken]
    ) -> None:
        """Swap the configuration; connections it invalidates stop (the next use reconnects).

        A connection stops when its server is gone, its URL or static headers changed, or no
        valid token hashes to its key any more.
        """
        self._servers, self._tokens = dict(servers), dict(tokens)
        now = time.time()
        live = {
            (t.server_id, hashlib.sha256(t.token.encode()).hexdigest())
            for t in self._tokens.values()
            if t.token and (t.expires_at is None or t.expires_at > now)
        }
        for key, conn in list(self._conns.items()):
            new = self._servers.get(key[0])
            if (
                new is None
                or new.url != conn.server.url
                or dict(new.headers) != dict(conn.server.headers)
                or (key[1] and key not in live)
            ):
                self._retire(conn, self.call_timeout)
            else:
                conn.server = new

    def _token(self, actor_id: str, server_id: str) -> str:
        found = self._tokens.get((actor_id, server_id))
        if found is None or not found.token:
            return ""
        if found.expires_at is not None and found.expires_at <= time.time():
            return ""
        return found.token

    def _connection(self, actor_id: str, server: McpServer) -> _Connection:
        token = self._token(actor_id, server.id)
        key = (server.id, hashlib.sha256(token.encode()).hexdigest() if token else "")
        conn = self._conns.get(key)
        if conn is None or conn.retired:
            conn = self._conns[key] = _Connection(self, server, token)
        return conn

    def _retire(self, conn: _Connection, drain: float) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        conn.stop(drain)
        task = conn.task
        if task is not None and not task.done():
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _owner_exited(self, conn: _Connection) -> None:
        if conn.retired and self._conns.get(conn.key) is conn:
            del self._conns[conn.key]

    def _sweep(self) -> None:
        """Forget connections without an owner task that nobody used for ``idle_ttl``."""
        horizon = time.monotonic() - self.idle_ttl
        for key, conn in list(self._conns.items()):
            if not conn.running and conn.inflight == 0 and conn.last_used < horizon:
                del self._conns[key]

    async def list_tools(self, actor_id: str) -> list[McpToolInfo]:
        """Every configured server's tools as this actor sees them; failing servers left out."""
        if self._closed:
            return []
        self._sweep()
        servers = list(self._servers.values())
        found = await asyncio.gather(*(self._list_one(actor_id, s) for s in servers))
        return [tool for tools in found for tool in tools]

    async def _list_one(self, actor_id: str, server: McpServer) -> list[McpToolInfo]:
        conn = self._connection(actor_id, server)
        try:
            async with asyncio.timeout(self.list_timeout):
                return await conn.tools(self.list_timeout)
        except TimeoutError:
            reason = f"no tool listing within {self.list_timeout:g}s"
        except McpCallError as exc:
            reason = str(exc)
        except Exception as exc:  # one failing server must not break the listing
            reason = conn.describe(exc)
        MCP_SERVER_UNAVAILABLE.labels(mcp_server=server.id).inc()
        _LOG.warning("MCP server %s left out of the tool listing: %s", server.id, reason)
        return []

    async def call(
        self, actor_id: str, server_id: str, tool: str, arguments: dict[str, Any]
    ) -> McpCallResult:
        """Call ``tool`` on the actor's connection to ``server_id``.

        A tool's own failure comes back as ``is_error=True``; anything that prevents a result
        (unknown server, server down, transport failure, ``call_timeout``) raises
        :class:`McpCallError`.
        """
        if self._closed:
            raise McpCallError("the MCP connection pool is closed")
        server = self._servers.get(server_id)
        if server is None:
            raise McpCallError(f"unknown MCP server {server_id!r}")
        self._sweep()
        conn = self._connection(actor_id, server)
        with conn.use():
            client = await conn.client(self.connect_timeout)
            try:
                async with asyncio.timeout(self.call_timeout):
                    result = await client.call_tool(
                        tool, arguments, read_timeout_seconds=self.call_timeout + 1.0
                    )
            except TimeoutError as exc:
                raise McpCallError(
                    f"MCP tool {tool!r} on server {server_id!r}: "
                    f"no result within {self.call_timeout:g}s"
                ) from exc
            except Exception as exc:
                if _broken(exc):
                    self._retire(conn, 0.0)
                raise McpCallError(
                    f"MCP tool {tool!r} on server {server_id!r} failed: {conn.describe(exc)}"
                ) from exc
        content = [
            item.model_dump(by_alias=True, mode="json", exclude_none=True)
            for item in result.content
        ]
        return McpCallResult(content, bool(result.is_error))

    async def close(self) -> None:
        """Stop every connection and wait for the owner tasks (cancelled after a grace)."""
        self._closed = True
        for conn in list(self._conns.values()):
            self._retire(conn, 0.0)
        tasks = set(self._closing)
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=_CLOSE_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
