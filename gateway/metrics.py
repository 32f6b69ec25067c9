"""Prometheus metrics of the daemon: one registry, bounded label sets, a public contract.

The request path keeps plain counters (``gateway.observe``) that ``gateway.exposition`` folds
into the exposition at scrape time; what happens rarely (spool faults, control pushes, MCP
servers left out) uses prometheus_client's own metrics, defined here. Every label set that
matters is created at start, so that ``rate()`` works from the first scrape.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from gateway import __version__

# A *_created series beside every counter doubles the exposition for a value Prometheus
# ignores by default.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU, memory, descriptors) and python_* (version, garbage collector), on this
# registry rather than prometheus_client's default one, which is never served.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Histogram buckets (seconds), fit for LLM traffic: answers take seconds to many minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60)
# What the gateway itself adds: tenths of a millisecond when all is well.
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)
MCP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

BUILD_INFO = Gauge(
    "aibridged_build_info",
    "Always 1; the label says which version of aibridged runs.",
    ["version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__).set(1)

DROP_REASONS = (
    "queue_full",
    "spool_max_records",
    "spool_max_age",
    "shutdown",
    "journal_unreadable",
)
USAGE_RECORDS_DROPPED = Counter(
    "aibridged_usage_records_dropped_total",
    "Usage records dropped before the host acknowledged them.",
    # queue_full | spool_max_records | spool_max_age | shutdown (neither committed nor in the
    # journal when the spool closed) | journal_unreadable
    ["reason"],
    registry=REGISTRY,
)
SPOOL_HIGH_WATERMARK = Gauge(
    "aibridged_usage_spool_high_watermark",
    "Highest sequence number written to the usage spool.",
    registry=REGISTRY,
)
WRITE_PROBLEMS = ("error", "stall", "journal_full")
SPOOL_WRITE_PROBLEMS = Counter(
    "aibridged_usage_spool_write_problems_total",
    "Spool batches that failed to commit (error), spells of spool_flush_timeout with records"
    " pending and nothing committed (stall), responses that found the journal full and waited"
    " for SQLite (journal_full).",
    ["reason"],
    registry=REGISTRY,
)
USAGE_RECORDS_DELIVERED = Counter(
    "aibridged_usage_records_delivered_total",
    "Usage records sent to the host over StreamUsage (resends included).",
    registry=REGISTRY,
)
PUSH_KINDS = ("providers", "api_keys", "mcp_servers", "mcp_tokens")
PUSH_OUTCOMES = ("applied", "invalid", "stale")
CONTROL_PUSHES = Counter(
    "aibridged_control_pushes_total",
    "State pushes received from the host, by kind and outcome (applied, invalid, stale).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
CONTROL_LAST_PUSH = Gauge(
    "aibridged_control_last_push_timestamp_seconds",
    "Unix time of the last state push of this kind the daemon applied (0: none since start).",
    ["kind"],
    registry=REGISTRY,
)
UNCONVERTIBLE_REASONS = ("unknown_kind", "malformed")
USAGE_RECORDS_UNCONVERTIBLE = Counter(
    "aibridged_usage_records_unconvertible_total",
    "Spooled records StreamUsage could not convert and delivered as UnknownRecord (once per"
    " record while it is among the last few thousand seen, not per resend).",
    ["reason"],
    registry=REGISTRY,
)

for _reason in DROP_REASONS:
    USAGE_RECORDS_DROPPED.labels(_reason)
for _reason in WRITE_PROBLEMS:
    SPOOL_WRITE_PROBLEMS.labels(_reason)
for _reason in UNCONVERTIBLE_REASONS:
    USAGE_RECORDS_UNCONVERTIBLE.labels(_reason)
for _kind in PUSH_KINDS:
    CONTROL_LAST_PUSH.labels(_kind)
    for _outcome in PUSH_OUTCOMES:
        CONTROL_PUSHES.labels(_kind, _outcome)
