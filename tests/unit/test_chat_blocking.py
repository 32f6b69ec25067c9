"""The Chat Completions blocking rewriter, fed with the synthetic fixtures (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion

from gateway.intercept.chat.blocking import ChatBlocking
from gateway.intercept.rewriter import ToolCall
from gateway.records import PromptUsage, TokenUsage, ToolUsage
from gateway.testing import load_txtar

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openai" / "chat"
IID = "4f1c2a9e-7d3b-4e21-9a0c-5b6d7e8f9a01"


def injected(name: str) -> bool:
    return name.startswith("bmcp_")


def body(fixture: str, name: str = "non-streaming") -> bytes:
    return load_txtar(FIXTURES / f"{fixture}.txtar")[name].encode()


def expected_tokens(completion: dict[str, Any]) -> tuple[int, int, int, int]:
    usage = completion["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    return usage["prompt_tokens"] - cached, cached, usage["completion_tokens"], reasoning


@pytest.mark.parametrize("fixture", ["text", "reasoning_cached", "parallel_tools"])
def test_a_completion_reaches_the_client_with_only_its_id_rewritten(fixture: str) -> None:
    raw = body(fixture)
    completion = orjson.loads(raw)
    result = ChatBlocking(IID, "prompt").feed(raw)
    assert result.error == ""
    assert result.body == raw.replace(orjson.dumps(completion["id"]), orjson.dumps(IID))
    prompt, token, *tools = result.records
    assert isinstance(prompt, PromptUsage)
    assert (prompt.msg_id, prompt.prompt) == (completion["id"], "prompt")
    assert isinstance(token, TokenUsage)
    got = (token.input, token.cache_read, token.output, token.reasoning)
    assert got == expected_tokens(completion)
    calls = completion["choices"][0]["message"].get("tool_calls") or []
    assert [(t.tool, t.tool_call_id, t.args) for t in tools if isinstance(t, ToolUsage)] == [
        (c["function"]["name"], c["id"], c["function"]["arguments"]) for c in calls
    ]
    assert not result.turn.tool_calls


def test_a_body_that_is_no_completion_is_reported() -> None:
    for junk in (b"<html>busy</html>", b'{"object":"list","data":[]}', b"[]"):
        result = ChatBlocking(IID, "p").feed(junk)
        assert result.error == "upstream returned a body that is not a chat completion"
        assert result.body == junk
        assert [type(r) for r in result.records] == [PromptUsage]


def test_an_injected_loop_answers_with_the_last_turn_and_the_summed_usage() -> None:
    turns = ChatBlocking(IID, "p", injected)
    first_raw, last_raw = body("injected_loop"), body("injected_loop", "non-streaming/tool-call")
    first, last = orjson.loads(first_raw), orjson.loads(last_raw)
    one = turns.feed(first_raw)
    assert one.turn.tool_calls == [
        ToolCall("call_SYNadd00002", "bmcp_tools_add", {"a": 2, "b": 3}, first["id"])
    ]
    assert one.turn.assistant == {
        "role": "assistant",
        "content": "Let me add.",
        "tool_calls": first["choices"][0]["message"]["tool_calls"],
    }
    two = turns.feed(last_raw)
    assert not two.turn.tool_calls
    sent = orjson.loads(two.body)
    assert sent["id"] == IID
    assert sent["choices"] == last["choices"]
    expected = dict(last["usage"])
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        expected[key] = first["usage"][key] + last["usage"][key]
    expected["prompt_tokens_details"] = {
        k: first["usage"]["prompt_tokens_details"][k] + v
        for k, v in last["usage"]["prompt_tokens_details"].items()
    }
    assert sent["usage"] == expected
    assert list(sent) == list(last)
    ChatCompletion.model_validate(sent)
    tokens = [r for r in [*one.records, *two.records] if isinstance(r, TokenUsage)]
    assert [(t.msg_id, t.input, t.cache_read) for t in tokens] == [
        (first["id"], *expected_tokens(first)[:2]),
        (last["id"], *expected_tokens(last)[:2]),
    ]
    assert [type(r) for r in one.records].count(PromptUsage) == 1
    assert PromptUsage not in [type(r) for r in two.records]


def test_a_mixed_turn_is_final_and_hides_its_injected_call() -> None:
    raw = body("injected_mixed")
    result = ChatBlocking(IID, None, injected).feed(raw)
    assert not result.turn.tool_calls
    assert [c.tool_use_id for c in result.turn.skipped_calls] == ["call_SYNmixadd02"]
    assert result.turn.skip_reason == "not run: the same turn called client tools"
    message = orjson.loads(result.body)["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert [r.tool_call_id for r in result.records if isinstance(r, ToolUsage)] == [
        "call_SYNmixwx002"
    ]


def test_a_final_turn_with_only_injected_calls_drops_the_key() -> None:
    completion = orjson.loads(body("injected_loop"))
    completion["choices"][0]["finish_reason"] = "length"
    result = ChatBlocking(IID, None, injected).feed(orjson.dumps(completion))
    assert result.turn.skip_reason == "not run: the turn stopped on length, not tool_calls"
    message = orjson.loads(result.body)["choices"][0]["message"]
    assert "tool_calls" not in message
    assert message["content"] == "Let me add."


def test_a_usage_object_nested_a_thousand_levels_is_still_answered() -> None:
    # Usage is two levels deep: deeper nesting is no counter, and must not exhaust the stack.
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    completion = orjson.loads(body("text"))
    completion["usage"]["x"] = "__deep__"
    raw = orjson.dumps(completion).replace(b'"__deep__"', deep)
    for turns in (ChatBlocking(IID, "p"), ChatBlocking(IID, "p", injected)):
        result = turns.feed(raw)
        assert result.error == ""
        assert result.body.startswith(b"{") and deep in result.body
        [token] = [r for r in result.records if isinstance(r, TokenUsage)]
        assert (token.input, token.cache_read, token.output, token.reasoning) == expected_tokens(
            completion
        )


def test_a_call_nested_too_deep_to_print_or_encode_is_still_answered() -> None:
    # A provider's id or name a thousand levels deep: str() of it would exhaust the stack, and
    # the re-encoded body of a loop's last turn exceeds orjson's 254 levels. The body is then
    # relayed as it came, never a 500.
    deep = b"[" * 1000 + b"]" * 1000
    completion = orjson.loads(body("injected_mixed"))
    call = completion["choices"][0]["message"]["tool_calls"][0]
    call["id"] = call["function"]["name"] = "__deep__"
    raw = orjson.dumps(completion).replace(b'"__deep__"', deep)
    turns = ChatBlocking(IID, None, injected)
    first = turns.feed(body("injected_loop"))
    assert first.turn.tool_calls
    result = turns.feed(raw)
    assert result.error == ""
    assert result.body == raw
    calls = [(r.tool, r.tool_call_id) for r in result.records if isinstance(r, ToolUsage)]
    assert calls[0] == ("", "")
