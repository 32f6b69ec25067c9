"""Replace a message id inside a JSON document without re-encoding it (pure)."""

from __future__ import annotations

import orjson


def replace_id(raw: bytes, old_id: str, new_id: str) -> bytes | None:
    """Swap the quoted ``old_id`` for ``new_id`` in ``raw`` when it occurs exactly once.

    Returns ``None`` when the id is absent or ambiguous, so the caller can fall back to a
    re-encode. Replacing the token keeps every other byte (whitespace, key order, number
    spelling) exactly as the provider sent it.
    """
    quoted = orjson.dumps(old_id)
    i = raw.find(quoted)
    if i < 0:
        return None
    end = i + len(quoted)
    # A second occurrence from the end of the first (like ``count``, not overlapping).
    if raw.find(quoted, end) >= 0:
        return None
    return b"".join((raw[:i], orjson.dumps(new_id), raw[end:]))
