"""Unit tests for gateway.intercept.responses.stream: the Responses stream rewriter (bytes only)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import orjson
import pytest
from openai import omit
from openai._models import construct_type_unchecked
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseErrorEvent, ResponseStreamEvent

import gateway.intercept.responses.stream as stream_module
from gateway.intercept.responses.dialect import RESPONSES
from gateway.intercept.responses.stream import ResponsesStream
from gateway.records import ModelThought, PromptUsage, Record, TokenUsage, ToolUsage
from gateway.sse import Frame, SSEFramer
from gateway.testing import load_txtar
from tests.conftest import FIXTURES

FOLDER = FIXTURES / "openai" / "responses"
IID = "intc_0123456789abcdef"
STREAMING = sorted(p.stem for p in FOLDER.glob("*.txtar") if "streaming" in load_txtar(p))


def _sse(name: str, section: str = "streaming") -> bytes:
    return load_txtar(FOLDER / f"{name}.txtar")[section].encode()


def _run(stream: ResponsesStream, data: bytes, size: int = 0) -> tuple[bytes, list[Record]]:
    """Feed ``data`` in chunks of ``size`` bytes (whole when 0); the client bytes and records."""
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


def _of(records: list[Record], cls: type[Any]) -> list[Any]:
    return [r for r in records if isinstance(r, cls)]


def _events(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(f.data) for f in SSEFramer().feed(data)]


def _fixture_usage(data: bytes) -> list[dict[str, Any]]:
    return [
        e["response"]["usage"]
        for e in _events(data)
        if e["type"] in ("response.completed", "response.failed", "response.incomplete")
    ]


@pytest.mark.parametrize("name", STREAMING)
@pytest.mark.parametrize("size", [0, 1, 7, 64])
def test_relayed_byte_for_byte(name: str, size: int) -> None:
    data = _sse(name)
    stream = ResponsesStream(IID, "p")
    out, records = _run(stream, data, size)
    records += stream.finish()
    assert out == data
    usage = _fixture_usage(data)
    tokens = _of(records, TokenUsage)
    assert [t.output for t in tokens] == [u["output_tokens"] for u in usage]
    assert [t.input + t.cache_read for t in tokens] == [u["input_tokens"] for u in usage]
    assert len(_of(records, PromptUsage)) == 1


def test_text_records() -> None:
    stream = ResponsesStream(IID, "tell me a joke")
    _, records = _run(stream, _sse("text"))
    assert stream.stop_relayed and stream.error is None
    assert [type(r) for r in records] == [PromptUsage, TokenUsage]
    prompt, tokens = records
    assert isinstance(prompt, PromptUsage) and isinstance(tokens, TokenUsage)
    assert (prompt.msg_id, prompt.prompt) == ("resp_text_1", "tell me a joke")
    assert (tokens.msg_id, tokens.input, tokens.output, tokens.cache_read) == (
        "resp_text_1",
        12,
        9,
        0,
    )
    assert stream.finish() == []


def test_deltas_pass_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = stream_module._loads

    def counting(data: bytes) -> dict[str, Any] | None:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(stream_module, "_loads", counting)
    _run(ResponsesStream(IID, None), _sse("text"))
    kinds = [orjson.loads(d)["type"] for d in parsed]
    assert kinds == ["response.created", "response.output_item.done", "response.completed"]


def test_parallel_client_calls_recorded() -> None:
    stream = ResponsesStream(IID, None)
    _, records = _run(stream, _sse("client_tools_parallel"))
    calls = _of(records, ToolUsage)
    assert [(c.tool, c.tool_call_id, c.msg_id) for c in calls] == [
        ("get_weather", "call_par_1", "resp_par_1"),
        ("get_weather", "call_par_2", "resp_par_1"),
    ]
    assert [orjson.loads(c.args) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert not any(c.injected for c in calls)


def test_custom_tool_input_recorded_as_json_string() -> None:
    _, records = _run(ResponsesStream(IID, None), _sse("custom_tool"))
    (call,) = _of(records, ToolUsage)
    assert (call.tool, call.tool_call_id) == ("code_exec", "call_custom_1")
    assert orjson.loads(call.args) == 'print("hello world")'
    (tokens,) = _of(records, TokenUsage)
    assert (tokens.output, tokens.reasoning) == (340, 320)


def test_reasoning_summaries_and_commentary_are_thoughts() -> None:
    _, records = _run(ResponsesStream(IID, None), _sse("reasoning_summary"))
    thoughts = [(t.source, t.content, t.msg_id) for t in _of(records, ModelThought)]
    assert thoughts == [
        ("reasoning_summary", "The user wants a sum.", "resp_sum_1"),
        ("reasoning_summary", "I will call add.", "resp_sum_1"),
        ("commentary", "Let me add those numbers.", "resp_sum_1"),
    ]
    assert [c.tool for c in _of(records, ToolUsage)] == ["add"]


def test_cached_tokens_normalised() -> None:
    _, records = _run(ResponsesStream(IID, None), _sse("cached_tokens"))
    (tokens,) = _of(records, TokenUsage)
    assert (tokens.input, tokens.cache_read, tokens.output, tokens.reasoning) == (
        16909 - 15744,
        15744,
        54,
        20,
    )
    assert tokens.cache_write == 0


def test_mid_stream_error_reported() -> None:
    stream = ResponsesStream(IID, "hello")
    out, records = _run(stream, _sse("mid_stream_error"))
    records += stream.finish()
    assert out == _sse("mid_stream_error")
    assert stream.error is not None
    assert (stream.error.type, stream.error.message) == (
        "server_error",
        "The server had an error while processing your request.",
    )
    assert not stream.stop_relayed
    assert _of(records, TokenUsage) == []
    assert [p.msg_id for p in _of(records, PromptUsage)] == ["resp_err_1"]


def test_nested_error_event_shape() -> None:
    stream = ResponsesStream(IID, None)
    frame = Frame(
        b'event: error\ndata: {"type":"error","error":{"type":"invalid_request_error",'
        b'"code":null,"message":"Conversation not found."},"sequence_number":3}\n\n'
    )
    assert stream.feed(frame) == frame.raw
    assert stream.error is not None
    assert (stream.error.type, stream.error.message) == (
        "invalid_request_error",
        "Conversation not found.",
    )


def test_failed_response_is_terminal_and_reported() -> None:
    stream = ResponsesStream(IID, None)
    _, records = _run(stream, _sse("response_failed"))
    assert stream.stop_relayed
    assert stream.status == "failed"
    assert stream.error is not None
    assert (stream.error.type, stream.error.message) == (
        "server_error",
        "The model failed to finish.",
    )
    (tokens,) = _of(records, TokenUsage)
    assert (tokens.input, tokens.output) == (30, 2)


def test_incomplete_response_is_terminal_and_reported() -> None:
    stream = ResponsesStream(IID, None)
    _, records = _run(stream, _sse("response_incomplete"))
    assert stream.stop_relayed
    assert stream.status == "incomplete"
    assert stream.error is not None
    assert stream.error.type == "response_incomplete"
    assert "max_output_tokens" in stream.error.message
    assert [(t.input, t.output) for t in _of(records, TokenUsage)] == [(15, 16)]


def test_error_event_is_the_sdks_error_event() -> None:
    for raw in (
        RESPONSES.error_event(502, "upstream unreachable"),
        RESPONSES.relayed_error_event(
            b'{"error":{"message":"Rate limit","type":"rate_limit_error","param":null,'
            b'"code":"rate_limit_exceeded"}}'
        ),
        RESPONSES.relayed_error_event(b"<html>bad gateway</html>"),
    ):
        (frame,) = SSEFramer().feed(raw)
        assert frame.event == "error"
        event = ResponseErrorEvent.model_validate_json(frame.data)
        assert event.type == "error" and event.message and event.code
    relayed = SSEFramer().feed(
        RESPONSES.relayed_error_event(
            b'{"error":{"message":"Rate limit","code":"rate_limit_exceeded"}}'
        )
    )
    assert orjson.loads(relayed[0].data)["code"] == "rate_limit_exceeded"


# -- injected tools ---------------------------------------------------------------------------


def _injected(name: str) -> bool:
    return name.startswith("bmcp_")


def _loop(size: int = 0) -> tuple[ResponsesStream, bytes, list[Record], list[Any]]:
    stream = ResponsesStream(IID, "List my templates.", _injected)
    out, records = _run(stream, _sse("injected_loop"), size)
    first = stream.turn_result()
    assert not stream.stop_relayed
    stream.next_turn()
    more, rest = _run(stream, _sse("injected_loop", "streaming/tool-call"), size)
    records += rest + stream.finish()
    return stream, out + more, records, [first, stream.turn_result()]


@pytest.mark.parametrize("size", [0, 5, 300])
def test_injected_loop_is_one_coherent_stream(size: int) -> None:
    stream, out, _, (first, last) = _loop(size)
    assert stream.stop_relayed
    assert b"bmcp_" not in out
    events = _events(out)
    kinds = [e["type"] for e in events]
    assert kinds.count("response.created") == kinds.count("response.in_progress") == 1
    assert kinds.count("response.completed") == 1 and kinds[-1] == "response.completed"
    seqs = [e["sequence_number"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [0, 1]
    indices = [e["output_index"] for e in events if "output_index" in e]
    assert all(a <= b for a, b in pairwise(indices))
    final = events[-1]["response"]
    turn1 = _events(_sse("injected_loop"))[-1]["response"]
    turn2 = _events(_sse("injected_loop", "streaming/tool-call"))[-1]["response"]
    assert final["id"] == turn2["id"]
    assert [i["id"] for i in final["output"]] == ["rs_inj_1", "msg_inj_2"]
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert final["usage"][key] == turn1["usage"][key] + turn2["usage"][key]
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == (
        turn1["usage"]["input_tokens_details"]["cached_tokens"]
        + turn2["usage"]["input_tokens_details"]["cached_tokens"]
    )
    assert first.tool_calls[0].tool_use_id == "call_inj_1"
    assert first.tool_calls[0].input == {"owner": "me"}
    assert first.tool_calls[0].msg_id == "resp_inj_1"
    assert [i["type"] for i in first.assistant.items] == ["reasoning", "function_call"]
    assert not last.tool_calls and not last.skipped_calls


def test_injected_loop_records_every_turn() -> None:
    _, _, records, _ = _loop()
    assert [(t.msg_id, t.input, t.cache_read, t.output) for t in _of(records, TokenUsage)] == [
        ("resp_inj_1", 500, 100, 30),
        ("resp_inj_2", 200, 500, 12),
    ]
    assert [p.msg_id for p in _of(records, PromptUsage)] == ["resp_inj_1"]
    assert [t.content for t in _of(records, ModelThought)] == ["Need templates."]
    # Injected calls are recorded by the tool loop when it runs them.
    assert _of(records, ToolUsage) == []


def test_injected_loop_output_accumulates_in_the_sdk() -> None:
    """The official SDK's accumulator takes the client stream (indices, items) as one response.

    The final ``response.completed`` is left out: it carries the last upstream response's id (what
    the client chains from), which this SDK's lifecycle check refuses when it differs from the
    ``response.created`` id.
    """
    _, out, _, _ = _loop()
    state = ResponseStreamState[None](input_tools=omit, text_format=omit)
    snapshot: Any = None
    for event in _events(out)[:-1]:
        raw: Any = construct_type_unchecked(type_=ResponseStreamEvent, value=event)  # type: ignore[arg-type]
        state.handle_event(raw)
        snapshot = state._ResponseStreamState__current_snapshot  # type: ignore[attr-defined]
    assert [item.type for item in snapshot.output] == ["reasoning", "message"]
    assert snapshot.output[1].content[0].text == "You have two templates."


def test_turn_calling_only_injected_tools_continues_hidden() -> None:
    stream = ResponsesStream(IID, None, lambda name: name == "add")
    out, _ = _run(stream, _sse("reasoning_summary"))
    assert not stream.stop_relayed
    result = stream.turn_result()
    assert [c.tool_use_id for c in result.tool_calls] == ["call_sum_1"]
    kinds = [e["type"] for e in _events(out)]
    assert "response.completed" not in kinds
    assert b'"name":"add"' not in out


def test_client_call_with_injected_call_is_final_and_hides_the_injected_one() -> None:
    # The second of the two parallel calls becomes a call of an injected tool.
    data = _sse("client_tools_parallel").replace(
        b'"call_id":"call_par_2","name":"get_weather"', b'"call_id":"call_par_2","name":"bmcp_w"'
    )
    stream = ResponsesStream(IID, None, _injected)
    out, records = _run(stream, data)
    assert stream.stop_relayed
    assert b"bmcp_" not in out and b"fc_par_2" not in out
    result = stream.turn_result()
    assert [c.tool_use_id for c in result.skipped_calls] == ["call_par_2"]
    assert not result.tool_calls
    assert "client tools" in result.skip_reason
    assert [c.tool_call_id for c in _of(records, ToolUsage)] == ["call_par_1"]
    events = _events(out)
    assert [i["id"] for i in events[-1]["response"]["output"]] == ["fc_par_1"]
    seqs = [e["sequence_number"] for e in events]
    assert seqs == list(range(len(seqs)))
    assert {e["output_index"] for e in events if "output_index" in e} == {0}


# -- item ids and end statuses ----------------------------------------------------------------


def _call_items(data: bytes) -> list[tuple[str, str]]:
    """``(call_id, item id)`` of the client calls the fixture's stream completes, in order."""
    return [
        (e["item"]["call_id"], e["item"]["id"])
        for e in _events(data)
        if e["type"] == "response.output_item.done"
        and e["item"]["type"] in ("function_call", "custom_tool_call")
    ]


