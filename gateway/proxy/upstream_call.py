"""The upstream POST of an intercepted call: no redirects, and a bounded number of attempts.

Every call of an interception (the first, its retries, the tool loop's continuations) goes through
:func:`post`. A call makes at most ``1 + max_retries`` attempts, retried per ``gateway.retry``
before anything reached the client. The one attempt allowed on top is for a pooled keep-alive
connection that the provider closed while the request was on its way: nothing was processed, and
only :class:`PoolConnector` can tell that such a connection was reused.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

import aiohttp
from multidict import CIMultiDict

from gateway.proxy.upstream_failure import UPSTREAM_ERRORS, UpstreamRedirect
from gateway.retry import retry_delay, should_retry

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

    from gateway.tracing import InterceptionTrace

log = logging.getLogger("aibridged.upstream")

# Whether the calling task's latest upstream connection came from the pool. A context variable:
# the connector runs inside the calling task, and other calls interleave at every await.
_reused: ContextVar[bool] = ContextVar("aibridged_upstream_reused", default=False)

_NO_HEADERS: Mapping[str, str] = {}


class PoolConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that notes, for the calling task, when it hands out a pooled connection.

    ``_get`` is where aiohttp 3.14 takes a live idle connection from the pool (``connect`` calls
    it first, and again after waiting for a free slot); it is awaited in the caller's task.
    """

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        conn = await super()._get(key, traces)
        if conn is not None:
            _reused.set(True)
        return conn


def _stale(exc: BaseException) -> bool:
    """Whether ``exc`` is a reused keep-alive connection closed before any response byte."""
    if not _reused.get() or isinstance(exc, aiohttp.ClientConnectorError):
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        # A response head cut short arrives as its parsed message instead of a string.
        return isinstance(exc.message, str)
    # A reset or broken pipe while sending the request.
    return isinstance(exc, (aiohttp.ClientOSError, aiohttp.ClientConnectionResetError))


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: CIMultiDict[str],
    skip_auto_headers: tuple[str, ...] | None,
    max_retries: int,
    interception_id: str,
    codes: dict[int | str, int],
    trace: InterceptionTrace | None = None,
) -> aiohttp.ClientResponse:
    """POST ``body`` to ``url``; the response to use (a success or the last error response).

    Each attempt is counted in ``codes`` (the metrics): by its HTTP status, or ``"error"``;
    with ``trace``, each is a span whose context goes upstream in ``traceparent``.

    Raises one of ``UPSTREAM_ERRORS`` when no usable response came: the last attempt's I/O
    failure, or :class:`UpstreamRedirect` for a 3xx (a redirect would carry the credential to
    wherever its ``Location`` points, so it is never followed, nor retried).
    """
    attempt = 0
    spare = True  # the extra attempt a stale pooled connection may cost, once per call
    while True:
        _reused.set(False)
        span = None if trace is None else trace.upstream(url, headers, attempt)
        try:
            resp = await session.post(
                url,
                data=body,
                headers=headers,
                skip_auto_headers=skip_auto_headers,
                allow_redirects=False,
                auto_decompress=True,
            )
        except UPSTREAM_ERRORS as exc:
            if span is not None:
                span.ended(0, exc)
            codes["error"] = codes.get("error", 0) + 1
            if spare and _stale(exc):
                spare = False
                log.debug("stale pooled connection", extra={"interception_id": interception_id})
                continue
            if attempt >= max_retries:
                raise
            delay = retry_delay(attempt, _NO_HEADERS, random.random())
        except BaseException as exc:  # cancelled: the span still ends
            if span is not None:
                span.ended(0, exc)
            raise
        else:
            status = resp.status
            if span is not None:
                span.ended(status)
            codes[status] = codes.get(status, 0) + 1
            if status < 300:
                return resp
            if status < 400:
                resp.release()
                raise UpstreamRedirect(status)
            if attempt >= max_retries or not should_retry(status, resp.headers):
                return resp
            delay = retry_delay(attempt, resp.headers, random.random())
            resp.release()
        attempt += 1
        extra = {"interception_id": interception_id, "attempt": attempt, "delay": round(delay, 3)}
        log.info("retrying upstream call", extra=extra)
        await asyncio.sleep(delay)
