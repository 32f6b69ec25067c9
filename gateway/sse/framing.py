"""Incremental SSE framer working on bytes.

The relay must forward each event as soon as it is complete and must not copy or re-scan the
buffer per chunk, so the framer keeps one ``bytearray`` and resumes its delimiter search where the
previous scan stopped. Frames keep their exact raw bytes (delimiter included): relaying a frame
untouched is then a plain write of ``frame.raw``. The ``event`` name and ``data`` payload are
parsed lazily, because most frames are relayed without being looked at.
"""

from __future__ import annotations

DEFAULT_MAX_FRAME = 16 * 1024 * 1024

# Blank-line terminators once carriage returns have been seen in a stream: real captures mix
# "\n" and "\r\n" line endings.
_CR_DELIMS = (b"\r\n\r\n", b"\n\r\n", b"\r\r", b"\n\n")


class FrameTooLarge(ValueError):
    """An event grew beyond the framer's limit without a terminating blank line."""


class Frame:
    """One complete SSE event: its raw bytes, with ``event`` and ``data`` parsed on first use."""

    __slots__ = ("_data", "_event", "raw")

    def __init__(self, raw: bytes, data: bytes | None = None) -> None:
        # ``data``: the payload when the caller already knows it (a region scan finds it with
        # the frame); it must equal what the ``data`` property would return.
        self.raw = raw
        self._event: str | None = None
        self._data = data

    def __repr__(self) -> str:
        return f"Frame({self.raw!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    @property
    def event(self) -> str:
        """The ``event:`` field, or ``""`` when the frame has none."""
        if self._event is None:
            raw = self.raw
            # Fast path for the common "event: name\n..." layout: routing needs only the name.
            if raw[:7] == b"event: ":
                end = raw.find(b"\n", 7)
                if end > 0:
                    self._event = raw[7:end].rstrip(b"\r ").decode("utf-8", "replace")
                    return self._event
            self._parse()
        assert self._event is not None
        return self._event

    @property
    def data(self) -> bytes:
        """The ``data:`` lines joined with ``\\n`` (one leading space per line removed)."""
        if self._data is None:
            raw = self._raw_data_line()
            if raw is not None:
                self._data = raw
                return raw
            self._parse()
        assert self._data is not None
        return self._data

    def _raw_data_line(self) -> bytes | None:
        # Fast path for "event: name\ndata: payload\n\n" (one data line, LF endings): the
        # payload is a slice, no line splitting.
        raw = self.raw
        if raw[:7] != b"event: ":
            return None
        start = raw.find(b"\ndata: ", 7) + 7
        end = len(raw) - 2
        if start < 7 or raw[end:] != b"\n\n" or raw.find(b"\n", start, end) >= 0:
            return None
        if raw.find(b"\r", 0, end) >= 0 or raw.find(b"\n", 7, start - 7) >= 0:
            return None
        return raw[start:end]

    def _parse(self) -> None:
        event = ""
        data_lines: list[bytes] = []
        for line in self.raw.splitlines():
            if not line or line[:1] == b":":
                continue
            name, sep, value = line.partition(b":")
            if sep and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data_lines.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace").strip()
        self._event = event
        self._data = b"\n".join(data_lines)


class SSEFramer:
    """Split a byte stream into SSE frames: ``feed(chunk)`` returns every frame it completes."""

    __slots__ = ("_buf", "_has_cr", "_max", "_scan")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._max = max_frame_bytes
        self._has_cr = False

    def feed(self, chunk: bytes) -> list[Frame]:
        """Add ``chunk`` and return the frames it completes, in order."""
        buf = self._buf
        buf += chunk
        # find, not "in": "in" on bytes first tries the needle as an integer (a raised and
        # cleared TypeError), about twice the cost; this runs once per upstream chunk.
        if not self._has_cr and chunk.find(b"\r") >= 0:
            self._has_cr = True
            self._scan = 0
        frames: list[Frame] = []
        start = 0
        # A delimiter may straddle the previous chunk boundary: back up by its length minus one.
        pos = max(0, self._scan - 3)
        while True:
            end = _find_delim_cr(buf, pos) if self._has_cr else _find_lf(buf, pos)
            if end < 0:
                break
            frames.append(Frame(bytes(buf[start:end])))
            start = pos = end
        if start:
            del buf[:start]
        self._scan = len(buf)
        if len(buf) > self._max:
            raise FrameTooLarge(f"SSE event larger than {self._max} bytes")
        return frames

    def feed_region(self, chunk: bytes) -> bytes | None:
        """Fast path for the common chunk: whole frames delimited by a bare blank line.

        When nothing is buffered and the stream has no carriage returns, return the run of
        complete frames at the start of ``chunk`` (exact bytes, maybe ``b""``), not split: the
        caller scans it. A trailing partial frame is buffered as ``feed`` would. ``None``: use
        ``feed``.
        """
        if self._buf or self._has_cr or chunk.find(b"\r") >= 0:
            return None
        i = chunk.rfind(b"\n\n")
        if i < 0:
            rest = chunk
        elif i and chunk[i - 1] == 10:
            # The last delimiter ends a run of more than two line feeds: only a left-to-right
            # split knows which of them end frames.
            rest = chunk.split(b"\n\n")[-1]
        else:
            i += 2
            if i == len(chunk):
                return chunk
            rest = chunk[i:]
        if len(rest) > self._max:
            raise FrameTooLarge(f"SSE event larger than {self._max} bytes")
        self._buf += rest
        self._scan = len(rest)
        return chunk[: len(chunk) - len(rest)]

    def flush(self) -> Frame | None:
        """Return what is left at end of stream (an unterminated last event), if anything."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return Frame(rest) if rest.strip() else None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete event."""
        return len(self._buf)


def _find_lf(buf: bytearray, start: int) -> int:
    i = buf.find(b"\n\n", start)
    return -1 if i < 0 else i + 2


def _find_delim_cr(buf: bytearray, start: int) -> int:
    best = -1
    best_len = 0
    for delim in _CR_DELIMS:
        i = buf.find(delim, start, best if best >= 0 else len(buf))
        if i >= 0 and (best < 0 or i < best):
            best, best_len = i, len(delim)
    return -1 if best < 0 else best + best_len


def encode(event: str, data: bytes) -> bytes:
    """Encode one SSE event with an ``event:`` line and a single ``data:`` line."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
