"""Unit tests for gateway.intercept.responses.blocking: blocking responses and their turns."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.intercept.responses.blocking import BlockingTurns
from gateway.intercept.responses.dialect import COMPACT, RESPONSES
from gateway.intercept.responses.request import parse_request
from gateway.records import ModelThought, PromptUsage, Record, TokenUsage, ToolUsage
from gateway.testing import load_txtar
from tests.conftest import FIXTURES

FOLDER = FIXTURES / "openai" / "responses"
IID = "intc_0123456789abcdef"
BLOCKING = sorted(p.stem for p in FOLDER.glob("*.txtar") if "non-streaming" in load_txtar(p))


def _body(name: str, section: str = "non-streaming") -> bytes:
    return load_txtar(FOLDER / f"{name}.txtar")[section].strip().encode()


def _of(records: Any, cls: type[Any]) -> list[Any]:
    return [r for r in records if isinstance(r, cls)]


@pytest.mark.parametrize("name", BLOCKING)
def test_body_relayed_as_is_with_its_usage(name: str) -> None:
    body = _body(name)
    result = BlockingTurns(IID, "p").feed(body)
    assert result.body is body
    assert result.error == ""
    usage = orjson.loads(body)["usage"]
    (tokens,) = _of(result.records, TokenUsage)
    assert tokens.input + tokens.cache_read == usage["input_tokens"]
    assert tokens.cache_read == usage["input_tokens_details"]["cached_tokens"]
    assert tokens.output == usage["output_tokens"]
    assert tokens.reasoning == usage["output_tokens_details"]["reasoning_tokens"]
    assert [p.msg_id for p in _of(result.records, PromptUsage)] == [orjson.loads(body)["id"]]


def test_records_of_items() -> None:
    records: list[Record] = list(BlockingTurns(IID, None).feed(_body("reasoning_summary")).records)
    assert [t.source for t in _of(records, ModelThought)] == [
        "reasoning_summary",
        "reasoning_summary",
        "commentary",
    ]
    calls = BlockingTurns(IID, None).feed(_body("client_tools_parallel")).records
    assert [c.tool_call_id for c in _of(calls, ToolUsage)] == ["call_par_1", "call_par_2"]
    custom = BlockingTurns(IID, None).feed(_body("custom_tool")).records
    assert [orjson.loads(c.args) for c in _of(custom, ToolUsage)] == ['print("hello world")']


def test_compaction_is_accounted() -> None:
    turns = COMPACT.blocking(IID, parse_request(b'{"model":"m","input":[]}'), None)
    body = _body("compact")
    result = turns.feed(body)
    assert result.body == body and result.error == ""
    (tokens,) = _of(result.records, TokenUsage)
    assert (tokens.input, tokens.cache_read, tokens.output) == (1000, 4000, 300)


@pytest.mark.parametrize("body", [b"<html>502</html>", b'{"object":"list"}', b"[]", b""])
def test_not_a_response(body: bytes) -> None:
    result = BlockingTurns(IID, "p").feed(body)
    assert result.error == "upstream returned a body that is not a response"
    assert result.body == body
    assert [p.msg_id for p in _of(result.records, PromptUsage)] == [""]


def test_injected_loop() -> None:
    turns = BlockingTurns(IID, "List my templates.", lambda n: n.startswith("bmcp_"))
    first = turns.feed(_body("injected_loop"))
    assert [(c.tool_use_id, c.input, c.msg_id) for c in first.turn.tool_calls] == [
        ("call_inj_1", {"owner": "me"}, "resp_inj_1")
    ]
    assert [i["type"] for i in first.turn.assistant.items] == ["reasoning", "function_call"]
    last = turns.feed(_body("injected_loop", "non-streaming/tool-call"))
    assert not last.turn.tool_calls and not last.turn.skipped_calls
    client = orjson.loads(last.body)
    assert client["id"] == "resp_inj_2"
    assert [i["id"] for i in client["output"]] == ["rs_inj_1", "msg_inj_2"]
    u1 = orjson.loads(_body("injected_loop"))["usage"]
    u2 = orjson.loads(_body("injected_loop", "non-streaming/tool-call"))["usage"]
    assert client["usage"]["input_tokens"] == u1["input_tokens"] + u2["input_tokens"]
    assert client["usage"]["output_tokens_details"]["reasoning_tokens"] == (
        u1["output_tokens_details"]["reasoning_tokens"]
        + u2["output_tokens_details"]["reasoning_tokens"]
    )
    assert set(client["usage"]) == set(u2)
    records = [*first.records, *last.records]
    assert [t.msg_id for t in _of(records, TokenUsage)] == ["resp_inj_1", "resp_inj_2"]
    assert _of(records, ToolUsage) == []


def test_final_turn_drops_its_injected_calls() -> None:
    body = _body("client_tools_parallel").replace(b'"name": "get_weather"', b'"name": "bmcp_w"', 1)
    result = BlockingTurns(IID, None, lambda n: n.startswith("bmcp_")).feed(body)
    assert [c.tool_use_id for c in result.turn.skipped_calls] == ["call_par_1"]
    assert [i["call_id"] for i in orjson.loads(result.body)["output"]] == ["call_par_2"]
    incomplete = BlockingTurns(IID, None, lambda n: True).feed(_body("response_incomplete"))
    assert incomplete.body == _body("response_incomplete")


def test_client_calls_carry_their_item_id() -> None:
    for name in ("client_tools_parallel", "custom_tool"):
        body = _body(name)
        expected = [
            (i["call_id"], i["id"])
            for i in orjson.loads(body)["output"]
            if i["type"] in ("function_call", "custom_tool_call")
        ]
        assert expected and all(call != item for call, item in expected)
        records = BlockingTurns(IID, None).feed(body).records
        assert [(c.tool_call_id, c.item_id) for c in _of(records, ToolUsage)] == expected


def test_injected_call_carries_its_item_id() -> None:
    body = _body("reasoning_summary")
    (item,) = [i for i in orjson.loads(body)["output"] if i["type"] == "function_call"]
    result = BlockingTurns(IID, None, lambda name: name == "add").feed(body)
    assert [(c.tool_use_id, c.item_id) for c in result.tool_calls] == [
        (item["call_id"], item["id"])
    ]


def _failed_body() -> bytes:
    """The failed response of the fixture's stream, as a blocking call would return it."""
    stream = load_txtar(FOLDER / "response_failed.txtar")["streaming"]
    last = stream.strip().rsplit("\n", 1)[-1].removeprefix("data: ")
    return orjson.dumps(orjson.loads(last)["response"])


