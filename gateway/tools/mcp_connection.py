"""One MCP client connection (I/O shell), owned by a long-lived task; used by ``McpPool``.

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
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import Counter

from gateway import __version__
from gateway.metrics import REGISTRY
from gateway.state import McpServer

if TYPE_CHECKING:
    # The mcp SDK (and httpx2) cost ~0.6 s and tens of MiB to import: a gateway without MCP
    # servers never loads them; the first connection does.
    import httpx2
    from mcp import Client
    from mcp.client.session import IncomingMessage


LOG = logging.getLogger(__name__)

MAX_LIST_PAGES = 100
_BASE_BACKOFF = 0.5  # seconds before the first reconnect attempt (before jitter)
CLOSE_GRACE = 10.0  # seconds close() waits for owner tasks before cancelling them

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


class McpRedirectError(Exception):
    """An MCP server answered a redirect: never followed (the request carries a token)."""


_USERINFO = re.compile(r"://[^/@\s]+@")


def _describe(exc: BaseException, secret: str = "") -> str:
    """A one-line description of ``exc`` (groups flattened), without URL userinfo or ``secret``."""
    if isinstance(exc, BaseExceptionGroup):
        text = "; ".join(_describe(e) for e in exc.exceptions)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = _USERINFO.sub("://***@", text)
    return (text.replace(secret, "***") if secret else text)[:300]


def broken(exc: BaseException) -> bool:
    """Whether ``exc`` means the session is unusable (as opposed to one failed request)."""
    from mcp import MCPError
    from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST

    if isinstance(exc, MCPError):
        return exc.code == CONNECTION_CLOSED or (
            exc.code == INVALID_REQUEST and "Session terminated" in str(exc)
        )
    return not isinstance(exc, TimeoutError)


@dataclass(frozen=True, slots=True)
class McpTimeouts:
    """The pool's timing a connection follows (seconds)."""

    connect: float
    call: float
    list_ttl: float
    idle_ttl: float
    max_backoff: float


class ConnectionOwner(Protocol):
    """What a connection tells the pool that owns it (``McpPool``)."""

    def retire(self, conn: McpConnection, drain: float) -> None:
        """Stop handing out ``conn``; it stops after ``drain`` seconds of in-flight calls."""
        ...

    def owner_exited(self, conn: McpConnection) -> None:
        """``conn``'s owner task has ended."""
        ...


class McpConnection:
    """One MCP session for one (server, token), owned by its own task."""

    def __init__(
        self, owner: ConnectionOwner, timeouts: McpTimeouts, server: McpServer, token: str
    ) -> None:
        self.server = server
        self._token = token
        self.key = (server.id, hashlib.sha256(token.encode()).hexdigest() if token else "")
        self._owner = owner
        self._timeouts = timeouts
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
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client
        from mcp_types import Implementation

        timeouts, sid = self._timeouts, self.server.id
        connected = False
        try:
            async with AsyncExitStack() as stack:
                async with asyncio.timeout(timeouts.connect):
                    read = max(300.0, timeouts.call + 5.0)  # SSE responses may stay silent
                    # The headers carry the actor's token: a redirect (even one the SDK would
                    # follow, within the origin) would hand it to another endpoint.
                    http = await stack.enter_async_context(
                        httpx2.AsyncClient(
                            headers=self._headers(),
                            timeout=httpx2.Timeout(timeouts.connect, read=read),
                            follow_redirects=False,
                            event_hooks={"response": [self._refuse_redirect]},
                        )
                    )
                    client = await stack.enter_async_context(
                        Client(
                            streamable_http_client(self.server.url, http_client=http),
                            read_timeout_seconds=timeouts.connect,  # per call_tool overridden
                            message_handler=self._on_message,
                            client_info=Implementation(name="aibridged", version=__version__),
                            cache=None,  # the pool keeps its own TTL'd listing
                        )
                    )
                connected = True
                self.failures, self.down_until, self.last_error = 0, 0.0, ""
                self.invalidate()
                self._client = client
                self._ready.set()
                LOG.debug("MCP server %s: connected (%s)", sid, client.protocol_version)
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
                LOG.info("MCP server %s: connection lost: %s", sid, self.last_error)
            else:
                self.failures += 1
                ceiling = min(timeouts.max_backoff, _BASE_BACKOFF * 2 ** (self.failures - 1))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                self.down_until = time.monotonic() + delay
                LOG.info(
                    "MCP server %s: connect failed (%s); next attempt in %.1fs",
                    sid,
                    self.last_error,
                    delay,
                )
        finally:
            self._client = None
            self._ready.set()
            self._owner.owner_exited(self)

    async def _refuse_redirect(self, response: httpx2.Response) -> None:
        """Fail a request the server answered with a redirect, before anything follows it."""
        if not response.is_redirect:
            return
        location = response.headers.get("location")
        if location:
            # Query and userinfo may carry state or credentials: the log names the path only.
            import httpx2

            try:
                target = response.url.join(location)
                where = str(target.copy_with(query=None, fragment=None, userinfo=b""))
            except httpx2.InvalidURL:
                where = "an invalid URL"
            LOG.warning(
                "MCP server %s: answered %d redirecting to %s; redirects are not followed "
                "(configure the final URL)",
                self.server.id,
                response.status_code,
                where,
            )
        raise McpRedirectError(
            f"MCP server answered a redirect ({response.status_code}); redirects are not followed"
        )

    async def _serve(self) -> None:
        """Wait for a stop request or idleness, then for in-flight requests (bounded)."""
        ttl = self._timeouts.idle_ttl
        while not self._stop.is_set():
            remaining = self.last_used + ttl - time.monotonic()
            if remaining <= 0 and self.inflight == 0:
                LOG.debug("MCP server %s: closing idle connection", self.server.id)
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
        from mcp import MCPError
        from mcp.client.subscriptions import ListenNotSupportedError
        from mcp_types import METHOD_NOT_FOUND

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
                LOG.debug("MCP server %s: listen stream: %s", self.server.id, self.describe(exc))
            self.invalidate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._timeouts.max_backoff)

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
                    if broken(exc):
                        self._owner.retire(self, 0.0)
                    raise
            if generation == self._generation:
                self._tools = listed
                self._tools_expiry = time.monotonic() + self._timeouts.list_ttl
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
        LOG.warning("MCP server %s: more than %d pages of tools", server.id, MAX_LIST_PAGES)
        return listed
