"""Tool calls of one Chat Completions turn, rebuilt from stream deltas (pure).

A streamed call arrives as ``choices[].delta.tool_calls[]`` fragments: the first carries the
call's ``id`` and ``function.name``, the next ones pieces of ``function.arguments``, all with the
call's ``index``. Parallel calls interleave by index. Fragments are kept per call and joined once,
at the end of the turn (parsing partial JSON on every fragment is quadratic).

Some compatible providers give every call of a turn the same index: a fragment with a new ``id``
at an index whose call already has another one starts a new call.

A custom tool's call (``type: "custom"``) carries ``custom.name`` and pieces of ``custom.input``,
free text rather than JSON: its record's arguments are that text as a JSON string, as Responses
records its custom calls. Injected tools are function tools: a custom call is the client's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.intercept.rewriter import ToolCall
from gateway.records import ToolUsage


@dataclass(slots=True)
class CallSlot:
    """One tool call of the turn."""

    choice: int
    id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)
    # An injected call: hidden from the client, run (or skipped) by the gateway.
    injected: bool = False
    # The ``index`` the client sees for a visible call.
    client_index: int = 0
    # A custom tool's call: ``parts`` are pieces of free text.
    custom: bool = False

    @property
    def arguments(self) -> str:
        """The call's arguments as the model wrote them ("{}" when it wrote none); a custom
        call's input as a JSON string."""
        if self.custom:
            return orjson.dumps("".join(self.parts)).decode()
        return "".join(self.parts) or "{}"

    def input(self) -> dict[str, Any]:
        """The arguments parsed: an object, else ``{}`` (a call cut short has half of them)."""
        try:
            value = orjson.loads(self.arguments)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    def tool_call(self, msg_id: str) -> ToolCall:
        """This call as the agentic loop runs it."""
        return ToolCall(self.id, self.name, self.input(), msg_id)

    def usage(self, interception_id: str, msg_id: str) -> ToolUsage:
        """The record of a client tool call."""
        return ToolUsage(
            interception_id=interception_id,
            msg_id=msg_id,
            tool=self.name,
            tool_call_id=self.id,
            args=self.arguments,
        )


class TurnCalls:
    """The tool calls of one upstream turn, in the order they started."""

    __slots__ = ("_by_index", "_injected", "_next_client", "slots")

    def __init__(
        self, injected: Callable[[str], bool] | None, next_client: dict[int, int] | None = None
    ) -> None:
        self._injected = injected
        self._by_index: dict[tuple[int, int | None], CallSlot] = {}
        # Next client index per choice, shared by the turns of one client stream.
        self._next_client = next_client if next_client is not None else {}
        self.slots: list[CallSlot] = []

    def delta(self, choice: int, fragment: dict[str, Any]) -> CallSlot:
        """Take one ``tool_calls[]`` fragment of ``choice``; return the call it belongs to."""
        index = fragment.get("index")
        # Only an int is a call's index: any other value (a list, an object) would not even
        # hash, and one such fragment must not cut the client's stream.
        key = (choice, index if type(index) is int else None)
        slot = self._by_index.get(key)
        call_id = fragment.get("id")
        if not isinstance(call_id, str):
            call_id = ""
        function = fragment.get("function")
        custom = False
        if not isinstance(function, dict):
            function = fragment.get("custom")
            custom = isinstance(function, dict)
        name = function.get("name") if isinstance(function, dict) else None
        if slot is None or (call_id and slot.id and call_id != slot.id):
            slot = CallSlot(choice, call_id, custom=custom)
            self.slots.append(slot)
            self._by_index[key] = slot
            if custom:
                slot.client_index = self._next_client.get(choice, 0)
                self._next_client[choice] = slot.client_index + 1
            elif isinstance(name, str) and self._injected is not None and self._injected(name):
                slot.injected = True
            else:
                slot.client_index = self._next_client.get(choice, 0)
                self._next_client[choice] = slot.client_index + 1
        elif call_id and not slot.id:
            slot.id = call_id
        if isinstance(function, dict):
            if isinstance(name, str) and not slot.name:
                slot.name = name
            arguments = function.get("input" if slot.custom else "arguments")
            if isinstance(arguments, str) and arguments:
                slot.parts.append(arguments)
        return slot

    @property
    def injected(self) -> list[CallSlot]:
        """The injected calls."""
        return [s for s in self.slots if s.injected]

    @property
    def client(self) -> list[CallSlot]:
        """The client's calls."""
        return [s for s in self.slots if not s.injected]


def not_run_reason(client_tool: bool, choices: int, stop_reason: str) -> str:
    """Why the injected calls of a final turn were not run (their ``ToolUsage`` record says)."""
    if client_tool:
        return "not run: the same turn called client tools"
    if choices > 1:
        return "not run: the response has several choices"
    if stop_reason == "tool_calls":
        return "not run: the stream ended before data: [DONE]"
    return f"not run: the turn stopped on {stop_reason or 'no finish_reason'}, not tool_calls"
