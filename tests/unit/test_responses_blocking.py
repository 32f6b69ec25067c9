"""Unit tests for gateway.intercept.responses.blocking: blocking responses and their turns."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.intercept.responses.blocking import BlockingTurns
from gateway.intercept.responses.dialect import COMPACT
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
    turns = COMPACT.blocking(IID, None, None)
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
