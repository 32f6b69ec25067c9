"""Multi-turn surgery on an Anthropic Messages stream whose turns may call injected tools (pure).

One client-visible message may span several upstream turns: when a turn stops on ``tool_use``
having called only injected tools, the gateway runs them and continues the conversation itself.
The client then sees a single ``message_start`` (the first), no trace of injected ``tool_use``
blocks or of the ends of the turns that only called them, content-block indices renumbered
monotonically across turns, and a final ``message_delta`` whose usage is the total of all turns.
No key is ever added to an event that did not have it, except the cumulative usage fields of
that final delta. A turn that stops otherwise (``max_tokens`` cutting an injected call short) is
final: its injected calls are hidden and not run.

:class:`InjectedTurns` holds that state; ``MessagesStream`` hands it each block and message
event it parsed and sends the client what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.intercept.messages.accumulate import TurnAccumulator
from gateway.intercept.messages.usage import MessageUsage
from gateway.intercept.rewriter import ToolCall
from gateway.sse import Frame, encode


@dataclass(slots=True)
class TrackedBlock:
    """An open content block whose text the stream records (thinking, tool calls)."""

    type: str
    tool_id: str = ""
    name: str = ""
    initial_input: Any = None
    parts: list[str] = field(default_factory=list)
    # An injected call: the client never sees it, and the tool loop records it, not the stream.
    hidden: bool = False


class InjectedTurns:
    """The turns of one client-visible message, as seen by the stream rewriter."""

    def __init__(self, injected: Callable[[str], bool]) -> None:
        self._injected = injected
        self.turn = 0
        self._totals = MessageUsage()
        self._acc = TurnAccumulator()
        # Upstream block index of this turn -> client index, counted across turns.
        self._index_map: dict[int, int] = {}
        self._next_index = 0
        self._calls: list[TrackedBlock] = []
        self.client_tool = False
        # The turn stopped on tool_use having called only injected tools: the gateway goes on.
        self.continues = False

    @property
    def hides_message_start(self) -> bool:
        """Whether a ``message_start`` is hidden: the client already has the first turn's."""
        return self.turn > 0

    def block_start(
        self,
        frame: Frame,
        event: dict[str, Any],
        index: int,
        block: dict[str, Any],
        tracked: TrackedBlock | None,
    ) -> bytes:
        """A ``content_block_start`` (``tracked``: the stream's record of it, if it keeps one)."""
        self._acc.start(index, block)
        if block.get("type") == "tool_use":
            if tracked is not None and self._injected(tracked.name):
                tracked.hidden = True
                self._calls.append(tracked)
                return b""
            self.client_tool = True
        return self._renumber(frame, event, index, new=True)

    def block_delta(
        self,
        frame: Frame,
        event: dict[str, Any],
        index: int,
        delta: dict[str, Any],
        tracked: TrackedBlock | None,
    ) -> bytes:
        """A ``content_block_delta``."""
        self._acc.delta(index, delta)
        if tracked is not None and tracked.hidden:
            return b""
        return self._renumber(frame, event, index)

    def block_stop(
        self, frame: Frame, event: dict[str, Any], index: int, tracked: TrackedBlock | None
    ) -> bytes:
        """A ``content_block_stop``."""
        if tracked is not None and tracked.hidden:
            return b""
        return self._renumber(frame, event, index)

    def message_delta(
        self, frame: Frame, event: dict[str, Any], usage: MessageUsage, stop_reason: str
    ) -> bytes:
        """A ``message_delta`` (``usage``: the turn's, already updated from it)."""
        if self._calls and not self.client_tool and stop_reason == "tool_use":
            self.continues = True
            return b""  # the loop goes on: this turn's end stays hidden
        if self.turn == 0:
            return frame.raw
        # Final turn of a loop: the client's usage is the total of every turn.
        total = self._totals.plus(usage)
        client_usage = event.get("usage")
        client_usage = client_usage if isinstance(client_usage, dict) else {}
        client_usage.update(total.as_anthropic())
        event["usage"] = client_usage
        return encode(frame.event, orjson.dumps(event))

    def message_stop(self, usage: MessageUsage | None) -> bool:
        """A ``message_stop`` (``usage``: the turn's final one); whether to hold it back."""
        if usage is not None:
            self._totals = self._totals.plus(usage)
        return self.continues

    def calls(self, msg_id: str) -> list[ToolCall]:
        """The injected calls of this turn, with their arguments."""
        inputs = {b.get("id"): b.get("input") for b in self._acc.content()}
        calls = []
        for block in self._calls:
            args = inputs.get(block.tool_id)
            args = args if isinstance(args, dict) else {}
            calls.append(ToolCall(block.tool_id, block.name, args, msg_id))
        return calls

    def assistant_message(self) -> dict[str, Any]:
        """This turn as the assistant message of the continuation request."""
        return {"role": "assistant", "content": self._acc.content()}

    def next_turn(self) -> None:
        """Start the next upstream turn: indices go on, usage keeps adding up."""
        self.turn += 1
        self._acc = TurnAccumulator()
        self._index_map = {}
        self._calls = []
        self.client_tool = False
        self.continues = False

    def _renumber(
        self, frame: Frame, event: dict[str, Any], index: int, new: bool = False
    ) -> bytes:
        """Give a client-visible block the next client index; re-encode only if it changed."""
        if new:
            self._index_map[index] = self._next_index
            self._next_index += 1
        client_index = self._index_map.get(index, index)
        if client_index == index:
            return frame.raw
        event["index"] = client_index
        return encode(frame.event, orjson.dumps(event))
