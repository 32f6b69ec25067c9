"""The data plane's metrics in the exposition: plain counters folded in at scrape time.

``DATA_PLANE`` is registered once on ``gateway.metrics.REGISTRY``; a daemon attaches its
counters (``gateway.observe.GatewayStats``), its state and its spool when it starts. ``collect``
runs on the scrape's thread, never on the event loop: it copies each container in one step
(atomic under the GIL) and builds the families from the copies. The label sets an operator's
``rate()`` needs exist from the first scrape: every configured provider's routes and every MCP
server appear with zeros before any traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.intercept.dialects import DIALECTS
from gateway.metrics import (
    DURATION_BUCKETS,
    MCP_BUCKETS,
    OVERHEAD_BUCKETS,
    PUSH_KINDS,
    REGISTRY,
    TTFB_BUCKETS,
)
from gateway.observe import (
    INJECTED_CALLS,
    PROMPTS,
    TOKEN_TYPES,
    TOOL_CALLS,
    GatewayStats,
    Histogram,
)
from gateway.state import StateHolder

# End statuses an interception can have in this process ("interrupted" is written at the next
# start, for the previous one's).
END_STATUSES = ("completed", "failed", "incomplete", "client_disconnected")
MCP_OUTCOMES = ("ok", "tool_error", "timeout", "error")


class SpoolBacklog(Protocol):
    """The spool as the metrics read it: from memory, never a query."""

    def backlog(self) -> tuple[int, float | None]:
        """``(records not acknowledged nor dropped, time.time() the oldest was spooled)``;
        the time is None when there are none."""
        ...


@dataclass(frozen=True)
class _Sources:
    stats: GatewayStats
    state: StateHolder
    spool: SpoolBacklog | None


@cache
def _bounds_text(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(floatToGoString(b) for b in bounds), "+Inf")  # type: ignore[no-untyped-call]


def _buckets(
    histogram: Histogram | None, bounds: tuple[float, ...]
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` pairs and the sum of ``histogram`` (all zero when None)."""
    counts = histogram.counts[:] if histogram is not None else [0] * (len(bounds) + 1)
    total = histogram.sum if histogram is not None else 0.0
    running = 0
    out = []
    for le, count in zip(_bounds_text(bounds), counts, strict=True):
        running += count
        out.append((le, float(running)))
    return out, total


class DataPlaneCollector(Collector):
    """Builds the data plane's families from the attached daemon's counters at each scrape."""

    def __init__(self) -> None:
        self._sources: _Sources | None = None

    def attach(self, stats: GatewayStats, state: StateHolder, spool: SpoolBacklog | None) -> None:
        """Serve these counters (a daemon starting; the last one started wins)."""
        self._sources = _Sources(stats, state, spool)

    def detach(self, stats: GatewayStats) -> None:
        """Stop serving ``stats`` (its daemon stopped) unless another daemon took over."""
        if self._sources is not None and self._sources.stats is stats:
            self._sources = None

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (the registry checks names with this)."""
        return _Families(actor=False).all()

    def collect(self) -> Iterable[Metric]:
        """Every family, from copies of the counters taken now."""
        sources = self._sources
        if sources is None:
            return []
        fam = _Families(sources.stats.actor_labels)
        _fold_routes(sources, fam)
        _fold_usage(sources.stats, fam)
        _fold_mcp(sources, fam)
        for (provider, route, code), count in dict(sources.stats.passthrough).items():
            fam.passthrough.add_metric([provider, route, str(code)], count)
        versions = sources.state.current.versions
        for kind in PUSH_KINDS:
            fam.version.add_metric([kind], getattr(versions, kind))
        if sources.spool is not None:
            depth, oldest = sources.spool.backlog()
            fam.spool.add_metric([], depth)
            fam.oldest.add_metric([], max(0.0, time.time() - oldest) if oldest else 0.0)
        return fam.all()


class _Families:
    """The data plane's families, empty; ``collect`` fills a fresh set each scrape."""

    def __init__(self, actor: bool) -> None:
        a = ["actor"] if actor else []
        self.ended = CounterMetricFamily(
            "aibridged_interceptions",
            "Interceptions (intercepted API calls) ended, by end status. model: the requested"
            " model, or 'other' past metrics_max_models or when it does not match"
            " metrics_model_pattern.",
            labels=["provider", "api", "model", "status", *a],
        )
        self.inflight = GaugeMetricFamily(
            "aibridged_interceptions_inflight",
            "Interceptions in progress (streams being relayed included).",
            labels=["provider", "api"],
        )
        self.duration = HistogramMetricFamily(
            "aibridged_interception_duration_seconds",
            "Time from a request's arrival to its interception's end.",
            labels=["provider", "api", "status"],
        )
        self.ttfb = HistogramMetricFamily(
            "aibridged_time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte written to its client (a stream's"
            " response head; a response sent whole when it is ready).",
            labels=["provider", "api"],
        )
        self.overhead = HistogramMetricFamily(
            "aibridged_gateway_overhead_seconds",
            "Time the gateway itself spent on an interception: its own work before the upstream"
            " call, on the response head, on each upstream chunk and on the end records;"
            " waits on the provider, the client and MCP servers excluded.",
            labels=["provider", "api"],
        )
        self.upstream = CounterMetricFamily(
            "aibridged_upstream_requests",
            "Calls to the provider on intercepted routes, retries and agentic-loop turns"
            " included. code: the HTTP status, or 'error' when no response came.",
            labels=["provider", "api", "code"],
        )
        self.passthrough = CounterMetricFamily(
            "aibridged_passthrough",
            "Passthrough requests relayed to the provider. code: its HTTP status, or 'error'"
            " when no response came.",
            labels=["provider", "route", "code"],
        )
        self.disconnects = CounterMetricFamily(
            "aibridged_client_disconnects",
            "Interceptions whose client went away before the response ended.",
            labels=["provider", "api"],
        )
        self.tokens = CounterMetricFamily(
            "aibridged_tokens",
            "Tokens by type, as the token_usage records count them (input: uncached input;"
            " output includes reasoning).",
            labels=["provider", "model", "type", *a],
        )
        self.prompts = CounterMetricFamily(
            "aibridged_prompts",
            "User prompts recorded (one per interception that has one).",
            labels=["provider", "model"],
        )
        self.tools = CounterMetricFamily(
            "aibridged_tool_calls",
            "Tool calls the model made: the client's own (injected='false') or injected MCP"
            " tools (injected='true').",
            labels=["provider", "model", "injected"],
        )
        self.mcp = CounterMetricFamily(
            "aibridged_mcp_calls",
            "Injected MCP tool calls, by outcome: ok, tool_error (the tool reported an error),"
            " timeout (mcp_call_timeout), error (no result).",
            labels=["mcp_server", "outcome"],
        )
        self.mcp_duration = HistogramMetricFamily(
            "aibridged_mcp_call_duration_seconds",
            "Duration of injected MCP tool calls.",
            labels=["mcp_server"],
        )
        self.spool = GaugeMetricFamily(
            "aibridged_usage_spool_records",
            "Usage records spooled and not yet acknowledged by the host (nor dropped).",
        )
        self.oldest = GaugeMetricFamily(
            "aibridged_usage_oldest_unacked_age_seconds",
            "Age of the oldest usage record the host has not acknowledged (0 when none).",
        )
        self.version = GaugeMetricFamily(
            "aibridged_control_applied_version",
            "config_version of the state applied, by kind (0: from the file, never pushed).",
            labels=["kind"],
        )

    def all(self) -> list[Metric]:
        """Every family, in exposition order."""
        return list(vars(self).values())


