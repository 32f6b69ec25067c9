"""Unit tests for Messages request parsing and blocking-response rewriting (pure), and for the
hand-written fixtures they read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.intercept.messages.blocking import BlockingTurns
from gateway.intercept.messages.request import (
    RequestError,
    correlating_tool_call_id,
    last_user_prompt,
    parse_request,
)
from gateway.records import ModelThought, PromptUsage, Record, TokenUsage, ToolUsage
from gateway.testing import load_txtar, parse_txtar
from tests.conftest import fixture_message

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "anthropic"
IID = "intc_fedcba9876543210"
FIXTURE_FILES = sorted(FIXTURES.glob("*.txtar"))


def _sections() -> list[tuple[str, dict[str, str]]]:
    return [(p.stem, load_txtar(p)) for p in FIXTURE_FILES]


REQUESTS = [(name, s["request"].encode()) for name, s in _sections() if "request" in s]
BLOCKING = [
    (name, s["non-streaming"].encode(), s["request"].encode())
    for name, s in _sections()
    if "non-streaming" in s and not s["non-streaming"].startswith("HTTP/")
]


def _of(records: list[Record], cls: type[Any]) -> list[Any]:
    return [r for r in records if isinstance(r, cls)]


_MISSING: Any = object()


def _body(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not _MISSING})


# -- parse_request ----------------------------------------------------------------------------


def test_fixtures_found() -> None:
    assert len(REQUESTS) >= 8
    assert len(BLOCKING) >= 6


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_fixture_is_labelled_synthetic_and_sections_are_distinct(path: Path) -> None:
    """Hand-written fixtures say so, and no two response sections share a message id or usage
    (two real requests never do), so a test reading the wrong section cannot pass by accident."""
    comment, sections = parse_txtar(path.read_text())
    assert "synthetic" in comment.lower()
    messages = [
        fixture_message(text)
        for name, text in sections.items()
        if name != "request" and not text.startswith("HTTP/")
    ]
    ids = [m.id for m in messages]
    assert len(set(ids)) == len(ids), ids
    usages = [
        (
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens or 0,
            u.cache_creation_input_tokens or 0,
        )
        for u in (m.usage for m in messages)
    ]
    assert len(set(usages)) == len(usages), usages


@pytest.mark.parametrize(("name", "body"), REQUESTS, ids=[n for n, _ in REQUESTS])
def test_fixture_requests_parse(name: str, body: bytes) -> None:
    req = parse_request(body)
    assert req.body == body
    assert req.body is body
    parsed = orjson.loads(body)
    assert req.parsed == parsed
    assert req.model == parsed["model"] == "claude-sonnet-4-5"
    assert req.stream is False
    assert req.prompt == parsed["messages"][-1]["content"][-1]["text"]
    assert req.correlating_tool_call_id is None


def test_valid_body_bytes_kept_with_unknown_fields_and_whitespace() -> None:
    body = (
        b'  {"zeta": {"keep": [1, 2.50, 1e3]},\n "model":"m", "stream": true,\n'
        b' "max_tokens": 5, "messages": [{"role":"user","content":"go"}]}\n'
    )
    req = parse_request(body)
    assert req.body == body
    assert req.stream is True
    assert req.model == "m"
    assert req.prompt == "go"


def test_valid_minimal_without_optional_fields() -> None:
    req = parse_request(b'{"model": "m", "messages": []}')
    assert req.stream is False
    assert req.prompt is None
    assert req.correlating_tool_call_id is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"", "body"),
        (b"   \n\t ", "body"),
        (b"{not json", "JSON"),
        (b'{"model": "m",}', "JSON"),
        (b'[{"model": "m"}]', "object"),
        (b'"just a string"', "object"),
        (_body(model=_MISSING), "model"),
        (_body(model=None), "model"),
        (_body(model=42), "model"),
        (_body(model=""), "model"),
        (_body(model=["m"]), "model"),
        (_body(messages=_MISSING), "messages"),
        (_body(messages=None), "messages"),
        (_body(messages={"role": "user"}), "messages"),
        (_body(messages="hi"), "messages"),
        (_body(messages=[{"role": "user", "content": "a"}, "oops"]), "messages.1"),
        (_body(messages=[["user", "hi"]]), "messages.0"),
        (_body(stream="true"), "stream"),
        (_body(stream=1), "stream"),
        (_body(stream=None), "stream"),
        (_body(max_tokens="16"), "max_tokens"),
        (_body(max_tokens=16.0), "max_tokens"),
        (_body(max_tokens=True), "max_tokens"),
        (_body(max_tokens=False), "max_tokens"),
    ],
)
def test_invalid_bodies_rejected(body: bytes, field: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(body)
    assert info.value.status == 400
    assert field in info.value.message
    assert str(info.value) == info.value.message


def test_max_tokens_int_accepted() -> None:
    assert parse_request(_body(max_tokens=0)).model == "claude-sonnet-4-5"


# -- last_user_prompt -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], None),
        ([{"role": "user", "content": "hello"}], "hello"),
        ([{"role": "user", "content": ""}], ""),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}], "q2"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "first"},
                        {"type": "image", "source": {}},
                        {"type": "text", "text": "second"},
                        {"type": "tool_result", "tool_use_id": "t1", "content": "r"},
                    ],
                }
            ],
            "second",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": ""},
                        {"type": "text", "text": 5},
                    ],
                }
            ],
            "",
        ),
        ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}], None),
        ([{"role": "user", "content": []}], None),
        ([{"role": "user", "content": None}], None),
        ([{"role": "user"}], None),
        (["not a dict"], None),
    ],
)
def test_last_user_prompt(messages: list[Any], expected: str | None) -> None:
    assert last_user_prompt(messages) == expected


# -- correlating_tool_call_id -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], None),
        ([{"role": "user", "content": "text only"}], None),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_a", "content": "1"},
                        {"type": "tool_result", "tool_use_id": "toolu_b", "content": "2"},
                        {"type": "text", "text": "thanks"},
                    ],
                }
            ],
            "toolu_b",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_a"},
                        {"type": "tool_result", "tool_use_id": ""},
                    ],
                }
            ],
            "toolu_a",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_old"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            ],
            None,
        ),
        ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 7}]}], None),
        (["junk"], None),
    ],
)
def test_correlating_tool_call_id(messages: list[Any], expected: str | None) -> None:
    assert correlating_tool_call_id(messages) == expected


def test_parse_request_fills_prompt_and_correlation() -> None:
    body = _body(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_9", "name": "w", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_9", "content": "sunny"},
                    {"type": "text", "text": "and tomorrow?"},
                ],
            },
        ]
    )
    req = parse_request(body)
    assert req.prompt == "and tomorrow?"
    assert req.correlating_tool_call_id == "toolu_9"


# -- blocking responses (one turn) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "request_body"), BLOCKING, ids=[n for n, _, _ in BLOCKING]
)
def test_rewrite_blocking_fixture(name: str, body: bytes, request_body: bytes) -> None:
    message = orjson.loads(body)
    msg_id = message["id"]
    prompt = parse_request(request_body).prompt
    assert prompt
    result = BlockingTurns(IID, prompt).feed(body)

    assert result.error == ""
    quoted = orjson.dumps(msg_id)
    assert body.count(quoted) == 1
    assert result.body == body.replace(quoted, orjson.dumps(IID))
    assert all(r.interception_id == IID for r in result.records)

    (usage,) = _of(result.records, TokenUsage)
    u = message["usage"]
    assert usage.msg_id == msg_id
    assert usage.input == u["input_tokens"]
    assert usage.output == u["output_tokens"]
    assert usage.cache_read == u.get("cache_read_input_tokens", 0)
    assert usage.cache_write == u.get("cache_creation_input_tokens", 0)
    split = u.get("cache_creation") or {}
    assert usage.cache_write_5m == split.get("ephemeral_5m_input_tokens", 0)
    assert usage.cache_write_1h == split.get("ephemeral_1h_input_tokens", 0)

    (prompt_rec,) = _of(result.records, PromptUsage)
    assert (prompt_rec.msg_id, prompt_rec.prompt) == (msg_id, prompt)

    tools = [b for b in message["content"] if b["type"] == "tool_use"]
    got = _of(result.records, ToolUsage)
    assert [(t.tool, t.tool_call_id) for t in got] == [(b["name"], b["id"]) for b in tools]
    for record, block in zip(got, tools, strict=True):
        assert record.msg_id == msg_id
        assert orjson.loads(record.args) == block["input"]

    thoughts = [b["thinking"] for b in message["content"] if b["type"] == "thinking"]
    assert [t.content for t in _of(result.records, ModelThought)] == thoughts


def test_rewrite_blocking_fixture_values() -> None:
    by_name = {name: body for name, body, _ in BLOCKING}
    result = BlockingTurns(IID, None).feed(by_name["cache_tokens"])
    (usage,) = _of(result.records, TokenUsage)
    u = orjson.loads(by_name["cache_tokens"])["usage"]
    split = u["cache_creation"]
    expected = (
        u["input_tokens"],
        u["output_tokens"],
        u["cache_read_input_tokens"],
        u["cache_creation_input_tokens"],
        split["ephemeral_5m_input_tokens"],
        split["ephemeral_1h_input_tokens"],
    )
    assert len(set(expected)) == len(expected)  # distinct, so no field can pass for another
    assert (
        usage.input,
        usage.output,
        usage.cache_read,
        usage.cache_write,
        usage.cache_write_5m,
        usage.cache_write_1h,
    ) == expected
    assert _of(result.records, PromptUsage) == []
    result = BlockingTurns(IID, None).feed(by_name["parallel_tools"])
    assert [t.tool for t in _of(result.records, ToolUsage)] == ["get_weather", "get_local_time"]
    assert len(_of(result.records, ModelThought)) == 1


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"type": "message"}'])
def test_rewrite_blocking_not_a_message(body: bytes) -> None:
    result = BlockingTurns(IID, "my prompt").feed(body)
    assert result.body == body
    assert result.error
    (prompt,) = result.records
    assert isinstance(prompt, PromptUsage)
    assert (prompt.interception_id, prompt.msg_id, prompt.prompt) == (IID, "", "my prompt")


def test_rewrite_blocking_id_twice_reencodes() -> None:
    message = {
        "id": "msg_twice",
        "type": "message",
        "content": [{"type": "text", "text": "msg_twice"}],
        "metadata": {"ref": "msg_twice"},
        "usage": {"input_tokens": 2, "output_tokens": 3},
    }
    body = orjson.dumps(message, option=orjson.OPT_INDENT_2)
    result = BlockingTurns(IID, None).feed(body)
    assert result.error == ""
    expected = dict(message, id=IID)
    assert orjson.loads(result.body) == expected
    (usage,) = _of(result.records, TokenUsage)
    assert (usage.msg_id, usage.input, usage.output) == ("msg_twice", 2, 3)
