"""OpenAI Responses usage arithmetic (pure).

A response reports its usage once, in its final object (``response.completed``, ``.failed``,
``.incomplete``, or the blocking body). OpenAI counts cached prompt tokens inside
``input_tokens`` and reasoning tokens inside ``output_tokens``; ``gateway.records.TokenUsage``
keeps the cache out of ``input`` and the reasoning inside ``output``, so:
``input = input_tokens - cached_tokens``, ``cache_read = cached_tokens``,
``output = output_tokens``, ``reasoning = reasoning_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.records import TokenUsage


def _int(obj: Any, key: str) -> int:
    if not isinstance(obj, dict):
        return 0
    value = obj.get(key)
    return value if type(value) is int and value > 0 else 0


def usage_record(interception_id: str, msg_id: str, usage: Any) -> TokenUsage:
    """The token-usage record of one response from its ``usage`` object (any shape)."""
    cached = _int(
        usage.get("input_tokens_details") if isinstance(usage, dict) else None, "cached_tokens"
    )
    reasoning = _int(
        usage.get("output_tokens_details") if isinstance(usage, dict) else None, "reasoning_tokens"
    )
    return TokenUsage(
        interception_id=interception_id,
        msg_id=msg_id,
        # A provider reporting more cached than input tokens must not make ``input`` negative.
        input=max(_int(usage, "input_tokens") - cached, 0),
        output=_int(usage, "output_tokens"),
        reasoning=reasoning,
        cache_read=cached,
    )


def summed_usage(final: dict[str, Any], earlier: Sequence[Any]) -> dict[str, Any]:
    """``final`` with each of its integer fields (nested ones too) summed over ``earlier``.

    Only the fields ``final`` has are summed: no key is added to what the provider sent.
    """
    out: dict[str, Any] = {}
    for key, value in final.items():
        if type(value) is int:
            out[key] = value + sum(
                v for u in earlier if isinstance(u, dict) and type(v := u.get(key)) is int
            )
        elif isinstance(value, dict):
            out[key] = summed_usage(value, [u.get(key) for u in earlier if isinstance(u, dict)])
        else:
            out[key] = value
    return out
