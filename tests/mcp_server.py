"""A real MCP test server (``mcp.server.MCPServer``) served over loopback by uvicorn.

``McpTestServer`` holds the server and its tools; ``running_mcp_server`` serves it in the test's
event loop and yields the endpoint URL. The URL carries the port, which the SDK's DNS-rebinding
protection (on by default for 127.0.0.1) requires in the ``Host`` header.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.subscriptions import ToolsListChanged

FAIL_MESSAGE = "the tool failed on purpose"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def echo_auth(ctx: Context) -> str:
    """Return the Authorization header this request carried ("" when none)."""
    return (ctx.headers or {}).get("authorization", "")


def echo_header(name: str, ctx: Context) -> str:
    """Return the value of request header ``name`` ("" when absent)."""
    return (ctx.headers or {}).get(name.lower(), "")


def fail() -> str:
    """Always fail (the result has isError set)."""
    raise ToolError(FAIL_MESSAGE)


async def slow(seconds: float) -> str:
    """Sleep ``seconds``, then answer "done"."""
    await asyncio.sleep(seconds)
    return "done"


class McpTestServer:
    """An ``MCPServer`` with test tools, optional ``tools/list`` paging and change events.

    ``page_size`` makes ``tools/list`` answer that many tools per page (cursor = offset);
    ``list_calls`` counts the ``tools/list`` requests served.
    """

    def __init__(self, name: str = "test", *, page_size: int | None = None) -> None:
        self.page_size = page_size
        self.list_calls = 0
        self.bus = InMemorySubscriptionBus()
        self.mcp: MCPServer[Any] = MCPServer(
            name, subscriptions=self.bus, log_level="WARNING", middleware=[self._paginate]
        )
        for fn in (add, echo_auth, echo_header, fail, slow):
            self.mcp.add_tool(fn)

    async def _paginate(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        result = await call_next(ctx)
        if ctx.method != "tools/list" or not isinstance(result, dict):
            return result
        self.list_calls += 1
        if self.page_size is None:
            return result
        start = int((ctx.params or {}).get("cursor") or 0)
        end = start + self.page_size
        tools = result["tools"]
        page = dict(result, tools=tools[start:end])
        if end < len(tools):
            page["nextCursor"] = str(end)
        return page

    def add_tool(self, fn: Callable[..., Any], name: str | None = None) -> None:
        """Register another tool at runtime (no change event: see ``notify_tools_changed``)."""
        self.mcp.add_tool(fn, name=name)

    def remove_tool(self, name: str) -> None:
        """Unregister a tool at runtime."""
        self.mcp.remove_tool(name)

    async def notify_tools_changed(self) -> None:
        """Publish a tools list-changed event to the ``subscriptions/listen`` streams."""
        await self.bus.publish(ToolsListChanged())


@asynccontextmanager
async def running_mcp_server(
    server: McpTestServer | None = None, *, port: int = 0
) -> AsyncIterator[str]:
    """Serve ``server`` (a fresh one if None) on 127.0.0.1:``port``; yield its MCP URL."""
    server = server or McpTestServer()
    config = uvicorn.Config(
        server.mcp.streamable_http_app(),
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
        # Open subscriptions/listen streams would otherwise hold the shutdown forever.
        timeout_graceful_shutdown=1,
    )
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        if task.done():
            task.result()  # startup failed: raise why (uvicorn exits with SystemExit)
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    bound = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound}/mcp"
    finally:
        uv.should_exit = True
        await task
