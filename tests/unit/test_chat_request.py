"""Chat Completions request parsing, and the injected tools' shapes (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.intercept.chat.calls import CallSlot
from gateway.intercept.chat.request import parse_request
from gateway.intercept.chat.tools import (
    assistant_message,
    chat_tool,
    chat_tool_error,
    chat_tool_result,
    continuation,
    inject_chat_tools,
)
from gateway.intercept.dialect import RequestError
from gateway.testing import load_txtar
from gateway.tools.naming import ToolRef

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openai" / "chat"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "request body is empty: expected a JSON object"),
        (b"  \n", "request body is empty: expected a JSON object"),
        (b"{nope", "request body is not valid JSON"),
        (b"[1]", "request body must be a JSON object"),
        (b'{"messages": []}', "model: field required"),
        (b'{"model": 4, "messages": []}', "model: expected a non-empty string"),
        (b'{"model": "", "messages": []}', "model: expected a non-empty string"),
    ],
)
def test_bad_bodies_are_refused_with_a_clear_400(body: bytes, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(body)
    assert caught.value.status == 400
    assert caught.value.message.startswith(message)


def test_nothing_else_is_refused() -> None:
    # Wrong types of other fields are the provider's to answer.
    body = b'{"model":"m","messages":"x","stream":"yes","n":"two","x_new":{"a":1}}'
    req = parse_request(body)
    assert req.body is body
    assert (req.model, req.stream, req.prompt, req.correlating_tool_call_id) == (
        "m",
        False,
        None,
        None,
    )


def test_a_blocking_body_is_forwarded_as_sent() -> None:
    body = b'{ "model" : "m",\n "messages": [{"role":"user","content":"hi"}], "n": 1.50 }'
    req = parse_request(body)
    assert req.body is body
    assert not req.stream
    assert req.prompt == "hi"


def test_a_stream_without_stream_options_gets_include_usage_appended() -> None:
    body = b'{ "model" : "m",\n "stream": true, "temperature": 1.50, "messages": [] }\n'
    req = parse_request(body)
    assert req.stream
    assert not req.client_usage
    # Every byte the client sent is kept: the field goes inside the closing brace.
    assert req.body == (
        b'{ "model" : "m",\n "stream": true, "temperature": 1.50, "messages": [] '
        b',"stream_options":{"include_usage":true}}\n'
    )
    assert orjson.loads(req.body) == req.parsed
    assert list(req.parsed)[-1] == "stream_options"


@pytest.mark.parametrize(
    "options",
    [{}, {"include_usage": False}, {"include_usage": None, "x": 1}, None],
)
def test_stream_options_without_include_usage_are_patched_keeping_key_order(
    options: Any,
) -> None:
    body = orjson.dumps(
        {"model": "m", "stream_options": options, "stream": True, "messages": [], "zz": 0}
    )
    req = parse_request(body)
    assert not req.client_usage
    sent = orjson.loads(req.body)
    assert sent["stream_options"]["include_usage"] is True
    assert list(sent) == ["model", "stream_options", "stream", "messages", "zz"]
    if isinstance(options, dict):
        assert list(sent["stream_options"])[: len(options)] == list(options)
    assert sent == req.parsed


@pytest.mark.parametrize("options", [b"null", b"{}"])
def test_a_stream_too_deep_to_patch_is_refused_with_a_400(options: bytes) -> None:
    # Forwarded unpatched, it would have the provider report no usage; re-encoding a body
    # nested over 254 levels fails (orjson's limit): refused, not a 500.
    deep = b"[" * 300 + b"]" * 300
    body = b'{"model":"m","stream":true,"stream_options":' + options + b',"x":' + deep + b"}"
    with pytest.raises(RequestError) as caught:
        parse_request(body)
    assert (caught.value.status, caught.value.message) == (
        400,
        "request body nests too deeply (over 254 levels)",
    )


def test_a_client_asking_for_usage_is_forwarded_as_sent() -> None:
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    req = parse_request(body)
    assert req.body is body
    assert req.client_usage


def test_only_json_true_streams() -> None:
    for value in (b'"true"', b"1", b"null", b"false"):
        req = parse_request(b'{"model":"m","stream":' + value + b"}")
        assert not req.stream
        assert b"stream_options" not in req.body


def _messages(*messages: dict[str, Any]) -> bytes:
    return orjson.dumps({"model": "m", "messages": list(messages)})


@pytest.mark.parametrize(
    ("messages", "prompt"),
    [
        ([{"role": "user", "content": "hello"}], "hello"),
        ([{"role": "user", "content": ""}], None),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "first"},
                        {"type": "text", "text": "last"},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                    ],
                }
            ],
            "last",
        ),
        ([{"role": "user", "content": [{"type": "image_url"}]}], None),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], None),
        ([], None),
        (["junk"], None),
    ],
)
def test_prompt_is_the_last_user_message(messages: list[Any], prompt: str | None) -> None:
    assert parse_request(_messages(*messages)).prompt == prompt


def test_a_tool_result_last_correlates_with_its_call() -> None:
    req = parse_request(
        _messages(
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        )
    )
    assert req.correlating_tool_call_id == "call_2"
    assert req.prompt is None
    assert (
        parse_request(_messages({"role": "tool", "content": "x"})).correlating_tool_call_id is None
    )


def test_fixture_requests_parse() -> None:
    files = sorted(FIXTURES.glob("*.txtar"))
    assert files
    for path in files:
        text = load_txtar(path)["request"]
        req = parse_request(text.encode())
        assert req.prompt, path.stem
        assert "synthetic" in path.read_text().split("-- ", 1)[0].lower(), path.stem


# -- tool shapes ---------------------------------------------------------------------------


def _ref(schema: dict[str, Any]) -> ToolRef:
    return ToolRef("srv", "http://srv.invalid/mcp", "add", "Adds two numbers.", schema)


def test_an_injected_tool_is_an_openai_function_with_a_reduced_schema() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    assert chat_tool("bmcp_srv_add", _ref(schema)) == {
        "type": "function",
        "function": {
            "name": "bmcp_srv_add",
            "description": "Adds two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a"],
            },
        },
    }
    assert chat_tool("t", _ref({"required": []}))["function"]["parameters"] == {
        "type": "object",
        "properties": {},
    }


INJECTED = [chat_tool("bmcp_a", _ref({})), chat_tool("bmcp_b", _ref({}))]


def test_injected_tools_are_appended_and_parallel_calls_turned_off() -> None:
    client = [{"type": "function", "function": {"name": "mine"}}]
    body: dict[str, Any] = {"model": "m", "tools": client, "parallel_tool_calls": True}
    inject_chat_tools(body, INJECTED)
    assert [t["function"]["name"] for t in body["tools"]] == ["mine", "bmcp_a", "bmcp_b"]
    assert body["parallel_tool_calls"] is False
    created: dict[str, Any] = {"model": "m"}
    inject_chat_tools(created, INJECTED)
    assert created["tools"] == INJECTED
    assert created["parallel_tool_calls"] is False


def test_nothing_to_inject_touches_nothing() -> None:
    body: dict[str, Any] = {"model": "m", "parallel_tool_calls": True}
    inject_chat_tools(body, [])
    assert body == {"model": "m", "parallel_tool_calls": True}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "tools": {"type": "function"}},
        {"model": "m", "functions": [{"name": "legacy"}]},
    ],
)
def test_a_body_that_forbids_injection_is_left_untouched(body: dict[str, Any]) -> None:
    before = orjson.dumps(body)
    with pytest.raises(ValueError):
        inject_chat_tools(body, INJECTED)
    assert orjson.dumps(body) == before


def test_tool_results_are_tool_messages_of_text() -> None:
    resource = {"uri": "file:///a", "mimeType": "text/plain", "text": "x"}
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "5"},
        {"type": "image", "mimeType": "image/png", "data": "iVBORw0KGgo="},
        {"type": "resource", "resource": resource},
    ]
    result = chat_tool_result("call_1", content, False)
    assert result["role"] == "tool"
    assert result["tool_call_id"] == "call_1"
    lines = result["content"].split("\n")
    assert lines[0] == "5"
    assert "image/png" in lines[1]
    assert "Resource (MIME: text/plain, URI: file:///a)" in result["content"]
    assert chat_tool_result("c", [], False)["content"] == "(the tool returned no content)"
    failed = chat_tool_result("c", [{"type": "text", "text": "boom"}], True)
    assert failed["content"] == "Error: boom"
    assert chat_tool_error("c", "tool x not found") == {
        "role": "tool",
        "tool_call_id": "c",
        "content": "Error: tool x not found",
    }


def test_the_continuation_repeats_the_turn_then_each_result() -> None:
    request: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "2+3?"}]}
    slot = CallSlot(0, "call_1", "bmcp_add", ['{"a":2,', '"b":3}'])
    assistant = assistant_message("Adding.", [slot, CallSlot(0, "", "lost")])
    results = [chat_tool_result("call_1", [{"type": "text", "text": "5"}], False)]
    sent = orjson.loads(continuation(request, assistant, results))
    assert sent["messages"] == [
        {"role": "user", "content": "2+3?"},
        {
            "role": "assistant",
            "content": "Adding.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "bmcp_add", "arguments": '{"a":2,"b":3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    assert assistant_message("", [])["content"] is None
    # Each continuation extends the previous one.
    again = orjson.loads(continuation(request, assistant, results))
    assert len(again["messages"]) == 5
