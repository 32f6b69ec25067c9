"""The upstream HTTP client and the header rules for requests and responses."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import Credential
from gateway.proxy.upstream_call import PoolConnector
from gateway.state import Actor

# Never forwarded upstream: hop-by-hop, transport-managed, cookies and every client credential
# (the gateway key must never reach a provider). Content-Encoding too: the gateway decodes every
# request body it accepts (handlers.read_body) and sends it as is.
_STRIP_REQUEST = frozenset(
    {
        "content-encoding",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "cookie",
        "authorization",
        "x-api-key",
        "forwarded",
    }
)

# Response headers worth relaying to the client: request ids for support tickets, rate-limit
# state and retry hints so the SDKs' own retry logic keeps working through the gateway.
_RELAY_RESPONSE = frozenset(
    {"request-id", "x-request-id", "retry-after", "retry-after-ms", "x-should-retry"}
)
_RELAY_RESPONSE_PREFIXES = ("anthropic-ratelimit-", "x-ratelimit-")


def stripped_headers(*extra: str) -> frozenset[str]:
    """The request headers never forwarded upstream, plus ``extra`` (e.g. the BYOK header)."""
    return _STRIP_REQUEST | {h.lower() for h in extra}


_ACTOR_PREFIX = "x-ai-bridge-actor"

# Whether a header name (as the client spelled it) is forwarded, per strip set. Clients send the
# same few names on every request, so this replaces a lower() and two tests per header with one
# dict lookup. Bounded: names past the limit are decided each time, never stored.
_NAME_LIMIT = 1024
_forwarded_names: dict[frozenset[str], dict[str, bool]] = {}


def _forwarded_for(strip: frozenset[str]) -> dict[str, bool]:
    names = _forwarded_names.get(strip)
    if names is None:
        if len(_forwarded_names) >= 16:
            _forwarded_names.clear()
        names = _forwarded_names[strip] = {}
    return names


def _forwarded(name: str, strip: frozenset[str]) -> bool:
    lowered = name.lower()
    return lowered not in strip and not lowered.startswith(_ACTOR_PREFIX)


def upstream_request_headers(
    client_headers: CIMultiDictProxy[str],
    credential: Credential,
    strip: frozenset[str] = _STRIP_REQUEST,
    actor: Actor | None = None,
) -> CIMultiDict[str]:
    """Client headers minus ``strip``, hop-by-hop headers and every client credential, plus
    exactly one provider auth header.

    ``strip`` comes from ``stripped_headers``: it holds Accept-Encoding and every credential
    header, so the gateway adds its own without looking for a client's copy.
    """
    connection = client_headers.get("connection")
    names: dict[str, bool] | None = None
    if connection:
        # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
        named = {token.strip().lower() for token in connection.split(",")} - {""}
        if not named <= strip:
            strip = strip | named
            names = {}  # a one-off strip set: decided here, not remembered
    if names is None:
        names = _forwarded_for(strip)
    kept: list[tuple[str, str]] = []
    for name, value in client_headers.items():
        forward = names.get(name)
        if forward is None:
            forward = _forwarded(name, strip)
            if len(names) < _NAME_LIMIT:
                names[name] = forward
        if forward:
            kept.append((name, value))
    # Identity keeps each streamed chunk relayable at once (no inflate window holding bytes).
    kept.append(("Accept-Encoding", "identity"))
    headers: CIMultiDict[str] = CIMultiDict(kept)
    headers.add(credential.header, credential.value)
    if actor is not None:
        headers["X-AI-Bridge-Actor-Id"] = actor.id
        for key, value in actor.metadata.items():
            headers[f"X-AI-Bridge-Actor-Metadata-{key}"] = value
    return headers


# Whether an upstream response header name is relayed (see ``_forwarded_names``).
_relayed_names: dict[str, bool] = {}


def relayed_header_items(upstream: Mapping[str, str]) -> list[tuple[str, str]]:
    """The allow-listed subset of an upstream response's headers, as (name, value) pairs."""
    names = _relayed_names
    out: list[tuple[str, str]] = []
    for name, value in upstream.items():
        relay = names.get(name)
        if relay is None:
            lowered = name.lower()
            relay = lowered in _RELAY_RESPONSE or lowered.startswith(_RELAY_RESPONSE_PREFIXES)
            if len(names) < _NAME_LIMIT:
                names[name] = relay
        if relay:
            out.append((name, value))
    return out


def relayed_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    """The allow-listed subset of an upstream response's headers."""
    return CIMultiDict(relayed_header_items(upstream))


# aiohttp adds a User-Agent, and a Content-Type for a body, that the client did not send unless
# told to skip them. Telling it costs a header merge per request, so intercepted requests pass
# this only when they lack one of them (``auto_headers_to_skip``); passthrough, off the hot
# path, always does. The session sets no skip list of its own.
SKIP_AUTO_HEADERS = ("User-Agent", "Content-Type")


def auto_headers_to_skip(headers: CIMultiDict[str]) -> tuple[str, ...] | None:
    """``skip_auto_headers`` for an upstream request with ``headers``: None if it needs none."""
    if "User-Agent" in headers and "Content-Type" in headers:
        return None
    return SKIP_AUTO_HEADERS


def make_session(connect_timeout: float, idle_timeout: float) -> aiohttp.ClientSession:
    """One pooled client session for all upstream calls (created inside the running loop)."""
    # Tells a failed call whether its connection was a pooled one (see ``upstream_call``).
    connector = PoolConnector(
        limit=0,
        keepalive_timeout=30,
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
    )
    # No total timeout: agent streams run for many minutes. Bound connect and idle reads only.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout, sock_read=idle_timeout
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        # Provider cookies (load-balancer affinity, bot scores) belong to whoever made the call:
        # a shared jar would replay one user's cookies on every other user's requests.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
