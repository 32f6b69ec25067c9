"""The Chat Completions dialect as the shell holds it, and its conformance with real recorded
OpenAI traffic (``../shared/fixtures/aibridge/openai/chatcompletions``: read in place, never
copied; those tests skip when it is absent)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from gateway.intercept.chat.blocking import ChatBlocking
from gateway.intercept.chat.dialect import CHAT, relayed_error_event, stream_for
from gateway.intercept.chat.request import parse_request
from gateway.intercept.chat.stream import ChatStream
from gateway.intercept.openai.provider import OPENAI
from gateway.records import Record, TokenUsage, ToolUsage
from gateway.sse import SSEFramer
from gateway.testing import load_txtar
from tests.conftest import SHARED_FIXTURES

IID = "4f1c2a9e-7d3b-4e21-9a0c-5b6d7e8f9a01"


def test_the_dialect_is_openai_chat_completions() -> None:
    assert (CHAT.name, CHAT.provider, CHAT.path, CHAT.terminal_event) == (
        "chat",
        OPENAI,
        "/v1/chat/completions",
        "[DONE]",
    )
    assert CHAT.parse_request is parse_request
    assert CHAT.upstream_path == "/chat/completions"  # the base URL holds /v1
    request = parse_request(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}')
    assert isinstance(CHAT.blocking("id-1", request, None), ChatBlocking)


def test_the_keepalive_is_an_sse_comment() -> None:
    [frame] = SSEFramer().feed(CHAT.keepalive)
    assert frame.data == b""
    assert CHAT.keepalive.startswith(b":")


def test_error_events_are_openai_error_chunks() -> None:
    event = CHAT.error_event(502, "upstream went away")
    [frame] = SSEFramer().feed(event)
    assert orjson.loads(frame.data) == {
        "error": {
            "message": "upstream went away",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


def test_a_relayed_error_body_stays_one_data_chunk() -> None:
    # Providers pretty-print error bodies: a newline would end the data: field.
    body = b'{\n  "error": {\n    "message": "Rate limit",\n    "type": "requests"\n  }\n}\n'
    [frame] = SSEFramer().feed(relayed_error_event(body))
    assert orjson.loads(frame.data) == orjson.loads(body)
    compact = b'{"error":{"message":"x"}}'
    assert relayed_error_event(compact) == b"data: " + compact + b"\n\n"
    [frame] = SSEFramer().feed(relayed_error_event(b"bad\ngateway"))
    assert frame.data == b"bad\ngateway"


def test_stream_for_hides_usage_when_the_client_did_not_ask() -> None:
    asked = parse_request(
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    )
    silent = parse_request(b'{"model":"m","stream":true,"messages":[]}')
    usage_only = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1}}\n\n'
    assert stream_for(IID, asked, None).feed_chunk(SSEFramer(), usage_only)
    assert not stream_for(IID, silent, None).feed_chunk(SSEFramer(), usage_only)


# -- recorded traffic -----------------------------------------------------------------------

FOLDER = SHARED_FIXTURES / "openai" / "chatcompletions"
FILES = sorted(FOLDER.glob("*.txtar")) if FOLDER.is_dir() else []
recorded = pytest.mark.skipif(not FILES, reason=f"{FOLDER} is absent")


def _sections(section: str) -> list[Any]:
    found = []
    for path in FILES:
        text = load_txtar(path).get(section)
        if text is not None and not text.startswith("HTTP/") and "request" in load_txtar(path):
            found.append(pytest.param(text.encode(), id=path.stem))
    return found


def _chunks(data: bytes) -> list[dict[str, Any]]:
    frames = SSEFramer().feed(data)
    return [orjson.loads(f.data) for f in frames if f.data and f.data != b"[DONE]"]


def _tokens(usage: dict[str, Any]) -> tuple[int, int, int, int]:
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
    return usage["prompt_tokens"] - cached, cached, usage["completion_tokens"], reasoning


def _feed(stream: ChatStream, data: bytes, size: int) -> tuple[bytes, list[Record]]:
    framer = SSEFramer()
    out = b""
    records: list[Record] = []
    for i in range(0, len(data), size):
        out += stream.feed_chunk(framer, data[i : i + size]) or b""
        records += stream.take_records()
    return out, records


@recorded
@pytest.mark.parametrize("size", [1 << 20, 97])
@pytest.mark.parametrize("data", _sections("streaming"))
def test_recorded_streams_pass_byte_for_byte_but_the_id(data: bytes, size: int) -> None:
    chunks = _chunks(data)
    upstream_id = chunks[0]["id"]
    stream = ChatStream(IID, "prompt")
    out, records = _feed(stream, data, size)
    records += stream.finish()
    # The bytes out are the bytes in, but for the documented id rewrite (a trailing partial
    # line, which no client could read, is left in the framer).
    expected = data.replace(orjson.dumps(upstream_id), orjson.dumps(IID))
    assert out == expected[: len(out)]
    assert expected[len(out) :].strip() == b""
    assert stream.stop_relayed == (b"data: [DONE]" in data)
    usages = [c["usage"] for c in chunks if isinstance(c.get("usage"), dict)]
    tokens = [r for r in records if isinstance(r, TokenUsage)]
    assert [(t.input, t.cache_read, t.output, t.reasoning) for t in tokens] == [
        _tokens(u) for u in usages
    ]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:
        assert stream.error is not None and stream.error.message == errors[0]["message"]
    else:
        assert stream.error is None
    # Every client tool call is recorded, as the SDK accumulates it.
    state = ChatCompletionStreamState()
    for chunk in _chunks(out):
        if "error" not in chunk:
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    calls = [] if errors else state.current_completion_snapshot.choices[0].message.tool_calls
    tools = [r for r in records if isinstance(r, ToolUsage)]
    assert [(t.tool_call_id, t.tool, t.args) for t in tools] == [
        (c.id, c.function.name, c.function.arguments) for c in calls or []
    ]


@recorded
@pytest.mark.parametrize("data", _sections("non-streaming"))
def test_recorded_completions_are_rewritten_and_accounted(data: bytes) -> None:
    completion = orjson.loads(data)
    result = ChatBlocking(IID, None).feed(data)
    assert result.body == data.replace(orjson.dumps(completion["id"]), orjson.dumps(IID))
    [token] = [r for r in result.records if isinstance(r, TokenUsage)]
    assert (token.input, token.cache_read, token.output, token.reasoning) == _tokens(
        completion["usage"]
    )


@recorded
def test_the_recorded_injected_loop_is_one_stream_with_summed_usage() -> None:
    path = FOLDER / "single_injected_tool.txtar"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    sections = load_txtar(path)
    turns = [sections["streaming"].encode(), sections["streaming/tool-call"].encode()]
    stream = ChatStream(IID, "p", lambda name: name.startswith("bmcp_"), client_usage=True)
    out = b""
    records: list[Record] = []
    for i, data in enumerate(turns):
        if i:
            stream.next_turn()
        got, taken = _feed(stream, data, 1 << 20)
        out += got
        records += taken
        if not i:
            [call] = stream.turn_result().tool_calls
            assert call.name == "bmcp_coder_coder_list_workspaces"
            assert not stream.stop_relayed
    records += stream.finish()
    assert stream.stop_relayed and out.count(b"[DONE]") == 1
    usages = [c["usage"] for data in turns for c in _chunks(data) if c.get("usage")]
    [client_usage] = [c["usage"] for c in _chunks(out) if c.get("usage")]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert client_usage[key] == sum(u[key] for u in usages)
    tokens = [r for r in records if isinstance(r, TokenUsage)]
    assert [(t.input, t.cache_read, t.output, t.reasoning) for t in tokens] == [
        _tokens(u) for u in usages
    ]
    assert b"bmcp_" not in out
