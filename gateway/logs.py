"""Logging: one line per event, JSON (one object a line) or text (``key=value``).

Secrets are never passed in. Extra fields of a record (``extra={...}``) become keys of the JSON
object, or ``key=value`` pairs after a text line's message; JSON lines start with ``time``
(UTC, ISO 8601), ``level``, ``logger`` and ``message``.

Per-request lines (an interception's end, a refused request) go through :class:`EventLog`.
Under the daemon (:func:`setup_logging`) they skip ``logging`` altogether: building a
``LogRecord``, dispatching it and writing each line through the text stream costs several
times the line itself, on every request. They are serialised at once and written to stderr in
batches, at most ``FLUSH_EVERY`` seconds later (and at shutdown).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# Libraries that log every HTTP request at INFO (httpx during MCP calls) or chatter about their
# sessions ("client" is the MCP SDK's session logger): WARNING and above only, whatever
# log_level says.
QUIET_LIBRARIES = ("httpx", "httpx2", "httpcore", "httpcore2", "mcp", "client", "sse_starlette")

# Longest wait before a per-request line reaches stderr.
FLUSH_EVERY = 0.1
# What ``EventLog.mode`` says: no line wanted; JSON lines from a template (``add_json``);
# a line from a dict (``emit``).
OFF, JSON_LINES, FIELDS = 0, 1, 2
# The keys every event line starts with (see ``EventLog.emit``).
_HEAD = ("time", "level", "logger", "message")


def _text_value(value: object) -> str:
    # Quoted when it could be mistaken for several fields or lines (client-chosen text may hold
    # spaces, quotes or newlines: one log line stays one line).
    if isinstance(value, str) and (
        not value.isprintable() or " " in value or "=" in value or '"' in value or not value
    ):
        return repr(value)
    return str(value)


def _text_fields(fields: Mapping[str, object]) -> str:
    return " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())


_UTC_MILLIS = tuple(f".{n:03d}Z" for n in range(1000))
_LOCAL_MILLIS = tuple(f",{n:03d}" for n in range(1000))


class _Clock:
    """Time stamps for log lines: the date and time formatted once per second, milliseconds
    from a table (formatting them per line costs more than the rest of the stamp).

    ``second``, ``raw`` and ``raw_millis`` let ``EventLog.add_json`` build a stamp as bytes
    without a call.
    """

    __slots__ = ("_millis", "_text", "_utc", "raw", "raw_millis", "second")

    def __init__(self, utc: bool) -> None:
        self._utc = utc
        self._millis = _UTC_MILLIS if utc else _LOCAL_MILLIS
        self.raw_millis = tuple(m.encode() for m in self._millis)
        self.second = -1
        self._text = ""
        self.raw = b""

    def stamp(self, created: float) -> str:
        """``2026-11-30T14:23:50.123Z`` (UTC) or ``2026-11-30 14:23:50,123`` (local, text)."""
        second = int(created)
        if second != self.second:
            self.second = second
            if self._utc:
                self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self.raw = self._text.encode()
        return self._text + self._millis[int((created - second) * 1000)]


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value ...`` with the record's ``extra`` fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._clock = _Clock(utc=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._clock.stamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        return f"{line} {_text_fields(extras)}" if extras else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, the extra
    fields, and ``exception`` (its traceback) when there is one."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock(utc=True)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self._clock.stamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field of a type orjson does not know is logged as its str().
        return orjson.dumps(line, default=str).decode()


class _Direct:
    """Where :class:`EventLog` writes under the daemon: the handler's stream, in batches."""

    __slots__ = (
        "clock",
        "dropped_bytes",
        "dropped_lines",
        "handler",
        "info",
        "json",
        "loop",
        "pending",
        "retry_loop",
        "thread",
    )
    # Lines kept while stderr cannot take them (a non-blocking pipe whose reader lags), in bytes;
    # how long a write off the event loop waits for stderr (before the loop runs, at shutdown).
    BLOCKED_MAX = 1 << 20
    BLOCKED_WAIT = 2.0

    def __init__(self, handler: logging.StreamHandler[Any], as_json: bool, level: int) -> None:
        self.handler = handler
        self.json = as_json
        self.info = level <= logging.INFO
        self.clock = _Clock(utc=as_json)
        self.pending: list[bytes] = []
        # Set while a daemon runs (``EventLog.bind``): batches are flushed from its loop.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = 0
        # Lines given up while stderr could not take them (past ``BLOCKED_MAX``), told once it can.
        self.dropped_lines = 0
        self.dropped_bytes = 0
        # The loop on which a retry of a blocked write is scheduled (one at a time).
        self.retry_loop: asyncio.AbstractEventLoop | None = None

    def add(self, data: bytes) -> None:
        pending = self.pending
        pending.append(data)
        if len(pending) == 1:
            self.schedule()

    def schedule(self) -> None:
        """The first line of a batch is queued: write it (and what follows) soon."""
        if self.loop is None:
            self.flush()
        else:
            self.loop.call_later(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        """Write the queued lines. What a non-blocking stderr does not take now stays queued,
        first, and is retried shortly (on the loop's thread: never blocking it)."""
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending = []
        handler = self.handler
        # Under the handler's lock: lines of other threads are never cut in two.
        handler.acquire()
        try:
            stream = handler.stream
            stream.flush()
            data = self._write(stream.fileno(), data)
        except BlockingIOError:  # from stream.flush: nothing of ``data`` written yet
            pass
        except Exception:  # a closed or broken stderr must not fail the daemon
            data = b""
        finally:
            handler.release()
        if data:
            self._blocked(data)

    def _on_loop(self) -> bool:
        loop = self.loop
        return loop is not None and self.thread == threading.get_ident() and not loop.is_closed()

    def _write(self, fd: int, data: bytes) -> bytes:
        # ``data`` written to ``fd``, then the notice of lines dropped, if any; what is left when
        # ``fd`` would block (off the loop: after waiting up to ``BLOCKED_WAIT`` for it).
        view = memoryview(data)
        deadline = 0.0
        while True:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    if self._on_loop():
                        return bytes(view)
                    now = time.monotonic()
                    deadline = deadline or now + self.BLOCKED_WAIT
                    if now >= deadline or not self._writable(fd, deadline - now):
                        return bytes(view)
            if not self.dropped_lines:
                return b""
            view = memoryview(self._dropped_notice())

    def _blocked(self, data: bytes) -> None:
        # Keep the unwritten ``data`` (its oldest ``BLOCKED_MAX`` bytes, whole lines) ahead of
        # the lines queued since, and retry soon.
        limit = self.BLOCKED_MAX
        if len(data) > limit:
            # The first line may be the rest of one partly written: it is kept whole.
            cut = data.rfind(b"\n", 0, limit) + 1 or data.find(b"\n") + 1 or len(data)
            self.dropped_lines += data.count(b"\n", cut)
            self.dropped_bytes += len(data) - cut
            data = data[:cut]
        if data:
            self.pending.insert(0, data)
        loop = self.loop
        if loop is not None and self.retry_loop is not loop and self._on_loop():
            self.retry_loop = loop
            loop.call_later(FLUSH_EVERY, self._retry)

    def _retry(self) -> None:
        self.retry_loop = None
        self.flush()

    def _dropped_notice(self) -> bytes:
        # One line for the lines ``_blocked`` gave up; the counts start again.
        fields = {"dropped_lines": self.dropped_lines, "dropped_bytes": self.dropped_bytes}
        self.dropped_lines = self.dropped_bytes = 0
        stamp = self.clock.stamp(time.time())
        message = "log lines dropped: stderr was not writable"
        if self.json:
            head = {"time": stamp, "level": "WARNING", "logger": "aibridged.logs"}
            line = head | {"message": message} | fields
            return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
        return f"{stamp} WARNING aibridged.logs {message} {_text_fields(fields)}\n".encode()

    @staticmethod
    def _writable(fd: int, timeout: float) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return bool(poller.poll(timeout * 1000))


class EventLog:
    """A logger for per-request events (an interception's end, a refused request).

    Under the daemon a line is serialised like any other record and queued for the daemon's
    handler (see the module docstring); elsewhere (tests, an embedding application) it is an
    ordinary ``logger.info``, seen by whatever handlers are configured.
    """

    _direct: _Direct | None = None

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        self.name = name

    def enabled(self) -> bool:
        """Whether INFO lines are wanted (check before building a line)."""
        direct = EventLog._direct
        return direct.info if direct is not None else self.logger.isEnabledFor(logging.INFO)

    def mode(self) -> int:
        """``OFF``, ``JSON_LINES`` (the daemon writes JSON: :meth:`add_json` may be used) or
        ``FIELDS`` (use :meth:`emit`)."""
        direct = EventLog._direct
        if direct is None:
            return FIELDS if self.logger.isEnabledFor(logging.INFO) else OFF
        if not direct.info:
            return OFF
        return JSON_LINES if direct.json else FIELDS

    def add_json(self, template: bytes, values: tuple[object, ...]) -> None:
        """Log the line ``template % (time, *values)`` (see :func:`json_template`), the mode
        being ``JSON_LINES``: about half the cost of :meth:`emit` (no dict, bytes only)."""
        direct = EventLog._direct
        if direct is None:
            return
        # The stamp and ``_Direct.add`` inlined: two calls fewer per request.
        clock = direct.clock
        now = time.time()
        second = int(now)
        if second != clock.second:
            clock.stamp(now)
        stamp = clock.raw + clock.raw_millis[int((now - second) * 1000)]
        pending = direct.pending
        pending.append(template % (stamp, *values))
        if len(pending) == 1:
            direct.schedule()

    def emit(self, line: dict[str, object]) -> None:
        """Log ``line`` at INFO, :meth:`enabled` being true: ``{"time": "", "level": "INFO",
        "logger": <this logger's name>, "message": ..., **fields}`` (built whole by the caller:
        one dict per line); ``time`` is filled in here."""
        direct = EventLog._direct
        if direct is None:
            fields = {k: v for k, v in line.items() if k not in _HEAD}
            self.logger.info(str(line["message"]), extra=fields)
            return
        line["time"] = direct.clock.stamp(time.time())
        if direct.json:
            try:
                data = orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE)
            except TypeError:  # text that is not UTF-8 (surrogates): escaped instead
                data = (json.dumps(line, default=str) + "\n").encode()
            direct.add(data)
            return
        fields = {k: v for k, v in line.items() if k not in _HEAD}
        text = f"{line['time']} INFO {self.name} {line['message']} {_text_fields(fields)}\n"
        direct.add(text.encode("utf-8", "backslashreplace"))

    @staticmethod
    def bind(loop: asyncio.AbstractEventLoop | None) -> None:
        """Flush batches from ``loop`` (a daemon starting), or at once (None: it stopped; what
        is queued is written now)."""
        direct = EventLog._direct
        if direct is not None:
            direct.loop = loop
            direct.thread = threading.get_ident()
            if loop is None:
                direct.flush()


