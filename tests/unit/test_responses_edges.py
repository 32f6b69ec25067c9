"""Unit tests for the Responses rewriters at their edges: built-in client tool calls, hostile
item types, upstreams without ``event:`` lines, frames after a hidden turn's end, and
``store: false`` injected loops as the official SDK's stream helper reads them."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from openai import omit
from openai._models import construct_type_unchecked
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from gateway.intercept.responses.blocking import BlockingTurns
from gateway.intercept.responses.dialect import RESPONSES
from gateway.intercept.responses.stream import ResponsesStream
from gateway.records import Record, TokenUsage, ToolUsage
from gateway.sse import SSEFramer
from gateway.testing import load_txtar
from tests.conftest import FIXTURES

FOLDER = FIXTURES / "openai" / "responses"
IID = "intc_0123456789abcdef"
DONE = b"data: [DONE]\n\n"


def _fx(name: str, section: str = "streaming") -> bytes:
    return load_txtar(FOLDER / f"{name}.txtar")[section].strip().encode() + (
        b"\n\n" if section.startswith("streaming") else b""
    )


def _run(stream: ResponsesStream, data: bytes, size: int = 0) -> tuple[bytes, list[Record]]:
    framer = SSEFramer()
    out = bytearray()
    records: list[Record] = []
    step = size or len(data)
    for i in range(0, len(data), step):
        got = stream.feed_chunk(framer, data[i : i + step])
        if got:
            out += got
        records += stream.take_records()
    return bytes(out), records


def _events(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(f.data) for f in SSEFramer().feed(data) if f.data != b"[DONE]"]


def _seen(records: list[Record]) -> list[dict[str, Any]]:
    """The records without their creation time (two runs compare equal)."""
    return [{**dataclasses.asdict(r), "created_at": None} for r in records]


def _injected(name: str) -> bool:
    return name.startswith("bmcp_")


# -- built-in client tools ------------------------------------------------------------------


def _builtin_expected() -> list[tuple[str, str, str, Any]]:
    """``(tool, call_id, item id, arguments)`` of the fixture's calls, from the fixture."""
    output = orjson.loads(_fx("builtin_client_tools", "non-streaming"))["output"]
    return [
        (i["type"], i["call_id"], i["id"], i.get("action") or i.get("operation"))
        for i in output
        if i["type"] != "reasoning"
    ]


def _calls(records: list[Record]) -> list[tuple[str, str, str, Any]]:
    return [
        (r.tool, r.tool_call_id, r.item_id, orjson.loads(r.args))
        for r in records
        if isinstance(r, ToolUsage)
    ]


@pytest.mark.parametrize("size", [0, 7])
def test_builtin_client_calls_recorded_streaming(size: int) -> None:
    expected = _builtin_expected()
    assert [e[0] for e in expected] == [
        "local_shell_call",
        "shell_call",
        "apply_patch_call",
        "computer_call",
    ]
    _, records = _run(ResponsesStream(IID, None), _fx("builtin_client_tools"), size)
    assert _calls(records) == expected
    # With injected tools too: a turn calling the client's tools is final.
    stream = ResponsesStream(IID, None, _injected)
    _, records = _run(stream, _fx("builtin_client_tools"), size)
    assert _calls(records) == expected
    assert stream.stop_relayed


def test_builtin_client_calls_recorded_blocking() -> None:
    result = BlockingTurns(IID, None).feed(_fx("builtin_client_tools", "non-streaming"))
    assert _calls(result.records) == _builtin_expected()


# -- hostile item types ---------------------------------------------------------------------

# Nested deeper than Python's repr and orjson's writer go, shallower than orjson's reader.
DEEP = b"[" * 900 + b"]" * 900
HOSTILE_TYPES = [b'{"x":1}', b"[]", DEEP]
HOSTILE_IDS = ["object", "array", "deep"]


def _json(obj: Any) -> bytes:
    """``obj`` as JSON, each string ``"DEEP"`` in it replaced with :data:`DEEP`."""
    return orjson.dumps(obj).replace(b'"DEEP"', DEEP)


