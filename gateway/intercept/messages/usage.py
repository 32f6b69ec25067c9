"""Anthropic usage arithmetic (pure).

Anthropic reports usage in ``message_start.message.usage`` and again, cumulatively, in every
``message_delta.usage``: the latest value of a field is the message's total, so values replace
earlier ones and are never added (the reference gateway adds them and over-counts output).

Anthropic's fields already have the meaning ``gateway.records.TokenUsage`` fixes for every
dialect (``input_tokens`` leaves the cache out, ``output_tokens`` counts thinking): they map one
to one, and ``reasoning`` stays 0, Anthropic reporting no thinking count apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.records import TokenUsage


@dataclass(slots=True)
class MessageUsage:
    """Running usage of one upstream message, updated from each usage object seen."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def update(self, usage: Any) -> None:
        """Take the cumulative values present in ``usage``; absent fields keep their value.

        A value counts when it is exactly an ``int``: JSON numbers parse to ``int``, ``true`` and
        ``false`` to ``bool``, which does not count. The checks are inlined: this runs for every
        ``message_start`` and ``message_delta``.
        """
        if not isinstance(usage, dict):
            return
        get = usage.get
        v = get("input_tokens")
        if type(v) is int:
            self.input = v
        v = get("output_tokens")
        if type(v) is int:
            self.output = v
        v = get("cache_read_input_tokens")
        if type(v) is int:
            self.cache_read = v
        v = get("cache_creation_input_tokens")
        if type(v) is int:
            self.cache_write = v
        split = get("cache_creation")
        if isinstance(split, dict):
            v = split.get("ephemeral_5m_input_tokens")
            if type(v) is int:
                self.cache_write_5m = v
            v = split.get("ephemeral_1h_input_tokens")
            if type(v) is int:
                self.cache_write_1h = v
        server_tools = get("server_tool_use")
        if isinstance(server_tools, dict):
            for name, value in server_tools.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    self.extra[name] = value

    def plus(self, other: MessageUsage) -> MessageUsage:
        """The sum of two messages' usage (for the total of an agentic loop)."""
        extra = dict(self.extra)
        for name, value in other.extra.items():
            extra[name] = extra.get(name, 0) + value
        return MessageUsage(
            input=self.input + other.input,
            output=self.output + other.output,
            cache_read=self.cache_read + other.cache_read,
            cache_write=self.cache_write + other.cache_write,
            cache_write_5m=self.cache_write_5m + other.cache_write_5m,
            cache_write_1h=self.cache_write_1h + other.cache_write_1h,
            extra=extra,
        )

    def as_anthropic(self) -> dict[str, int]:
        """The usage fields as Anthropic names them (for a rewritten final usage object)."""
        return {
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": self.output,
        }

    def record(self, interception_id: str, msg_id: str) -> TokenUsage:
        """The token-usage record for this message."""
        return TokenUsage(
            interception_id=interception_id,
            msg_id=msg_id,
            input=self.input,
            output=self.output,
            cache_read=self.cache_read,
            cache_write=self.cache_write,
            cache_write_5m=self.cache_write_5m,
            cache_write_1h=self.cache_write_1h,
            extra=dict(self.extra),
        )
