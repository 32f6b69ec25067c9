"""Carries out what the agentic loop driver decides: the I/O half of ``gateway.intercept.loop``.

The driver is pure and decides everything (go on, stop at the cap, give up on a failed call);
this runs the injected tools (``tool_loop``) and sends the continuation requests (through the
interception, which records failed calls). Streaming and blocking relays call it alike, between
two turns; only the way they show a failed ``Finish`` to the client differs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp

from gateway.intercept.loop import (
    AgenticLoop,
    CallUpstream,
    Finish,
    RunTools,
    ToolsDone,
    TurnEnded,
    UpstreamFailed,
    UpstreamRefused,
)
from gateway.intercept.outcome import Outcome
from gateway.proxy.tool_loop import ToolLoop
from gateway.proxy.upstream_failure import UPSTREAM_ERRORS, UpstreamFailure


class Upstream(Protocol):
    """The interception's upstream side, as the loop uses it (``relay.Interception``)."""

    @property
    def outcome(self) -> Outcome:
        """How the interception ends, for its end record."""
        ...

    def post_again(self, body: bytes) -> Awaitable[aiohttp.ClientResponse]:
        """POST ``body`` to the interception's upstream endpoint, with its headers."""
        ...

    def upstream_failed(self, exc: BaseException, started: bool = False) -> UpstreamFailure:
        """Record a failed upstream call on the end record and log it; what it means."""
        ...

    async def refusal(self, resp: aiohttp.ClientResponse) -> UpstreamRefused:
        """Read an upstream error response (status >= 400), release it, record it."""
        ...


class LoopRunner:
    """One interception's agentic loop: the driver deciding, the tools and upstream doing."""

    __slots__ = ("driver", "tools", "upstream")

    def __init__(self, driver: AgenticLoop, tools: ToolLoop, upstream: Upstream) -> None:
        self.driver = driver
        self.tools = tools
        self.upstream = upstream

    async def advance(
        self, event: TurnEnded, gone: Callable[[], bool]
    ) -> aiohttp.ClientResponse | Finish:
        """After a turn: the next turn's response (status < 400), or how the loop ended.

        ``gone``: whether the client left (a stream's client gets no further turn then). A
        failed ``Finish`` is on the end record already.
        """
        driver = self.driver
        upstream = self.upstream
        action = driver.send(event)
        while True:
            if isinstance(action, RunTools):
                results = await self.tools.run(action.calls)
                action = driver.send(ToolsDone(results, gone()))
            elif isinstance(action, CallUpstream):
                try:
                    resp = await upstream.post_again(action.body)
                except UPSTREAM_ERRORS as exc:
                    failure = upstream.upstream_failed(exc)
                    action = driver.send(
                        UpstreamFailed(failure.error_type, failure.client_message, failure.status)
                    )
                    continue
                if resp.status < 400:
                    return resp
                action = driver.send(await upstream.refusal(resp))
            else:
                if action.skipped_calls:
                    self.tools.record_skipped(action.skipped_calls, action.skip_reason)
                if action.error_type:
                    # First failure wins: a failed or refused call is on the record already.
                    upstream.outcome.fail(action.error_type, action.message)
                return action


def client_present() -> bool:
    """``gone`` for a blocking client: there until its handler is cancelled."""
    return False