def _with_item(data: bytes, kind: str, item: bytes) -> bytes:
    """``data`` with one more ``kind`` event of ``item`` before its terminal event."""
    payload = b'{"type":"' + kind.encode() + b'","item":' + item
    frame = b"event: " + kind.encode() + b"\ndata: " + payload + b',"output_index":1}\n\n'
    cut = data.index(b"event: response.completed")
    return data[:cut] + frame + data[cut:]


@pytest.mark.parametrize("kind", HOSTILE_TYPES, ids=HOSTILE_IDS)
@pytest.mark.parametrize("injected", [None, _injected], ids=["plain", "injected"])
@pytest.mark.parametrize("event", ["response.output_item.added", "response.output_item.done"])
def test_hostile_item_type_streaming(kind: bytes, injected: Any, event: str) -> None:
    item = b'{"type":' + kind + b',"name":' + DEEP + b',"call_id":' + DEEP + b"}"
    data = _with_item(_fx("text"), event, item)
    stream = ResponsesStream(IID, "p", injected)
    out, records = _run(stream, data, 64)
    assert out == data
    assert stream.stop_relayed and stream.error is None
    tokens = [(r.input, r.output) for r in records if isinstance(r, TokenUsage)]
    assert tokens == [(12, 9)]


@pytest.mark.parametrize("kind", HOSTILE_TYPES, ids=HOSTILE_IDS)
def test_hostile_item_type_blocking(kind: bytes) -> None:
    body = orjson.loads(_fx("text", "non-streaming"))
    body["output"] += [
        {"type": "KIND"},
        {"type": "function_call", "name": "DEEP", "call_id": "DEEP", "arguments": "{}"},
        {"type": "shell_call", "call_id": "c", "action": "DEEP"},
    ]
    raw = _json(body).replace(b'"KIND"', kind)
    result = BlockingTurns(IID, "p", _injected).feed(raw)
    assert result.body == raw
    tokens = [(r.input, r.output) for r in result.records if isinstance(r, TokenUsage)]
    assert tokens == [(12, 9)]
    calls = [(r.tool, r.tool_call_id, r.args) for r in result.records if isinstance(r, ToolUsage)]
    assert calls == [("function_call", "", "{}"), ("shell_call", "c", "{}")]


@pytest.mark.parametrize("kind", HOSTILE_TYPES, ids=HOSTILE_IDS)
def test_hostile_input_item_type_is_no_error(kind: bytes) -> None:
    body = b'{"model":"m","input":[{"type":' + kind + b',"call_id":"c"}]}'
    request = RESPONSES.parse_request(body)
    assert request.body == body
    assert request.correlating_tool_call_id is None


# -- frames without an event line -----------------------------------------------------------


def _data_only(data: bytes) -> bytes:
    """``data`` as an OpenAI-compatible upstream may send it: ``data:`` lines only."""
    return b"".join(b"data: " + f.data + b"\n\n" for f in SSEFramer().feed(data))


@pytest.mark.parametrize(
    "name", ["text", "client_tools_parallel", "builtin_client_tools", "response_failed"]
)
@pytest.mark.parametrize("size", [0, 7])
def test_data_only_stream_is_read_like_a_named_one(name: str, size: int) -> None:
    named = ResponsesStream(IID, "p")
    _, expected = _run(named, _fx(name), size)
    data = _data_only(_fx(name)) + DONE
    stream = ResponsesStream(IID, "p")
    out, records = _run(stream, data, size)
    assert out == data
    assert _seen(records) == _seen(expected) and expected
    assert (stream.stop_relayed, stream.status, stream.error) == (
        named.stop_relayed,
        named.status,
        named.error,
    )
    assert stream.stop_relayed


def _loop(
    first: bytes, second: bytes, size: int = 0, stream: ResponsesStream | None = None
) -> tuple[ResponsesStream, bytes, list[Record]]:
    stream = stream or ResponsesStream(IID, "List my templates.", _injected)
    out, records = _run(stream, first, size)
    assert not stream.stop_relayed
    assert [c.tool_use_id for c in stream.turn_result().tool_calls] == ["call_inj_1"]
    stream.next_turn()
    more, rest = _run(stream, second, size)
    assert stream.stop_relayed
    return stream, out + more, records + rest + stream.finish()


