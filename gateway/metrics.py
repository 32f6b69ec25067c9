"""Prometheus metrics of the daemon (one registry, bounded label sets)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

USAGE_RECORDS_DROPPED = Counter(
    "aibridged_usage_records_dropped_total",
    "Usage records dropped before the host acknowledged them.",
    # queue_full | spool_max_records | spool_max_age | shutdown (neither committed nor in the
    # journal when the spool closed) | journal_unreadable
    ["reason"],
    registry=REGISTRY,
)
SPOOL_RECORDS = Gauge(
    "aibridged_usage_spool_records",
    "Usage records in the spool, not yet acknowledged by the host.",
    registry=REGISTRY,
)
SPOOL_HIGH_WATERMARK = Gauge(
    "aibridged_usage_spool_high_watermark",
    "Highest sequence number written to the usage spool.",
    registry=REGISTRY,
)
SPOOL_WRITE_PROBLEMS = Counter(
    "aibridged_usage_spool_write_problems_total",
    "Spool batches that failed to commit (error), spells of spool_flush_timeout with records"
    " pending and nothing committed (stall), responses that found the journal full and waited"
    " for SQLite (journal_full).",
    ["reason"],  # error | stall | journal_full
    registry=REGISTRY,
)
USAGE_RECORDS_DELIVERED = Counter(
    "aibridged_usage_records_delivered_total",
    "Usage records sent to the host over StreamUsage (resends included).",
    registry=REGISTRY,
)
CONTROL_PUSHES = Counter(
    "aibridged_control_pushes_total",
    "State pushes received from the host.",
    ["kind", "outcome"],  # kind: providers|api_keys|mcp_servers|mcp_tokens
    registry=REGISTRY,
)
USAGE_RECORDS_UNCONVERTIBLE = Counter(
    "aibridged_usage_records_unconvertible_total",
    "Spooled records StreamUsage could not convert and delivered as UnknownRecord (once per"
    " record while it is among the last few thousand seen, not per resend).",
    ["reason"],  # unknown_kind | malformed
    registry=REGISTRY,
)
