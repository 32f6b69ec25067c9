"""Unit tests for gateway.intercept.messages.stream: the Anthropic stream rewriter (bytes only)."""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from typing import Any, cast

import orjson
import pytest
from anthropic._models import construct_type
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jiter import from_json

from gateway.intercept.messages.rewrite_id import replace_id
from gateway.intercept.messages.stream import MessagesStream
from gateway.intercept.rewriter import StreamError
from gateway.records import ModelThought, PromptUsage, Record, TokenUsage, ToolUsage
from gateway.sse import Frame, SSEFramer, encode
from gateway.testing import load_txtar
from tests.conftest import FIXTURES, recorded_sse_streams

IID = "intc_0123456789abcdef"
PROMPT = "the user's last prompt"
_SDK_EVENTS = frozenset(
    {
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    }
)


STREAMS = recorded_sse_streams()
STREAM_IDS = [name for name, _ in STREAMS]


def _frames(data: bytes) -> list[Frame]:
    framer = SSEFramer()
    frames = framer.feed(data)
    rest = framer.flush()
    if rest is not None:
        frames.append(rest)
    return frames


def _msg_id(frames: list[Frame]) -> str:
    start = next(f for f in frames if f.event == "message_start")
    return str(orjson.loads(start.data)["message"]["id"])


def _run(
    frames: list[Frame], prompt: str | None = PROMPT, iid: str = IID
) -> tuple[MessagesStream, bytes, list[Record]]:
    stream = MessagesStream(iid, prompt)
    out = bytearray()
    records: list[Record] = []
    for frame in frames:
        out += stream.feed(frame)
        records.extend(stream.take_records())
    records.extend(stream.finish())
    return stream, bytes(out), records


def _of(records: list[Record], cls: type[Any]) -> list[Any]:
    return [r for r in records if isinstance(r, cls)]


def _oracle(frames: list[Frame]) -> Any:
    """The Anthropic SDK's own accumulation of the stream (the final message snapshot)."""
    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    for frame in frames:
        if frame.event not in _SDK_EVENTS:
            continue
        event = cast(
            RawMessageStreamEvent,
            construct_type(type_=RawMessageStreamEvent, value=orjson.loads(frame.data)),
        )
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    return snapshot


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return encode(name, orjson.dumps(payload))


def _message_start(msg_id: str, usage: dict[str, Any]) -> dict[str, Any]:
    """A ``message_start`` payload: an empty assistant message."""
    return {
        "type": "message_start",
        "message": {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        },
    }


def _tiny_stream(msg_id: str, start_usage: dict[str, Any], delta_usage: dict[str, Any]) -> bytes:
    return b"".join(
        [
            _event("message_start", _message_start(msg_id, start_usage)),
            _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "hi"},
                },
            ),
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": delta_usage,
                },
            ),
            _event("message_stop", {"type": "message_stop"}),
        ]
    )


# -- bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
def test_output_equals_input_except_id(name: str, data: bytes) -> None:
    frames = _frames(data)
    msg_id = _msg_id(frames)
    _, out, records = _run(frames)
    quoted = orjson.dumps(msg_id)
    assert data.count(quoted) == 1
    assert out == data.replace(quoted, orjson.dumps(IID))
    assert [u.msg_id for u in _of(records, TokenUsage)] == [msg_id]


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
def test_crlf_stream_output_equals_input_except_id(name: str, data: bytes) -> None:
    crlf = data.replace(b"\n", b"\r\n")
    frames = _frames(crlf)
    msg_id = _msg_id(frames)
    _, out, _ = _run(frames)
    assert out == crlf.replace(orjson.dumps(msg_id), orjson.dumps(IID))


def _untimed(records: list[Record]) -> list[dict[str, Any]]:
    return [{**dataclasses.asdict(r), "created_at": 0.0} for r in records]


