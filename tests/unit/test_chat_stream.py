"""The Chat Completions stream rewriter, fed with the synthetic fixtures (bytes only).

The ``openai`` SDK's own stream accumulator is the oracle of what a client ends up with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
)

from gateway.intercept.chat.stream import ChatStream
from gateway.intercept.rewriter import ToolCall
from gateway.records import PromptUsage, Record, TokenUsage, ToolUsage
from gateway.sse import SSEFramer
from gateway.testing import load_txtar

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openai" / "chat"
IID = "4f1c2a9e-7d3b-4e21-9a0c-5b6d7e8f9a01"
PROMPT = "the user's last prompt"


def injected(name: str) -> bool:
    return name.startswith("bmcp_")


def section(fixture: str, name: str) -> bytes:
    return load_txtar(FIXTURES / f"{fixture}.txtar")[name].encode()


def pieces(data: bytes, how: str) -> list[bytes]:
    """``data`` cut as a network might deliver it."""
    if how == "whole":
        return [data]
    if how == "events":
        parts = data.split(b"\n\n")
        return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    size = int(how.removeprefix("bytes"))
    return [data[i : i + size] for i in range(0, len(data), size)]


CUTS = ["whole", "events", "bytes7", "bytes64"]


def feed(stream: ChatStream, data: bytes, how: str = "whole") -> tuple[bytes, list[Record]]:
    """One upstream turn through ``stream``: the client bytes and the records taken so far."""
    framer = SSEFramer()
    out = []
    records: list[Record] = []
    for piece in pieces(data, how):
        got = stream.feed_chunk(framer, piece)
        if got:
            out.append(got)
        records += stream.take_records()
    return b"".join(out), records


def first_id(data: bytes) -> str:
    for frame in SSEFramer().feed(data):
        if frame.data.startswith(b"{"):
            return str(orjson.loads(frame.data)["id"])
    raise AssertionError("no chunk")


def rewritten(data: bytes, iid: str = IID) -> bytes:
    """``data`` with the documented rewrite: each chunk's id is the interception id."""
    return data.replace(orjson.dumps(first_id(data)), orjson.dumps(iid))


def chunks(data: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a stream (``[DONE]`` left out)."""
    return [orjson.loads(f.data) for f in SSEFramer().feed(data) if f.data and f.data != b"[DONE]"]


def sdk_view(data: bytes) -> ChatCompletion:
    """What the ``openai`` SDK's accumulator makes of a client's stream."""
    state = ChatCompletionStreamState()
    for raw in chunks(data):
        state.handle_chunk(ChatCompletionChunk.model_validate(raw))
    return state.get_final_completion()


def calls_of(view: ChatCompletion) -> list[ChatCompletionMessageFunctionToolCall]:
    """The function calls of a completion's first choice."""
    calls = view.choices[0].message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) for c in calls)
    return [c for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]


def usage_of(data: bytes) -> list[dict[str, Any]]:
    return [c["usage"] for c in chunks(data) if isinstance(c.get("usage"), dict)]


def token_record(usage: dict[str, Any], msg_id: str) -> TokenUsage:
    """The record the normalisation of ``gateway.records`` asks for, from a usage object."""
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
    return TokenUsage(
        IID,
        msg_id,
        input=usage["prompt_tokens"] - cached,
        output=usage["completion_tokens"],
        reasoning=reasoning,
        cache_read=cached,
    )


def same(records: list[Record], expected: list[Record]) -> None:
    """Records equal but for their creation time."""
    assert [_fields(r) for r in records] == [_fields(r) for r in expected]


def _fields(record: Record) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k != "created_at"}


# -- one turn, no injected tools ----------------------------------------------------------


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("fixture", ["text", "reasoning_cached", "parallel_tools"])
def test_the_client_gets_the_provider_bytes_with_the_id_rewritten(fixture: str, how: str) -> None:
    data = section(fixture, "streaming")
    stream = ChatStream(IID, PROMPT)
    out, records = feed(stream, data, how)
    assert out == rewritten(data).rstrip(b"\n") + b"\n\n"
    assert stream.stop_relayed
    assert stream.error is None
    records += stream.finish()
    msg_id = first_id(data)
    [usage] = usage_of(data)
    calls = [
        ToolUsage(IID, msg_id, c.function.name, c.id, c.function.arguments)
        for c in calls_of(sdk_view(data))
    ]
    same(records, [PromptUsage(IID, msg_id, PROMPT), *calls, token_record(usage, msg_id)])


