"""The spool's backlog as the metrics read it: from memory, at any moment, from any thread.

``aibridged_usage_spool_records`` and ``aibridged_usage_oldest_unacked_age_seconds`` must be
right at every scrape, whether a host is connected or not, without a query on the event loop.
The spool's loop side tells a :class:`Backlog` what changes the floor (acknowledgements, records
dropped by the bounds) and, once per batch, how many records it was given; a scrape reads it.
"""

from __future__ import annotations

from collections import deque

# Seconds between two marks (see ``Backlog``): the age is exact to this, and a host that never
# acknowledges costs one mark per period (a week's are ~6 MB).
MARK_EVERY = 10.0


class Backlog:
    """Records not acknowledged nor dropped, and a lower bound on when the oldest was spooled.

    Marks ``(seq, time)`` say that the records above ``seq`` were spooled at ``time`` or later;
    the first mark is the last one at or below the floor (the highest sequence number
    acknowledged or dropped), so its time bounds the oldest record's.
    """

    __slots__ = ("_holes", "_marks", "_start_high", "trimmed_through")

    def __init__(self) -> None:
        self._marks: deque[tuple[int, float]] = deque()
        self.trimmed_through = 0
        # Sequence numbers the file lacked at start below its high watermark (rows trimmed out
        # of order): not in the backlog.
        self._holes = 0
        self._start_high = 0

    def start(self, acked: int, high: int, depth: int, oldest: float | None, now: float) -> None:
        """What the file held at start: ``depth`` records above ``acked``, the oldest spooled
        at ``oldest``; ``high`` the high watermark."""
        self._holes = max(0, high - acked - depth)
        self._start_high = high
        if depth:
            self._marks.append((acked, oldest if oldest is not None else now))
        self._marks.append((high, now))

    def mark(self, last: int, now: float) -> None:
        """Records up to ``last`` are spooled by ``now`` (called once per committed batch)."""
        marks = self._marks
        if not marks or now - marks[-1][1] >= MARK_EVERY:
            marks.append((last, now))

    def moved(self, acked: int, trimmed_through: int = 0) -> None:
        """The floor moved: acknowledged through ``acked``, dropped through ``trimmed_through``."""
        self.trimmed_through = max(self.trimmed_through, trimmed_through)
        floor = max(acked, self.trimmed_through)
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= floor:
            marks.popleft()

    def read(self, last: int, acked: int) -> tuple[int, float | None]:
        """``(records above the floor up to last, time the oldest was spooled or None)``."""
        floor = max(acked, self.trimmed_through)
        holes = self._holes if floor < self._start_high else 0
        depth = max(0, last - floor - holes)
        if not depth:
            return 0, None
        try:
            return depth, self._marks[0][1]
        except IndexError:  # not started
            return depth, None
