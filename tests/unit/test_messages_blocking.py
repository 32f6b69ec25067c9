"""Unit tests for gateway.intercept.messages.blocking: when a blocking turn continues the loop."""

from __future__ import annotations

import orjson
import pytest

from gateway.intercept.messages.blocking import BlockingTurns
from gateway.testing import load_txtar
from tests.conftest import FIXTURES

IID = "intc_0123456789abcdef"
CUT = load_txtar(FIXTURES / "anthropic" / "synthetic_loop_max_tokens.txtar")["non-streaming"]
ADD = load_txtar(FIXTURES / "anthropic" / "injected_add.txtar")["non-streaming"]


def _injected(name: str) -> bool:
    return name.startswith("bmcp_")


def test_injected_call_cut_by_max_tokens_is_final_and_hidden() -> None:
    result = BlockingTurns(IID, "prompt", _injected).feed(CUT.encode())

    assert result.error == ""
    assert result.tool_calls == []
    body = orjson.loads(result.body)
    assert body["id"] == IID
    assert body["stop_reason"] == "max_tokens"
    assert body["content"] == [{"type": "text", "text": "I'll add those numbers."}]
    (skipped,) = result.skipped_calls
    assert (skipped.name, skipped.tool_use_id) == ("bmcp_tools_add", "toolu_01MaxTokCallBlock67890")
    assert "max_tokens" in result.skip_reason


@pytest.mark.parametrize("stop_reason", ["end_turn", "max_tokens", "pause_turn", None])
def test_only_tool_use_continues(stop_reason: str | None) -> None:
    message = orjson.loads(ADD)
    message["stop_reason"] = stop_reason
    result = BlockingTurns(IID, "prompt", _injected).feed(orjson.dumps(message))

    assert result.tool_calls == []
    assert [c.name for c in result.skipped_calls] == ["bmcp_tools_add"]
    assert [b["type"] for b in orjson.loads(result.body)["content"]] == ["text"]


def test_tool_use_continues() -> None:
    result = BlockingTurns(IID, "prompt", _injected).feed(ADD.encode())

    (call,) = result.tool_calls
    assert (call.name, call.input) == ("bmcp_tools_add", {"a": 2, "b": 3})
    assert result.skipped_calls == []
    assert result.assistant is not None
