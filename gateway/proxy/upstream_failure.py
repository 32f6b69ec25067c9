"""What a failed upstream call means: the one place that maps upstream failures to outcomes.

Every path that calls a provider (intercepted relay, tool-loop continuations, passthrough) asks
here what an exception or an unusable response means: the record's error type, the message a
client may see (never an internal host, port or address) and the detail that goes to the log
and the record only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.intercept.outcome import Outcome

log = logging.getLogger("aibridged.upstream")

# Raised by aiohttp when the upstream connection breaks before or during the response.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class UpstreamRedirect(aiohttp.ClientError):
    """The provider answered a call with a 3xx, which is never followed (see ``redirected``).

    An ``aiohttp.ClientError``, so every ``except UPSTREAM_ERRORS`` around an upstream call
    handles it like any other failed call.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """One upstream failure, described for the client, the record and the log."""

    # The end record's error type (``upstream_unreachable``, ``upstream_stream_broken``...).
    error_type: str
    # Safe to show a client: names no host, port, address or path of the deployment.
    client_message: str
    # For the log and the end record only (may name the upstream's address).
    detail: str
    # The status a client gets when nothing was sent to it yet.
    status: int = 502
    # The provider's status, when it answered (a redirect); 0 when it did not.
    upstream_status: int = 0


def describe_upstream_error(exc: BaseException) -> str:
    """A short description of an upstream I/O failure, for logs and records (not for clients:
    it may name the upstream's address)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:300]


def _client_reason(exc: BaseException) -> str:
    # Only the exception's kind: its text may carry host:port or a resolver's message.
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed by the provider"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "response body broken"
    if isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
        return "connection error"
    return "invalid response"


def _detail(exc: BaseException, url: str) -> str:
    text = describe_upstream_error(exc)
    if not url:
        return text
    # Which upstream failed, for the operator; an exception's text often names none (a reset).
    try:
        where = str(URL(url).origin())  # scheme, host and port: no path, query or userinfo
    except ValueError:
        return text
    return f"{where}: {text}"


def unreachable(exc: BaseException, url: str = "") -> UpstreamFailure:
    """The upstream call failed before a response arrived (connect, send, headers).

    ``url``: the call's URL; its origin goes in the detail (never in the client message).
    """
    return UpstreamFailure(
        "upstream_unreachable",
        f"upstream provider unreachable: {_client_reason(exc)}",
        _detail(exc, url),
    )


def stream_broken(exc: BaseException, url: str = "") -> UpstreamFailure:
    """The upstream response broke after it started (mid-body or mid-stream)."""
    return UpstreamFailure(
        "upstream_stream_broken",
        f"upstream stream broken: {_client_reason(exc)}",
        _detail(exc, url),
    )


def redirected(status: int) -> UpstreamFailure:
    """The provider answered with a redirect: never followed where a credential travels."""
    return UpstreamFailure(
        "upstream_redirect",
        f"upstream provider answered with a redirect ({status}); redirects are not followed",
        f"upstream answered {status} (redirect not followed)",
        upstream_status=status,
    )


def call_failed(exc: BaseException, url: str = "") -> UpstreamFailure:
    """What an exception from an upstream call means before its response was used: a redirect
    (:class:`UpstreamRedirect`) or an unreachable upstream."""
    if isinstance(exc, UpstreamRedirect):
        return redirected(exc.status)
    return unreachable(exc, url)


def record_failure(failure: UpstreamFailure, outcome: Outcome, interception_id: str) -> None:
    """Put ``failure`` on the interception's end record and log its detail (WARNING)."""
    if failure.upstream_status:
        outcome.upstream_status = failure.upstream_status
    outcome.fail(failure.error_type, failure.detail)
    log.warning(
        "upstream call failed",
        extra={
            "interception_id": interception_id,
            "error_type": failure.error_type,
            "error": failure.detail,
        },
    )
