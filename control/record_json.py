"""JSON for a record that orjson refuses, so that the spool stores every record it is given.

A record holds what clients sent: a ``User-Agent`` or session header with bytes that are not
UTF-8 arrives as a str with lone surrogates (aiohttp decodes headers with ``surrogateescape``),
which orjson will not encode. Such a record is still stored, with each bad character replaced by
U+FFFD; the fields and their types stay those of the record. Only the rare record that fails the
plain ``orjson.dumps`` comes here, so the usual path pays nothing.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

log = logging.getLogger("aibridged.spool")

# orjson refuses integers past 64 bits (say, a provider's absurd token count): they are clamped
# to the int64 range of the record's protobuf fields, keeping the field an integer.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1

_sanitised = 0


def sanitised_json(record: object) -> bytes:
    """``record`` (a dataclass with a ``__dict__``) as JSON, with every value made encodable.

    Never raises. Logs the 1st, 2nd, 4th, 8th... such record, so that a client sending odd
    headers on every request cannot flood the log.
    """
    global _sanitised
    _sanitised += 1
    if _sanitised & (_sanitised - 1) == 0:
        log.warning(
            "usage record held text that is not valid UTF-8: stored with U+FFFD in its place",
            extra={"kind": _text(str(getattr(record, "kind", ""))), "count": _sanitised},
        )
    fields = vars(record) if hasattr(record, "__dict__") else {"value": record}
    try:
        return orjson.dumps(_clean(fields))
    except (TypeError, RecursionError):
        # Nesting deeper than orjson accepts: keep what identifies the record.
        return orjson.dumps({k: _clean(fields.get(k)) for k in ("kind", "interception_id")})


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return min(max(value, _INT_MIN), _INT_MAX)
    if isinstance(value, dict):
        return {_text(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "__dict__"):
        return _clean(vars(value))
    return _text(str(value))


def _text(value: str) -> str:
    # Surrogates in U+DC80..U+DCFF are bytes that were not UTF-8 (surrogateescape): back to those
    # bytes, decoded with replacement. Any other lone surrogate (a JSON "\ud800") is one U+FFFD.
    raw = _OTHER_SURROGATES.sub("\ufffd", value).encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace")


_OTHER_SURROGATES = re.compile("[\ud800-\udc7f\udd00-\udfff]")