def _relay_chunks(
    chunks: list[bytes], injected: Any = None
) -> tuple[MessagesStream, bytes, list[Record]]:
    """Feed chunks through the relay's entry point (whole-frame fast path, else frame by frame)."""
    stream = MessagesStream(IID, PROMPT, injected)
    framer = SSEFramer()
    out = bytearray()
    records: list[Record] = []
    for chunk in chunks:
        out += stream.feed_chunk(framer, chunk) or b""
        records.extend(stream.take_records())
    # Fed like ``_frames`` does, to compare with it (the relay drops these: a cut event).
    rest = framer.flush()
    if rest is not None:
        out += stream.feed(rest)
    records.extend(stream.finish())
    return stream, bytes(out), records


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=30))
def test_whole_frame_fast_path_matches_frame_by_frame(
    name: str, data: bytes, cuts: list[int]
) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    chunks = [data[a:b] for a, b in pairwise(bounds)]
    expected_stream, expected_out, expected_records = _run(_frames(data))
    stream, out, records = _relay_chunks(chunks)
    assert out == expected_out
    assert _untimed(records) == _untimed(expected_records)
    assert stream.message_stopped == expected_stream.message_stopped
    assert stream.error == expected_stream.error
    # Events one per chunk, as a provider sends them: same again.
    _, out, records = _relay_chunks([f.raw for f in _frames(data)])
    assert (out, _untimed(records)) == (expected_out, _untimed(expected_records))


def test_fast_path_skips_nothing_it_must_see() -> None:
    """Deltas of a thinking block are recorded even when they arrive in one chunk."""
    chunk = b"".join(
        [
            b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
            b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n',
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            b'"content_block":{"type":"thinking","thinking":""}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"thinking_delta","thinking":"hmm"}}\n\n',
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
            b'event: message_delta\ndata: {"type":"message_delta","delta":{},'
            b'"usage":{"output_tokens":9}}\n\n',
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        ]
    )
    _, out, records = _relay_chunks([chunk])
    assert out == chunk.replace(b'"msg_1"', orjson.dumps(IID))
    assert [(t.msg_id, t.content) for t in _of(records, ModelThought)] == [("msg_1", "hmm")]
    assert [(u.input, u.output) for u in _of(records, TokenUsage)] == [(3, 9)]


