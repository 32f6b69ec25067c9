"""How an interception ended, as its end record will say (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.records import EndStatus


@dataclass(slots=True)
class Outcome:
    """How the interception ended, for the end record."""

    status: EndStatus = "completed"
    error_type: str = ""
    error_message: str = ""
    upstream_status: int = 0

    def fail(self, error_type: str, message: str, status: EndStatus = "failed") -> None:
        """Mark the interception failed, or ``status`` ("incomplete": the provider cut the
        response short), with why (the first such end wins)."""
        if self.status == "completed":
            self.status = status
            self.error_type, self.error_message = error_type, message
