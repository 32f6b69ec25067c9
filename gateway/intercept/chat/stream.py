"""Chat Completions stream rewriter: a pure state machine fed with SSE chunks.

Every chunk is a ``data:`` line holding a ``chat.completion.chunk`` whose ``id`` the client must
see as the interception id; ``data: [DONE]`` ends the stream. Without injected tools the bulk of a
stream (text deltas) needs no parsing: once the first chunk taught the rewriter the exact bytes
that open each chunk (``data: {"id":"chatcmpl-..."``), a run of whole chunks that all open so and
hold no ``"tool_calls"``, no ``"error"`` and no usage but ``"usage":null`` is rewritten by one
``bytes.replace``: a few byte searches in C, no Python per chunk. Only the chunks that matter are
parsed: the first, tool-call fragments (to record the calls), the usage chunk (to record it, and
to hide it from a client that did not ask for it: the gateway always does), errors and
``[DONE]`` (which do not open with the id). Each search is a necessary condition: JSON escapes
the quotes of a string, so text content cannot fake a key; a false alarm only costs a parse
(``gateway.intercept.chat.chunks``). A provider whose id is not the first key (Azure sorts its
keys) has its ``"id":"..."`` bytes replaced where they are, when each chunk holds them once; one
that spaces its JSON has its null usage keys found however spelt.

With injected tools one client-visible stream may span several upstream turns, and every chunk
is parsed: injected calls are hidden, visible calls keep coherent ``index`` values, and between
turns the client sees no finish chunk, no usage chunk, no ``[DONE]`` and no second ``role``. The
last turn's usage chunk carries the totals over the turns. A key is never added to a chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.intercept.chat.calls import TurnCalls, not_run_reason
from gateway.intercept.chat.chunks import (
    ANY_MARKERS,
    CHOICES,
    MARKERS,
    NULL_USAGE,
    empty_choice,
    hide_any_null_usage,
    id_bytes,
    reported_error,
)
from gateway.intercept.chat.tools import assistant_message
from gateway.intercept.chat.usage import ChatUsage, add_usage, apply_totals
from gateway.intercept.rewriter import StreamError, TurnResult
from gateway.records import PromptUsage, Record
from gateway.sse import Frame, SSEFramer


class ChatStream:
    """Rewrites one client-visible Chat Completions stream and extracts its records."""

    def __init__(
        self,
        interception_id: str,
        prompt: str | None,
        injected: Callable[[str], bool] | None = None,
        client_usage: bool = True,
    ) -> None:
        """``client_usage``: whether the client asked for the usage chunk itself."""
        self.interception_id = interception_id
        self._quoted_iid = orjson.dumps(interception_id)
        self._prompt = prompt
        self._prompt_recorded = prompt is None
        self._injected = injected
        self._client_usage = client_usage
        # The provider spells its null usage otherwise than NULL_USAGE (learnt from a parsed
        # chunk): the fast path lets any spelling through (ANY_MARKERS), removed by a regex.
        self._spelt_otherwise = False
        self._markers = MARKERS
        self._records: list[Record] = []
        self.error: StreamError | None = None
        # True once the client-visible ``data: [DONE]`` has been produced.
        self.stop_relayed = False
        # How many upstream turns came before the current one.
        self.turn = 0
        # Next client-visible tool-call index per choice, across turns.
        self._next_client: dict[int, int] = {}
        # Usage summed over the ended turns, in the provider's shape (for the client).
        self._totals: dict[str, Any] = {}
        self._start_turn()

    def _start_turn(self) -> None:
        # The turn's upstream id: None until its first chunk is read.
        self._msg_id: str | None = None
        # The bytes opening each chunk of the turn, and their rewrite (fast path), if known.
        self._old: bytes | None = None
        self._new = b""
        # Whether ``_old`` is the id's key and value inside a chunk, not the chunk's opening.
        self._loose = False
        # The bytes opening a plain chunk of the turn up to its choices (see _learn_head).
        self._head: bytes | None = None
        self._usage = ChatUsage()
        self._turn_usage: dict[str, Any] = {}
        self._calls = TurnCalls(self._injected, self._next_client)
        self._content: list[str] = []
        self._choices: set[int] = set()
        # choices[0].finish_reason, "" until seen.
        self.stop_reason = ""
        # The turn stopped to have injected tools run: its end stays hidden.
        self.continues = False
        self._done = False
        self._ended = False

    # -- public API -------------------------------------------------------------------------

    def feed_chunk(self, framer: SSEFramer, chunk: bytes) -> bytes | None:
        """Frame ``chunk`` and process what it completes: the client bytes, or None if nothing."""
        region = framer.feed_region(chunk)
        if region is None:
            frames = framer.feed(chunk)
            return self.feed_all(frames) if frames else None
        if not region:
            return None
        old = self._old
        # The usual chunk, one frame of one ``data:`` line (its first line feed ends it): the
        # frame path below gives what the region path would.
        if region.find(b"\n") == len(region) - 2 and region.startswith(b"data: "):
            if old is not None:
                head = self._head
                if head is not None and region.startswith(head):
                    # The bytes before were searched in an earlier chunk.
                    if self._markers.search(region, len(head)) is None:
                        out = self._new + region[len(old) :]
                        if self._client_usage:
                            return out
                        out = out.replace(NULL_USAGE, b"")
                        return hide_any_null_usage(out) if self._spelt_otherwise else out
                    return self._data(region, region[6:-2])
                if region.startswith(old) or region.find(old) < 0:
                    return self._frame(region, None)
            else:
                return self._data(region, region[6:-2])
        if old is not None and self._markers.search(region) is None:
            n = region.count(old)
            # Each chunk opens with the known bytes (content cannot hold a raw newline).
            if n == region.count(b"\ndata:") + region.startswith(b"data:"):
                out = region.replace(old, self._new) if n else region
                return out if self._client_usage else self._hide_null_usage(out)
        # Frame by frame, cut as SSEFramer would (the region has no carriage return).
        pieces = []
        pos = 0
        while pos < len(region):
            end = region.find(b"\n\n", pos) + 2
            pieces.append(self._frame(region[pos:end], None))
            pos = end
        return b"".join(pieces)

    def _hide_null_usage(self, out: bytes) -> bytes:
        """``out`` without its null usage keys, for a client that did not ask for usage."""
        out = out.replace(NULL_USAGE, b"")
        return hide_any_null_usage(out) if self._spelt_otherwise else out

    def _learn_head(self, raw: bytes, old: bytes) -> None:
        """Keep the bytes of a plain chunk up to its ``choices``: the provider repeats them in
        the next chunks (object, created, model...), whose search may then start after them.
        No marker can straddle the end of the head: it ends in '['."""
        i = raw.find(b'"choices":[', len(old))
        if i > 0:
            self._head = raw[: i + 11]
        elif (spaced := CHOICES.search(raw, len(old))) is not None:
            self._head = raw[: spaced.end()]

    def feed_all(self, frames: list[Frame]) -> bytes:
        """Process frames in order and return the client bytes for all of them, joined."""
        if len(frames) == 1:
            return self.feed(frames[0])
        return b"".join([self.feed(f) for f in frames])

    def feed(self, frame: Frame) -> bytes:
        """Process one upstream frame; return what the client must receive for it."""
        return self._frame(frame.raw, frame)

    def _frame(self, raw: bytes, frame: Frame | None) -> bytes:
        """``feed`` of the frame ``raw`` (``frame``, when there is one, knows its data)."""
        old = self._old
        if old is not None and raw.startswith(old):
            head = self._head
            start = len(head) if head is not None and raw.startswith(head) else 0
            # From ``start``: the bytes before were searched in an earlier chunk.
            if self._markers.search(raw, start) is None:
                if head is None:
                    self._learn_head(raw, old)
                out = self._new + raw[len(old) :]
                return out if self._client_usage else self._hide_null_usage(out)
        elif (
            self._loose
            and old is not None
            and raw.count(old) == 1
            and self._markers.search(raw) is None
        ):
            out = raw.replace(old, self._new)
            return out if self._client_usage else self._hide_null_usage(out)
        if frame is not None:
            data = frame.data
        elif raw.find(b"\n") == len(raw) - 2 and raw.startswith(b"data: "):
            data = raw[6:-2]  # what Frame.data gives for one line
        else:
            data = Frame(raw).data
        return self._data(raw, data)

    def _data(self, raw: bytes, data: bytes) -> bytes:
        """Process one frame, not of the fast path, from its raw bytes and its data payload."""
        if not data:
            return raw  # a comment (keep-alive) or an empty event
        if data == b"[DONE]":
            return self._on_done(raw)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return raw
        if not isinstance(obj, dict):
            return raw
        return self._chunk(raw, obj)

    def take_records(self) -> list[Record]:
        """Records produced since the last call, in order."""
        records, self._records = self._records, []
        return records

    def finish(self) -> list[Record]:
        """Close the stream (normally or not): the records of a cut turn, the prompt."""
        self._end_turn()
        self._record_prompt("")
        return self.take_records()

    def turn_result(self) -> TurnResult:
        """How the upstream turn that just ended ended, for the agentic loop."""
        msg_id = self._msg_id or ""
        injected = self._calls.injected
        if self.continues and self._done:
            assistant = assistant_message("".join(self._content), injected)
            calls = [slot.tool_call(msg_id) for slot in injected]
            return TurnResult(calls, (), "", assistant, self.stop_reason)
        skipped = [slot.tool_call(msg_id) for slot in injected]
        reason = ""
        if skipped:
            reason = not_run_reason(bool(self._calls.client), len(self._choices), self.stop_reason)
        return TurnResult((), skipped, reason, None, self.stop_reason)

    def next_turn(self) -> None:
        """Prepare for the next upstream stream of the same client-visible stream."""
        assert self._injected is not None, "only available with injected tools"
        self._end_turn()
        self.turn += 1
        self._start_turn()

    # -- chunks -----------------------------------------------------------------------------

    def _chunk(self, raw: bytes, obj: dict[str, Any]) -> bytes:
        # The SDKs' rule: a chunk whose ``error`` is truthy fails the stream, even one that
        # carries choices too (OpenRouter ends so, on finish_reason "error"); a null one is
        # nothing.
        failed = obj.get("error")
        if failed:
            self.error = reported_error(failed)
            if "choices" not in obj:
                return raw
        chunk_id = obj.get("id")
        if self._msg_id is None and type(chunk_id) is str and chunk_id:
            # Azure opens with a chunk of id "" (its prompt filter results): not the turn's.
            self._first_chunk(raw, chunk_id)
        changed = False
        choices = obj.get("choices")
        had_choices = False
        if isinstance(choices, list) and choices:
            had_choices = True
            changed = self._read_choices(choices)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage.update(usage)
            if self._injected is not None:
                # Only an agentic loop sums usage over turns.
                self._turn_usage = {}
                add_usage(self._turn_usage, usage)
            if not choices and not failed and (self.continues or not self._client_usage):
                return b""  # the usage-only chunk of a hidden turn end, or one nobody asked for
            if self.turn and not self.continues:
                totals: dict[str, Any] = {}
                add_usage(totals, self._totals)
                add_usage(totals, usage)
                apply_totals(usage, totals)
                changed = True
        elif had_choices and not choices and not failed:
            return b""  # nothing of it is left for the client
        elif usage is None and "usage" in obj:
            if not self._spelt_otherwise and NULL_USAGE not in raw:
                self._spelt_otherwise = True
                self._markers = ANY_MARKERS
            if not self._client_usage:
                # There because the gateway asked for usage: a client that did not never sees it.
                if not changed:
                    shown = self._swap_id(raw, chunk_id, obj)
                    hidden = self._hide_null_usage(shown)
                    if len(hidden) < len(shown):
                        return hidden
                del obj["usage"]
                return self._encode(raw, obj)
        if not changed:
            return self._swap_id(raw, chunk_id, obj)
        return self._encode(raw, obj)

    def _read_choices(self, choices: list[Any]) -> bool:
        """Track the choices' deltas; edit them in place for the client; whether any changed."""
        injecting = self._injected is not None
        changed = False
        kept = []
        for choice in choices:
            if not isinstance(choice, dict):
                kept.append(choice)
                continue
            index = choice.get("index")
            index = index if type(index) is int else 0
            self._choices.add(index)
            edited = False
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if injecting:
                    content = delta.get("content")
                    if index == 0 and isinstance(content, str):
                        self._content.append(content)
                    # The SDKs concatenate every string of a delta: a second role would
                    # read "assistantassistant".
                    if self.turn and "role" in delta:
                        del delta["role"]
                        edited = True
                fragments = delta.get("tool_calls")
                if isinstance(fragments, list) and fragments:
                    edited = self._tool_fragments(index, delta, fragments) or edited
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish and index == 0:
                self.stop_reason = finish
                if injecting and self._stops_for_injected(finish):
                    self.continues = True
                    choice["finish_reason"] = None
                    edited = True
            if edited:
                changed = True
                if empty_choice(choice):
                    continue
            kept.append(choice)
        if len(kept) != len(choices):
            choices[:] = kept
        return changed

    def _tool_fragments(self, choice: int, delta: dict[str, Any], fragments: list[Any]) -> bool:
        renumber = self._injected is not None
        changed = False
        kept = []
        for fragment in fragments:
            if not isinstance(fragment, dict):
                kept.append(fragment)
                continue
            slot = self._calls.delta(choice, fragment)
            if slot.injected:
                changed = True
                continue
            if renumber and "index" in fragment and fragment["index"] != slot.client_index:
                fragment["index"] = slot.client_index
                changed = True
            kept.append(fragment)
        if len(kept) != len(fragments):
            if kept:
                delta["tool_calls"] = kept
            else:
                del delta["tool_calls"]
        return changed

    def _stops_for_injected(self, finish: str) -> bool:
        """Whether the turn stopped to have injected tools, and only those, run."""
        calls = self._calls
        return (
            finish == "tool_calls"
            and self.error is None
            and bool(calls.injected)
            and not calls.client
            and len(self._choices) == 1
        )

    def _on_done(self, raw: bytes) -> bytes:
        self._done = True
        self._end_turn()
        if self.continues:
            return b""
        self.stop_relayed = True
        return raw

    # -- helpers ----------------------------------------------------------------------------

    def _first_chunk(self, raw: bytes, msg_id: str) -> None:
        """Take the turn's id from its first chunk that has one; learn the fast path's bytes."""
        self._msg_id = msg_id
        self._record_prompt(msg_id)
        if self._injected is None:
            learnt = id_bytes(raw, msg_id, self._quoted_iid)
            if learnt is not None:
                self._old, self._new, self._loose = learnt

    def _swap_id(self, raw: bytes, chunk_id: Any, obj: dict[str, Any]) -> bytes:
        """``raw`` with its id's bytes replaced, every other byte kept."""
        if not isinstance(chunk_id, str):
            return raw
        quoted = orjson.dumps(chunk_id)
        i = raw.find(quoted)
        end = i + len(quoted)
        if i < 0 or raw.find(quoted, end) >= 0:
            # Spelt otherwise in the bytes (escapes), or ambiguous: re-encode.
            return self._encode(raw, obj)
        return b"".join((raw[:i], self._quoted_iid, raw[end:]))

    def _encode(self, raw: bytes, obj: dict[str, Any]) -> bytes:
        """An edited chunk, its id (if it has one) the interception's; ``raw`` as it came if
        it nests too deep to encode, rather than the stream cut."""
        if "id" in obj:
            obj["id"] = self.interception_id
        try:
            return b"data: " + orjson.dumps(obj) + b"\n\n"
        except TypeError:  # nested deeper than orjson writes (255 levels)
            return raw

    def _end_turn(self) -> None:
        """Record the turn's client tool calls and usage, once."""
        if self._ended:
            return
        self._ended = True
        msg_id = self._msg_id or ""
        # A turn whose chunks had no id: its prompt is still recorded before its usage.
        self._record_prompt(msg_id)
        iid = self.interception_id
        if self._calls.slots:
            self._records.extend(slot.usage(iid, msg_id) for slot in self._calls.client)
        if self._usage.reported:
            self._records.append(self._usage.record(iid, msg_id))
            if self._turn_usage:
                add_usage(self._totals, self._turn_usage)

    def _record_prompt(self, msg_id: str) -> None:
        if not self._prompt_recorded and self._prompt is not None:
            self._records.append(PromptUsage(self.interception_id, msg_id, self._prompt))
            self._prompt_recorded = True
