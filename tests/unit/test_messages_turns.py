"""The Messages multi-turn surgery at byte level: upstream frames in, the client's exact bytes out.

Every stream here is synthetic (hand-written), shaped like the provider's: compact JSON, the
provider's key order. Each test feeds the turns of one client-visible message through
``MessagesStream`` the three ways the relay can (frame by frame, one region per turn through the
region scan, one byte at a time) and compares the client's bytes with a literal.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from gateway.intercept.messages.stream import MessagesStream
from gateway.intercept.rewriter import ToolCall
from gateway.records import ModelThought, Record, TokenUsage, ToolUsage
from gateway.sse import SSEFramer

IID = "intc_turns_0001"


def _injected(name: str) -> bool:
    return name.startswith("bmcp_")


def _ev(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


def _start(msg_id: str, usage: str) -> bytes:
    message = (
        '{"id":"' + msg_id + '","type":"message","role":"assistant","model":"claude-x",'
        '"content":[],"stop_reason":null,"stop_sequence":null,"usage":' + usage + "}"
    )
    return _ev("message_start", '{"type":"message_start","message":' + message + "}")


def _block_start(index: int, block: str) -> bytes:
    return _ev(
        "content_block_start",
        f'{{"type":"content_block_start","index":{index},"content_block":{block}}}',
    )


def _block_delta(index: int, delta: str) -> bytes:
    return _ev(
        "content_block_delta", f'{{"type":"content_block_delta","index":{index},"delta":{delta}}}'
    )


def _text_delta(index: int, text: str) -> bytes:
    return _block_delta(index, f'{{"type":"text_delta","text":"{text}"}}')


def _json_delta(index: int, part: str) -> bytes:
    quoted = orjson.dumps(part).decode()
    return _block_delta(index, f'{{"type":"input_json_delta","partial_json":{quoted}}}')


def _thinking_delta(index: int, text: str) -> bytes:
    return _block_delta(index, f'{{"type":"thinking_delta","thinking":"{text}"}}')


def _block_stop(index: int) -> bytes:
    return _ev("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}')


def _delta(stop_reason: str, usage: str) -> bytes:
    delta = f'{{"stop_reason":"{stop_reason}","stop_sequence":null}}'
    return _ev("message_delta", f'{{"type":"message_delta","delta":{delta},"usage":{usage}}}')


TEXT = '{"type":"text","text":""}'
THINKING = '{"type":"thinking","thinking":"","signature":""}'
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _tool(tool_id: str, name: str) -> str:
    return f'{{"type":"tool_use","id":"{tool_id}","name":"{name}","input":{{}}}}'


def _frame_by_frame(stream: MessagesStream, data: bytes) -> bytes:
    framer = SSEFramer()
    return stream.feed_all(framer.feed(data))


def _one_region(stream: MessagesStream, data: bytes) -> bytes:
    return stream.feed_chunk(SSEFramer(), data) or b""


def _byte_by_byte(stream: MessagesStream, data: bytes) -> bytes:
    framer = SSEFramer()
    return b"".join(stream.feed_chunk(framer, data[i : i + 1]) or b"" for i in range(len(data)))


Feeder = Callable[[MessagesStream, bytes], bytes]
FEEDERS = pytest.mark.parametrize(
    "feed", [_frame_by_frame, _one_region, _byte_by_byte], ids=["frames", "region", "bytes"]
)


def _loop(feed: Feeder, turns: list[bytes]) -> tuple[MessagesStream, list[bytes], list[Record]]:
    """Feed each upstream turn as the relay does, continuing while the gateway must run tools.

    Returns the stream, the client's bytes per turn, and every record.
    """
    stream = MessagesStream(IID, "add 2 and 3", _injected)
    out: list[bytes] = []
    records: list[Record] = []
    for i, turn in enumerate(turns):
        if i:
            assert stream.tool_calls, "the turn before must have called injected tools only"
            stream.next_turn()
        out.append(feed(stream, turn))
        records += stream.take_records()
    records += stream.finish()
    return stream, out, records


def _usages(records: list[Record]) -> list[tuple[str, int, int, int, int]]:
    return [
        (r.msg_id, r.input, r.output, r.cache_read, r.cache_write)
        for r in records
        if isinstance(r, TokenUsage)
    ]


# Turn 1: text, then an injected call; stops on tool_use.
USAGE_1 = (
    '{"input_tokens":10,"cache_creation_input_tokens":4,"cache_read_input_tokens":100,'
    '"output_tokens":1}'
)
TURN_1 = b"".join(
    [
        _start("msg_t1", USAGE_1),
        _block_start(0, TEXT),
        _text_delta(0, "Adding."),
        _block_stop(0),
        PING,
        _block_start(1, _tool("toolu_add1", "bmcp_calc_add")),
        _json_delta(1, '{"a": 2,'),
        _json_delta(1, ' "b": 3}'),
        _block_stop(1),
        _delta("tool_use", '{"output_tokens":30}'),
        STOP,
    ]
)
# Turn 2: the answer; stops on end_turn.
TURN_2 = b"".join(
    [
        _start(
            "msg_t2",
            '{"input_tokens":50,"cache_creation_input_tokens":0,'
            '"cache_read_input_tokens":104,"output_tokens":1}',
        ),
        PING,
        _block_start(0, TEXT),
        _text_delta(0, "It is 5."),
        _block_stop(0),
        _delta("end_turn", '{"output_tokens":7}'),
        STOP,
    ]
)


@FEEDERS
def test_two_turns_one_message(feed: Feeder) -> None:
    stream, (first, second), records = _loop(feed, [TURN_1, TURN_2])

    # Turn 1: the id rewritten in place, the text as sent, the injected call and the turn's
    # end (message_delta, message_stop) hidden.
    assert first == b"".join(
        [
            _start(IID, USAGE_1),
            _block_start(0, TEXT),
            _text_delta(0, "Adding."),
            _block_stop(0),
            PING,
        ]
    )
    # Turn 2: no second message_start; its block 0 is the client's block 1; the final
    # message_delta carries the usage of both turns (its own keys first, then the totals').
    assert second == b"".join(
        [
            PING,
            _block_start(1, TEXT),
            _text_delta(1, "It is 5."),
            _block_stop(1),
            _ev(
                "message_delta",
                '{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
                '"usage":{"output_tokens":37,"input_tokens":60,'
                '"cache_creation_input_tokens":4,"cache_read_input_tokens":204}}',
            ),
            STOP,
        ]
    )
    assert stream.stop_relayed
    # The records keep each upstream message apart; the injected call is the loop's to record.
    assert _usages(records) == [("msg_t1", 10, 30, 100, 4), ("msg_t2", 50, 7, 104, 0)]
    assert not [r for r in records if isinstance(r, ToolUsage)]


@FEEDERS
def test_turn_result_of_a_turn_that_calls_injected_tools(feed: Feeder) -> None:
    stream = MessagesStream(IID, None, _injected)
    feed(stream, TURN_1)
    call = ToolCall("toolu_add1", "bmcp_calc_add", {"a": 2, "b": 3}, "msg_t1")
    assert stream.message_stopped and not stream.stop_relayed
    assert stream.tool_calls == [call]
    result = stream.turn_result()
    assert (list(result.tool_calls), list(result.skipped_calls)) == ([call], [])
    assert result.stop_reason == "tool_use"
    # The continuation repeats the turn as the provider built it, the call's input parsed.
    assert result.assistant == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Adding."},
            {
                "type": "tool_use",
                "id": "toolu_add1",
                "name": "bmcp_calc_add",
                "input": {"a": 2, "b": 3},
            },
        ],
    }


# Turn 2 of a three-turn loop: thinking, another injected call.
TURN_2_CALLS = b"".join(
    [
        _start("msg_t2", '{"input_tokens":50,"output_tokens":1}'),
        _block_start(0, THINKING),
        _thinking_delta(0, "Now times 4."),
        _block_stop(0),
        _block_start(1, _tool("toolu_mul1", "bmcp_calc_mul")),
        _json_delta(1, '{"a": 5, "b": 4}'),
        _block_stop(1),
        _delta("tool_use", '{"output_tokens":12}'),
        STOP,
    ]
)
TURN_3 = b"".join(
    [
        _start("msg_t3", '{"input_tokens":70,"output_tokens":1}'),
        _block_start(0, TEXT),
        _text_delta(0, "20."),
        _block_stop(0),
        _delta("end_turn", '{"output_tokens":3,"input_tokens":71}'),
        STOP,
    ]
)


@FEEDERS
def test_indices_keep_counting_across_three_turns(feed: Feeder) -> None:
    stream, (_, second, third), records = _loop(feed, [TURN_1, TURN_2_CALLS, TURN_3])
    assert second == b"".join(
        [
            _block_start(1, THINKING),
            _thinking_delta(1, "Now times 4."),
            _block_stop(1),
        ]
    )
    assert third == b"".join(
        [
            _block_start(2, TEXT),
            _text_delta(2, "20."),
            _block_stop(2),
            _ev(
                "message_delta",
                '{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
                '"usage":{"output_tokens":45,"input_tokens":131,'
                '"cache_creation_input_tokens":4,"cache_read_input_tokens":100}}',
            ),
            STOP,
        ]
    )
    assert stream.turn == 2
    assert [(r.msg_id, r.content) for r in records if isinstance(r, ModelThought)] == [
        ("msg_t2", "Now times 4.")
    ]
    assert _usages(records) == [
        ("msg_t1", 10, 30, 100, 4),
        ("msg_t2", 50, 12, 0, 0),
        ("msg_t3", 71, 3, 0, 0),
    ]


# One turn calling an injected and a client tool: final, so the client gets it whole but for
# the injected call, and its client tool block takes the hidden call's place.
MIXED = b"".join(
    [
        _start("msg_mix", '{"input_tokens":9,"output_tokens":1}'),
        _block_start(0, _tool("toolu_inj", "bmcp_calc_add")),
        _json_delta(0, '{"a": 1}'),
        _block_stop(0),
        _block_start(1, _tool("toolu_cli", "get_weather")),
        _json_delta(1, '{"city": "Lisbon"}'),
        _block_stop(1),
        _delta("tool_use", '{"output_tokens":25}'),
        STOP,
    ]
)


@FEEDERS
def test_mixed_turn_is_final_with_the_injected_call_hidden(feed: Feeder) -> None:
    stream, (out,), records = _loop(feed, [MIXED])
    assert out == b"".join(
        [
            _start(IID, '{"input_tokens":9,"output_tokens":1}'),
            _block_start(0, _tool("toolu_cli", "get_weather")),
            _json_delta(0, '{"city": "Lisbon"}'),
            _block_stop(0),
            # A single turn: its own usage, its bytes as sent.
            _delta("tool_use", '{"output_tokens":25}'),
            STOP,
        ]
    )
    assert stream.stop_relayed
    assert stream.tool_calls == []
    assert stream.skipped_calls == [ToolCall("toolu_inj", "bmcp_calc_add", {"a": 1}, "msg_mix")]
    assert "client tools" in stream.skip_reason
    assert [(r.tool, r.args) for r in records if isinstance(r, ToolUsage)] == [
        ("get_weather", '{"city": "Lisbon"}')
    ]


@FEEDERS
def test_second_turn_cut_short_records_its_usage_and_sends_no_end(feed: Feeder) -> None:
    cut = TURN_2[: TURN_2.index(b"event: content_block_stop")]
    stream, (_, second), records = _loop(feed, [TURN_1, cut])
    assert second == PING + _block_start(1, TEXT) + _text_delta(1, "It is 5.")
    assert not stream.stop_relayed and not stream.message_stopped
    assert _usages(records) == [("msg_t1", 10, 30, 100, 4), ("msg_t2", 50, 1, 104, 0)]


def test_without_injected_tools_a_second_message_is_relayed_whole() -> None:
    """The surgery runs only for a loop: a plain stream keeps every message_start and index."""
    stream = MessagesStream(IID, None)
    out = _frame_by_frame(stream, TURN_1.replace(b"bmcp_", b"tool_") + TURN_2)
    assert out == (TURN_1.replace(b"bmcp_", b"tool_") + TURN_2).replace(
        b'"msg_t1"', orjson.dumps(IID)
    ).replace(b'"msg_t2"', orjson.dumps(IID))
    assert stream.turn == 0
    assert stream.tool_calls == []
