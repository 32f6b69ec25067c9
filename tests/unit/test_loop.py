"""Unit tests for gateway.intercept.loop: the agentic-loop driver, fed with events only.

Each upstream turn is read as the relay reads it: the fixture's bytes go through the real
Messages rewriter of the mode (``MessagesStream`` chunk by chunk, ``BlockingTurns`` whole), whose
``TurnResult`` is sent to the same driver the relay's ``LoopRunner`` drives, with the Messages
continuation the handler gives it. No socket, no event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from gateway.intercept.loop import (
    Action,
    AgenticLoop,
    CallUpstream,
    Finish,
    LoopStateError,
    RunTools,
    ToolsDone,
    TurnEnded,
    UpstreamFailed,
    UpstreamRefused,
)
from gateway.intercept.messages.blocking import BlockingTurns
from gateway.intercept.messages.stream import MessagesStream
from gateway.intercept.messages.tools import continuation
from gateway.intercept.rewriter import ToolCall, TurnResult
from gateway.sse import SSEFramer
from gateway.testing import load_txtar, split_events
from tests.conftest import FIXTURES

IID = "intc_0123456789abcdef"
MODES = pytest.mark.parametrize("streaming", [True, False], ids=["stream", "blocking"])

# An upstream answer: (fixture, section suffix) read as a turn, or a failed continuation call.
Answer = tuple[str, str] | UpstreamRefused | UpstreamFailed
ADD = ("injected_add", "")
ADD_ANSWER = ("injected_add", "/tool-call")
TWO_CALLS = ("loop_two_calls", "")
TEXT = ("text", "")
MIXED = ("loop_mixed", "")
CUT = ("synthetic_loop_max_tokens", "")

OVERLOADED = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
REFUSED = UpstreamRefused(529, OVERLOADED, "overloaded_error", "Overloaded")
UNREACHABLE = UpstreamFailed("upstream_unreachable", "upstream provider unreachable: timed out")


def _injected(name: str) -> bool:
    return name.startswith("bmcp_")


def _section(fixture: str, suffix: str, streaming: bool) -> bytes:
    sections = load_txtar(FIXTURES / "anthropic" / f"{fixture}.txtar")
    return sections[("streaming" if streaming else "non-streaming") + suffix].encode()


def _request(fixture: str) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(
        load_txtar(FIXTURES / "anthropic" / f"{fixture}.txtar")["request"]
    )
    return body


def _result(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": call.tool_use_id,
        "content": [],
        "is_error": False,
    }


class Upstream:
    """Reads upstream turns through the real Messages rewriter of one mode, as the relay does."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.stream = MessagesStream(IID, "prompt", _injected)
        self.blocking = BlockingTurns(IID, "prompt", _injected)
        self.turns = 0
        # What the client got: the stream so far, or the last blocking body.
        self.client = b""

    def read(self, fixture: str, suffix: str) -> TurnResult:
        raw = _section(fixture, suffix, self.streaming)
        self.turns += 1
        if not self.streaming:
            result = self.blocking.feed(raw)
            self.client = result.body
            return result.turn
        if self.turns > 1:
            self.stream.next_turn()
        framer = SSEFramer()
        for frame in split_events(raw):  # one chunk per event, as a provider sends them
            self.client += self.stream.feed_chunk(framer, frame) or b""
        return self.stream.turn_result()


def play(
    streaming: bool,
    answers: Sequence[Answer],
    max_iterations: int = 10,
    fixture: str = "injected_add",
) -> tuple[list[Action], AgenticLoop, Upstream]:
    """Drive a loop as the relay does, the upstream answering ``answers`` in order."""
    upstream = Upstream(streaming)
    driver = AgenticLoop(_request(fixture), max_iterations, continuation)
    pending = list(answers)
    actions: list[Action] = []
    event: TurnEnded | ToolsDone | UpstreamRefused | UpstreamFailed
    event = TurnEnded(upstream.read(*_tuple(pending.pop(0))))
    while True:
        action = driver.send(event)
        actions.append(action)
        if isinstance(action, Finish):
            assert not pending, "the loop ended before the upstream's last answer"
            return actions, driver, upstream
        if isinstance(action, RunTools):
            event = ToolsDone([_result(call) for call in action.calls])
            continue
        answer = pending.pop(0)
        event = answer if not isinstance(answer, tuple) else TurnEnded(upstream.read(*answer))


