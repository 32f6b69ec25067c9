"""Unit tests for gateway.intercept.responses.request and tools: parsing, injection, results."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.intercept.dialect import RequestError
from gateway.intercept.responses.dialect import COMPACT, RESPONSES
from gateway.intercept.responses.output import ResponsesTurn
from gateway.intercept.responses.request import parse_request
from gateway.intercept.responses.tools import (
    continuation,
    function_call_error,
    function_call_output,
    function_tool,
    inject_tools,
)
from gateway.testing import load_txtar
from gateway.tools.naming import ToolRef
from tests.conftest import FIXTURES

FOLDER = FIXTURES / "openai" / "responses"


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"model": "gpt-5", **fields})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"{nope", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"model": 5}', "model"),
    ],
)
def test_bad_bodies_are_refused_with_400(body: bytes, needle: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(body)
    assert err.value.status == 400
    assert needle in err.value.message


def test_background_is_refused_clearly() -> None:
    with pytest.raises(RequestError) as err:
        parse_request(_body(input="hi", background=True))
    assert err.value.status == 400
    assert "background responses are not supported through the gateway" in err.value.message
    assert parse_request(_body(input="hi", background=False)).prompt == "hi"


def test_stream_only_for_json_true() -> None:
    assert parse_request(_body(stream=True)).stream is True
    for value in (False, "true", 1, None):
        assert parse_request(_body(stream=value)).stream is False


@pytest.mark.parametrize(
    ("items", "prompt"),
    [
        ("", ""),
        ("hello", "hello"),
        ([{"role": "user", "content": "hi"}], "hi"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "a"},
                        {"type": "input_image", "image_url": "data:x"},
                        {"type": "input_text", "text": 5},
                        {"type": "input_text", "text": "b"},
                    ],
                }
            ],
            "a\nb",
        ),
        ([{"role": "user", "content": [{"type": "input_image"}]}], None),
        ([{"role": "assistant", "content": "x"}], None),
        ([], None),
        (5, None),
        ([{"type": "function_call_output", "call_id": "c1", "output": "2"}], None),
    ],
)
def test_prompt_rules(items: Any, prompt: str | None) -> None:
    assert parse_request(_body(input=items)).prompt == prompt


def test_correlating_tool_call_id_from_trailing_tool_outputs() -> None:
    items = [
        {"role": "user", "content": "x"},
        {"type": "function_call_output", "call_id": "call_a", "output": "1"},
        {"type": "custom_tool_call_output", "call_id": "call_b", "output": "2"},
    ]
    assert parse_request(_body(input=items)).correlating_tool_call_id == "call_b"
    assert parse_request(_body(input=items[:2])).correlating_tool_call_id == "call_a"
    assert parse_request(_body(input=items[:1])).correlating_tool_call_id is None


def test_body_is_the_clients_bytes_with_unknown_fields() -> None:
    fx = load_txtar(FOLDER / "unknown_item.txtar")
    raw = fx["request"].encode()
    parsed = parse_request(raw)
    assert parsed.body is raw
    assert parsed.prompt == "go"
    compact = COMPACT.parse_request(load_txtar(FOLDER / "compact.txtar")["request"].encode())
    assert compact.stream is False
    assert compact.model == "gpt-5.2-codex"


REF = ToolRef(
    "coder",
    "http://mcp",
    "list",
    "List things.",
    {"required": ["owner"], "$schema": "x", "additionalProperties": False},
)


def test_function_tool_shape() -> None:
    tool = function_tool("bmcp_coder_list", REF)
    assert tool == {
        "type": "function",
        "name": "bmcp_coder_list",
        "description": "List things.",
        # ``required`` without ``properties`` (the reference's crash, #16) stays a valid schema.
        "parameters": {"type": "object", "properties": {}, "required": ["owner"]},
        "strict": False,
    }


def test_inject_appends_and_turns_parallel_off() -> None:
    body: dict[str, Any] = {"tools": [{"type": "custom", "name": "c"}], "parallel_tool_calls": True}
    inject_tools(body, [{"name": "t"}])
    assert body["tools"] == [{"type": "custom", "name": "c"}, {"name": "t"}]
    assert body["parallel_tool_calls"] is False
    untouched: dict[str, Any] = {"parallel_tool_calls": True}
    inject_tools(untouched, [])
    assert untouched == {"parallel_tool_calls": True}
    bad: dict[str, Any] = {"tools": "nope"}
    with pytest.raises(ValueError):
        inject_tools(bad, [{"name": "t"}])
    assert bad == {"tools": "nope"}
    with pytest.raises(ValueError):
        COMPACT.tools.inject({}, [{"name": "t"}])


def test_results_from_mcp_content() -> None:
    text = function_call_output("call_1", [{"type": "text", "text": "two"}], False)
    assert text == {"type": "function_call_output", "call_id": "call_1", "output": "two"}
    failed = function_call_output("call_1", [{"type": "text", "text": "boom"}], True)
    assert failed["output"].startswith("Error:") and "boom" in failed["output"]
    image = function_call_output(
        "call_2", [{"type": "image", "mimeType": "image/png", "data": "AAAA"}], False
    )
    assert image["output"] == [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]
    empty = function_call_output("call_3", [], False)
    assert isinstance(empty["output"], str) and empty["output"]
    assert function_call_error("call_4", "timed out") == {
        "type": "function_call_output",
        "call_id": "call_4",
        "output": "Error: timed out",
    }


ITEMS: list[dict[str, Any]] = [
    {"id": "rs_1", "type": "reasoning", "summary": []},
    {"id": "rs_2", "type": "reasoning", "summary": [], "encrypted_content": "gAAA"},
    {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "t", "arguments": "{}"},
]
RESULT = {"type": "function_call_output", "call_id": "c1", "output": "ok"}


def test_continuation_stateless_repeats_input_turn_and_results() -> None:
    request: dict[str, Any] = {"model": "m", "input": "hi"}
    body = orjson.loads(continuation(request, ResponsesTurn("resp_1", ITEMS), [RESULT]))
    assert body["input"] == [{"role": "user", "content": "hi"}, *ITEMS, RESULT]
    again = orjson.loads(continuation(request, ResponsesTurn("resp_2", ITEMS[2:]), [RESULT]))
    assert len(again["input"]) == 1 + 3 + 1 + 1 + 1


def test_continuation_without_storage_drops_ids_and_unreplayable_reasoning() -> None:
    request: dict[str, Any] = {"model": "m", "input": [], "store": False}
    body = orjson.loads(continuation(request, ResponsesTurn("resp_1", ITEMS), [RESULT]))
    assert body["input"] == [
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAA"},
        {"type": "function_call", "call_id": "c1", "name": "t", "arguments": "{}"},
        RESULT,
    ]


def test_continuation_chains_from_the_turn_when_the_provider_keeps_state() -> None:
    request: dict[str, Any] = {"model": "m", "input": "hi", "previous_response_id": "resp_0"}
    body = orjson.loads(continuation(request, ResponsesTurn("resp_1", ITEMS), [RESULT]))
    assert body["previous_response_id"] == "resp_1"
    assert body["input"] == [RESULT]
    conv: dict[str, Any] = {"model": "m", "input": "hi", "conversation": "conv_1"}
    body = orjson.loads(continuation(conv, ResponsesTurn("resp_1", ITEMS), [RESULT]))
    assert body["input"] == [RESULT] and "previous_response_id" not in body


def test_dialects() -> None:
    assert (RESPONSES.path, COMPACT.path) == ("/v1/responses", "/v1/responses/compact")
    assert RESPONSES.provider is COMPACT.provider
    assert RESPONSES.provider.type == "openai"
    assert RESPONSES.keepalive == b": ping\n\n"
    assert RESPONSES.terminal_event == "response.completed"


@pytest.mark.parametrize("value", [None, True, False])
def test_clients_parallel_tool_calls_kept_before_injection(value: bool | None) -> None:
    body = {
        "model": "m",
        "input": "hi",
        **({} if value is None else {"parallel_tool_calls": value}),
    }
    request = parse_request(orjson.dumps(body))
    inject_tools(request.parsed, [{"type": "function", "name": "bmcp_x"}])
    assert request.parsed["parallel_tool_calls"] is False
    assert request.client_parallel_tool_calls is value