def test_parallel_calls_are_each_recorded() -> None:
    stream = ChatStream(IID, None)
    out, records = feed(stream, section("parallel_tools", "streaming"), "bytes7")
    tools = [r for r in records if isinstance(r, ToolUsage)]
    assert [(t.tool, t.tool_call_id, orjson.loads(t.args)) for t in tools] == [
        ("get_weather", "call_SYNweather01", {"location": "Paris, France"}),
        ("get_local_time", "call_SYNtime0001", {"timezone": "Europe/Paris"}),
    ]
    assert sdk_view(out).id == IID


def test_usage_is_normalised_and_recorded_once_per_response() -> None:
    data = section("reasoning_cached", "streaming")
    stream = ChatStream(IID, None)
    _, records = feed(stream, data)
    records += stream.finish()
    [token] = [r for r in records if isinstance(r, TokenUsage)]
    [usage] = usage_of(data)
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached and usage["completion_tokens_details"]["reasoning_tokens"]
    assert token.input == usage["prompt_tokens"] - cached
    assert token.cache_read == cached
    assert token.output == usage["completion_tokens"]
    assert token.reasoning == usage["completion_tokens_details"]["reasoning_tokens"]
    assert token.cache_write == 0


@pytest.mark.parametrize("how", CUTS)
def test_the_usage_chunk_is_hidden_from_a_client_that_did_not_ask(how: str) -> None:
    data = section("text", "streaming")
    stream = ChatStream(IID, PROMPT, client_usage=False)
    out, records = feed(stream, data, how)
    records += stream.finish()
    sent = chunks(out)
    # Nor the "usage": null the provider adds to every chunk once usage is asked for: a
    # client that did not ask would not have had the key from the provider.
    assert sent == [
        {k: v for k, v in c.items() if k != "usage"}
        for c in chunks(rewritten(data))
        if c["choices"]
    ]
    assert b'"usage"' not in out
    assert all(c["choices"] for c in sent)
    assert out.endswith(b"data: [DONE]\n\n")
    # Hidden, yet accounted.
    [token] = [r for r in records if isinstance(r, TokenUsage)]
    assert token.output == usage_of(data)[0]["completion_tokens"]


def test_the_usage_chunk_reaches_a_client_that_asked() -> None:
    data = section("text", "streaming")
    out, _ = feed(ChatStream(IID, PROMPT, client_usage=True), data)
    assert usage_of(out) == usage_of(data)


def test_done_is_the_terminal_event() -> None:
    data = section("text", "streaming")
    stream = ChatStream(IID, None)
    feed(stream, data[: data.index(b"data: [DONE]")])
    assert not stream.stop_relayed
    last = stream.feed_chunk(SSEFramer(), b"data: [DONE]\n\n")
    assert last == b"data: [DONE]\n\n"
    assert stream.stop_relayed


def test_a_mid_stream_error_is_relayed_as_it_came() -> None:
    data = section("mid_stream_error", "streaming")
    stream = ChatStream(IID, PROMPT)
    out, records = feed(stream, data, "events")
    assert out == rewritten(data).rstrip(b"\n") + b"\n\n"
    assert stream.error is not None
    assert (stream.error.type, stream.error.message) == (
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
    )
    assert not stream.stop_relayed
    records += stream.finish()
    same(records, [PromptUsage(IID, first_id(data), PROMPT)])


