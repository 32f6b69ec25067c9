"""Unit tests for gateway.sse: incremental SSE framing and the region scan, on bytes."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sse import Frame, FrameTooLarge, RegionScanner, SSEFramer, named_events
from gateway.testing import split_events
from tests.conftest import recorded_sse_streams

STREAMS = recorded_sse_streams()
STREAM_IDS = [name for name, _ in STREAMS]
CUTS = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def _frame_all(data: bytes, cuts: list[int], max_frame_bytes: int | None = None) -> list[Frame]:
    framer = SSEFramer() if max_frame_bytes is None else SSEFramer(max_frame_bytes)
    frames: list[Frame] = []
    for chunk in _chunks(data, cuts):
        frames.extend(framer.feed(chunk))
    rest = framer.flush()
    if rest is not None:
        frames.append(rest)
    assert framer.pending == 0
    return frames


def test_fixtures_found() -> None:
    assert len(STREAMS) >= 6
    for _, data in STREAMS:
        assert b"\r" not in data


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=CUTS)
def test_any_split_lf(name: str, data: bytes, cuts: list[int]) -> None:
    frames = _frame_all(data, cuts)
    assert b"".join(f.raw for f in frames) == data
    events = split_events(data)
    assert len(frames) == len(events)
    assert [f.raw for f in frames] == events


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=CUTS)
def test_any_split_crlf(name: str, data: bytes, cuts: list[int]) -> None:
    crlf = data.replace(b"\n", b"\r\n")
    frames = _frame_all(crlf, cuts)
    assert b"".join(f.raw for f in frames) == crlf
    lf_frames = _frame_all(data, [])
    assert len(frames) == len(lf_frames) == len(split_events(data))
    assert [f.event for f in frames] == [f.event for f in lf_frames]
    assert [f.data for f in frames] == [f.data for f in lf_frames]
    assert [f.raw.replace(b"\r\n", b"\n") for f in frames] == [f.raw for f in lf_frames]


@pytest.mark.parametrize("crlf", [False, True])
def test_byte_by_byte(crlf: bool) -> None:
    data = dict(STREAMS)["text"]
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    framer = SSEFramer()
    frames: list[Frame] = []
    for i in range(len(data)):
        frames.extend(framer.feed(data[i : i + 1]))
    assert framer.flush() is None
    assert b"".join(f.raw for f in frames) == data
    assert len(frames) == len(split_events(data.replace(b"\r\n", b"\n")))
    assert frames[0].event == "message_start"
    assert frames[-1].event == "message_stop"


def test_frame_emitted_as_soon_as_complete() -> None:
    framer = SSEFramer()
    assert framer.feed(b"event: a\ndata: 1\n") == []
    assert framer.pending == len(b"event: a\ndata: 1\n")
    frames = framer.feed(b"\nevent: b\n")
    assert [f.raw for f in frames] == [b"event: a\ndata: 1\n\n"]
    assert framer.pending == len(b"event: b\n")


def test_event_and_data_parsing() -> None:
    frames = SSEFramer().feed(
        b"event: delta\ndata: first\ndata:second\ndata:  third\ndata\n\n"
        b'data: {"a": 1}\n\n'
        b"event:no-space\n: a comment inside\ndata: x\n\n"
    )
    assert len(frames) == 3
    multi, plain, nospace = frames
    assert multi.event == "delta"
    assert multi.data == b"first\nsecond\n third\n"
    assert plain.event == ""
    assert plain.data == b'{"a": 1}'
    assert nospace.event == "no-space"
    assert nospace.data == b"x"


def test_data_before_event_line() -> None:
    (frame,) = SSEFramer().feed(b"data: payload\nevent: late\n\n")
    assert frame.data == b"payload"
    assert frame.event == "late"


def test_crlf_event_and_data() -> None:
    (frame,) = SSEFramer().feed(b"event: ping\r\ndata: a\r\ndata: b\r\n\r\n")
    assert frame.event == "ping"
    assert frame.data == b"a\nb"


def test_comment_frame() -> None:
    (frame,) = SSEFramer().feed(b": keep-alive\n\n")
    assert frame.raw == b": keep-alive\n\n"
    assert frame.event == ""
    assert frame.data == b""


def test_flush_returns_unterminated_event() -> None:
    framer = SSEFramer()
    assert [f.raw for f in framer.feed(b"event: a\ndata: 1\n\nevent: b\ndata: 2")] == [
        b"event: a\ndata: 1\n\n"
    ]
    rest = framer.flush()
    assert rest is not None
    assert rest.raw == b"event: b\ndata: 2"
    assert rest.event == "b"
    assert rest.data == b"2"
    assert framer.pending == 0
    assert framer.flush() is None


def test_flush_ignores_whitespace_only_tail() -> None:
    framer = SSEFramer()
    framer.feed(b"data: 1\n\n\n")
    assert framer.flush() is None


def test_frame_too_large_unterminated() -> None:
    framer = SSEFramer(max_frame_bytes=100)
    framer.feed(b"data: " + b"x" * 60)
    with pytest.raises(FrameTooLarge):
        framer.feed(b"x" * 60)


def test_frame_too_large_single_chunk() -> None:
    with pytest.raises(FrameTooLarge):
        SSEFramer(max_frame_bytes=100).feed(b"event: big\ndata: " + b"x" * 200)


def test_frame_at_limit_is_accepted() -> None:
    framer = SSEFramer(max_frame_bytes=100)
    body = b"data: " + b"x" * 92  # 98 bytes, still unterminated but within the limit
    assert framer.feed(body) == []
    (frame,) = framer.feed(b"\n\n")
    assert frame.raw == body + b"\n\n"


def test_frame_equality_and_hash() -> None:
    a, b = Frame(b"data: 1\n\n"), Frame(b"data: 1\n\n")
    assert a == b
    assert hash(a) == hash(b)
    assert a != Frame(b"data: 2\n\n")


@pytest.mark.parametrize(
    "raw",
    [
        b'event: message_start\ndata: {"a": 1}   \n\n',
        b"event: x\ndata: one\ndata: two\n\n",
        b"event: x\n: comment\ndata: one\n\n",
        b"data: first\nevent: x\n\n",
        b"event: x\ndata:no-space\n\n",
        b"event: x\ndata: \n\n",
    ],
)
def test_data_fast_path_agrees_with_the_line_parser(raw: bytes) -> None:
    fast = Frame(raw)
    slow = Frame(raw)
    slow._parse()
    assert fast.data == slow.data
    assert fast.event == slow.event


def _frame_region(data: bytes, cuts: list[int]) -> list[bytes]:
    """Frame with ``feed_region`` when it applies, ``feed`` otherwise (as the relay does)."""
    framer = SSEFramer()
    raws: list[bytes] = []
    for chunk in _chunks(data, cuts):
        region = framer.feed_region(chunk)
        if region is None:
            raws.extend(f.raw for f in framer.feed(chunk))
            continue
        raws.extend(body + b"\n\n" for body in region.split(b"\n\n")[:-1])
    rest = framer.flush()
    if rest is not None:
        raws.append(rest.raw)
    return raws


@pytest.mark.parametrize(("name", "data"), STREAMS, ids=STREAM_IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=CUTS)
def test_feed_region_mixed_with_feed_frames_like_feed(
    name: str, data: bytes, cuts: list[int]
) -> None:
    assert _frame_region(data, cuts) == [f.raw for f in _frame_all(data, cuts)]


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"\n", b"a", b"event: x", b"\n\n", b"data: 1"])).map(b"".join),
    cuts=CUTS,
)
def test_feed_region_agrees_with_feed_on_blank_line_runs(data: bytes, cuts: list[int]) -> None:
    assert _frame_region(data, cuts) == [f.raw for f in _frame_all(data, cuts)]
    by_feed = SSEFramer()
    frames = by_feed.feed(data)
    framer = SSEFramer()
    region = framer.feed_region(data)
    assert region == b"".join(f.raw for f in frames)
    assert framer.pending == by_feed.pending


def test_feed_region_declines_carriage_returns_and_buffered_bytes() -> None:
    framer = SSEFramer()
    assert framer.feed_region(b"event: ping\r\ndata: {}\r\n\r\n") is None
    framer = SSEFramer()
    chunk = b"event: ping\ndata: {}\n\n"
    assert framer.feed_region(chunk) is chunk
    assert framer.feed_region(b"event: pi") == b""
    assert framer.pending == len(b"event: pi")
    assert framer.feed_region(b"ng\ndata: {}\n\n") is None
    with pytest.raises(FrameTooLarge):
        SSEFramer(max_frame_bytes=16).feed_region(b"event: ping\n\n" + b"data: " + b"x" * 32)


# -- region scan ------------------------------------------------------------------------------


class _Tracker:
    """A toy rewriter: ``start`` begins tracking, ``stop`` ends it and is rewritten."""

    def __init__(self) -> None:
        self.scan_all = False
        self.seen: list[tuple[str, bytes]] = []

    def feed(self, frame: Frame) -> bytes:
        self.seen.append(("feed", frame.raw))
        return frame.raw


def _start(target: _Tracker, frame: Frame) -> bytes:
    target.seen.append(("start", frame.data))
    target.scan_all = True
    return frame.raw


def _stop(target: _Tracker, frame: Frame) -> bytes:
    target.seen.append(("stop", frame.data))
    target.scan_all = False
    return b"event: stopped\n\n"


_SCANNER = RegionScanner(
    named_events(ignored=["ping"], tracked_only=["delta", "stop"]),
    {b"start": _start, b"stop": _stop},
)


def test_region_scan_feeds_only_the_frames_the_rewriter_reads() -> None:
    ping = b"event: ping\ndata: {}\n\n"
    delta = b"event: delta\ndata: d\n\n"
    region = b"".join(
        [
            delta,  # not tracking: passes unread
            b"event: start\ndata: s\n\n",
            ping,  # never read
            delta,  # tracking, no handler: the rewriter's feed
            b"event: stop\ndata: x\n\n",  # rewritten
            delta,
            b"data: unnamed\n\n",  # no event line: the rewriter's feed
        ]
    )
    target = _Tracker()
    out = _SCANNER.scan(target, region)
    assert out == region.replace(b"event: stop\ndata: x\n\n", b"event: stopped\n\n")
    assert target.seen == [
        ("start", b"s"),
        ("feed", delta),
        ("stop", b"x"),
        ("feed", b"data: unnamed\n\n"),
    ]
    # Nothing to read or rewrite: the region itself comes back.
    quiet = ping + delta + ping
    assert _SCANNER.scan(_Tracker(), quiet) is quiet