def json_template(logger: str, message: str, fields: tuple[tuple[str, str], ...]) -> bytes:
    """A whole JSON event line for :meth:`EventLog.add_json`, ``%``-formatted bytes.

    ``fields`` are ``(key, spec)``: ``spec`` formats the value's JSON text, given as bytes:
    ``'"%s"'`` for ASCII text known to need no escaping, ``"%s"`` for JSON text
    (``orjson.dumps(value)``), ``"%d"`` for an integer. An empty key splices ``spec`` alone:
    ``("", "%s")`` takes several ``"key":value`` members rendered beforehand.
    """

    def text(value: str) -> str:
        return orjson.dumps(value).decode().replace("%", "%%")

    head = f'{{"time":"%s","level":"INFO","logger":{text(logger)},"message":{text(message)}'
    line = head + "".join(f",{text(key)}:{spec}" if key else f",{spec}" for key, spec in fields)
    line += "}\n"
    return line.encode()


class _Handler(logging.StreamHandler[Any]):
    """The daemon's stderr handler: a record logged on the event loop first writes the event
    lines queued before it, so that the log keeps the order of events."""

    def emit(self, record: logging.LogRecord) -> None:
        direct = EventLog._direct
        if direct is not None and direct.pending and direct.thread == threading.get_ident():
            direct.flush()
        super().emit(record)


def default_format(stream: Any = None) -> str:
    """``text`` when stderr is a terminal, ``json`` otherwise (a container, a log collector)."""
    stream = sys.stderr if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def setup_logging(level: str, fmt: str | None = None) -> None:
    """Configure the root logger for the daemon: ``fmt`` ``json`` or ``text`` (None: see
    :func:`default_format`) on stderr, at ``level``; third-party chatter at WARNING."""
    as_json = (fmt or default_format()) == "json"
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # aiohttp logs every client disconnect with a traceback; they are expected on a gateway.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    EventLog._direct = direct = _Direct(handler, as_json, root.getEffectiveLevel())
    # Lines still batched when the process exits (a failed shutdown, a closed loop) are written.
    atexit.register(direct.flush)