def _tuple(answer: Answer) -> tuple[str, str]:
    assert isinstance(answer, tuple)
    return answer


def kinds(actions: list[Action]) -> list[str]:
    return [type(action).__name__ for action in actions]


def sent(action: Action) -> dict[str, Any]:
    assert isinstance(action, CallUpstream)
    body: dict[str, Any] = orjson.loads(action.body)
    return body


# -- a single turn -----------------------------------------------------------------------------


@MODES
def test_turn_without_tool_calls_is_final(streaming: bool) -> None:
    actions, driver, _ = play(streaming, [TEXT])

    assert actions == [Finish()]
    assert driver.calls == 1
    assert driver.state == "done"


# -- one and two injected rounds ---------------------------------------------------------------


@MODES
def test_one_injected_round(streaming: bool) -> None:
    actions, driver, upstream = play(streaming, [ADD, ADD_ANSWER])

    assert kinds(actions) == ["RunTools", "CallUpstream", "Finish"]
    run = actions[0]
    assert isinstance(run, RunTools)
    assert [(c.name, c.input) for c in run.calls] == [("bmcp_tools_add", {"a": 2, "b": 3})]
    # The continuation repeats the conversation, the model's turn and the tool's result.
    messages = sent(actions[1])["messages"]
    assert messages[0] == _request("injected_add")["messages"][0]
    assert messages[1]["role"] == "assistant"
    assert [b["type"] for b in messages[1]["content"]] == ["text", "tool_use"]
    assert messages[2] == {"role": "user", "content": [_result(run.calls[0])]}
    assert actions[-1] == Finish()
    assert driver.calls == 2
    # The client gets one message, with no trace of the injected call.
    assert b"bmcp_" not in upstream.client
    if streaming:
        assert upstream.client.count(b"event: message_start") == 1
        assert upstream.client.count(b"event: message_stop") == 1
    else:
        answer = orjson.loads(upstream.client)["content"]
        assert answer == [{"type": "text", "text": "2 + 3 = 5."}]


@MODES
def test_two_injected_rounds_extend_the_same_conversation(streaming: bool) -> None:
    actions, driver, _ = play(streaming, [ADD, ADD, ADD_ANSWER])

    assert kinds(actions) == ["RunTools", "CallUpstream", "RunTools", "CallUpstream", "Finish"]
    first, second = sent(actions[1])["messages"], sent(actions[3])["messages"]
    assert len(first) == 3
    assert second[:3] == first
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant", "user"]
    assert driver.calls == 3


@MODES
def test_two_calls_of_one_turn_run_together(streaming: bool) -> None:
    actions, _, _ = play(streaming, [TWO_CALLS, ("loop_two_calls", "/tool-call")])

    run = actions[0]
    assert isinstance(run, RunTools)
    assert [c.input for c in run.calls] == [{"a": 2, "b": 3}, {"a": 10, "b": 4}]
    (results,) = [m for m in sent(actions[1])["messages"] if m["role"] == "user"][-1:]
    assert [r["tool_use_id"] for r in results["content"]] == [c.tool_use_id for c in run.calls]


# -- final turns that called injected tools ----------------------------------------------------


@MODES
def test_mixed_client_and_injected_calls_go_back_to_the_client(streaming: bool) -> None:
    actions, driver, upstream = play(streaming, [MIXED], fixture="loop_mixed")

    (finish,) = actions
    assert isinstance(finish, Finish)
    assert finish.error_type == ""
    assert [c.name for c in finish.skipped_calls] == ["bmcp_tools_add"]
    assert "client tools" in finish.skip_reason
    assert driver.calls == 1
    assert b"get_weather" in upstream.client and b"bmcp_" not in upstream.client