@pytest.mark.parametrize("name", ["client_tools_parallel", "custom_tool"])
def test_client_calls_carry_their_item_id(name: str) -> None:
    data = _sse(name)
    _, records = _run(ResponsesStream(IID, None), data)
    expected = _call_items(data)
    assert expected and all(call != item for call, item in expected)
    assert [(c.tool_call_id, c.item_id) for c in _of(records, ToolUsage)] == expected


def test_injected_call_carries_its_item_id() -> None:
    data = _sse("reasoning_summary")
    stream = ResponsesStream(IID, None, lambda name: name == "add")
    _run(stream, data)
    calls = stream.turn_result().tool_calls
    assert [(c.tool_use_id, c.item_id) for c in calls] == _call_items(data)


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("response_incomplete", "incomplete"),
        ("response_failed", "failed"),
        ("mid_stream_error", "failed"),
    ],
)
def test_reported_errors_say_their_end_status(name: str, status: str) -> None:
    stream = ResponsesStream(IID, None)
    _run(stream, _sse(name))
    assert stream.error is not None
    assert stream.error.end_status == status


# -- the injected request's echo ----------------------------------------------------------------

ECHO = load_txtar(FOLDER / "injected_loop_echo.txtar")


def _echo_stream(client: dict[str, Any]) -> tuple[ResponsesStream, dict[str, Any]]:
    """A stream rewriter made by the dialect for the echo fixture's request plus ``client``."""
    request = {**orjson.loads(ECHO["request"]), **client}
    parsed = RESPONSES.parse_request(orjson.dumps(request))
    rewriter = RESPONSES.stream(IID, parsed, _injected)
    assert isinstance(rewriter, ResponsesStream)
    return rewriter, request


