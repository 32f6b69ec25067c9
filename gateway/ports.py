"""Seams between the data plane and what it reports to (pure Protocols)."""

from __future__ import annotations

from typing import Protocol

from gateway.records import Record


class UsageSink(Protocol):
    """Where records go. ``submit`` must never block or await: it runs on the request path."""

    def submit(self, record: Record) -> None:
        """Accept one record for durable storage."""
        ...

    async def persist(self) -> None:
        """Return once every record submitted so far would survive the process being killed."""
        ...