_MSG_START = (
    b'data: {"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":3,'
    b'"output_tokens":1,"cache_creation":{"ephemeral_5m_input_tokens":2}}}}'
)
_THINKING_START = (
    b'data: {"type":"content_block_start","index":1,'
    b'"content_block":{"type":"thinking","thinking":""}}'
)
_TOOL_START = (
    b'data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use",'
    b'"id":"toolu_1","name":"add","input":{}}}'
)
# Frames of every kind, standard and odd (names with trailing spaces, no space after the colon,
# data before the event line, comments, several data lines, blank-line runs): the whole-frame
# fast path must treat each exactly as frame-by-frame feeding does.
_ODD_FRAMES = [
    b"event: message_start\n" + _MSG_START + b"\n\n",
    b"event: message_start \n" + _MSG_START + b"  \n\n",
    b": hello\nevent: message_start\n" + _MSG_START + b"\n\n",
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n',
    b"event: content_block_start\n" + _THINKING_START + b"\n\n",
    b"event:content_block_start\n" + _THINKING_START + b"\n\n",
    b"event: content_block_start\n" + _TOOL_START + b"\n\n",
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"thinking_delta","thinking":"hmm"}}\n\n',
    b'event: content_block_delta \ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"thinking_delta","thinking":"odd"}}\n\n',
    b'data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta",'
    b'"partial_json":"{\\"a\\":"}}\nevent: content_block_delta\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,\n'
    b'data: "delta":{"type":"input_json_delta","partial_json":"1}"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":2}   \n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: ping\ndata: {"type": "ping"}\n\n',
    b"event: ping \n\n",
    b": keep-alive\n\n",
    b"\n",
    b"event: ping",
    b"event: content_block_delta\n\n",
    b'event: unknown\ndata: {"type":"unknown"}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{},'
    b'"usage":{"output_tokens":9,"input_tokens":true}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":12}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    b'data: {"type":"message_stop"}\nevent: message_stop\n\n',
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
    b'"message":"busy"}}\n\n',
    b"event: error\ndata: not json\n\n",
]


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.integers(min_value=0, max_value=len(_ODD_FRAMES) - 1), max_size=24),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=6),
    injected=st.booleans(),
)
def test_fast_path_matches_frame_by_frame_on_odd_frames(
    picks: list[int], cuts: list[int], injected: bool
) -> None:
    data = b"".join(_ODD_FRAMES[i] for i in picks)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in pairwise([0, *points, len(data)])]
    tools = (lambda name: name == "add") if injected else None
    expected = MessagesStream(IID, PROMPT, tools)
    expected_out = bytearray()
    expected_records: list[Record] = []
    for frame in _frames(data):
        expected_out += expected.feed(frame)
        expected_records.extend(expected.take_records())
    expected_records.extend(expected.finish())
    for pieces in ([data], chunks):
        stream, out, records = _relay_chunks(pieces, tools)
        assert out == expected_out
        assert _untimed(records) == _untimed(expected_records)
        assert stream.message_stopped == expected.message_stopped
        assert stream.error == expected.error


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"id":"msg_1","x":1}', b'{"id":"NEW","x":1}'),
        (b'{"id":"msg_1","x":"msg_1"}', None),
        (b'{"id":"msg_2"}', None),
        (b'{"id":"a\\"","x":"a\\"a\\""}', None),
        # Occurrences overlapping the first do not count (like ``bytes.count``).
        (b'"a\\""a\\""', b'"NEW"a\\""'),
    ],
)
def test_replace_id(raw: bytes, expected: bytes | None) -> None:
    old = "msg_1" if b"msg_" in raw else 'a"'
    assert replace_id(raw, old, "NEW") == expected
    quoted = orjson.dumps(old)
    if raw.count(quoted) == 1:
        assert expected == raw.replace(quoted, b'"NEW"', 1)


# -- records against the SDK oracle -----------------------------------------------------------


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
def test_records_match_sdk_accumulator(name: str, data: bytes) -> None:
    frames = _frames(data)
    msg_id = _msg_id(frames)
    snapshot = _oracle(frames)
    _, _, records = _run(frames)

    for record in records:
        assert record.interception_id == IID

    (usage,) = _of(records, TokenUsage)
    sdk = snapshot.usage
    assert usage.msg_id == msg_id
    assert usage.input == sdk.input_tokens
    assert usage.output == sdk.output_tokens
    assert usage.cache_read == (sdk.cache_read_input_tokens or 0)
    assert usage.cache_write == (sdk.cache_creation_input_tokens or 0)
    split = sdk.cache_creation
    assert usage.cache_write_5m == (split.ephemeral_5m_input_tokens if split else 0)
    assert usage.cache_write_1h == (split.ephemeral_1h_input_tokens if split else 0)

    (prompt,) = _of(records, PromptUsage)
    assert (prompt.msg_id, prompt.prompt) == (msg_id, PROMPT)

    tools = [b for b in snapshot.content if b.type == "tool_use"]
    got_tools = _of(records, ToolUsage)
    assert [(t.tool, t.tool_call_id) for t in got_tools] == [(b.name, b.id) for b in tools]
    for got, block in zip(got_tools, tools, strict=True):
        assert got.msg_id == msg_id
        # The record keeps the arguments as streamed: cut by max_tokens, they are a prefix,
        # which the SDK reads in partial mode.
        assert from_json(got.args.encode(), partial_mode=True) == block.input
        assert not got.injected

    thoughts = [b.thinking for b in snapshot.content if b.type == "thinking"]
    got_thoughts = _of(records, ModelThought)
    assert [t.content for t in got_thoughts] == thoughts
    assert all(t.msg_id == msg_id for t in got_thoughts)


