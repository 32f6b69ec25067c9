"""Chat Completions usage arithmetic (pure).

OpenAI counts the cached part of the prompt inside ``prompt_tokens`` and the reasoning part of
the completion inside ``completion_tokens``. ``gateway.records.TokenUsage`` fixes one meaning for
every dialect, so the record's ``input`` is ``prompt_tokens - cached_tokens``, ``cache_read`` the
cached tokens, ``output`` the whole ``completion_tokens`` and ``reasoning`` its reasoning part,
never added to ``output`` again. A usage object holds the response's totals: a later one replaces
an earlier one (some compatible providers repeat it in several chunks), it is never added to it.

What a client sees after an agentic loop is another matter: the provider's own usage object,
its values replaced by their sums over the turns (:func:`add_usage`, :func:`apply_totals`),
without a key the provider did not send.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.records import TokenUsage

# Counters of ``completion_tokens_details`` kept apart in ``TokenUsage.extra``, as named there
# (``prompt_tokens_details.audio_tokens`` is the other one).
_COMPLETION_EXTRA = (
    ("audio_tokens", "completion_audio_tokens"),
    ("accepted_prediction_tokens", "accepted_prediction_tokens"),
    ("rejected_prediction_tokens", "rejected_prediction_tokens"),
)


@dataclass(slots=True)
class ChatUsage:
    """Usage of one upstream response, from the last usage object it reported."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0
    reasoning: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    # Whether the response reported usage at all (a stream cut before its usage chunk did not).
    reported: bool = False

    def update(self, usage: Any) -> None:
        """Take the values present in ``usage``; absent fields keep theirs.

        A value counts when it is exactly an ``int`` (JSON ``true`` parses to ``bool``).
        """
        if not isinstance(usage, dict):
            return
        self.reported = True
        get = usage.get
        v = get("prompt_tokens")
        if type(v) is int:
            self.prompt = v
        v = get("completion_tokens")
        if type(v) is int:
            self.completion = v
        details = get("prompt_tokens_details")
        if isinstance(details, dict):
            v = details.get("cached_tokens")
            if type(v) is int:
                self.cached = v
            v = details.get("audio_tokens")
            if type(v) is int and v:
                self.extra["prompt_audio_tokens"] = v
        details = get("completion_tokens_details")
        if isinstance(details, dict):
            v = details.get("reasoning_tokens")
            if type(v) is int:
                self.reasoning = v
            for name, key in _COMPLETION_EXTRA:
                v = details.get(name)
                if type(v) is int and v:
                    self.extra[key] = v

    def record(self, interception_id: str, msg_id: str) -> TokenUsage:
        """The token-usage record of this response, normalised (see the module docstring)."""
        return TokenUsage(
            interception_id=interception_id,
            msg_id=msg_id,
            input=max(self.prompt - self.cached, 0),
            output=self.completion,
            reasoning=self.reasoning,
            cache_read=self.cached,
            extra=dict(self.extra),
        )


def add_usage(totals: dict[str, Any], usage: Any, depth: int = 2) -> None:
    """Add every integer of the usage object ``usage`` into ``totals``, nested objects too.

    A usage object is two levels deep (``prompt_tokens_details.cached_tokens``): what nests
    deeper is no counter, and a provider nesting a thousand levels must not exhaust the stack.
    """
    if not isinstance(usage, dict):
        return
    for key, value in usage.items():
        if type(value) is int:
            current = totals.get(key)
            totals[key] = (current if type(current) is int else 0) + value
        elif depth > 1 and isinstance(value, dict):
            inner = totals.get(key)
            if not isinstance(inner, dict):
                inner = totals[key] = {}
            add_usage(inner, value, depth - 1)


def apply_totals(usage: dict[str, Any], totals: dict[str, Any]) -> None:
    """Replace, in place, each integer of ``usage`` by its total; no key is added."""
    for key, value in usage.items():
        total = totals.get(key)
        if type(value) is int and type(total) is int:
            usage[key] = total
        elif isinstance(value, dict) and isinstance(total, dict):
            apply_totals(value, total)
