"""When and how long to wait before retrying an upstream call (pure).

Retries happen only before anything reached the client, so a retried call is invisible to it
except for the time it took. The rules follow the providers' own SDKs: connection errors and
408/409/429/5xx/529 are retried, ``x-should-retry`` overrides, ``retry-after(-ms)`` is honoured up
to a cap, otherwise exponential back-off with jitter. Header names are matched case-insensitively,
whatever mapping holds them.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.identity import header_value

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
INITIAL_DELAY = 0.5
MAX_DELAY = 8.0


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an upstream response with ``status`` may be retried."""
    hint = (header_value(headers, "x-should-retry") or "").strip().lower()
    if hint == "true":
        return True
    if hint == "false":
        return False
    return status in RETRYABLE_STATUSES


def retry_delay(attempt: int, headers: Mapping[str, str], jitter: float) -> float:
    """Seconds to wait before retry number ``attempt + 1``; ``jitter`` is uniform in [0, 1)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = header_value(headers, name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue  # an HTTP date: fall back to back-off
        if 0 <= seconds <= MAX_DELAY:
            return seconds
    base: float = min(INITIAL_DELAY * 2.0**attempt, MAX_DELAY)
    return base * (1 - 0.25 * jitter)
