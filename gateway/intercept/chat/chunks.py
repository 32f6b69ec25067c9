"""Byte-level facts about Chat Completions chunks, for the stream rewriter's fast path (pure).

Each search here is a necessary condition on raw bytes: JSON escapes the quotes inside a string,
so the text of a delta cannot fake a key, and a false alarm only costs the chunk a parse.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.intercept.rewriter import StreamError

# What may precede the id's value at the start of a chunk for the bytes fast path.
ID_HEAD = re.compile(rb"data: ?\{\s*\"id\"\s*:\s*")
# Where a chunk's choices open: the end of the bytes a provider repeats in each chunk.
CHOICES = re.compile(rb'"choices"\s*:\s*\[')
# The id's key before its value, when it is not the chunk's first key.
ID_KEY = re.compile(rb'"id"\s*:\s*\Z')


def id_bytes(raw: bytes, msg_id: str, quoted_iid: bytes) -> tuple[bytes, bytes, bool] | None:
    """What the fast path replaces in each chunk of a turn whose first chunk is ``raw``, by
    what, and whether it is inside the chunk (else it opens the chunk); None: no fast path."""
    quoted = orjson.dumps(msg_id)
    i = raw.find(quoted)
    if i < 0:
        return None
    if ID_HEAD.fullmatch(raw, 0, i):
        return raw[: i + len(quoted)], raw[:i] + quoted_iid, False
    # Not the first key (Azure sorts its keys): the key and value are replaced wherever they
    # are, in a chunk that holds them once.
    key = ID_KEY.search(raw, max(i - 64, 0), i)
    if key is None or raw.find(quoted, i + len(quoted)) >= 0:
        return None
    return raw[key.start() : i + len(quoted)], raw[key.start() : i] + quoted_iid, True


# What the provider adds to every chunk once usage is asked for, in its compact spelling (a
# quote inside a JSON string is escaped: these bytes are always the key). Removed for a client
# that did not ask for usage, who would not have had it from the provider.
NULL_USAGE = b',"usage":null'
# The same, spelt by a provider that spaces its JSON.
ANY_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null')
# The same, as the first key (two searches: one regex of both is four times slower).
FIRST_NULL_USAGE = re.compile(rb'\{\s*"usage"\s*:\s*null\s*,')


def hide_any_null_usage(out: bytes) -> bytes:
    """``out`` without its null usage keys, however spelt."""
    out = ANY_NULL_USAGE.sub(b"", out)
    return FIRST_NULL_USAGE.sub(b"{", out) if b'"usage"' in out else out


# What a plain chunk holds none of: a tool call, an error, a usage object but a null one (as
# ``NULL_USAGE`` spells it; ``ANY_MARKERS``: however spelt). One search, in C.
MARKERS = re.compile(rb'"(?:tool_calls"|error"|usage"(?!:null))')
ANY_MARKERS = re.compile(rb'"(?:tool_calls"|error"|usage"(?!\s*:\s*null))')


def reported_error(error: Any) -> StreamError:
    """The error a chunk reports, from its truthy ``error`` value whatever its type."""
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code") or "error"
        return StreamError(_text(kind), _text(error.get("message") or ""))
    return StreamError("error", _text(error)[:200])


def _text(value: Any) -> str:
    """A provider's value as text: a string as it is, else its JSON (bounded in depth)."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()[:200]
    except TypeError:  # nested deeper than orjson writes; str() would exhaust the stack
        return type(value).__name__


_NOTHING: tuple[Any, ...] = (None, "", [])


def empty_choice(choice: dict[str, Any]) -> bool:
    """Whether an edited choice has nothing left to tell the client."""
    delta = choice.get("delta")
    if isinstance(delta, dict) and any(v not in _NOTHING for v in delta.values()):
        return False
    return choice.get("finish_reason") is None and choice.get("logprobs") is None
