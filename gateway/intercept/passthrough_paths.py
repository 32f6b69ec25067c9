"""The passthrough allow-list, matched segment by segment on the decoded request path.

A passthrough request goes upstream with the central key, so the upstream URL is built here from
validated segments, never from the client's path: the HTTP client would otherwise resolve
``..`` (raw or percent-encoded) and a request for a model could reach any provider endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode

# Stands for one client-chosen segment (a model id) in an allow-listed path.
ID = None

# One allow-listed endpoint: a method and the path's segments, literals or ``ID``. Each provider
# type lists its own (``ProviderApi.passthrough``).
PassthroughRoute = tuple[str, tuple[str | None, ...]]

# What a decoded id segment may hold: the characters of model ids (``claude-sonnet-4-5``,
# ``anthropic.claude-3-5-sonnet-v2:0``, ``claude-3-5-sonnet-v2@20241022``). Everything else (a
# slash or backslash, ``%`` left by double encoding, ``;`` parameters, controls, spaces,
# non-ASCII) makes the path unknown: ids never hold them, and servers disagree on their meaning.
_ID_SEGMENT = re.compile(r"[A-Za-z0-9._~:@-]{1,256}")
# Kept as they are when an id is encoded again for the upstream URL (RFC 3986 allows both).
_ID_SAFE = ":@"


def _segment(raw: str) -> str | None:
    """A raw path segment decoded once, or None if it cannot be part of an allowed path."""
    # Bytes that are not UTF-8 decode to U+FFFD, which the pattern refuses.
    decoded = unquote(raw) if "%" in raw else raw
    # Dot segments (and all-dot ones, which some servers trim to nothing) are never ids.
    if not decoded.strip(".") or not _ID_SEGMENT.fullmatch(decoded):
        return None
    return decoded


def upstream_path(routes: Iterable[PassthroughRoute], method: str, raw_path: str) -> str | None:
    """The upstream path for ``method`` on ``raw_path``, or None if the allow-list ``routes``
    has no such route.

    ``raw_path`` is the request path after the provider prefix, still percent-encoded (e.g.
    ``/v1/models/claude-sonnet-4-5``). Each segment is decoded once and must match the route's
    literal or, for an id, be one plain segment; the result is rebuilt from those segments.
    """
    if not raw_path.startswith("/"):
        return None
    raw_segments = raw_path[1:].split("/")
    for allowed_method, route in routes:
        if allowed_method != method or len(route) != len(raw_segments):
            continue
        built: list[str] = []
        for expected, raw in zip(route, raw_segments, strict=True):
            segment = _segment(raw)
            if segment is None or (expected is not ID and segment != expected):
                break
            built.append(quote(segment, safe=_ID_SAFE))
        else:
            return "/" + "/".join(built)
    return None


def reencode_query(raw_query: str) -> str:
    """``raw_query`` parsed and encoded again: only ``name=value`` pairs, each percent-encoded,
    reach the provider (never the client's raw bytes)."""
    if not raw_query:
        return ""
    pairs = parse_qsl(raw_query, keep_blank_values=True)
    return urlencode(pairs, quote_via=quote)