def _routes(sources: _Sources) -> list[tuple[str, str]]:
    """(provider, api) of every configured provider's routes, then any other seen."""
    keys = [
        (name, dialect.name)
        for name, provider in sources.state.current.providers.items()
        for dialect in DIALECTS.values()
        if dialect.provider.type == provider.type
    ]
    return keys + [k for k in list(sources.stats.routes) if k not in keys]


def _fold_routes(sources: _Sources, fam: _Families) -> None:
    routes = dict(sources.stats.routes)
    for provider, api in _routes(sources):
        route = routes.get((provider, api))
        pa = [provider, api]
        disconnects = 0
        durations: dict[str, Histogram] = {}
        if route is not None:
            for (model, status, actor), count in dict(route.ended).items():
                fam.ended.add_metric([*pa, model, status, *([actor] if actor else [])], count)
                if status == "client_disconnected":
                    disconnects += count
            for code, count in dict(route.upstream).items():
                fam.upstream.add_metric([*pa, str(code)], count)
            durations = dict(route.durations)
        fam.inflight.add_metric(pa, route.inflight if route is not None else 0)
        fam.disconnects.add_metric(pa, disconnects)
        for status in (*END_STATUSES, *(s for s in durations if s not in END_STATUSES)):
            _add_histogram(fam.duration, [*pa, status], durations.get(status), DURATION_BUCKETS)
        _add_histogram(fam.ttfb, pa, route.ttfb if route else None, TTFB_BUCKETS)
        _add_histogram(fam.overhead, pa, route.overhead if route else None, OVERHEAD_BUCKETS)


def _add_histogram(
    family: HistogramMetricFamily,
    labels: Sequence[str],
    histogram: Histogram | None,
    bounds: tuple[float, ...],
) -> None:
    buckets, total = _buckets(histogram, bounds)
    family.add_metric(list(labels), buckets, total)


def _fold_usage(stats: GatewayStats, fam: _Families) -> None:
    prompts: dict[tuple[str, str], int] = {}
    calls: dict[tuple[str, str, str], int] = {}
    for (provider, model, actor), counts in dict(stats.usage).items():
        values = counts[:]
        actor_label = [actor] if stats.actor_labels else []
        for kind, value in zip(TOKEN_TYPES, values, strict=False):
            fam.tokens.add_metric([provider, model, kind, *actor_label], value)
        # Without the actor: summed over actors.
        pm = (provider, model)
        prompts[pm] = prompts.get(pm, 0) + values[PROMPTS]
        for injected, slot in (("false", TOOL_CALLS), ("true", INJECTED_CALLS)):
            key = (provider, model, injected)
            calls[key] = calls.get(key, 0) + values[slot]
    for (provider, model), count in prompts.items():
        fam.prompts.add_metric([provider, model], count)
    for labels, count in calls.items():
        fam.tools.add_metric(list(labels), count)


def _fold_mcp(sources: _Sources, fam: _Families) -> None:
    servers = dict(sources.stats.mcp)
    names = list(sources.state.current.mcp_servers)
    names += [s for s in servers if s not in names]
    for name in names:
        found = servers.get(name)
        outcomes = dict(found.outcomes) if found is not None else {}
        for outcome in (*MCP_OUTCOMES, *(o for o in outcomes if o not in MCP_OUTCOMES)):
            fam.mcp.add_metric([name, outcome], outcomes.get(outcome, 0))
        _add_histogram(fam.mcp_duration, [name], found.duration if found else None, MCP_BUCKETS)


DATA_PLANE = DataPlaneCollector()
REGISTRY.register(DATA_PLANE)