def test_incomplete_response_is_the_answer_reported_incomplete() -> None:
    body = _body("response_incomplete")
    result = BlockingTurns(IID, None).feed(body)
    assert result.body is body and result.error == ""
    assert result.reported is not None
    assert result.reported.end_status == "incomplete"
    assert result.reported.type == "response_incomplete"
    assert "max_output_tokens" in result.reported.message
    (tokens,) = _of(result.records, TokenUsage)
    assert tokens.output == orjson.loads(body)["usage"]["output_tokens"]


def test_failed_response_is_the_answer_reported_failed() -> None:
    body = _failed_body()
    result = BlockingTurns(IID, None).feed(body)
    assert result.body is body and result.error == ""
    assert result.reported is not None
    error = orjson.loads(body)["error"]
    assert (result.reported.end_status, result.reported.type, result.reported.message) == (
        "failed",
        error["code"],
        error["message"],
    )
    assert BlockingTurns(IID, None).feed(_body("text")).reported is None


@pytest.mark.parametrize(
    "client", [{}, {"parallel_tool_calls": True}, {"parallel_tool_calls": False}]
)
def test_injected_loop_answer_shows_the_clients_tools_and_parallel_tool_calls(
    client: dict[str, Any],
) -> None:
    fx = load_txtar(FOLDER / "injected_loop_echo.txtar")
    request = {**orjson.loads(fx["request"]), **client, "stream": False}
    turns = RESPONSES.blocking(IID, parse_request(orjson.dumps(request)), _bmcp)
    first = turns.feed(fx["non-streaming"].strip().encode())
    assert first.turn.tool_calls
    last = turns.feed(fx["non-streaming/tool-call"].strip().encode())
    answer = orjson.loads(last.body)
    assert answer["tools"] == request["tools"]
    assert answer["parallel_tool_calls"] is request.get("parallel_tool_calls", True)


def test_final_first_answer_shows_the_clients_echo() -> None:
    fx = load_txtar(FOLDER / "injected_loop_echo.txtar")
    turns = RESPONSES.blocking(IID, parse_request(fx["request"].encode()), _bmcp)
    answer = orjson.loads(turns.feed(fx["non-streaming/tool-call"].strip().encode()).body)
    upstream = orjson.loads(fx["non-streaming/tool-call"])
    assert answer == {**upstream, "tools": upstream["tools"][:1], "parallel_tool_calls": True}


def _bmcp(name: str) -> bool:
    return name.startswith("bmcp_")
