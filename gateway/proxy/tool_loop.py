"""Injected MCP tools of one interception: which tools, injecting them, running the calls.

The MCP I/O around the pure pieces: ``gateway.tools`` names and filters; the dialect's
``ToolShapes`` define the tools and shape their results; its stream and blocking rewriters decide
when the model called an injected tool; ``gateway.intercept.loop`` decides what happens next. This
module lists the pool's tools, awaits the calls and records each.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from gateway.intercept.dialect import ToolShapes
from gateway.intercept.rewriter import ToolCall
from gateway.observe import GatewayStats
from gateway.ports import UsageSink
from gateway.records import ToolUsage
from gateway.state import McpServer, Snapshot
from gateway.tools.mcp_pool import McpCallError, McpPool
from gateway.tools.naming import ToolCatalog, ToolRef, allowed

if TYPE_CHECKING:
    from gateway.tools.mcp_pool import McpToolInfo
    from gateway.tracing import InterceptionTrace

log = logging.getLogger("aibridged.tools")


class ToolLoop:
    """The injected tools of one request: which, and running the model's calls to them."""

    def __init__(
        self,
        pool: McpPool,
        actor_id: str,
        catalog: ToolCatalog,
        interception_id: str,
        sink: UsageSink,
        shapes: ToolShapes,
        stats: GatewayStats,
        trace: InterceptionTrace | None = None,
    ) -> None:
        self.pool = pool
        self.trace = trace
        self.stats = stats
        self.actor_id = actor_id
        self.catalog = catalog
        self.interception_id = interception_id
        self.sink = sink
        self.shapes = shapes

    @classmethod
    async def prepare(
        cls,
        pool: McpPool,
        snapshot: Snapshot,
        actor_id: str,
        interception_id: str,
        sink: UsageSink,
        shapes: ToolShapes,
        stats: GatewayStats,
        trace: InterceptionTrace | None = None,
    ) -> ToolLoop | None:
        """List the actor's tools (servers that are down are left out); None when there are none.

        With ``trace``, the listing and each call the loop runs are spans of the interception.
        """
        if not snapshot.mcp_servers:
            return None
        span = None if trace is None else trace.listing()
        listed: list[McpToolInfo] = []
        try:
            listed = await pool.list_tools(actor_id)
        finally:
            if span is not None:
                span.listed(len(listed))
        refs: dict[tuple[str, str], ToolRef] = {}
        for info in listed:
            server = snapshot.mcp_servers.get(info.server_id)
            if server is None or not _allowed(info.name, server):
                continue
            # A server listing a name twice must not cost the request every other tool.
            refs.setdefault(
                (info.server_id, info.name),
                ToolRef(
                    info.server_id, info.server_url, info.name, info.description, info.input_schema
                ),
            )
        if not refs:
            return None
        return cls(
            pool, actor_id, ToolCatalog(refs.values()), interception_id, sink, shapes, stats, trace
        )

    def inject(self, body: dict[str, Any]) -> bool:
        """Add the tools to the request; False (request untouched) when its shape forbids it."""
        shapes = self.shapes
        tools = [shapes.definition(tool_id, ref) for tool_id, ref in self.catalog.tools]
        try:
            shapes.inject(body, tools)
        except ValueError as exc:
            log.warning(
                "tools not injected: %s", exc, extra={"interception_id": self.interception_id}
            )
            return False
        return True

    def is_injected(self, name: str) -> bool:
        """Whether the model's tool name designates an injected tool."""
        return self.catalog.lookup(name) is not None

    async def run(self, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """Run the calls concurrently; one result item per call, in call order."""
        return list(await asyncio.gather(*(self._run_one(call) for call in calls)))

    async def _run_one(self, call: ToolCall) -> dict[str, Any]:
        ref = self.catalog.lookup(call.name)
        if ref is None:  # the rewriters only report catalogued names; defensive
            return self.shapes.error(call.tool_use_id, f"tool {call.name} not found")
        started = time.perf_counter()
        error = ""
        outcome = "ok"
        span = None
        if self.trace is not None:
            span = self.trace.tool_call(ref.server_id, ref.server_url, ref.name)
        try:
            result = await self.pool.call(self.actor_id, ref.server_id, ref.name, call.input)
        except McpCallError as exc:
            error = str(exc) or type(exc).__name__
            block = self.shapes.error(call.tool_use_id, error)
            outcome = "timeout" if isinstance(exc.__cause__, TimeoutError) else "error"
        except BaseException:  # cancelled: the span still ends
            if span is not None:
                span.called("cancelled", "the call was cancelled")
            raise
        else:
            block = self.shapes.result(call.tool_use_id, result.content, result.is_error)
            if result.is_error:
                error = _error_text(result.content)
                outcome = "tool_error"
        seconds = time.perf_counter() - started
        if span is not None:
            span.called(outcome, error)
        self.stats.mcp_call(ref.server_id, outcome, seconds)
        log.log(
            logging.WARNING if error else logging.DEBUG,
            "injected tool invoked",
            extra={
                "interception_id": self.interception_id,
                "mcp_server": ref.server_id,
                "tool": ref.name,
                "duration_ms": round(seconds * 1000, 1),
                "outcome": outcome,
            },
        )
        self.sink.submit(
            ToolUsage(
                interception_id=self.interception_id,
                msg_id=call.msg_id,
                tool=ref.name,
                tool_call_id=call.tool_use_id,
                args=orjson.dumps(call.input).decode(),
                injected=True,
                server_url=ref.server_url,
                invocation_error=error,
                item_id=call.item_id,
            )
        )
        return block

    def record_skipped(self, calls: Sequence[ToolCall], reason: str) -> None:
        """Injected calls of a final turn, which the gateway did not run, and ``reason``."""
        for call in calls:
            ref = self.catalog.lookup(call.name)
            self.sink.submit(
                ToolUsage(
                    interception_id=self.interception_id,
                    msg_id=call.msg_id,
                    tool=ref.name if ref else call.name,
                    tool_call_id=call.tool_use_id,
                    args=orjson.dumps(call.input).decode(),
                    injected=True,
                    server_url=ref.server_url if ref else "",
                    invocation_error=reason,
                    item_id=call.item_id,
                )
            )


def _allowed(name: str, server: McpServer) -> bool:
    # re caches compiled patterns; the control plane validated them on push.
    allow = re.compile(server.tool_allow_regex) if server.tool_allow_regex else None
    deny = re.compile(server.tool_deny_regex) if server.tool_deny_regex else None
    return allowed(name, allow, deny)


def _error_text(content: Sequence[Mapping[str, Any]]) -> str:
    texts = [str(item.get("text")) for item in content if item.get("type") == "text"]
    return ("; ".join(texts) or "the tool reported an error")[:500]
