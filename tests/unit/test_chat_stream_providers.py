"""The Chat Completions stream rewriter and the quirks of compatible providers (bytes only):
Azure's sorted keys and empty ids, OpenRouter's in-band errors, spaced JSON, odd tool-call
indexes. The helpers are those of ``test_chat_stream``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.intercept.chat.stream import ChatStream
from gateway.records import PromptUsage, TokenUsage, ToolUsage
from gateway.sse import SSEFramer
from tests.unit.test_chat_stream import (
    CUTS,
    IID,
    PROMPT,
    chunks,
    feed,
    same,
    section,
    token_record,
    usage_of,
)

AZURE_ID = b'"chatcmpl-SYNazure000000000000000001"'


def parsed_chunks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The raw chunks the rewriter parses from now on (the others took the fast path)."""
    parsed: list[bytes] = []
    real = ChatStream._chunk

    def counting(self: ChatStream, raw: bytes, obj: dict[str, Any]) -> bytes:
        parsed.append(raw)
        return real(self, raw, obj)

    monkeypatch.setattr(ChatStream, "_chunk", counting)
    return parsed


# -- Azure: sorted keys, empty ids ---------------------------------------------------------


@pytest.mark.parametrize("how", CUTS)
def test_an_azure_stream_is_recorded_under_its_completion_id(how: str) -> None:
    # Azure opens with an id-less chunk (its prompt filter results): the turn's id is the first
    # non-empty one, or every record would carry "".
    data = section("azure_sorted_keys", "streaming")
    stream = ChatStream(IID, PROMPT)
    out, records = feed(stream, data, how)
    records += stream.finish()
    msg_id = orjson.loads(AZURE_ID)
    same(records, [PromptUsage(IID, msg_id, PROMPT), token_record(usage_of(data)[0], msg_id)])
    # Every chunk, the id-less ones included, reaches the client under the interception id.
    quoted = orjson.dumps(IID)
    expected = data.replace(AZURE_ID, quoted).replace(b'"id":""', b'"id":' + quoted)
    assert out == expected.rstrip(b"\n") + b"\n\n"


def test_azure_text_deltas_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    # The id is not the first key: the fast path replaces it where it is.
    parsed = parsed_chunks(monkeypatch)
    data = section("azure_sorted_keys", "streaming")
    for how in ("whole", "events"):
        parsed.clear()
        out, _ = feed(ChatStream(IID, None), data, how)
        assert out.count(orjson.dumps(IID)) == 8
        # The two id-less chunks, the first with an id, the usage chunk: no text delta.
        assert len(parsed) == 4, how
        assert not [raw for raw in parsed if b'"content":"' in raw and b'"content":""' not in raw]


def test_an_azure_stream_hides_usage_from_a_client_that_did_not_ask() -> None:
    data = section("azure_sorted_keys", "streaming")
    out, _ = feed(ChatStream(IID, None, client_usage=False), data, "events")
    assert b'"usage"' not in out
    assert [c["choices"] for c in chunks(out)] == [
        c["choices"] for c in chunks(data) if not isinstance(c.get("usage"), dict)
    ]


# -- spaced JSON ---------------------------------------------------------------------------


def spaced(data: bytes) -> bytes:
    """``data`` as a provider spacing its JSON writes it."""
    out = []
    for frame in SSEFramer().feed(data):
        payload = frame.data
        if payload.startswith(b"{"):
            payload = orjson.dumps(orjson.loads(payload)).replace(b'":', b'": ')
            payload = payload.replace(b',"', b', "')
        out.append(b"data: " + payload + b"\n\n")
    return b"".join(out)