def test_a_stream_cut_before_its_usage_still_yields_what_is_owed() -> None:
    data = section("parallel_tools", "streaming")
    # Cut in the middle of the second call's arguments.
    cut = data[: data.index(b'one\\":\\"Europe')]
    stream = ChatStream(IID, PROMPT)
    _, records = feed(stream, cut, "bytes64")
    assert not stream.stop_relayed
    records += stream.finish()
    msg_id = first_id(data)
    kinds = [type(r).__name__ for r in records]
    assert kinds == ["PromptUsage", "ToolUsage", "ToolUsage"]
    assert [r.tool_call_id for r in records if isinstance(r, ToolUsage)] == [
        "call_SYNweather01",
        "call_SYNtime0001",
    ]
    assert isinstance(records[0], PromptUsage) and records[0].msg_id == msg_id
    assert stream.finish() == []


def test_a_stream_cut_after_its_usage_records_it_on_finish() -> None:
    data = section("text", "streaming")
    stream = ChatStream(IID, None)
    _, records = feed(stream, data[: data.index(b"data: [DONE]")])
    assert records == []  # the usage is the response's once the response ends
    owed = stream.finish()
    same(owed, [token_record(usage_of(data)[0], first_id(data))])


def test_no_key_is_ever_added_to_a_chunk() -> None:
    # A provider that sends no id, no usage key and a comment line: nothing is added.
    data = (
        b": keep-alive\n\n"
        b'data: {"object":"chat.completion.chunk",'
        b'"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1",'
        b'"function":{"name":"f","arguments":"{}"}}]}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    for client_usage in (True, False):
        stream = ChatStream(IID, None, client_usage=client_usage)
        out, _ = feed(stream, data)
        expected = data if client_usage else data.replace(data.split(b"\n\n")[3] + b"\n\n", b"")
        assert out == expected


def test_an_edited_chunk_gains_no_key_either() -> None:
    # Hiding an injected call re-encodes the chunk: still no id where the provider sent none.
    data = (
        b'data: {"choices":[{"index":0,"delta":{"content":"a","tool_calls":[{"index":0,'
        b'"id":"c1","function":{"name":"bmcp_x","arguments":"{}"}}]}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    out, _ = feed(ChatStream(IID, None, injected), data)
    assert chunks(out) == [
        {"choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    ]


def test_an_id_spelt_with_escapes_is_still_rewritten() -> None:
    data = (
        b'data: {"id":"chatcmpl-\\u0041B","choices":[{"index":0,"delta":{"content":"x"}}],'
        b'"usage":null}\n\ndata: [DONE]\n\n'
    )
    out, _ = feed(ChatStream(IID, None), data)
    assert chunks(out) == [
        {"id": IID, "choices": [{"index": 0, "delta": {"content": "x"}}]} | {"usage": None}
    ]


def test_a_provider_spacing_its_json_is_still_read() -> None:
    # Compatible providers may space their JSON: the fast path must not miss the usage chunk.
    data = (
        b'data: {"id": "gen-1", "choices": [{"index": 0, "delta": {"content": "a"}}], '
        b'"usage": null}\n\n'
        b'data: {"id": "gen-1", "choices": [{"index": 0, "delta": {"content": "b"}}], '
        b'"usage": null}\n\n'
        b'data: {"id": "gen-1", "choices": [], "usage": {"prompt_tokens": 5, '
        b'"completion_tokens": 2}}\n\n'
        b"data: [DONE]\n\n"
    )
    stream = ChatStream(IID, None, client_usage=False)
    out, records = feed(stream, data)
    records += stream.finish()
    # Nor does a client that did not ask for usage see the null usage key, however spaced.
    shown = data.replace(data.split(b"\n\n")[2] + b"\n\n", b"").replace(b', "usage": null', b"")
    assert out == shown.replace(b'"gen-1"', orjson.dumps(IID))
    [token] = [r for r in records if isinstance(r, TokenUsage)]
    assert (token.input, token.output) == (5, 2)


def test_crlf_streams_are_rewritten_too() -> None:
    data = section("parallel_tools", "streaming").replace(b"\n", b"\r\n")
    stream = ChatStream(IID, None)
    out, records = feed(stream, data, "bytes64")
    assert out == rewritten(data).rstrip(b"\r\n") + b"\r\n\r\n"
    assert len([r for r in records if isinstance(r, ToolUsage)]) == 2


def test_text_deltas_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast path: once the first chunk is read, runs of text chunks pass as one replace.
    parsed: list[bytes] = []
    real = ChatStream._chunk

    def counting(self: ChatStream, raw: bytes, obj: dict[str, Any]) -> bytes:
        parsed.append(raw)
        return real(self, raw, obj)

    monkeypatch.setattr(ChatStream, "_chunk", counting)
    data = section("reasoning_cached", "streaming")
    for how in ("whole", "events"):
        parsed.clear()
        out, _ = feed(ChatStream(IID, None), data, how)
        assert out == rewritten(data).rstrip(b"\n") + b"\n\n"
        # The first chunk (to learn the id) and the usage chunk; [DONE] is no JSON.
        assert len(parsed) == 2, how


# -- injected tools: several upstream turns, one client stream --------------------------


def run_loop(
    fixture: str, client_usage: bool, how: str = "whole"
) -> tuple[ChatStream, bytes, list[Record], list[list[ToolCall]]]:
    stream = ChatStream(IID, PROMPT, injected, client_usage)
    sections = load_txtar(FIXTURES / f"{fixture}.txtar")
    turns = [sections["streaming"].encode()]
    if "streaming/tool-call" in sections:
        turns.append(sections["streaming/tool-call"].encode())
    out = b""
    records: list[Record] = []
    calls = []
    for i, data in enumerate(turns):
        if i:
            stream.next_turn()
        got, taken = feed(stream, data, how)
        out += got
        records += taken
        result = stream.turn_result()
        calls.append(list(result.tool_calls))
        if i < len(turns) - 1:
            assert result.tool_calls, "the fixture's turn should continue"
            assert not stream.stop_relayed
    records += stream.finish()
    return stream, out, records, calls


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("client_usage", [True, False])
def test_an_injected_loop_reaches_the_client_as_one_stream(client_usage: bool, how: str) -> None:
    stream, out, records, calls = run_loop("injected_loop", client_usage, how)
    first = section("injected_loop", "streaming")
    second = section("injected_loop", "streaming/tool-call")
    assert stream.stop_relayed
    assert out.count(b"[DONE]") == 1 and out.endswith(b"data: [DONE]\n\n")
    assert b"bmcp_" not in out and b"tool_calls" not in out
    sent = chunks(out)
    assert {c["id"] for c in sent} == {IID}
    assert [c["choices"][0]["finish_reason"] for c in sent if c["choices"]].count("stop") == 1
    assert sum(1 for c in sent if c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    view = sdk_view(out)
    assert view.choices[0].message.content == _text(first) + _text(second)
    assert view.choices[0].message.role == "assistant"
    assert view.choices[0].finish_reason == "stop"
    # One usage chunk, with the totals over the turns, when the client asked for it.
    pairs = zip(_ints(usage_of(first)[0]), _ints(usage_of(second)[0]), strict=True)
    totals = [u1 + u2 for u1, u2 in pairs]
    if client_usage:
        [usage] = usage_of(out)
        assert _ints(usage) == totals
        assert _keys(usage) == _keys(usage_of(second)[0])
    else:
        assert usage_of(out) == []
    # The first turn's call, with its arguments, for the gateway to run.
    assert calls[0] == [
        ToolCall("call_SYNadd00001", "bmcp_tools_add", {"a": 2, "b": 3}, first_id(first))
    ]
    same(
        records,
        [
            PromptUsage(IID, first_id(first), PROMPT),
            token_record(usage_of(first)[0], first_id(first)),
            token_record(usage_of(second)[0], first_id(second)),
        ],
    )


def _text(data: bytes) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks(data) if c["choices"]
    )


def _ints(usage: dict[str, Any]) -> list[int]:
    out = []
    for value in usage.values():
        if isinstance(value, dict):
            out += _ints(value)
        else:
            out.append(value)
    return out


def _keys(usage: dict[str, Any]) -> list[str]:
    out = []
    for key, value in usage.items():
        out.append(key)
        if isinstance(value, dict):
            out += [f"{key}.{k}" for k in _keys(value)]
    return out


def test_the_continuing_turn_is_repeated_in_the_continuation() -> None:
    stream = ChatStream(IID, None, injected)
    feed(stream, section("injected_loop", "streaming"))
    result = stream.turn_result()
    assert result.stop_reason == "tool_calls"
    assert result.assistant == {
        "role": "assistant",
        "content": "Let me add.",
        "tool_calls": [
            {
                "id": "call_SYNadd00001",
                "type": "function",
                "function": {"name": "bmcp_tools_add", "arguments": '{"a":2,"b":3}'},
            }
        ],
    }


def test_a_turn_mixing_injected_and_client_calls_is_final() -> None:
    data = section("injected_mixed", "streaming")
    for how in CUTS:
        stream, out, records, calls = run_loop("injected_mixed", True, how)
        assert stream.stop_relayed
        assert calls == [[]]
        result = stream.turn_result()
        assert [c.tool_use_id for c in result.skipped_calls] == ["call_SYNmixadd01"]
        assert result.skipped_calls[0].input == {"a": 1, "b": 2}
        assert result.skip_reason == "not run: the same turn called client tools"
        # The client sees its own call only, at index 0.
        assert b"bmcp_" not in out
        [call] = calls_of(sdk_view(out))
        assert (call.id, call.function.name, call.function.arguments) == (
            "call_SYNmixwx001",
            "get_weather",
            '{"location":"Oslo"}',
        )
        indices = {
            tc["index"]
            for c in chunks(out)
            for ch in c["choices"]
            for tc in ch["delta"].get("tool_calls", [])
        }
        assert indices == {0}
        assert usage_of(out) == usage_of(data)
        tools = [r for r in records if isinstance(r, ToolUsage)]
        assert [t.tool_call_id for t in tools] == ["call_SYNmixwx001"]


def test_two_calls_of_one_injected_tool_both_run_and_the_next_turn_stays_coherent() -> None:
    _, out, records, calls = run_loop("loop_two_calls", True, "bytes7")
    first = first_id(section("loop_two_calls", "streaming"))
    assert calls[0] == [
        ToolCall("call_SYNtwo00001", "bmcp_tools_add", {"a": 1, "b": 2}, first),
        ToolCall("call_SYNtwo00002", "bmcp_tools_add", {"a": 3, "b": 4}, first),
    ]
    view = sdk_view(out)
    assert view.choices[0].message.content == "Sums: 3 and 7."
    [call] = calls_of(view)
    assert (call.id, call.function.name) == ("call_SYNtwowx001", "get_weather")
    assert view.choices[0].finish_reason == "tool_calls"
    second = first_id(section("loop_two_calls", "streaming/tool-call"))
    tools = [r for r in records if isinstance(r, ToolUsage)]
    assert [(t.msg_id, t.tool_call_id) for t in tools] == [(second, "call_SYNtwowx001")]


def test_a_turn_cut_by_length_does_not_run_its_injected_call() -> None:
    data = section("injected_loop", "streaming").replace(
        b'"finish_reason":"tool_calls"', b'"finish_reason":"length"'
    )
    stream = ChatStream(IID, None, injected)
    out, _ = feed(stream, data)
    result = stream.turn_result()
    assert not result.tool_calls
    assert [c.tool_use_id for c in result.skipped_calls] == ["call_SYNadd00001"]
    assert result.skip_reason == "not run: the turn stopped on length, not tool_calls"
    assert stream.stop_relayed
    assert b"bmcp_" not in out
    finishes = [ch["finish_reason"] for c in chunks(out) for ch in c["choices"]]
    assert finishes[-1] == "length"


def test_a_continuing_turn_cut_before_done_is_not_run() -> None:
    data = section("injected_loop", "streaming")
    stream = ChatStream(IID, None, injected)
    feed(stream, data[: data.index(b"data: [DONE]")])
    result = stream.turn_result()
    assert not result.tool_calls
    assert result.skip_reason == "not run: the stream ended before data: [DONE]"
    assert not stream.stop_relayed