@MODES
def test_max_tokens_stop_is_final_and_the_cut_call_is_skipped(streaming: bool) -> None:
    actions, _, upstream = play(streaming, [CUT], fixture="synthetic_loop_max_tokens")

    (finish,) = actions
    assert isinstance(finish, Finish)
    assert finish.error_type == ""
    assert [c.name for c in finish.skipped_calls] == ["bmcp_tools_add"]
    assert "max_tokens" in finish.skip_reason
    assert b'"stop_reason":"max_tokens"' in upstream.client.replace(b" ", b"")


# -- the cap -----------------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("cap", [1, 2, 3])
def test_cap_stops_a_model_still_calling_tools(streaming: bool, cap: int) -> None:
    actions, driver, _ = play(streaming, [ADD] * cap, max_iterations=cap)

    assert kinds(actions) == ["RunTools", "CallUpstream"] * (cap - 1) + ["Finish"]
    finish = actions[-1]
    assert isinstance(finish, Finish)
    assert (finish.error_type, finish.status) == ("tool_loop_limit", 502)
    assert "mcp_max_iterations" in finish.message
    assert f"after {cap} upstream calls" in finish.message
    assert finish.skipped_calls == ()
    assert driver.calls == cap


@MODES
def test_last_allowed_turn_may_still_answer(streaming: bool) -> None:
    actions, _, _ = play(streaming, [ADD, ADD_ANSWER], max_iterations=2)

    assert actions[-1] == Finish()


# -- a continuation that fails -----------------------------------------------------------------


@MODES
def test_upstream_error_in_the_second_turn_ends_the_loop(streaming: bool) -> None:
    actions, driver, _ = play(streaming, [ADD, REFUSED])

    assert kinds(actions) == ["RunTools", "CallUpstream", "Finish"]
    finish = actions[-1]
    assert isinstance(finish, Finish)
    assert finish.refused == REFUSED  # relayed to the client as the provider sent it
    assert (finish.error_type, finish.message, finish.status) == (
        "overloaded_error",
        "Overloaded",
        529,
    )
    assert driver.state == "done"


@MODES
def test_unreachable_upstream_in_the_second_turn_ends_the_loop(streaming: bool) -> None:
    actions, _, _ = play(streaming, [ADD, UNREACHABLE])

    finish = actions[-1]
    assert finish == Finish("upstream_unreachable", UNREACHABLE.message, 502)


# -- the client leaving ------------------------------------------------------------------------


def test_client_gone_after_a_turn_runs_no_tool() -> None:
    upstream = Upstream(streaming=True)
    driver = AgenticLoop(_request("injected_add"), 10, continuation)

    action = driver.send(TurnEnded(upstream.read(*ADD), client_gone=True))

    assert action == Finish()


def test_client_gone_while_tools_ran_gets_no_further_turn() -> None:
    upstream = Upstream(streaming=True)
    driver = AgenticLoop(_request("injected_add"), 10, continuation)
    run = driver.send(TurnEnded(upstream.read(*ADD)))
    assert isinstance(run, RunTools)

    action = driver.send(ToolsDone([_result(c) for c in run.calls], client_gone=True))

    assert action == Finish()
    assert driver.calls == 1


# -- events out of order -----------------------------------------------------------------------


def test_events_out_of_order_are_refused() -> None:
    final = TurnEnded(TurnResult())
    calls = TurnEnded(TurnResult(tool_calls=[ToolCall("toolu_1", "bmcp_x", {}, "msg_1")]))
    for first in (ToolsDone([]), REFUSED, UNREACHABLE):
        with pytest.raises(LoopStateError):
            AgenticLoop({}, 10, continuation).send(first)
    driver = AgenticLoop({}, 10, continuation)
    assert isinstance(driver.send(calls), RunTools)
    with pytest.raises(LoopStateError):
        driver.send(final)  # the tools have not returned
    driver = AgenticLoop({}, 10, continuation)
    assert driver.send(final) == Finish()
    with pytest.raises(LoopStateError):
        driver.send(final)  # the loop is over
