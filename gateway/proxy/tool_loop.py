"""Injected MCP tools of one interception: which tools, injecting them, running the calls.

The shell around the pure pieces: ``gateway.tools`` names, filters and converts; the stream and
blocking rewriters decide when the model called an injected tool; this module awaits the MCP
pool, records each call, and builds the continuation request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import orjson

from gateway.intercept.errors import anthropic_error_event, parse_error_body
from gateway.intercept.messages.stream import MessagesStream
from gateway.intercept.messages.turn import ToolCall
from gateway.intercept.outcome import Outcome
from gateway.ports import UsageSink
from gateway.proxy.upstream_failure import UPSTREAM_ERRORS, UpstreamFailure
from gateway.records import ToolUsage
from gateway.sse import encode
from gateway.state import McpServer, Snapshot
from gateway.tools.mcp_pool import McpCallError, McpPool
from gateway.tools.naming import ToolCatalog, ToolRef, allowed
from gateway.tools.results import anthropic_tool_error, anthropic_tool_result
from gateway.tools.schema import anthropic_tool, inject_anthropic_tools

log = logging.getLogger("aibridged.tools")


class ToolLoop:
    """The injected tools of one request and the state of its agentic loop."""

    def __init__(
        self,
        pool: McpPool,
        actor_id: str,
        catalog: ToolCatalog,
        interception_id: str,
        sink: UsageSink,
        max_iterations: int,
    ) -> None:
        self.pool = pool
        self.actor_id = actor_id
        self.catalog = catalog
        self.interception_id = interception_id
        self.sink = sink
        self.max_iterations = max_iterations

    @classmethod
    async def prepare(
        cls,
        pool: McpPool,
        snapshot: Snapshot,
        actor_id: str,
        interception_id: str,
        sink: UsageSink,
        max_iterations: int,
    ) -> ToolLoop | None:
        """List the actor's tools (servers that are down are left out); None when there are none."""
        if not snapshot.mcp_servers:
            return None
        refs: dict[tuple[str, str], ToolRef] = {}
        for info in await pool.list_tools(actor_id):
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
            pool, actor_id, ToolCatalog(refs.values()), interception_id, sink, max_iterations
        )

    def inject(self, body: dict[str, Any]) -> bool:
        """Add the tools to the request; False (request untouched) when its shape forbids it."""
        tools = [anthropic_tool(tool_id, ref) for tool_id, ref in self.catalog.tools]
        try:
            inject_anthropic_tools(body, tools)
        except ValueError as exc:
            log.warning(
                "tools not injected: %s", exc, extra={"interception_id": self.interception_id}
            )
            return False
        return True

    def is_injected(self, name: str) -> bool:
        """Whether the model's tool name designates an injected tool."""
        return self.catalog.lookup(name) is not None

    async def run(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Run the calls concurrently; one ``tool_result`` block per call, in call order."""
        return list(await asyncio.gather(*(self._run_one(call) for call in calls)))

    async def _run_one(self, call: ToolCall) -> dict[str, Any]:
        ref = self.catalog.lookup(call.name)
        if ref is None:  # the rewriters only report catalogued names; defensive
            return anthropic_tool_error(call.tool_use_id, f"tool {call.name} not found")
        started = time.perf_counter()
        error = ""
        try:
            result = await self.pool.call(self.actor_id, ref.server_id, ref.name, call.input)
        except McpCallError as exc:
            error = str(exc) or type(exc).__name__
            block = anthropic_tool_error(call.tool_use_id, error)
        else:
            block = anthropic_tool_result(call.tool_use_id, result.content, result.is_error)
            if result.is_error:
                error = _error_text(result.content)
        log.log(
            logging.WARNING if error else logging.DEBUG,
            "injected tool invoked",
            extra={
                "interception_id": self.interception_id,
                "mcp_server": ref.server_id,
                "tool": ref.name,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "failed": bool(error),
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
            )
        )
        return block

    def record_skipped(self, calls: list[ToolCall], reason: str) -> None:
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
                )
            )

    def limit_message(self) -> str:
        """The error given when the model keeps calling injected tools."""
        return (
            f"injected tool loop stopped: the model was still calling tools after "
            f"{self.max_iterations} upstream calls (setting mcp_max_iterations)"
        )

    @staticmethod
    def continuation(
        body: dict[str, Any], assistant: dict[str, Any], results: list[dict[str, Any]]
    ) -> bytes:
        """The next upstream request: the conversation so far, the turn, the tool results."""
        messages = body.get("messages")
        history = messages if isinstance(messages, list) else []
        # All results of a turn go in one user message, as the API requires.
        body["messages"] = [*history, assistant, {"role": "user", "content": results}]
        return orjson.dumps(body)


def _allowed(name: str, server: McpServer) -> bool:
    # re caches compiled patterns; the control plane validated them on push.
    allow = re.compile(server.tool_allow_regex) if server.tool_allow_regex else None
    deny = re.compile(server.tool_deny_regex) if server.tool_deny_regex else None
    return allowed(name, allow, deny)


def _error_text(content: Sequence[Mapping[str, Any]]) -> str:
    texts = [str(item.get("text")) for item in content if item.get("type") == "text"]
    return ("; ".join(texts) or "the tool reported an error")[:500]


class Upstream(Protocol):
    """How the loop sends its continuation requests (the interception's upstream call)."""

    async def post_again(self, body: bytes) -> aiohttp.ClientResponse:
        """POST ``body`` to the same upstream endpoint with the same headers."""
        ...

    def upstream_failed(self, exc: BaseException) -> UpstreamFailure:
        """Record a failed call on the interception (and log it); what it means."""
        ...


class StreamContinuation:
    """Drives a streamed loop: after a turn that called injected tools, run them and go on."""

    def __init__(
        self, loop: ToolLoop, body: dict[str, Any], upstream: Upstream, outcome: Outcome
    ) -> None:
        self.loop = loop
        self.body = body
        self.upstream = upstream
        self.outcome = outcome

    async def next_response(
        self, rewriter: MessagesStream, client_gone: Callable[[], bool]
    ) -> aiohttp.ClientResponse | bytes | None:
        """The next turn's upstream response; an error event to end the stream; None if final.

        A client that left while the tools ran gets no further turn: nobody would read it, and
        the turns so far are already recorded.
        """
        calls = rewriter.tool_calls
        self.loop.record_skipped(rewriter.skipped_calls, rewriter.skip_reason)
        if not calls:
            return None
        if rewriter.turn + 1 >= self.loop.max_iterations:
            return self._fail("tool_loop_limit", self.loop.limit_message())
        results = await self.loop.run(calls)
        if client_gone():
            return None
        payload = self.loop.continuation(self.body, rewriter.assistant_message(), results)
        rewriter.next_turn()
        try:
            resp = await self.upstream.post_again(payload)
        except UPSTREAM_ERRORS as exc:
            # The stream has started: the failure goes out as an error event naming no address.
            return anthropic_error_event(self.upstream.upstream_failed(exc).client_message)
        if resp.status >= 400:
            body = await resp.read()
            resp.release()
            self.outcome.upstream_status = resp.status
            self.outcome.fail(*parse_error_body(body))
            # The stream has started: the provider's error body goes out as an error event.
            return encode("error", body)
        return resp

    def _fail(self, error_type: str, message: str) -> bytes:
        self.outcome.fail(error_type, message)
        return anthropic_error_event(message)