def test_fixture_expectations() -> None:
    """Pin a few oracle values so a broken fixture or oracle cannot hide a regression."""
    streams = dict(STREAMS)
    _, _, records = _run(_frames(streams["cache_tokens"]))
    (usage,) = _of(records, TokenUsage)
    assert (usage.input, usage.output, usage.cache_read, usage.cache_write) == (24, 119, 2210, 2709)
    assert (usage.cache_write_5m, usage.cache_write_1h) == (1175, 1534)

    _, _, records = _run(_frames(streams["parallel_tools"]))
    assert [t.tool for t in _of(records, ToolUsage)] == ["get_weather", "get_local_time"]
    assert len(_of(records, ModelThought)) == 1

    _, _, records = _run(_frames(streams["client_tool"]))
    (tool,) = _of(records, ToolUsage)
    assert orjson.loads(tool.args) == {"location": "Lisbon, Portugal", "unit": "celsius"}

    _, _, records = _run(_frames(streams["long_stream"]))
    (usage,) = _of(records, TokenUsage)
    assert usage.output == 1500


def test_output_tokens_not_double_counted() -> None:
    data = _tiny_stream("msg_tiny", {"input_tokens": 9, "output_tokens": 5}, {"output_tokens": 61})
    frames = _frames(data)
    _, out, records = _run(frames)
    assert out == data.replace(b'"msg_tiny"', orjson.dumps(IID))
    (usage,) = _of(records, TokenUsage)
    assert usage.output == 61
    assert usage.input == 9
    assert usage.output == _oracle(frames).usage.output_tokens


def test_message_delta_updates_input_and_cache_fields() -> None:
    data = _tiny_stream(
        "msg_cache",
        {
            "input_tokens": 3,
            "output_tokens": 1,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        },
        {
            "input_tokens": 24,
            "output_tokens": 119,
            "cache_read_input_tokens": 2210,
            "cache_creation_input_tokens": 2709,
        },
    )
    frames = _frames(data)
    _, _, records = _run(frames)
    (usage,) = _of(records, TokenUsage)
    assert (usage.input, usage.output, usage.cache_read, usage.cache_write) == (24, 119, 2210, 2709)
    sdk = _oracle(frames).usage
    assert (usage.input, usage.cache_read, usage.cache_write) == (
        sdk.input_tokens,
        sdk.cache_read_input_tokens,
        sdk.cache_creation_input_tokens,
    )


def test_message_delta_without_input_keeps_message_start_values() -> None:
    data = _tiny_stream(
        "msg_keep",
        {"input_tokens": 40, "output_tokens": 1, "cache_read_input_tokens": 7},
        {"output_tokens": 12},
    )
    _, _, records = _run(_frames(data))
    (usage,) = _of(records, TokenUsage)
    assert (usage.input, usage.output, usage.cache_read) == (40, 12, 7)