def _shown(out: bytes) -> list[tuple[str, list[Any], Any]]:
    return [
        (e["type"], e["response"]["tools"], e["response"]["parallel_tool_calls"])
        for e in _events(out)
        if "response" in e
    ]


@pytest.mark.parametrize("size", [0, 5, 300])
@pytest.mark.parametrize(
    "client", [{}, {"parallel_tool_calls": True}, {"parallel_tool_calls": False}]
)
def test_injected_loop_shows_the_clients_tools_and_parallel_tool_calls(
    size: int, client: dict[str, Any]
) -> None:
    stream, request = _echo_stream(client)
    out, _ = _run(stream, ECHO["streaming"].encode(), size)
    stream.next_turn()
    more, _ = _run(stream, ECHO["streaming/tool-call"].encode(), size)
    out += more
    assert b"bmcp_" not in out
    mine = (request["tools"], request.get("parallel_tool_calls", True))
    kinds = ["response.created", "response.in_progress", "response.completed"]
    assert _shown(out) == [(kind, *mine) for kind in kinds]
    seqs = [e["sequence_number"] for e in _events(out)]
    assert seqs == list(range(len(seqs)))


@pytest.mark.parametrize("size", [0, 64])
def test_final_first_turn_shows_the_clients_echo(size: int) -> None:
    """No injected call (identity): the lifecycle and terminal events are re-encoded all the
    same, every other event passes as it came."""
    stream, request = _echo_stream({})
    data = ECHO["streaming/tool-call"].encode()
    out, _ = _run(stream, data, size)
    assert stream.stop_relayed
    assert b"bmcp_" not in out
    assert {(tools == request["tools"], parallel) for _, tools, parallel in _shown(out)} == {
        (True, True)
    }
    sent, got = SSEFramer().feed(data), SSEFramer().feed(out)
    assert [f.raw for f in got if b'"response":' not in f.raw] == [
        f.raw for f in sent if b'"response":' not in f.raw
    ]


def test_injected_stream_whose_echo_is_the_clients_passes_as_is() -> None:
    """An upstream that echoes nothing injected (or no echo at all): bytes untouched."""
    data = _sse("text")
    stream, _ = _echo_stream({})
    out, _ = _run(stream, data, 7)
    assert out == data
