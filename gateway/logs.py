"""Logging setup: one line per event, extra fields as ``key=value`` (secrets never passed in)."""

from __future__ import annotations

import logging
import sys

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value ...`` with the record's ``extra`` fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def setup_logging(level: str) -> None:
    """Configure the root logger for the daemon."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every client disconnect with a traceback; they are expected on a gateway.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