@pytest.mark.parametrize("how", CUTS)
def test_a_spaced_null_usage_is_hidden_and_text_deltas_stay_unparsed(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = parsed_chunks(monkeypatch)
    data = spaced(section("text", "streaming"))
    assert data.count(b', "usage": null') == 8
    stream = ChatStream(IID, PROMPT, client_usage=False)
    out, records = feed(stream, data, how)
    records += stream.finish()
    # A client that did not ask for usage sees no usage key, however the provider spaces it.
    assert b'"usage"' not in out
    assert [c["choices"] for c in chunks(out)] == [
        c["choices"] for c in chunks(data) if c["choices"]
    ]
    assert [type(r) for r in records] == [PromptUsage, TokenUsage]
    # The first chunk and the usage chunk only.
    assert len(parsed) == 2, how


def test_a_spaced_null_usage_reaches_a_client_that_asked() -> None:
    data = spaced(section("text", "streaming"))
    out, _ = feed(ChatStream(IID, None, client_usage=True), data)
    assert out == data.replace(b'"chatcmpl-SYNtext0000000000000000001"', orjson.dumps(IID))


def test_a_leading_null_usage_key_is_hidden_too() -> None:
    data = (
        b'data: {"usage":null,"id":"gen-1","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"usage":null,"id":"gen-1","choices":[{"index":0,"delta":{"content":"b"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    out, _ = feed(ChatStream(IID, None, client_usage=False), data)
    assert b'"usage"' not in out
    assert [c["choices"][0]["delta"]["content"] for c in chunks(out)] == ["a", "b"]


# -- in-band errors ------------------------------------------------------------------------

OPENROUTER_ERROR = (
    b'data: {"id":"gen-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}'
    b"\n\n"
    b'data: {"id":"gen-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"provider":"openai","error":{"code":"server_error","message":"Provider disconnected"},'
    b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n'
    b'data: {"id":"gen-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


def test_an_error_chunk_with_choices_fails_the_stream() -> None:
    # OpenRouter ends a failed stream on a chunk with choices and an error: the SDKs raise on
    # any chunk whose error is truthy, so the interception failed too.
    stream = ChatStream(IID, None)
    out, records = feed(stream, OPENROUTER_ERROR, "events")
    records += stream.finish()
    assert stream.error is not None
    assert (stream.error.type, stream.error.message) == ("server_error", "Provider disconnected")
    # The chunk reaches the client under the interception id, and the usage is still recorded.
    assert out == OPENROUTER_ERROR.replace(b'"gen-1"', orjson.dumps(IID))
    same(records, [TokenUsage(IID, "gen-1", input=7, output=2)])


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (b'"upstream overloaded"', ("error", "upstream overloaded")),
        (b'{"type":["x"],"message":{"m":1}}', ('["x"]', '{"m":1}')),
        (b"[" * 300 + b"]" * 300, ("error", "list")),
    ],
)
def test_an_error_of_any_shape_fails_the_stream(error: bytes, expected: tuple[str, str]) -> None:
    data = b'data: {"id":"gen-1","error":' + error + b"}\n\ndata: [DONE]\n\n"
    stream = ChatStream(IID, None)
    out, _ = feed(stream, data)
    assert out == data
    assert stream.error is not None
    assert (stream.error.type, stream.error.message) == expected


def test_a_null_error_is_no_error() -> None:
    # The SDKs read on past a chunk whose error is null: so does the gateway, usage included.
    data = (
        b'data: {"id":"gen-1","choices":[{"index":0,"delta":{"content":"hi"},'
        b'"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"gen-1","error":null,"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    stream = ChatStream(IID, None, client_usage=False)
    out, records = feed(stream, data)
    records += stream.finish()
    assert stream.error is None
    assert stream.stop_relayed
    same(records, [TokenUsage(IID, "gen-1", input=3, output=1)])
    # The usage chunk, which the client did not ask for, is hidden.
    assert out == data.replace(data.split(b"\n\n")[1] + b"\n\n", b"").replace(
        b'"gen-1"', orjson.dumps(IID)
    )


# -- tool-call indexes ---------------------------------------------------------------------


@pytest.mark.parametrize("index", [b"[0]", b"{}", b'"0"', b"null"])
def test_a_tool_call_index_that_is_no_integer_keeps_the_stream_going(index: bytes) -> None:
    def fragment(body: bytes) -> bytes:
        return (
            b'data: {"id":"c-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":'
            + index
            + b","
            + body
            + b'}]},"finish_reason":null}],"usage":null}\n\n'
        )

    data = (
        b'data: {"id":"c-1","choices":[{"index":0,"delta":{"role":"assistant"},'
        b'"finish_reason":null}],"usage":null}\n\n'
        + fragment(
            b'"id":"call_1","type":"function","function":{"name":"f","arguments":"{\\"a\\":"}'
        )
        + fragment(b'"function":{"arguments":"1}"}')
        + fragment(b'"id":"call_2","type":"function","function":{"name":"g","arguments":"{}"}')
        + b'data: {"id":"c-1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\n'
        + b"data: [DONE]\n\n"
    )
    stream = ChatStream(IID, None)
    out, records = feed(stream, data, "bytes7")
    records += stream.finish()
    assert out == data.replace(b'"c-1"', orjson.dumps(IID))
    assert stream.stop_relayed
    same(
        records,
        [
            ToolUsage(IID, "c-1", "f", "call_1", '{"a":1}'),
            ToolUsage(IID, "c-1", "g", "call_2", "{}"),
            TokenUsage(IID, "c-1", input=5, output=9),
        ],
    )


def test_a_chunk_too_deep_to_re_encode_is_relayed_as_it_came() -> None:
    # Its id's bytes appear twice: the chunk is re-encoded to rewrite the id. Nested over
    # orjson's 254 levels, it is relayed as it came rather than the client's stream cut.
    deep = b"[" * 300 + b"]" * 300
    odd = b'data: {"id":"c-1","choices":[{"index":0,"delta":{"content":"c-1"}}],"x":' + deep
    odd += b"}\n\n"
    rest = (
        b'data: {"id":"c-1","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"id":"c-1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    stream = ChatStream(IID, None)
    out, records = feed(stream, odd + rest, "events")
    records += stream.finish()
    assert out == odd + rest.replace(b'"c-1"', orjson.dumps(IID))
    assert stream.stop_relayed
    same(records, [TokenUsage(IID, "c-1", input=2, output=1)])
