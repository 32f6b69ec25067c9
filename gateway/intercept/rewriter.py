"""The seam between the relay and a dialect's rewriters (pure).

The relay pumps upstream bytes through a :class:`StreamRewriter` (a blocking body through a
:class:`BlockingRewriter`) and never names a dialect's types: bytes in, the client's bytes and
usage records out. Between two upstream turns of an agentic loop it asks for the
:class:`TurnResult`, which ``gateway.intercept.loop`` decides on.

Every dialect's stream ends with a terminal event (Messages ``message_stop``, Chat
``data: [DONE]``, Responses ``response.completed``). The rewriter says when it has produced it
(``stop_relayed``); the relay holds that event and whatever follows back until the
interception's records are durable, so a client that saw a whole response always has it on
record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.records import EndStatus, Record
from gateway.sse import SSEFramer


@dataclass(frozen=True, slots=True)
class ToolCall:
    """An injected tool the model called in a turn (every dialect's calls look alike)."""

    tool_use_id: str
    name: str
    input: dict[str, Any]
    # The provider's id of the message (turn) the call came in, for its record.
    msg_id: str
    # The call's own output item id (OpenAI Responses ``fc_...``), for its record; "" when the
    # dialect's calls have none.
    item_id: str = ""


@dataclass(frozen=True, slots=True)
class TurnResult:
    """How one upstream turn ended, as the agentic loop needs to know it.

    The dialect decides which calls the gateway runs: ``tool_calls`` is non-empty only when the
    turn stopped to have tools run and every tool it called is an injected one. Any other turn
    is final; the injected calls it made are ``skipped_calls``, recorded with ``skip_reason``.
    """

    # Injected calls the gateway must run before the conversation can go on.
    tool_calls: Sequence[ToolCall] = ()
    # Injected calls of a final turn: never run.
    skipped_calls: Sequence[ToolCall] = ()
    skip_reason: str = ""
    # The turn as the dialect's conversation item (Messages: the assistant message) that the
    # continuation request repeats before the tool results; None when there is nothing to run.
    assistant: Any = None
    # The provider's own stop reason ("tool_use", "max_tokens"...), "" when it gave none.
    stop_reason: str = ""


class ReportedError(Protocol):
    """An error the upstream reported inside its stream."""

    @property
    def type(self) -> str:
        """The provider's error type."""
        ...

    @property
    def message(self) -> str:
        """The provider's message."""
        ...

    @property
    def end_status(self) -> EndStatus:
        """How the interception ended for it: "failed", or "incomplete" when the provider cut
        the response short at a limit the client chose (it is no error of anyone's)."""
        ...


@dataclass(slots=True)
class StreamError:
    """A :class:`ReportedError` as every dialect reports one (relayed to the client as it came)."""

    type: str
    message: str
    end_status: EndStatus = "failed"


class StreamRewriter(Protocol):
    """A dialect's pure stream rewriter, as the relay drives it (one per client stream)."""

    @property
    def stop_relayed(self) -> bool:
        """Whether the client-visible terminal event has been produced.

        Read once per chunk on the hot path: implement it as a plain attribute.
        """
        ...

    @property
    def error(self) -> ReportedError | None:
        """The error the upstream reported in the stream, if any (relayed as it came)."""
        ...

    def feed_chunk(self, framer: SSEFramer, chunk: bytes) -> bytes | None:
        """Frame ``chunk`` and process what it completes: the client's bytes, None if nothing."""
        ...

    def take_records(self) -> list[Record]:
        """Records produced since the last call, in order."""
        ...

    def finish(self) -> list[Record]:
        """Close the stream, normally or not: the records still owed (usage of a cut turn)."""
        ...

    def turn_result(self) -> TurnResult:
        """How the upstream turn that just ended ended (call once its body is read)."""
        ...

    def next_turn(self) -> None:
        """Prepare for the next upstream turn of the same client-visible response."""
        ...


class BlockingTurn(Protocol):
    """One blocking upstream response, rewritten (``BlockingRewriter.feed``)."""

    @property
    def body(self) -> bytes:
        """What the client gets, if this turn is the last."""
        ...

    @property
    def records(self) -> Sequence[Record]:
        """What to record for this turn."""
        ...

    @property
    def error(self) -> str:
        """Why the body is no answer of the dialect's (an HTML page, junk); "" if it is one."""
        ...

    @property
    def reported(self) -> ReportedError | None:
        """What the response itself says went wrong (a Responses body whose ``status`` is
        ``failed`` or ``incomplete``): relayed as it came, recorded with its end status."""
        ...

    @property
    def turn(self) -> TurnResult:
        """This response as a turn of the agentic loop."""
        ...


@dataclass(frozen=True, slots=True)
class BlockingResult:
    """A :class:`BlockingTurn` as every dialect makes one: what to send back to the client and
    what to record for one blocking response."""

    body: bytes
    records: list[Record]
    error: str = ""
    # Injected calls to run before the conversation goes on, and the turn they came in (the
    # dialect's conversation item, for the continuation).
    tool_calls: list[ToolCall] = field(default_factory=list)
    assistant: Any = None
    # Injected calls of a final turn: not run, for ``skip_reason``.
    skipped_calls: list[ToolCall] = field(default_factory=list)
    skip_reason: str = ""
    stop_reason: str = ""
    reported: ReportedError | None = None

    @property
    def turn(self) -> TurnResult:
        """This response as a turn of the agentic loop (``gateway.intercept.loop``)."""
        return TurnResult(
            self.tool_calls, self.skipped_calls, self.skip_reason, self.assistant, self.stop_reason
        )


class BlockingRewriter(Protocol):
    """A dialect's pure rewriter of blocking responses (one per client request)."""

    def feed(self, body: bytes) -> BlockingTurn:
        """Take one upstream response body (one per upstream call, in order)."""
        ...
