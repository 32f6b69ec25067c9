"""Pooled MCP client connections (I/O shell): list an actor's tools, call them, reconnect.

One connection (``gateway.tools.mcp_connection``) per (server, bearer token): actors without a
token for a server share the connection that carries only the server's static headers.
Connections start lazily, back off after failures, reconnect on next use and close when idle.
Secrets never reach a log line or a metric label: connections are keyed by the token's sha256
and logs name the server id only.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from typing import Any

from gateway.state import McpServer, McpToken
from gateway.tools.mcp_connection import (
    CLOSE_GRACE,
    LOG,
    MAX_LIST_PAGES,
    MCP_SERVER_UNAVAILABLE,
    McpCallError,
    McpCallResult,
    McpConnection,
    McpTimeouts,
    McpToolInfo,
    broken,
)

__all__ = ["MAX_LIST_PAGES", "McpCallError", "McpCallResult", "McpPool", "McpToolInfo"]


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
        self._timeouts = McpTimeouts(
            connect=self.connect_timeout,
            call=call_timeout,
            list_ttl=list_ttl,
            idle_ttl=idle_ttl,
            max_backoff=max_backoff,
        )
        self._servers: Mapping[str, McpServer] = {}
        self._tokens: Mapping[tuple[str, str], McpToken] = {}
        self._conns: dict[tuple[str, str], McpConnection] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        # Connections opened since start (tests use it; an operator can read it in a debugger).
        self.connections_opened = 0

    def configure(
        self, servers: Mapping[str, McpServer], tokens: Mapping[tuple[str, str], McpToken]
    ) -> None:
        """Swap the configuration; connections it invalidates stop (the next use reconnects).

        A connection stops when its server is gone, its URL or static headers changed, or no
        valid token hashes to its key any more.
        """
        self._servers, self._tokens = dict(servers), dict(tokens)
        for server_id in self._servers:
            # Listed from the first scrape, at 0, so that an alert's rate() has a series.
            MCP_SERVER_UNAVAILABLE.labels(mcp_server=server_id)
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
                self.retire(conn, self.call_timeout)
            else:
                conn.server = new

    def _token(self, actor_id: str, server_id: str) -> str:
        found = self._tokens.get((actor_id, server_id))
        if found is None or not found.token:
            return ""
        if found.expires_at is not None and found.expires_at <= time.time():
            return ""
        return found.token

    def _connection(self, actor_id: str, server: McpServer) -> McpConnection:
        token = self._token(actor_id, server.id)
        key = (server.id, hashlib.sha256(token.encode()).hexdigest() if token else "")
        conn = self._conns.get(key)
        if conn is None or conn.retired:
            conn = self._conns[key] = McpConnection(self, self._timeouts, server, token)
            self.connections_opened += 1
        return conn

    def retire(self, conn: McpConnection, drain: float) -> None:
        """Stop handing out ``conn``; it stops after ``drain`` seconds of in-flight calls."""
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        conn.stop(drain)
        task = conn.task
        if task is not None and not task.done():
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def owner_exited(self, conn: McpConnection) -> None:
        """Forget ``conn`` once its owner task ended, if it was retired."""
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
        LOG.warning("MCP server %s left out of the tool listing: %s", server.id, reason)
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
                if broken(exc):
                    self.retire(conn, 0.0)
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
            self.retire(conn, 0.0)
        tasks = set(self._closing)
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
