"""Multi-turn surgery on a Responses stream whose turns may call injected tools (pure).

One client-visible response may span several upstream responses: when a turn completes having
called only injected tools, the gateway runs them and continues the conversation itself. The
client then sees one coherent stream: a single ``response.created`` and ``response.in_progress``
(the first turn's), no event of an injected ``function_call`` item, no end of the turns that
only called injected tools, ``output_index`` renumbered without gaps across turns,
``sequence_number`` renumbered strictly increasing, and a final ``response.completed`` carrying
the last upstream response (its id is what the client chains from) with the visible output of
every turn and the usage summed over turns. A request with ``store: false`` leaves nothing to
chain from: its final event keeps the id ``response.created`` showed, as the SDK's stream
helper requires of every lifecycle event. Every response object shown echoes the client's own
``tools`` and ``parallel_tool_calls``, not the injected request's: those events are re-encoded.

Renumbering edits the integer fields in the event's bytes; an event is re-encoded only when
its content changes (the final event) or a field cannot be found exactly once. Until the
first event is hidden (the first turn, before an injected call), events pass as they came and
the stream's region scan lets deltas through unread: ``identity`` says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from gateway.intercept.responses.output import (
    ResponsesTurn,
    is_client_call,
    is_injected_call,
    tool_call,
)
from gateway.intercept.responses.tools import hide_injection
from gateway.intercept.responses.usage import summed_usage
from gateway.intercept.rewriter import ToolCall
from gateway.sse import Frame, encode

# A key can only match outside string values: inside one, its quotes would be escaped.
_FIELDS = {
    key: re.compile(b'("' + key.encode() + rb'"\s*:\s*)-?\d+')
    for key in ("sequence_number", "output_index")
}


class InjectedTurns:
    """The turns of one client-visible response, as seen by the stream rewriter."""

    def __init__(
        self, injected: Callable[[str], bool], parallel_tool_calls: bool = True, store: bool = True
    ) -> None:
        """``parallel_tool_calls``: what the client's own request means (``client_parallel``);
        ``store``: False when the client sent ``store: false``."""
        self._injected = injected
        self._parallel = parallel_tool_calls
        self._store = store
        # The id the first turn showed the client ("" until known).
        self._first_id = ""
        self.turn = 0
        # Nothing hidden nor renumbered yet: events pass as the provider sent them.
        self.identity = True
        # The next client sequence number, once ``identity`` is over.
        self._next_seq = 0
        self._next_index = 0
        # Upstream output_index of this turn -> client output_index, counted across turns.
        self._index_map: dict[int, int] = {}
        self._hidden: set[int] = set()
        self._items: dict[int, dict[str, Any]] = {}
        self._calls: list[dict[str, Any]] = []
        self.client_tool = False
        # The turn completed having called only injected tools: the gateway goes on.
        self.continues = False
        self._turn_output: list[dict[str, Any]] = []
        # The visible output items and the usage objects of the turns before this one.
        self._earlier_items: list[Any] = []
        self._earlier_usage: list[Any] = []

    # -- events -------------------------------------------------------------------------------

    def lifecycle(self, frame: Frame, event: dict[str, Any]) -> bytes:
        """``response.created`` / ``.in_progress`` / ``.queued``: the first turn's only, with
        the client's own tools and ``parallel_tool_calls`` in its response object."""
        if self.turn > 0:
            return b""
        response = event.get("response")
        if isinstance(response, dict):
            self._note_first_id(response)
        if isinstance(response, dict) and hide_injection(response, self._injected, self._parallel):
            return self._encoded(frame, event)
        return self.renumber(frame, event)

    def item_added(self, frame: Frame, event: dict[str, Any], item: Any, index: int) -> bytes:
        """``response.output_item.added``: an injected call is hidden from here on."""
        if is_injected_call(item, self._injected):
            self._hidden.add(index)
            if self.identity:
                self.identity = False
                seq = event.get("sequence_number")
                self._next_seq = seq if type(seq) is int else 0
            return b""
        if is_client_call(item):
            self.client_tool = True
        if self.identity:
            self._index_map[index] = index
            self._next_index = max(self._next_index, index + 1)
            return frame.raw
        return self.renumber(frame, event)

    def item_done(self, frame: Frame, event: dict[str, Any], item: Any, index: int) -> bytes:
        """``response.output_item.done``: the item whole (an injected call's arguments)."""
        if isinstance(item, dict):
            self._items[index] = item
            if index in self._hidden:
                self._calls.append(item)
        return self.renumber(frame, event)

    def terminal(self, frame: Frame, event: dict[str, Any], response: dict[str, Any]) -> bytes:
        """``response.completed`` / ``.failed`` / ``.incomplete``: hidden if the loop goes on."""
        output = response.get("output")
        items = output if isinstance(output, list) and output else self._collected()
        self._turn_output = [i for i in items if isinstance(i, dict)]
        visible = [i for i in items if not is_injected_call(i, self._injected)]
        self._note_first_id(response)
        # The frame's name, as the stream dispatched on it, says how the turn ended.
        if self._calls and not self.client_tool and frame.event == "response.completed":
            self.continues = True
            self._earlier_items += visible
            self._earlier_usage.append(response.get("usage"))
            return b""
        hidden = hide_injection(response, self._injected, self._parallel)
        first = self._first_id
        if not self._store and first and self.turn > 0 and response.get("id") != first:
            response["id"] = first
            hidden = True
        if self.identity and not hidden:
            return frame.raw
        if isinstance(output, list) and not self.identity:
            response["output"] = [*self._earlier_items, *visible]
        usage = response.get("usage")
        if isinstance(usage, dict) and self._earlier_usage:
            response["usage"] = summed_usage(usage, self._earlier_usage)
        return self._encoded(frame, event)

    def renumber(self, frame: Frame, event: dict[str, Any]) -> bytes:
        """Any other visible event: hidden if it belongs to an injected call, else renumbered."""
        if self.identity:
            return frame.raw
        index = event.get("output_index")
        if type(index) is int and index in self._hidden:
            return b""
        changes: dict[str, int] = {}
        seq = event.get("sequence_number")
        if type(seq) is int and (new := self._take_seq()) != seq:
            changes["sequence_number"] = new
        if type(index) is int and (new := self._client_index(index)) != index:
            changes["output_index"] = new
        return _patched(frame, event, changes) if changes else frame.raw

    # -- the turn -----------------------------------------------------------------------------

    def calls(self, response_id: str) -> list[ToolCall]:
        """The injected calls of this turn, with their arguments."""
        return [tool_call(item, response_id) for item in self._calls]

    def assistant(self, response_id: str) -> ResponsesTurn:
        """This turn as the continuation request needs it."""
        return ResponsesTurn(response_id, list(self._turn_output))

    def next_turn(self) -> None:
        """Start the next upstream turn: indices and sequence numbers go on."""
        self.turn += 1
        self._index_map = {}
        self._hidden = set()
        self._items = {}
        self._calls = []
        self._turn_output = []
        self.client_tool = False
        self.continues = False

    def peek_seq(self) -> int:
        """The sequence number the next visible event will carry."""
        return self._next_seq

    def _encoded(self, frame: Frame, event: dict[str, Any]) -> bytes:
        """``event`` re-encoded, its sequence number renumbered once ``identity`` is over."""
        if not self.identity and type(event.get("sequence_number")) is int:
            event["sequence_number"] = self._take_seq()
        return _encode(frame, event)

    def _note_first_id(self, response: dict[str, Any]) -> None:
        rid = response.get("id")
        if not self._first_id and self.turn == 0 and isinstance(rid, str):
            self._first_id = rid

    def _collected(self) -> list[Any]:
        return [self._items[i] for i in sorted(self._items)]

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _client_index(self, index: int) -> int:
        client = self._index_map.get(index)
        if client is None:
            client = self._index_map[index] = self._next_index
            self._next_index += 1
        return client


def _patched(frame: Frame, event: dict[str, Any], changes: dict[str, int]) -> bytes:
    """The frame with integer fields changed in its bytes; re-encoded whole when a field is not
    found exactly once (a layout the byte edit cannot be sure of)."""
    raw = frame.raw
    for key, value in changes.items():
        pattern = _FIELDS[key]
        if len(pattern.findall(raw)) != 1:
            event.update(changes)
            return _encode(frame, event)
        raw = pattern.sub(rb"\g<1>" + str(value).encode(), raw, count=1)
    return raw


def _encode(frame: Frame, event: dict[str, Any]) -> bytes:
    """``event`` in the layout of ``frame``: named, or ``data:`` only as an upstream without
    ``event:`` lines sends it (the stream names those frames by their JSON ``type``)."""
    data = orjson.dumps(event)
    if not frame.event or frame.raw[:5] == b"data:":
        return b"data: " + data + b"\n\n"
    return encode(frame.event, data)