# -- cut streams, errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
def test_finish_after_cut_stream(name: str, data: bytes) -> None:
    frames = _frames(data)
    half = frames[: len(frames) // 2]
    assert half[0].event == "message_start"
    assert all(f.event != "message_stop" for f in half)
    msg_id = _msg_id(frames)
    start_usage = orjson.loads(half[0].data)["message"]["usage"]

    stream = MessagesStream(IID, PROMPT)
    out = stream.feed_all(half)
    assert out == b"".join(f.raw for f in half).replace(orjson.dumps(msg_id), orjson.dumps(IID))
    records = stream.take_records() + stream.finish()

    (usage,) = _of(records, TokenUsage)
    assert usage.msg_id == msg_id
    assert usage.input == start_usage["input_tokens"]
    assert usage.output == start_usage["output_tokens"]
    assert usage.cache_read == start_usage["cache_read_input_tokens"]
    assert usage.cache_write == start_usage["cache_creation_input_tokens"]
    (prompt,) = _of(records, PromptUsage)
    assert (prompt.msg_id, prompt.prompt) == (msg_id, PROMPT)
    assert not stream.message_stopped
    # A second finish records nothing more.
    assert stream.finish() == []


def test_finish_cut_inside_tool_use_records_partial_call() -> None:
    frames = _frames(dict(STREAMS)["client_tool"])
    cut = next(
        i
        for i, f in enumerate(frames)
        if f.event == "content_block_delta" and b"input_json_delta" in f.data and b"Lis" in f.data
    )
    stream = MessagesStream(IID, PROMPT)
    stream.feed_all(frames[: cut + 1])
    records = stream.take_records() + stream.finish()
    (tool,) = _of(records, ToolUsage)
    assert tool.tool == "get_weather"
    assert tool.tool_call_id == "toolu_01hCmYemQf7lFpojbWVnTdbx"
    assert tool.args == '{"location": "Lis'
    assert len(_of(records, TokenUsage)) == 1


def test_finish_without_any_message() -> None:
    stream = MessagesStream(IID, PROMPT)
    assert stream.feed(Frame(b": keep-alive\n\n")) == b": keep-alive\n\n"
    records = stream.finish()
    assert len(records) == 1
    (prompt,) = _of(records, PromptUsage)
    assert (prompt.msg_id, prompt.prompt) == ("", PROMPT)


def test_no_prompt_record_without_prompt() -> None:
    _, _, records = _run(_frames(dict(STREAMS)["text"]), prompt=None)
    assert _of(records, PromptUsage) == []
    assert len(_of(records, TokenUsage)) == 1


def test_error_event_sets_error_and_is_relayed_verbatim() -> None:
    data = dict(STREAMS)["mid_stream_error"]
    frames = _frames(data)
    error_frame = frames[-1]
    assert error_frame.event == "error"
    stream, out, records = _run(frames)
    assert stream.error == StreamError("overloaded_error", "Overloaded")
    assert out.endswith(error_frame.raw)
    assert out == data.replace(orjson.dumps(_msg_id(frames)), orjson.dumps(IID))
    (usage,) = _of(records, TokenUsage)
    assert (usage.input, usage.output) == (14, 1)
    assert len(_of(records, PromptUsage)) == 1


def test_error_event_with_unparseable_data() -> None:
    stream = MessagesStream(IID, None)
    raw = b"event: error\ndata: upstream exploded\n\n"
    assert stream.feed(Frame(raw)) == raw
    assert stream.error is not None
    assert stream.error.type == "error"
    assert "upstream exploded" in stream.error.message


# -- id rewrite fallback ----------------------------------------------------------------------


def test_id_twice_falls_back_to_reencode_keeping_other_keys() -> None:
    msg_id = "msg_dup"
    payload = _message_start(msg_id, {"input_tokens": 3, "output_tokens": 1})
    payload["message"]["metadata"] = {"echo": msg_id}
    payload["extra_top_level"] = [1, 2.5, "x"]
    raw = b"event: message_start\ndata:   " + orjson.dumps(payload) + b"  \n\n"
    assert raw.count(orjson.dumps(msg_id)) == 2
    stream = MessagesStream(IID, PROMPT)
    out = stream.feed(Frame(raw))
    (frame,) = _frames(out)
    assert frame.event == "message_start"
    expected = orjson.loads(orjson.dumps(payload))
    expected["message"]["id"] = IID
    assert orjson.loads(frame.data) == expected
    records = stream.finish()
    (usage,) = _of(records, TokenUsage)
    assert (usage.msg_id, usage.input, usage.output) == (msg_id, 3, 1)


# -- several messages -------------------------------------------------------------------------


def test_two_messages_one_prompt_two_usages() -> None:
    streams = dict(STREAMS)
    first, second = streams["text"], streams["thinking"]
    frames = _frames(first + second)
    first_id, second_id = _msg_id(_frames(first)), _msg_id(_frames(second))
    stream, out, records = _run(frames)
    expected = (first + second).replace(orjson.dumps(first_id), orjson.dumps(IID))
    assert out == expected.replace(orjson.dumps(second_id), orjson.dumps(IID))

    (prompt,) = _of(records, PromptUsage)
    assert prompt.msg_id == first_id
    usages = _of(records, TokenUsage)
    assert [u.msg_id for u in usages] == [first_id, second_id]
    assert [u.output for u in usages] == [74, 187]
    assert [u.input for u in usages] == [19, 61]
    (thought,) = _of(records, ModelThought)
    assert thought.msg_id == second_id
    assert stream.message_stopped


def test_records_taken_incrementally() -> None:
    frames = _frames(dict(STREAMS)["text"])
    stream = MessagesStream(IID, PROMPT)
    stream.feed(frames[0])
    first = stream.take_records()
    assert [type(r) for r in first] == [PromptUsage]
    assert stream.take_records() == []
    for frame in frames[1:]:
        stream.feed(frame)
    rest = stream.take_records()
    assert [type(r) for r in rest] == [TokenUsage]
    assert stream.message_stopped
    assert stream.finish() == []


# -- the loop goes on only after a turn that stopped on tool_use --------------------------------


def _loop_fixture(name: str) -> list[Frame]:
    return _frames(load_txtar(FIXTURES / "anthropic" / f"{name}.txtar")["streaming"].encode())


def _injected(name: str) -> bool:
    return name.startswith("bmcp_")


def test_injected_call_cut_by_max_tokens_ends_the_turn() -> None:
    frames = _loop_fixture("synthetic_loop_max_tokens")
    stream = MessagesStream(IID, PROMPT, _injected)
    out = stream.feed_all(frames)

    # The client gets a whole message: its text, the real stop reason, its message_stop.
    assert b"bmcp_" not in out and b"toolu_" not in out
    sent = _frames(out)
    assert [f.event for f in sent] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert orjson.loads(sent[-2].data)["delta"]["stop_reason"] == "max_tokens"
    assert stream.stop_relayed
    # The half-written call is not for the loop to run; it is reported as skipped, with why.
    assert stream.tool_calls == []
    (skipped,) = stream.skipped_calls
    assert (skipped.name, skipped.tool_use_id) == (
        "bmcp_tools_add",
        "toolu_01MaxTokCallStream12345",
    )
    assert "max_tokens" in stream.skip_reason
    assert not _of(stream.take_records() + stream.finish(), ToolUsage)


def test_injected_call_on_tool_use_continues_the_loop() -> None:
    frames = _loop_fixture("injected_add")
    stream = MessagesStream(IID, PROMPT, _injected)
    out = stream.feed_all(frames)

    # The turn's end stays hidden: the next turn continues the same client message.
    names = [f.event for f in _frames(out)]
    assert "message_delta" not in names and "message_stop" not in names
    assert not stream.stop_relayed
    (call,) = stream.tool_calls
    assert (call.name, call.input) == ("bmcp_tools_add", {"a": 2, "b": 3})
    assert stream.skipped_calls == []


@pytest.mark.parametrize("stop_reason", ["end_turn", "max_tokens", "pause_turn", "refusal"])
def test_only_tool_use_continues(stop_reason: str) -> None:
    frames = [
        Frame(f.raw.replace(b'"stop_reason":"tool_use"', f'"stop_reason":"{stop_reason}"'.encode()))
        for f in _loop_fixture("injected_add")
    ]
    stream = MessagesStream(IID, PROMPT, _injected)
    out = stream.feed_all(frames)

    assert [f.event for f in _frames(out)][-2:] == ["message_delta", "message_stop"]
    assert stream.tool_calls == []
    assert [c.name for c in stream.skipped_calls] == ["bmcp_tools_add"]
    assert stop_reason in stream.skip_reason
