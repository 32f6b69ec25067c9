"""The Responses rewriters over real recorded traffic (``../shared/fixtures/aibridge/openai``).

The folder is reference data outside the project: read in place, never copied; skipped when
absent. Expected numbers are computed from each fixture's own usage, never copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.intercept.responses.blocking import BlockingTurns
from gateway.intercept.responses.stream import ResponsesStream
from gateway.records import Record, TokenUsage
from gateway.sse import SSEFramer
from gateway.testing import load_txtar
from tests.conftest import SHARED_FIXTURES

FOLDER = SHARED_FIXTURES / "openai" / "responses"
FILES = sorted(FOLDER.glob("*/*.txtar")) if FOLDER.is_dir() else []
pytestmark = pytest.mark.skipif(not FILES, reason=f"{FOLDER} is absent")

SECTIONS = [
    (path, section)
    for path in FILES
    for section in ("streaming", "non-streaming")
    if section in load_txtar(path) and not load_txtar(path)[section].startswith("HTTP/")
]
CASES = [pytest.param(p, s, id=f"{p.parent.name}-{p.stem}") for p, s in SECTIONS]
INJECTED = [p for p, s in SECTIONS if f"{s}/tool-call" in load_txtar(p)]


def _injected(name: str) -> bool:
    return name.startswith("bmcp_")


def _totals(records: list[Record]) -> tuple[int, int, int]:
    tokens = [r for r in records if isinstance(r, TokenUsage)]
    return (
        sum(t.input + t.cache_read for t in tokens),
        sum(t.cache_read for t in tokens),
        sum(t.output for t in tokens),
    )


def _expected(usages: list[Any]) -> tuple[int, int, int]:
    return (
        sum(u["input_tokens"] for u in usages),
        sum(u["input_tokens_details"]["cached_tokens"] for u in usages),
        sum(u["output_tokens"] for u in usages),
    )


def _stream_usages(data: bytes) -> list[Any]:
    out = []
    for frame in SSEFramer().feed(data):
        if frame.event == "response.completed":
            out.append(orjson.loads(frame.data)["response"]["usage"])
    return out


def _relay(stream: ResponsesStream, data: bytes, size: int) -> tuple[bytes, list[Record], int]:
    framer = SSEFramer()
    out = bytearray()
    records: list[Record] = []
    for i in range(0, len(data), size):
        got = stream.feed_chunk(framer, data[i : i + size])
        if got:
            out += got
        records += stream.take_records()
    return bytes(out), records, framer.pending


@pytest.mark.parametrize(("path", "section"), CASES or [pytest.param(None, None, id="none")])
@pytest.mark.parametrize("size", [1 << 20, 13])
def test_recorded_relayed_byte_for_byte(path: Path, section: str, size: int) -> None:
    text = load_txtar(path)[section]
    if section == "streaming":
        data = text.encode()
        stream = ResponsesStream("iid", "p")
        out, records, pending = _relay(stream, data, size)
        records += stream.finish()
        # What is left unframed at the end (a trailing newline) is no event: never relayed.
        assert out == data[: len(data) - pending]
        assert not data[len(out) :].strip()
        usages = _stream_usages(data)
    else:
        body = text.strip().encode()
        result = BlockingTurns("iid", "p").feed(body)
        assert result.body is body
        records = list(result.records)
        usages = [orjson.loads(body)["usage"]]
    assert _totals(records) == _expected(usages)


@pytest.mark.parametrize("path", INJECTED or [pytest.param(None, id="none")], ids=str)
def test_recorded_injected_loop(path: Path) -> None:
    fx = load_txtar(path)
    if "streaming" in fx:
        first, second = fx["streaming"].encode(), fx["streaming/tool-call"].encode()
        stream = ResponsesStream("iid", "p", _injected)
        out, records, _ = _relay(stream, first, 1 << 20)
        assert stream.turn_result().tool_calls
        stream.next_turn()
        more, rest, _ = _relay(stream, second, 1 << 20)
        records += rest
        assert stream.stop_relayed and not stream.turn_result().tool_calls
        events = [orjson.loads(f.data) for f in SSEFramer().feed(out + more)]
        # The response objects echo the request's tools (injected ones included); no item is
        # an injected call.
        items = [e.get("item") for e in events] + events[-1]["response"]["output"]
        assert not [i for i in items if i and str(i.get("name", "")).startswith("bmcp_")]
        seqs = [e["sequence_number"] for e in events]
        assert seqs == sorted(set(seqs))
        final = events[-1]["response"]
        usages = _stream_usages(first) + _stream_usages(second)
        assert final["usage"]["input_tokens"] == sum(u["input_tokens"] for u in usages)
        assert final["id"] == orjson.loads(SSEFramer().feed(second)[-1].data)["response"]["id"]
        assert _totals(records) == _expected(usages)
