"""Anthropic Messages stream rewriter: a pure state machine fed with SSE frames.

``feed(frame)`` returns the bytes to send to the client for that frame (``b""`` to hide it) and
queues records, which the I/O shell collects with ``take_records()``. Only the frames that must be
read are parsed: ``message_*`` always, ``content_block_*`` only while a thinking or tool_use block
is open (text deltas, the bulk of a stream, are relayed without being decoded).

The only rewrite is ``message_start.message.id`` (to the interception id); no key is ever added to
an event that did not have it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.intercept.messages.rewrite_id import replace_id
from gateway.intercept.messages.usage import MessageUsage
from gateway.records import ModelThought, PromptUsage, Record, ToolUsage
from gateway.sse import Frame, encode

_TRACKED_BLOCKS = frozenset({"thinking", "tool_use", "server_tool_use"})


@dataclass(slots=True)
class _Block:
    type: str
    tool_id: str = ""
    name: str = ""
    initial_input: Any = None
    parts: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StreamError:
    """An error the upstream reported inside the stream (relayed to the client as it came)."""

    type: str
    message: str


class MessagesStream:
    """Rewrites one client-visible Anthropic stream and extracts its records."""

    def __init__(self, interception_id: str, prompt: str | None) -> None:
        self.interception_id = interception_id
        self._prompt = prompt
        self._prompt_recorded = prompt is None
        self._records: list[Record] = []
        self._msg_id = ""
        self._usage: MessageUsage | None = None
        self._open: dict[int, _Block] = {}
        self.error: StreamError | None = None
        self.message_stopped = False
        self._handlers = {
            "message_start": self._message_start,
            "message_delta": self._message_delta,
            "message_stop": self._message_stop,
            "content_block_start": self._block_start,
            "content_block_delta": self._block_delta,
            "content_block_stop": self._block_stop,
            "error": self._error,
        }

    # -- public API -------------------------------------------------------------------------

    def feed(self, frame: Frame) -> bytes:
        """Process one upstream frame; return what the client must receive for it."""
        handler = self._handlers.get(frame.event)
        if handler is None:
            return frame.raw
        return handler(frame)

    def feed_all(self, frames: list[Frame]) -> bytes:
        """Process frames in order and return the client bytes for all of them, joined."""
        if len(frames) == 1:
            return self.feed(frames[0])
        return b"".join([self.feed(f) for f in frames])

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
        if not self._msg_id:
            return frame.raw
        rewritten = replace_id(frame.raw, self._msg_id, self.interception_id)
        if rewritten is not None:
            return rewritten
        message["id"] = self.interception_id
        return encode(frame.event, orjson.dumps(event))

    def _message_delta(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        if event is not None and self._usage is not None:
            self._usage.update(event.get("usage"))
        return frame.raw

    def _message_stop(self, frame: Frame) -> bytes:
        if self._usage is not None:
            self._records.append(self._usage.record(self.interception_id, self._msg_id))
            self._usage = None
        self.message_stopped = True
        return frame.raw

    def _block_start(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        if event is None:
            return frame.raw
        block = event.get("content_block")
        index = event.get("index")
        if isinstance(block, dict) and isinstance(index, int):
            kind = block.get("type")
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
        return frame.raw

    def _block_delta(self, frame: Frame) -> bytes:
        if not self._open:
            return frame.raw
        event = _loads(frame.data)
        if event is None:
            return frame.raw
        block = self._open.get(event.get("index"))  # type: ignore[arg-type]
        delta = event.get("delta")
        if block is None or not isinstance(delta, dict):
            return frame.raw
        kind = delta.get("type")
        if kind == "thinking_delta":
            text = delta.get("thinking")
            if isinstance(text, str):
                block.parts.append(text)
        elif kind == "input_json_delta":
            part = delta.get("partial_json")
            if isinstance(part, str):
                block.parts.append(part)
        return frame.raw

    def _block_stop(self, frame: Frame) -> bytes:
        if not self._open:
            return frame.raw
        event = _loads(frame.data)
        if event is not None:
            block = self._open.pop(event.get("index"), None)  # type: ignore[arg-type]
            if block is not None:
                self._close_block(block)
        return frame.raw

    def _error(self, frame: Frame) -> bytes:
        event = _loads(frame.data)
        err = event.get("error") if event else None
        if isinstance(err, dict):
            self.error = StreamError(str(err.get("type") or "error"), str(err.get("message") or ""))
        else:
            self.error = StreamError("error", frame.data[:200].decode("utf-8", "replace"))
        return frame.raw

    # -- helpers ----------------------------------------------------------------------------

    def _close_block(self, block: _Block) -> None:
        if block.type == "thinking":
            text = "".join(block.parts)
            if text:
                self._records.append(ModelThought(self.interception_id, self._msg_id, text))
        elif block.type == "tool_use":
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


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
