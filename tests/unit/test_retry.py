"""Retry policy for upstream calls (pure)."""

from __future__ import annotations

import pytest

from gateway.retry import MAX_DELAY, retry_delay, should_retry


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (429, {}, True),
        (529, {}, True),
        (500, {}, True),
        (503, {}, True),
        (408, {}, True),
        (400, {}, False),
        (401, {}, False),
        (404, {}, False),
        (429, {"x-should-retry": "false"}, False),
        (400, {"x-should-retry": "true"}, True),
    ],
)
def test_should_retry(status: int, headers: dict[str, str], expected: bool) -> None:
    assert should_retry(status, headers) is expected


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    assert retry_delay(0, {"retry-after": "2"}, 0.5) == 2.0
    assert retry_delay(0, {"retry-after-ms": "150"}, 0.5) == pytest.approx(0.15)
    # Too long to hold a client waiting: fall back to back-off.
    assert retry_delay(0, {"retry-after": "120"}, 0.0) == 0.5
    # An HTTP date is not a number of seconds: back-off too.
    assert retry_delay(1, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0) == 1.0


def test_backoff_grows_and_is_capped() -> None:
    delays = [retry_delay(n, {}, 0.0) for n in range(8)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == MAX_DELAY
    assert retry_delay(2, {}, 0.999) < retry_delay(2, {}, 0.0)


def test_retry_headers_are_read_whatever_their_case() -> None:
    # A plain dict keeps the provider's spelling (aiohttp's headers would not need this).
    assert retry_delay(0, {"Retry-After-Ms": "10"}, 0.0) == pytest.approx(0.01)
    assert retry_delay(0, {"RETRY-AFTER": "3"}, 0.0) == 3.0
    assert should_retry(429, {"X-Should-Retry": "false"}) is False
    assert should_retry(400, {"X-SHOULD-RETRY": "True"}) is True
