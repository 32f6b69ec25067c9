"""Anthropic Messages stream rewriter: a pure state machine fed with SSE frames.

``feed(frame)`` returns the bytes to send to the client for that frame (``b""`` to hide it) and
queues records, which the I/O shell collects with ``take_records()``. Without injected tools only
``message_*`` frames are parsed and the one rewrite is ``message_start.message.id``; text deltas,
the bulk of a stream, pass as the provider's bytes.

With injected tools (``injected`` given) one client-visible message may span several upstream
turns: when a turn stops on ``tool_use`` having called only injected tools, the gateway runs them
and continues the conversation itself. Then the client sees a single ``message_start`` (the
first), no trace of injected ``tool_use`` blocks or of the turns that only called them,
content-block indices renumbered monotonically across turns, and a final ``message_delta`` whose
usage is the total of all turns. No key is ever added to an event that did not have it, except
the cumulative usage fields of that final delta. A turn that stops otherwise (``max_tokens``
cutting an injected call short) is final: its injected calls are hidden and not run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.intercept.messages.accumulate import TurnAccumulator
from gateway.intercept.messages.rewrite_id import replace_id
from gateway.intercept.messages.turn import StreamError, ToolCall, not_run_reason
from gateway.intercept.messages.usage import MessageUsage
from gateway.records import ModelThought, PromptUsage, Record, ToolUsage
from gateway.sse import Frame, SSEFramer, encode

_TRACKED_BLOCKS = frozenset({"thinking", "tool_use", "server_tool_use"})
# Scanning a region of whole frames (``SSEFramer.feed_region``): each pattern matches, empty, at
# the start of a frame the rewriter must see; the others pass as they are. Group 1 is the event
# name and group 2 the data payload when the frame has the standard layout ``event: NAME\ndata:
# PAYLOAD\n\n`` (exactly what ``Frame.event`` and ``Frame.data`` would return then); the frame ends
# at its first blank line, as ``bytes.split`` cuts it. ``_SCAN*`` find frames after the delimiter
# ending the frame before, ``_FIRST*`` match the region's first frame: the literal prefix of
# ``_SCAN*`` keeps the search in C (``\A|\n\n`` would try a match at every byte). The ``_ALL``
# patterns skip only pings: while a tracked block is open, or with injected tools, every block
# event counts.
_HEAD = rb"(?=event: ([a-z_]+)\n(?:data: ([^\n]*)\n\n)?|)"
_SKIP = rb"(?!event: (?:ping|content_block_delta|content_block_stop)\n|\Z)" + _HEAD
_SKIP_ALL = rb"(?!event: ping\n|\Z)" + _HEAD
_FIRST = re.compile(_SKIP)
_FIRST_ALL = re.compile(_SKIP_ALL)
_SCAN = re.compile(rb"\n\n" + _SKIP)
_SCAN_ALL = re.compile(rb"\n\n" + _SKIP_ALL)


@dataclass(slots=True)
class _Block:
    type: str
    tool_id: str = ""
    name: str = ""
    initial_input: Any = None
    parts: list[str] = field(default_factory=list)
    hidden: bool = False


class MessagesStream:
    """Rewrites one client-visible Anthropic stream and extracts its records."""

    def __init__(
        self,
        interception_id: str,
        prompt: str | None,
        injected: Callable[[str], bool] | None = None,
    ) -> None:
        self.interception_id = interception_id
        self._prompt = prompt
        self._prompt_recorded = prompt is None
        self._injected = injected
        self._records: list[Record] = []
        self._msg_id = ""
        self._usage: MessageUsage | None = None
        self._open: dict[int, _Block] = {}
        self.error: StreamError | None = None
        self.message_stopped = False
        # True once the client-visible message_stop has been produced (the stream's last event).
        self.stop_relayed = False
        # Multi-turn state (only used with injected tools).
        self.turn = 0
        self._totals = MessageUsage()
        self._acc: TurnAccumulator | None = TurnAccumulator() if injected else None
        self._index_map: dict[int, int] = {}
        self._next_index = 0
        self._turn_calls: list[_Block] = []
        self._turn_client_tool = False
        # The turn stopped on tool_use having called only injected tools: the gateway goes on.
        self._continues = False
        self._stop_reason = ""

    # -- public API -------------------------------------------------------------------------

    def feed(self, frame: Frame) -> bytes:
        """Process one upstream frame; return what the client must receive for it."""
        handler = _HANDLERS.get(frame.event)
        if handler is None:
            return frame.raw
        return handler(self, frame)

    def feed_all(self, frames: list[Frame]) -> bytes:
        """Process frames in order and return the client bytes for all of them, joined."""
        if len(frames) == 1:
            return self.feed(frames[0])
        return b"".join([self.feed(f) for f in frames])

    def feed_chunk(self, framer: SSEFramer, chunk: bytes) -> bytes | None:
        """Frame ``chunk`` and process what it completes: the client bytes, or None if nothing.

        Whole-frame chunks take the fast path (``SSEFramer.feed_region``), others ``feed``.
        """
        region = framer.feed_region(chunk)
        if region is not None:
            return self._feed_region(region) if region else None
        frames = framer.feed(chunk)
        return self.feed_all(frames) if frames else None

    def _feed_region(self, region: bytes) -> bytes:
        """Process a run of whole frames (``SSEFramer.feed_region``); return the client bytes.

        The frames to look at are found with a regex scan (``_SCAN``); the others (text deltas,
        pings, the end of an untracked block) pass with no per-frame Python work. When no frame
        changes, ``region`` itself is returned.
        """
        edits: list[tuple[int, int, bytes]] = []
        every = self._acc is not None or bool(self._open)
        pos = 0
        m = (_FIRST_ALL if every else _FIRST).match(region)
        if m is not None:
            pos = self._feed_match(region, m, edits)
        while True:
            every = self._acc is not None or bool(self._open)
            for m in (_SCAN_ALL if every else _SCAN).finditer(region, pos):
                pos = self._feed_match(region, m, edits)
                if every is not (self._acc is not None or bool(self._open)):
                    break  # a tracked block opened or closed: go on with the other scan
            else:
                break
        if not edits:
            return region
        pieces = []
        done = 0
        for start, end, out in edits:
            pieces.append(region[done:start])
            pieces.append(out)
            done = end
        pieces.append(region[done:])
        return b"".join(pieces)

    def _feed_match(
        self, region: bytes, m: re.Match[bytes], edits: list[tuple[int, int, bytes]]
    ) -> int:
        """Feed the frame starting where ``m`` ends; return the position of its delimiter."""
        start = m.end()
        data = m[2]
        end = m.end(2) if data is not None else region.find(b"\n\n", start)
        frame = Frame(region[start : end + 2], data)
        name = m[1]
        handler = _BY_NAME.get(name) if name is not None else None
        out = handler(self, frame) if handler is not None else self.feed(frame)
        if out is not frame.raw:
            edits.append((start, end + 2, out))
        return end

    def take_records(self) -> list[Record]:
        """Records produced since the last call, in order."""
        records, self._records = self._records, []
        return records

    def finish(self) -> list[Record]:
        """Close the stream (normally or not): flush usage of an unfinished message, the prompt."""
        if self._usage is not None:
            # The stream stopped before message_stop (upstream error, client gone): the tokens
            # were still spent, so record what the provider reported so far.
            for block in self._open.values():
                self._close_block(block)
            self._open.clear()
            self._records.append(self._usage.record(self.interception_id, self._msg_id))
            self._usage = None
        self._record_prompt("")
        return self.take_records()

    @property
    def upstream_message_id(self) -> str:
        """The provider's id of the current (or last) message."""
        return self._msg_id

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Injected calls of the turn that just ended, when the gateway must run them.

        Empty when the turn is final: no injected call, a client tool was called too (then
        the client must answer first), or the turn stopped on anything but ``tool_use`` (a call
        cut off by ``max_tokens`` has half its arguments). Calls of a final turn are not run.
        """
        if not self._continues or not self.message_stopped:
            return []
        return self._injected_calls()

    @property
    def skipped_calls(self) -> list[ToolCall]:
        """Injected calls of a final turn (never run; ``skip_reason`` says why)."""
        if self._acc is None or self._continues or not self.message_stopped:
            return []
        return self._injected_calls()

    @property
    def skip_reason(self) -> str:
        """Why ``skipped_calls`` were not run."""
        return not_run_reason(self._turn_client_tool, self._stop_reason)

    def _injected_calls(self) -> list[ToolCall]:
        assert self._acc is not None
        inputs = {b.get("id"): b.get("input") for b in self._acc.content()}
        calls = []
        for block in self._turn_calls:
            args = inputs.get(block.tool_id)
            args = args if isinstance(args, dict) else {}
            calls.append(ToolCall(block.tool_id, block.name, args, self._msg_id))
        return calls

    def assistant_message(self) -> dict[str, Any]:
        """The turn that just ended, as the assistant message of the continuation request."""
        assert self._acc is not None, "only available with injected tools"
        return {"role": "assistant", "content": self._acc.content()}

    def next_turn(self) -> None:
        """Prepare for the next upstream stream of the same client-visible message."""
        self.turn += 1
        self.message_stopped = False
        self._acc = TurnAccumulator()
        self._index_map = {}
        self._turn_calls = []
        self._turn_client_tool = False
        self._continues = False
        self._stop_reason = ""

    # -- handlers ---------------------------------------------------------------------------

    def _message_start(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        message = event.get("message") if event else None
        if not isinstance(message, dict):
            return frame.raw
        self._msg_id = str(message.get("id") or "")
        self._usage = MessageUsage()
        self._usage.update(message.get("usage"))
        self._record_prompt(self._msg_id)
        if self.turn > 0:
            return b""  # the client already has its message_start
        if not self._msg_id:
            return frame.raw
        rewritten = replace_id(frame.raw, self._msg_id, self.interception_id)
        if rewritten is not None:
            return rewritten
        message["id"] = self.interception_id
        return encode(frame.event, orjson.dumps(event))

    def _message_delta(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        if event is None or self._usage is None:
            return frame.raw
        self._usage.update(event.get("usage"))
        if self._acc is None:
            return frame.raw
        delta = event.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        self._stop_reason = stop_reason if isinstance(stop_reason, str) else ""
        if self._turn_calls and not self._turn_client_tool and stop_reason == "tool_use":
            self._continues = True
            return b""  # the loop goes on: this turn's end stays hidden
        if self.turn == 0:
            return frame.raw
        # Final turn of a loop: the client's usage is the total of every turn.
        total = self._totals.plus(self._usage)
        usage = event.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        usage.update(total.as_anthropic())
        event["usage"] = usage
        return encode(frame.event, orjson.dumps(event))

    def _message_stop(self, frame: Frame) -> bytes:
        if self._usage is not None:
            self._records.append(self._usage.record(self.interception_id, self._msg_id))
            if self._acc is not None:  # only a multi-turn message needs the running total
                self._totals = self._totals.plus(self._usage)
            self._usage = None
        self.message_stopped = True
        if self._continues:
            return b""
        self.stop_relayed = True
        return frame.raw

    def _block_start(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        if event is None:
            return frame.raw
        block = event.get("content_block")
        index = event.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            return frame.raw
        kind = block.get("type")
        tracked: _Block | None = None
        if kind in _TRACKED_BLOCKS:
            tracked = _Block(type=str(kind))
            if kind == "thinking":
                text = block.get("thinking")
                if isinstance(text, str) and text:
                    tracked.parts.append(text)
            else:
                tracked.tool_id = str(block.get("id") or "")
                tracked.name = str(block.get("name") or "")
                tracked.initial_input = block.get("input")
            self._open[index] = tracked
        if self._acc is None:
            return frame.raw
        self._acc.start(index, block)
        injected = self._injected
        if tracked is not None and kind == "tool_use" and injected and injected(tracked.name):
            tracked.hidden = True
            self._turn_calls.append(tracked)
            return b""
        if kind == "tool_use":
            self._turn_client_tool = True
        return self._renumber(frame, event, index, new=True)

    def _block_delta(self, frame: Frame) -> bytes:
        if not self._open and self._acc is None:
            return frame.raw
        event = _loads(frame.data)
        if event is None:
            return frame.raw
        index = event.get("index")
        delta = event.get("delta")
        if not isinstance(index, int) or not isinstance(delta, dict):
            return frame.raw
        block = self._open.get(index)
        if block is not None:
            kind = delta.get("type")
            if kind == "thinking_delta":
                text = delta.get("thinking")
                if isinstance(text, str):
                    block.parts.append(text)
            elif kind == "input_json_delta":
                part = delta.get("partial_json")
                if isinstance(part, str):
                    block.parts.append(part)
        if self._acc is None:
            return frame.raw
        self._acc.delta(index, delta)
        if block is not None and block.hidden:
            return b""
        return self._renumber(frame, event, index)

    def _block_stop(self, frame: Frame) -> bytes:
        if not self._open and self._acc is None:
            return frame.raw
        event = _loads(frame.data)
        if event is None:
            return frame.raw
        index = event.get("index")
        if not isinstance(index, int):
            return frame.raw
        block = self._open.pop(index, None)
        if block is not None:
            self._close_block(block)
            if block.hidden:
                return b""
        if self._acc is None:
            return frame.raw
        return self._renumber(frame, event, index)

    def _error(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        err = event.get("error") if event else None
        if isinstance(err, dict):
            self.error = StreamError(str(err.get("type") or "error"), str(err.get("message") or ""))
        else:
            self.error = StreamError("error", frame.data[:200].decode("utf-8", "replace"))
        return frame.raw

    # -- helpers ----------------------------------------------------------------------------

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

    def _close_block(self, block: _Block) -> None:
        if block.type == "thinking":
            text = "".join(block.parts)
            if text:
                self._records.append(ModelThought(self.interception_id, self._msg_id, text))
        elif block.type == "tool_use" and not block.hidden:
            args = "".join(block.parts)
            if not args:
                args = orjson.dumps(block.initial_input or {}).decode()
            self._records.append(
                ToolUsage(
                    interception_id=self.interception_id,
                    msg_id=self._msg_id,
                    tool=block.name,
                    tool_call_id=block.tool_id,
                    args=args,
                )
            )

    def _record_prompt(self, msg_id: str) -> None:
        if not self._prompt_recorded and self._prompt is not None:
            self._records.append(PromptUsage(self.interception_id, msg_id, self._prompt))
            self._prompt_recorded = True


_HANDLERS: dict[str, Callable[[MessagesStream, Frame], bytes]] = {
    "message_start": MessagesStream._message_start,
    "message_delta": MessagesStream._message_delta,
    "message_stop": MessagesStream._message_stop,
    "content_block_start": MessagesStream._block_start,
    "content_block_delta": MessagesStream._block_delta,
    "content_block_stop": MessagesStream._block_stop,
    "error": MessagesStream._error,
}

# The same, keyed by the event name's bytes (``_feed_region``).
_BY_NAME = {name.encode(): handler for name, handler in _HANDLERS.items()}


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
