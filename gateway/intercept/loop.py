"""The agentic loop of one interception, as a pure state machine (in the style of h11).

When the model calls injected tools, the gateway runs them and continues the conversation
itself, turn after turn, until a turn is final. The relay owns every socket; this driver owns
every decision. The relay sends it what happened (an event) and carries out what it answers (an
action):

    TurnEnded        -> RunTools | Finish         a turn's body was read
    ToolsDone        -> CallUpstream | Finish     the injected tools returned
    UpstreamRefused  -> Finish                    a continuation got an error status
    UpstreamFailed   -> Finish                    a continuation call failed

After ``CallUpstream`` the relay reads the next turn and sends ``TurnEnded`` again. Streaming and
blocking interceptions use the same driver; only the way the relay renders ``Finish`` differs
(an error event after what the client already has, or an error response). The cap on upstream
calls (setting ``mcp_max_iterations``) is checked here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.intercept.rewriter import ToolCall, TurnResult

# -- events (what happened) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """An upstream turn was read to its end (a stream or a blocking body)."""

    turn: TurnResult
    # The client left: nobody would read a further turn.
    client_gone: bool = False


@dataclass(frozen=True, slots=True)
class ToolsDone:
    """The injected tools of ``RunTools`` returned: one result item per call, in call order."""

    results: Sequence[Any]
    client_gone: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamRefused:
    """A continuation call was answered with an error status: the provider's answer."""

    status: int
    body: bytes
    # The provider's error type and message, parsed from ``body`` (for the end record).
    error_type: str
    message: str
    # The provider's headers to relay with the answer (a client with no response yet).
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """A continuation call failed before it was answered (``proxy.upstream_failure`` says how)."""

    error_type: str
    # Safe to show a client: names no address.
    message: str
    status: int = 502


Event = TurnEnded | ToolsDone | UpstreamRefused | UpstreamFailed


# -- actions (what to do) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunTools:
    """Run these injected calls, then send ``ToolsDone``."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class CallUpstream:
    """POST this continuation request upstream, then read its answer as the next turn."""

    body: bytes


@dataclass(frozen=True, slots=True)
class Finish:
    """The loop is over. Without ``error_type`` the last turn read is the client's answer."""

    error_type: str = ""
    # For the end record and the client: names no address.
    message: str = ""
    # What a client with no response yet gets (a blocking one); a stream gets an error event.
    status: int = 0
    # The provider refused a continuation: its answer goes to the client as it came.
    refused: UpstreamRefused | None = None
    # Injected calls of the final turn, never run: to record, with ``skip_reason``.
    skipped_calls: tuple[ToolCall, ...] = ()
    skip_reason: str = ""


Action = RunTools | CallUpstream | Finish

# The only status a gateway-made loop failure gets: the upstream side misbehaved.
_FAILED = 502


class LoopStateError(RuntimeError):
    """An event the loop cannot take in its state (a bug in the caller, like h11's
    ``LocalProtocolError``)."""


_State = Literal["turn", "tools", "call", "done"]


class AgenticLoop:
    """The agentic loop of one interception whose request has injected tools.

    ``request``: the parsed request body, which every continuation extends with the turn and
    its tool results. ``continuation(request, assistant, results)``: the dialect's next request
    body. ``max_iterations``: the most upstream calls one interception may make, the client's
    own request included.
    """

    __slots__ = ("_assistant", "_continuation", "_request", "calls", "max_iterations", "state")

    def __init__(
        self,
        request: dict[str, Any],
        max_iterations: int,
        continuation: Callable[[dict[str, Any], Any, Sequence[Any]], bytes],
    ) -> None:
        self._request = request
        self._continuation = continuation
        self._assistant: Any = None
        self.max_iterations = max_iterations
        # Upstream calls made so far: the first is the one the client asked for.
        self.calls = 1
        # "turn": reading a turn; "tools": tools running; "call": a continuation sent.
        self.state: _State = "turn"

    def send(self, event: Event) -> Action:
        """Take what happened; return what the relay must do next."""
        if isinstance(event, TurnEnded):
            self._expect(event, "turn", "call")
            return self._turn_ended(event)
        if isinstance(event, ToolsDone):
            self._expect(event, "tools")
            return self._tools_done(event)
        self._expect(event, "call")
        if isinstance(event, UpstreamRefused):
            return self._finish(Finish(event.error_type, event.message, event.status, event))
        return self._finish(Finish(event.error_type, event.message, event.status))

    def limit_message(self) -> str:
        """The error given when the model keeps calling injected tools."""
        return (
            f"injected tool loop stopped: the model was still calling tools after "
            f"{self.max_iterations} upstream calls (setting mcp_max_iterations)"
        )

    def _turn_ended(self, event: TurnEnded) -> Action:
        turn = event.turn
        if event.client_gone:
            return self._finish(Finish())
        if not turn.tool_calls:
            if not turn.skipped_calls:
                return self._finish(Finish())
            skipped = tuple(turn.skipped_calls)
            return self._finish(Finish(skipped_calls=skipped, skip_reason=turn.skip_reason))
        # The one place the cap is checked: another turn would be one call too many.
        if self.calls >= self.max_iterations:
            return self._finish(Finish("tool_loop_limit", self.limit_message(), _FAILED))
        self._assistant = turn.assistant
        self.state = "tools"
        return RunTools(tuple(turn.tool_calls))

    def _tools_done(self, event: ToolsDone) -> Action:
        if event.client_gone:
            return self._finish(Finish())
        body = self._continuation(self._request, self._assistant, event.results)
        self._assistant = None
        self.calls += 1
        self.state = "call"
        return CallUpstream(body)

    def _finish(self, action: Finish) -> Finish:
        self.state = "done"
        return action

    def _expect(self, event: Event, *states: _State) -> None:
        if self.state not in states:
            raise LoopStateError(f"{type(event).__name__} cannot be sent in state {self.state}")
