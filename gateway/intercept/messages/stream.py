"""Anthropic Messages stream rewriter: a pure state machine fed with SSE frames.

``feed(frame)`` returns the bytes to send to the client for that frame (``b""`` to hide it) and
queues records, which the I/O shell collects with ``take_records()``. Without injected tools only
``message_*`` frames are parsed and the one rewrite is ``message_start.message.id``; text deltas,
the bulk of a stream, pass as the provider's bytes. With injected tools one client-visible
message may span several upstream turns: :mod:`gateway.intercept.messages.turns` does that
surgery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.intercept.messages.rewrite_id import replace_id
from gateway.intercept.messages.turn import not_run_reason
from gateway.intercept.messages.turns import InjectedTurns, TrackedBlock
from gateway.intercept.messages.usage import MessageUsage
from gateway.intercept.rewriter import StreamError, ToolCall, TurnResult
from gateway.records import ModelThought, PromptUsage, Record, ToolUsage
from gateway.sse import Frame, RegionScanner, SSEFramer, encode, named_events

_TRACKED_BLOCKS = frozenset({"thinking", "tool_use", "server_tool_use"})
# Frames a region scan lets pass unread: pings always, and the deltas and ends of blocks the
# stream does not track (text), unless it tracks a block or runs the multi-turn surgery.
_PATTERNS = named_events(
    ignored=["ping"], tracked_only=["content_block_delta", "content_block_stop"]
)


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
        self._records: list[Record] = []
        self._msg_id = ""
        self._usage: MessageUsage | None = None
        self._open: dict[int, TrackedBlock] = {}
        self._turns = InjectedTurns(injected) if injected else None
        # The region scan's flag (``ScanTarget``): a block is tracked, or the surgery runs.
        self.scan_all = self._turns is not None
        self.error: StreamError | None = None
        self.message_stopped = False
        # True once the client-visible message_stop has been produced (the stream's last event).
        self.stop_relayed = False
        # The current turn's stop reason (from its message_delta), "" until then.
        self.stop_reason = ""

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

        Whole-frame chunks take the fast path (``SSEFramer.feed_region`` and a region scan that
        passes text deltas and pings with no per-frame Python work), others ``feed``.
        """
        region = framer.feed_region(chunk)
        if region is not None:
            return _SCANNER.scan(self, region) if region else None
        frames = framer.feed(chunk)
        return self.feed_all(frames) if frames else None

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
            self.scan_all = self._turns is not None
            self._records.append(self._usage.record(self.interception_id, self._msg_id))
            self._usage = None
        self._record_prompt("")
        return self.take_records()

    @property
    def turn(self) -> int:
        """How many upstream turns came before the current one (0 without injected tools)."""
        return self._turns.turn if self._turns is not None else 0

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Injected calls of the turn that just ended, when the gateway must run them.

        Empty when the turn is final: no injected call, a client tool was called too (then
        the client must answer first), or the turn stopped on anything but ``tool_use`` (a call
        cut off by ``max_tokens`` has half its arguments). Calls of a final turn are not run.
        """
        turns = self._turns
        if turns is None or not turns.continues or not self.message_stopped:
            return []
        return turns.calls(self._msg_id)

    @property
    def skipped_calls(self) -> list[ToolCall]:
        """Injected calls of a final turn (never run; ``skip_reason`` says why)."""
        turns = self._turns
        if turns is None or turns.continues or not self.message_stopped:
            return []
        return turns.calls(self._msg_id)

    @property
    def skip_reason(self) -> str:
        """Why ``skipped_calls`` were not run."""
        return not_run_reason(self._turns is not None and self._turns.client_tool, self.stop_reason)

    def assistant_message(self) -> dict[str, Any]:
        """The turn that just ended, as the assistant message of the continuation request."""
        assert self._turns is not None, "only available with injected tools"
        return self._turns.assistant_message()

    def turn_result(self) -> TurnResult:
        """How the upstream turn that just ended ended, for the agentic loop."""
        calls = self.tool_calls
        assistant = self.assistant_message() if calls else None
        return TurnResult(calls, self.skipped_calls, self.skip_reason, assistant, self.stop_reason)

    def next_turn(self) -> None:
        """Prepare for the next upstream stream of the same client-visible message."""
        assert self._turns is not None, "only available with injected tools"
        self._turns.next_turn()
        self.message_stopped = False
        self.stop_reason = ""

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
        if self._turns is not None and self._turns.hides_message_start:
            return b""
        if not self._msg_id:
            return frame.raw
        rewritten = replace_id(frame.raw, self._msg_id, self.interception_id)
        if rewritten is not None:
            return rewritten
        message["id"] = self.interception_id
        return encode(frame.event, orjson.dumps(event))

    def _message_delta(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        usage = self._usage
        if event is None or usage is None:
            return frame.raw
        usage.update(event.get("usage"))
        delta = event.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        self.stop_reason = stop_reason if isinstance(stop_reason, str) else ""
        if self._turns is None:
            return frame.raw
        return self._turns.message_delta(frame, event, usage, self.stop_reason)

    def _message_stop(self, frame: Frame) -> bytes:
        usage = self._usage
        if usage is not None:
            self._records.append(usage.record(self.interception_id, self._msg_id))
            self._usage = None
        self.message_stopped = True
        if self._turns is not None and self._turns.message_stop(usage):
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
        tracked: TrackedBlock | None = None
        if kind in _TRACKED_BLOCKS:
            tracked = TrackedBlock(type=str(kind))
            if kind == "thinking":
                text = block.get("thinking")
                if isinstance(text, str) and text:
                    tracked.parts.append(text)
            else:
                tracked.tool_id = str(block.get("id") or "")
                tracked.name = str(block.get("name") or "")
                tracked.initial_input = block.get("input")
            self._open[index] = tracked
            self.scan_all = True
        if self._turns is None:
            return frame.raw
        return self._turns.block_start(frame, event, index, block, tracked)

    def _block_delta(self, frame: Frame) -> bytes:
        if not self.scan_all:
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
        if self._turns is None:
            return frame.raw
        return self._turns.block_delta(frame, event, index, delta, block)

    def _block_stop(self, frame: Frame) -> bytes:
        if not self.scan_all:
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
            self.scan_all = self._turns is not None or bool(self._open)
        if self._turns is None:
            return frame.raw
        return self._turns.block_stop(frame, event, index, block)

    def _error(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        err = event.get("error") if event else None
        if isinstance(err, dict):
            self.error = StreamError(str(err.get("type") or "error"), str(err.get("message") or ""))
        else:
            self.error = StreamError("error", frame.data[:200].decode("utf-8", "replace"))
        return frame.raw

    # -- helpers ----------------------------------------------------------------------------

    def _close_block(self, block: TrackedBlock) -> None:
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

# The same, keyed by the event name's bytes, for the region scan.
_SCANNER = RegionScanner(_PATTERNS, {name.encode(): h for name, h in _HANDLERS.items()})


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