@pytest.mark.parametrize("size", [0, 5, 300])
def test_data_only_injected_loop_is_the_named_loop(size: int) -> None:
    first, second = _fx("injected_loop"), _fx("injected_loop", "streaming/tool-call")
    _, named_out, named_records = _loop(first, second, size)
    _, out, records = _loop(_data_only(first), _data_only(second), size)
    assert b"bmcp_" not in out
    assert _events(out) == _events(named_out)
    assert b"event:" not in out
    assert _seen(records) == _seen(named_records)


# -- frames after a hidden turn's end -------------------------------------------------------


@pytest.mark.parametrize("size", [0, 5, 300])
@pytest.mark.parametrize("data_only", [False, True])
def test_frames_after_a_hidden_end_are_dropped(size: int, data_only: bool) -> None:
    first, second = _fx("injected_loop"), _fx("injected_loop", "streaming/tool-call")
    if data_only:
        first, second = _data_only(first), _data_only(second)
    _, out, _ = _loop(first + DONE, second + DONE, size)
    assert out.count(b"[DONE]") == 1 and out.endswith(DONE)
    assert b"bmcp_" not in out


# -- store: false ---------------------------------------------------------------------------


def _request(store: Any) -> Any:
    body = orjson.loads(load_txtar(FOLDER / "injected_loop.txtar")["request"])
    if store is not None:
        body["store"] = store
    return RESPONSES.parse_request(orjson.dumps(body))


def _sdk_final(out: bytes) -> Any:
    """What the SDK's ``responses.stream()`` helper makes of ``out``: its final response."""
    state = ResponseStreamState[None](input_tools=omit, text_format=omit)
    for event in _events(out):
        raw: Any = construct_type_unchecked(type_=ResponseStreamEvent, value=event)  # type: ignore[arg-type]
        state.handle_event(raw)
    return state._completed_response


@pytest.mark.parametrize("size", [0, 5])
def test_unstored_injected_loop_keeps_one_id_for_the_sdk(size: int) -> None:
    rewriter = RESPONSES.stream(IID, _request(False), _injected)
    assert isinstance(rewriter, ResponsesStream)
    first, second = _fx("injected_loop"), _fx("injected_loop", "streaming/tool-call")
    _, out, records = _loop(first, second, size, rewriter)
    lifecycle = [e["response"]["id"] for e in _events(out) if "response" in e]
    assert lifecycle == ["resp_inj_1"] * 3
    final = _sdk_final(out)
    assert final is not None and final.id == "resp_inj_1"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == "You have two templates."
    # The records keep each upstream response's own id.
    assert [r.msg_id for r in records if isinstance(r, TokenUsage)] == ["resp_inj_1", "resp_inj_2"]


@pytest.mark.parametrize("store", [None, True])
def test_stored_injected_loop_ends_with_the_last_id(store: Any) -> None:
    rewriter = RESPONSES.stream(IID, _request(store), _injected)
    assert isinstance(rewriter, ResponsesStream)
    first, second = _fx("injected_loop"), _fx("injected_loop", "streaming/tool-call")
    _, out, _ = _loop(first, second, 0, rewriter)
    lifecycle = [e["response"]["id"] for e in _events(out) if "response" in e]
    assert lifecycle == ["resp_inj_1", "resp_inj_1", "resp_inj_2"]


@pytest.mark.parametrize(("store", "shown"), [(False, "resp_inj_1"), (None, "resp_inj_2")])
def test_blocking_loop_id_follows_store(store: Any, shown: str) -> None:
    turns = RESPONSES.blocking(IID, _request(store), _injected)
    assert isinstance(turns, BlockingTurns)
    first = turns.feed(_fx("injected_loop", "non-streaming"))
    assert first.turn.tool_calls
    last = turns.feed(_fx("injected_loop", "non-streaming/tool-call"))
    assert orjson.loads(last.body)["id"] == shown
    ids = [r.msg_id for r in [*first.records, *last.records] if isinstance(r, TokenUsage)]
    assert ids == ["resp_inj_1", "resp_inj_2"]
