"""Caller identity helpers: secret masking, bearer parsing, client and session detection.

Everything here is pure (no I/O, no event loop) so it can be called from any hot path and
tested exhaustively without fixtures.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import orjson

__all__ = [
    "client_session_id",
    "detect_client",
    "extract_bearer",
    "header_value",
    "is_utf8",
    "mask_secret",
    "sha256_hex",
]

_ELLIPSIS = "..."

# (minimum length, characters revealed at each end), longest first. Short secrets reveal
# nothing so a masked value never leaks a meaningful fraction of the key.
_REVEAL_TIERS: tuple[tuple[int, int], ...] = ((20, 4), (10, 2), (5, 1))

# Checked in order and the first prefix wins, so precedence is explicit if prefixes ever
# overlap. Bare "claude"/"codex" (no slash) also cover names like "claude-cli/" and "codex_cli".
_UA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("mux/", "Mux"),
    ("claude", "Claude Code"),
    ("codex", "Codex"),
    ("zed/", "Zed"),
    ("githubcopilotchat/", "GitHub Copilot (VS Code)"),
    ("copilot/", "GitHub Copilot (CLI)"),
    ("kilo-code/", "Kilo Code"),
    ("roo-code/", "Roo Code"),
    ("coder-agents/", "Coder Agents"),
    ("charm crush/", "Charm Crush"),
)

# Some extensions run inside a host whose User-Agent hides them, but they announce themselves
# through an Originator header instead.
_ORIGINATORS: Mapping[str, str] = {
    "kilo-code": "Kilo Code",
    "roo-code": "Roo Code",
}

# Clients not listed here have no trustworthy session signal, so we report none rather than
# guessing from headers another client might happen to send.
_SESSION_HEADERS: Mapping[str, str] = {
    "Codex": "session_id",
    "Mux": "x-mux-workspace-id",
    "GitHub Copilot (VS Code)": "x-interaction-id",
    "GitHub Copilot (CLI)": "x-client-session-id",
    "Kilo Code": "x-kilocode-taskid",
    "Coder Agents": "x-coder-chat-id",
}

_CLAUDE_SESSION_HEADER = "x-claude-code-session-id"

# Older Claude Code builds pack the session into metadata.user_id as
# user_<sha>_account_<id>_session_<uuid>; search() picks the leftmost "_session_".
_LEGACY_SESSION_RE = re.compile(r"_session_(.+)$")


def mask_secret(secret: str) -> str:
    """Return a display-safe form of ``secret`` revealing at most 4 code points per end.

    Lengths are counted in Unicode code points. Secrets too short to reveal anything (or
    whose revealed ends would cover the whole value) collapse to ``"..."``; an empty secret
    stays empty so "no key" remains distinguishable from "a key".
    """
    n = len(secret)
    if n == 0:
        return ""
    reveal = next((r for min_len, r in _REVEAL_TIERS if n >= min_len), 0)
    if n <= 2 * reveal:
        return _ELLIPSIS
    # secret[n - reveal:] rather than secret[-reveal:] because -0 would select everything.
    return secret[:reveal] + _ELLIPSIS + secret[n - reveal :]


def sha256_hex(secret: str) -> str:
    """Return the lowercase hex SHA-256 digest of ``secret`` encoded as UTF-8.

    Header bytes that are not UTF-8 reach us as lone surrogates (aiohttp decodes header values
    with ``surrogateescape``); they hash as the bytes the client sent instead of raising, so such
    a key is simply one that matches nothing.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def is_utf8(value: str) -> bool:
    """Whether ``value`` (a header value) was valid UTF-8 on the wire.

    aiohttp gives undecodable header bytes as lone surrogates, which cannot be encoded, hashed
    or serialised as they are. ASCII, the normal case, is answered without encoding anything.
    """
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def extract_bearer(value: str | None) -> str:
    """Return the token from an ``Authorization: Bearer <token>`` value, or ``""``.

    The scheme is matched case-insensitively; anything other than exactly two
    whitespace-separated fields is rejected rather than guessed at.
    """
    if value is None:
        return ""
    fields = value.split()
    if len(fields) != 2 or fields[0].lower() != "bearer":
        return ""
    return fields[1]


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup of ``name`` (lower case) without copying the headers.

    aiohttp's CIMultiDict is already case-insensitive (and its ``get`` returns the first of
    duplicates); a plain dict may use any case, so it is scanned only when the exact key misses.
    """
    value = headers.get(name)
    if value is not None or hasattr(headers, "getone"):
        return value
    for key, candidate in headers.items():
        if str(key).lower() == name:
            return candidate
    return None


def _clean(value: object) -> str | None:
    # Blank identifiers are as useless as missing ones, so both become None.
    if not isinstance(value, str):
        return None
    stripped = value.strip()
    return stripped or None


# The client each User-Agent names ("" for none), as it was decided: clients send the same
# User-Agent on every request. Bounded: past the limit, new values are decided each time.
_UA_CLIENTS: dict[str, str] = {}
_UA_LIMIT = 1024


def _client_from_user_agent(user_agent: str) -> str:
    client = _UA_CLIENTS.get(user_agent)
    if client is None:
        lowered = user_agent.lower()
        client = next((c for prefix, c in _UA_PREFIXES if lowered.startswith(prefix)), "")
        if len(_UA_CLIENTS) < _UA_LIMIT:
            _UA_CLIENTS[user_agent] = client
    return client


def detect_client(headers: Mapping[str, str]) -> str:
    """Name the AI client that sent a request, or ``"Unknown"``.

    Header names are looked up case-insensitively. User-Agent prefixes are checked first,
    then the Originator header, then Cursor's version header.
    """
    user_agent = header_value(headers, "user-agent")
    if user_agent:
        client = _client_from_user_agent(user_agent)
        if client:
            return client
    originator = _ORIGINATORS.get(header_value(headers, "originator") or "")
    if originator is not None:
        return originator
    if _clean(header_value(headers, "x-cursor-client-version")) is not None:
        return "Cursor"
    return "Unknown"


def _claude_session_from_user_id(user_id: str) -> str | None:
    try:
        parsed: object = orjson.loads(user_id)
    except ValueError:  # orjson.JSONDecodeError subclasses ValueError
        # Not JSON is the normal legacy case, not an error.
        parsed = None
    if isinstance(parsed, dict) and "session_id" in parsed:
        return _clean(parsed["session_id"])
    match = _LEGACY_SESSION_RE.search(user_id)
    return _clean(match.group(1)) if match else None


def client_session_id(
    client: str,
    headers: Mapping[str, str],
    body: Mapping[str, object] | None,
) -> str | None:
    """Return the client's own session/conversation id for grouping requests, if any.

    ``client`` is a name returned by :func:`detect_client`. Values are trimmed and blank
    values yield ``None``. Never raises on malformed headers or bodies.
    """
    if client == "Claude Code":
        from_header = _clean(header_value(headers, _CLAUDE_SESSION_HEADER))
        if from_header is not None:
            return from_header
        metadata = body.get("metadata") if body is not None else None
        user_id = metadata.get("user_id") if isinstance(metadata, Mapping) else None
        return _claude_session_from_user_id(user_id) if isinstance(user_id, str) else None
    header = _SESSION_HEADERS.get(client)
    if header is None:
        return None
    return _clean(header_value(headers, header))
