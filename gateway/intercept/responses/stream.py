"""OpenAI Responses stream rewriter: a pure state machine fed with SSE frames.

Without injected tools the client gets the provider's bytes as they came: response ids are
never rewritten (clients chain them through ``previous_response_id``). Only the frames that
carry records are parsed (``response.created``, ``response.output_item.done``, the terminal
``response.completed`` / ``.failed`` / ``.incomplete``, ``error``); deltas, the bulk of a
stream, pass a region scan unread. A frame without an ``event:`` line (OpenAI-compatible
upstreams send only ``data:``) is read by its JSON ``type``, as the SDKs do: the slow path.
With injected tools one client-visible response may span several upstream responses:
:mod:`gateway.intercept.responses.turns` does that surgery, and every response object shown to
the client echoes its own ``tools`` and ``parallel_tool_calls``, not the injected request's
(``response.in_progress`` is then read too); what the upstream sends after a hidden turn's end
(a ``data: [DONE]``) is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from gateway.intercept.responses.output import (
    failure,
    incompleteness,
    item_records,
    not_run_reason,
)
from gateway.intercept.responses.tools import client_parallel
from gateway.intercept.responses.turns import InjectedTurns
from gateway.intercept.responses.usage import usage_record
from gateway.intercept.rewriter import StreamError, TurnResult
from gateway.records import PromptUsage, Record
from gateway.sse import Frame, RegionScanner, SSEFramer, named_events

# Frames a region scan lets pass unread unless the multi-turn surgery renumbers them: every
# delta and part event, and the lifecycle events the rewriter has no use for.
_PASSING = [
    "response.in_progress",
    "response.content_part.added",
    "response.content_part.done",
    "response.output_text.delta",
    "response.output_text.done",
    "response.output_text.annotation.added",
    "response.refusal.delta",
    "response.refusal.done",
    "response.reasoning_summary_part.added",
    "response.reasoning_summary_part.done",
    "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.done",
    "response.reasoning_text.delta",
    "response.reasoning_text.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.custom_tool_call_input.delta",
    "response.custom_tool_call_input.done",
    "response.audio.delta",
    "response.audio.done",
    "response.audio.transcript.delta",
    "response.audio.transcript.done",
    "response.code_interpreter_call_code.delta",
    "response.code_interpreter_call_code.done",
    "response.mcp_call_arguments.delta",
    "response.mcp_call_arguments.done",
    "response.image_generation_call.partial_image",
]
# Responses event names have dots: the standard head would leave them unnamed (parsed by
# ``Frame``, dispatched by ``feed``); this one names them and finds their payload.
_PATTERNS = replace(
    named_events(ignored=[], tracked_only=_PASSING),
    head=rb"(?=event: ([a-z_.]+)\n(?:data: ([^\n]*)\n\n)?|)",
)
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})


class ResponsesStream:
    """Relays one client-visible Responses stream and extracts its records."""

    def __init__(
        self,
        interception_id: str,
        prompt: str | None,
        injected: Callable[[str], bool] | None = None,
        client_parallel_tool_calls: Any = None,
        store: bool = True,
    ) -> None:
        """``client_parallel_tool_calls``: the client's own value (None: unset), shown to it in
        the response objects when tools were injected; ``store``: False when the client asked
        for ``store: false`` (see ``InjectedTurns``)."""
        self.interception_id = interception_id
        self._prompt = prompt
        self._prompt_recorded = prompt is None
        self._injected = injected
        self._records: list[Record] = []
        # The current upstream response's id (records' msg_id), "" until it is known.
        self._response_id = ""
        self._usage_recorded = False
        self._turns: InjectedTurns | None = None
        self._scanner = _SCANNER
        if injected:
            parallel = client_parallel(client_parallel_tool_calls)
            self._turns = InjectedTurns(injected, parallel, store)
            self._scanner = _INJECTED_SCANNER
        # The region scan's flag (``ScanTarget``): every frame must be read (renumbering).
        self.scan_all = False
        # An ``error`` event, or a response that failed or stopped incomplete (see ``status``).
        self.error: StreamError | None = None
        # The current turn's terminal event was read.
        self.ended = False
        # True once the client-visible terminal event has been produced.
        self.stop_relayed = False
        # The current turn's final status ("completed", "failed", "incomplete"), "" until then.
        self.status = ""
        # The current turn's terminal was hidden (the gateway continues): whatever the upstream
        # sends after it (a ``[DONE]``) belongs to no client-visible event.
        self._dropping = False

    # -- public API -------------------------------------------------------------------------

    def feed(self, frame: Frame) -> bytes:
        """Process one upstream frame; return what the client must receive for it."""
        handler = _HANDLERS.get(frame.event)
        if handler is None:
            return self._other(frame)
        return handler(self, frame)

    def feed_chunk(self, framer: SSEFramer, chunk: bytes) -> bytes | None:
        """Frame ``chunk`` and process what it completes: the client bytes, or None if nothing."""
        region = framer.feed_region(chunk)
        if region is not None:
            return self._scanner.scan(self, region) if region else None
        frames = framer.feed(chunk)
        if not frames:
            return None
        if len(frames) == 1:
            return self.feed(frames[0])
        return b"".join([self.feed(f) for f in frames])

    def take_records(self) -> list[Record]:
        """Records produced since the last call, in order."""
        records, self._records = self._records, []
        return records

    def finish(self) -> list[Record]:
        """Close the stream (normally or not): the prompt if no response said its id.

        A response cut before its terminal event reported no usage: there is none to record.
        """
        self._record_prompt(self._response_id)
        return self.take_records()

    @property
    def next_sequence_number(self) -> int | None:
        """The sequence number an event added after the relayed ones should carry, if known."""
        turns = self._turns
        return None if turns is None or turns.identity else turns.peek_seq()

    def turn_result(self) -> TurnResult:
        """How the upstream turn that just ended ended, for the agentic loop."""
        turns = self._turns
        if turns is None or not self.ended:
            return TurnResult(stop_reason=self.status)
        calls = turns.calls(self._response_id)
        if turns.continues:
            return TurnResult(calls, (), "", turns.assistant(self._response_id), self.status)
        reason = not_run_reason(turns.client_tool, self.status)
        return TurnResult((), calls, reason, None, self.status)

    def next_turn(self) -> None:
        """Prepare for the next upstream stream of the same client-visible response."""
        assert self._turns is not None, "only available with injected tools"
        self._turns.next_turn()
        self.ended = False
        self.status = ""
        self._usage_recorded = False
        self._dropping = False

    # -- handlers ---------------------------------------------------------------------------

    def _lifecycle(self, frame: Frame) -> bytes:
        if self._dropping:
            return b""
        event = _loads(frame.data)
        response = event.get("response") if event is not None else None
        if isinstance(response, dict):
            rid = response.get("id")
            if isinstance(rid, str) and rid:
                self._response_id = rid
                self._record_prompt(rid)
        if self._turns is None or event is None:
            return frame.raw
        return self._turns.lifecycle(frame, event)

    def _item_added(self, frame: Frame) -> bytes:
        turns = self._turns
        if turns is None:
            return frame.raw
        if self._dropping:
            return b""
        event = _loads(frame.data)
        index = event.get("output_index") if event is not None else None
        if event is None or type(index) is not int:
            return self._other(frame)
        out = turns.item_added(frame, event, event.get("item"), index)
        self.scan_all = not turns.identity
        return out

    def _item_done(self, frame: Frame) -> bytes:
        if self._dropping:
            return b""
        event = _loads(frame.data)
        if event is None:
            return frame.raw
        item = event.get("item")
        item_records(self.interception_id, self._response_id, item, self._injected, self._records)
        turns = self._turns
        index = event.get("output_index")
        if turns is None:
            return frame.raw
        if type(index) is not int:
            return turns.renumber(frame, event)
        return turns.item_done(frame, event, item, index)

    def _terminal(self, frame: Frame) -> bytes:
        if self._dropping:
            return b""
        event = _loads(frame.data)
        response = event.get("response") if event is not None else None
        response = response if isinstance(response, dict) else {}
        rid = response.get("id")
        if isinstance(rid, str) and rid:
            self._response_id = rid
        self._record_prompt(self._response_id)
        if not self._usage_recorded:
            self._usage_recorded = True
            usage = response.get("usage")
            self._records.append(usage_record(self.interception_id, self._response_id, usage))
        kind = frame.event
        status = response.get("status")
        self.status = status if isinstance(status, str) else kind.removeprefix("response.")
        if kind == "response.failed":
            self.error = failure(response)
        elif kind == "response.incomplete":
            self.error = incompleteness(response)
        self.ended = True
        turns = self._turns
        if turns is None or event is None:
            self.stop_relayed = True
            return frame.raw
        out = turns.terminal(frame, event, response)
        self.stop_relayed = not turns.continues
        self._dropping = turns.continues
        return out

    def _error(self, frame: Frame) -> bytes:
        if self._dropping:
            return b""
        event = _loads(frame.data)
        self.error = _reported(event, frame.data)
        if self._turns is None or event is None:
            return frame.raw
        return self._turns.renumber(frame, event)

    def _other(self, frame: Frame) -> bytes:
        if self._dropping:
            return b""
        if not frame.event:
            # No ``event:`` line (OpenAI-compatible upstreams): the SDKs dispatch on the JSON
            # ``type``, so does the gateway. Only these frames pay for it.
            named = _named(frame)
            if named is not None:
                return _HANDLERS[named.event](self, named)
        if not self.scan_all:
            return frame.raw
        assert self._turns is not None
        event = _loads(frame.data)
        if event is None:
            return frame.raw
        return self._turns.renumber(frame, event)

    def _record_prompt(self, response_id: str) -> None:
        if not self._prompt_recorded and self._prompt is not None:
            self._records.append(PromptUsage(self.interception_id, response_id, self._prompt))
            self._prompt_recorded = True


class _Named(Frame):
    """A frame without an ``event:`` line, named by its JSON ``type``."""

    __slots__ = ()

    def __init__(self, frame: Frame, name: str) -> None:
        super().__init__(frame.raw, frame.data)
        self._event = name


def _named(frame: Frame) -> Frame | None:
    """``frame`` named by its JSON ``type`` when that is an event the rewriter reads."""
    event = _loads(frame.data)
    kind = event.get("type") if event is not None else None
    # A hostile ``type`` may be any JSON value: only a known name (a string) is looked up.
    if isinstance(kind, str) and kind in _HANDLERS:
        return _Named(frame, kind)
    return None


def _reported(event: dict[str, Any] | None, data: bytes) -> StreamError:
    """An ``error`` event's type and message: flat (``code``, ``message``, as the SDK's
    ``ResponseErrorEvent``) or nested under ``error`` (both are seen in real streams)."""
    if event is None:
        return StreamError("error", data[:200].decode("utf-8", "replace"))
    nested = event.get("error")
    source = nested if isinstance(nested, dict) else event
    kind = source.get("code") or (source.get("type") if source is nested else None)
    message = source.get("message")
    return StreamError(
        kind if isinstance(kind, str) and kind else "error",
        message if isinstance(message, str) else "",
    )


_HANDLERS: dict[str, Callable[[ResponsesStream, Frame], bytes]] = {
    "response.created": ResponsesStream._lifecycle,
    "response.in_progress": ResponsesStream._lifecycle,
    "response.queued": ResponsesStream._lifecycle,
    "response.output_item.added": ResponsesStream._item_added,
    "response.output_item.done": ResponsesStream._item_done,
    "response.completed": ResponsesStream._terminal,
    "response.failed": ResponsesStream._terminal,
    "response.incomplete": ResponsesStream._terminal,
    "error": ResponsesStream._error,
}
# The same, keyed by the event name's bytes, for the region scan; any other named frame goes
# to ``feed``.
_BY_NAME = {name.encode(): h for name, h in _HANDLERS.items()}
_SCANNER = RegionScanner(_PATTERNS, _BY_NAME)
# With injected tools ``response.in_progress`` is read too: its response object echoes them.
_INJECTED_SCANNER = RegionScanner(
    replace(
        named_events(ignored=[], tracked_only=[e for e in _PASSING if e != "response.in_progress"]),
        head=_PATTERNS.head,
    ),
    _BY_NAME,
)


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
