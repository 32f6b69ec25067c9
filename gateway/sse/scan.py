"""Region scan: find, in a run of whole SSE frames, the few a stream rewriter must read (pure).

Most frames of a stream (text deltas, keep-alives) reach the client as the provider sent them. A
rewriter fed one ``Frame`` at a time pays Python work for each; fed a region of whole frames
(``SSEFramer.feed_region``) it can let a regex find the frames it must read, in C, and pass the
bytes between them untouched. Which frames those are is the dialect's business: a
:class:`FramePatterns` says it once per dialect, and a :class:`RegionScanner` built from it
drives one rewriter type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gateway.sse.framing import Frame


@dataclass(frozen=True, slots=True)
class FramePatterns:
    """Which frames of a dialect a rewriter may leave unread, as regex fragments (bytes).

    ``head`` matches, empty, at the start of every frame: group 1 is the frame's name (the key
    of the rewriter's handler table; None when it has none the pattern recognises) and group 2
    its data payload when the frame has the one-data-line layout, exactly as ``Frame.data``
    would return it (None otherwise). ``skip`` matches at the start of a frame the rewriter does
    not need while it tracks nothing (the most frames); ``skip_tracking`` at one it does not
    need even while it tracks something (keep-alives). A dialect whose frames carry only
    ``data:`` lines (Chat Completions) writes its own fragments; :func:`named_events` builds
    them for dialects whose frames start with an ``event:`` line.
    """

    head: bytes
    skip: bytes
    skip_tracking: bytes


# The standard layout ``event: NAME\ndata: PAYLOAD\n\n``: the frame ends at its first blank
# line, as ``bytes.split`` cuts it, so the payload is what ``Frame.data`` would return. Frames
# of any other layout match with the groups unset and are parsed by ``Frame``.
_NAMED_HEAD = rb"(?=event: ([a-z_]+)\n(?:data: ([^\n]*)\n\n)?|)"


def named_events(ignored: Iterable[str], tracked_only: Iterable[str]) -> FramePatterns:
    """Patterns for frames named by a leading ``event:`` line.

    ``ignored``: events the rewriter never reads (keep-alives such as ``ping``);
    ``tracked_only``: events it reads only while it tracks something.
    """
    never = list(ignored)
    return FramePatterns(
        head=_NAMED_HEAD,
        skip=_event_lines([*never, *tracked_only]),
        skip_tracking=_event_lines(never),
    )


def _event_lines(names: list[str]) -> bytes:
    alternatives = "|".join(re.escape(name) for name in names)
    return b"event: (?:" + alternatives.encode() + b")\n"


class ScanTarget(Protocol):
    """A rewriter a :class:`RegionScanner` can drive."""

    # Whether the rewriter tracks something (then only ``skip_tracking`` frames pass unread).
    # Read before each frame it may change: kept as a plain attribute, never computed.
    scan_all: bool

    def feed(self, frame: Frame) -> bytes:
        """Process a frame its handler table does not name; return the client bytes."""
        ...


T = TypeVar("T", bound=ScanTarget)
Handler = Callable[[T, Frame], bytes]


class RegionScanner(Generic[T]):
    """Feeds the frames of a region that a rewriter must read to it, the rest passing as bytes."""

    __slots__ = ("_first", "_first_all", "_handlers", "_scan", "_scan_all")

    def __init__(self, patterns: FramePatterns, handlers: Mapping[bytes, Handler[T]]) -> None:
        """``handlers``: by frame name (group 1 of ``patterns.head``); ``target.feed`` else."""
        # Each pattern matches, empty, at the start of a frame the rewriter must see. ``_scan*``
        # find frames after the delimiter ending the frame before, ``_first*`` match a region's
        # first frame: the literal prefix of ``_scan*`` keeps the search in C (``\A|\n\n``
        # would try a match at every byte). ``\Z``: the end of the region is no frame.
        some = rb"(?!" + patterns.skip + rb"|\Z)" + patterns.head
        every = rb"(?!" + patterns.skip_tracking + rb"|\Z)" + patterns.head
        self._first = re.compile(some)
        self._first_all = re.compile(every)
        self._scan = re.compile(rb"\n\n" + some)
        self._scan_all = re.compile(rb"\n\n" + every)
        self._handlers = handlers

    def scan(self, target: T, region: bytes) -> bytes:
        """Feed ``target`` the frames of ``region`` it must read; return the client bytes.

        ``region`` is a run of whole frames (``SSEFramer.feed_region``). When no frame changes,
        ``region`` itself is returned.
        """
        edits: list[tuple[int, int, bytes]] = []
        every = target.scan_all
        pos = 0
        m = (self._first_all if every else self._first).match(region)
        if m is not None:
            pos = self._feed_match(target, region, m, edits)
        while True:
            every = target.scan_all
            for m in (self._scan_all if every else self._scan).finditer(region, pos):
                pos = self._feed_match(target, region, m, edits)
                if every is not target.scan_all:
                    break  # tracking started or stopped: go on with the other pattern
            else:
                break
        if not edits:
            return region
        pieces = []
        done = 0
        for start, end, out in edits:
            pieces.append(region[done:start])
            pieces.append(out)
            done = end
        pieces.append(region[done:])
        return b"".join(pieces)

    def _feed_match(
        self, target: T, region: bytes, m: re.Match[bytes], edits: list[tuple[int, int, bytes]]
    ) -> int:
        """Feed the frame starting where ``m`` ends; return the position of its delimiter."""
        start = m.end()
        data = m[2]
        end = m.end(2) if data is not None else region.find(b"\n\n", start)
        frame = Frame(region[start : end + 2], data)
        name = m[1]
        handler = self._handlers.get(name) if name is not None else None
        out = handler(target, frame) if handler is not None else target.feed(frame)
        if out is not frame.raw:
            edits.append((start, end + 2, out))
        return end
