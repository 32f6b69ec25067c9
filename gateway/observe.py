"""What the data plane counts for its metrics and per-request log lines, cheaply.

The request path only adds to plain integers, lists and dicts (no lock, no prometheus_client
child to look up): :class:`GatewayStats` holds them for the daemon, and an :class:`Observation`
follows one interception. The observation is also the sink its records pass through on their way
to the spool, so token, prompt and tool-call counts are exactly those of the records.
``gateway.exposition`` folds all of it into the Prometheus exposition at scrape time, on another
thread: the containers here are only ever added to, and it copies each in one step (atomic under
the GIL).

Gateway overhead (``aibridged_gateway_overhead_seconds``) is the wall time of the gateway's own
work on an interception, summed from ``perf_counter`` stamps around its segments: from the
request's arrival to the first upstream call (authentication, parsing, the start record, tool
injection; reading the body and listing MCP tools are left out, they wait on the client and on
MCP servers), from the upstream response head to the client's (streams), the processing of each
upstream chunk (framing, rewriting, records; not the write to the client, which may wait on it),
a blocking response's rewriting, and from the end of the upstream stream to the end record.
Waiting on the provider, the client or MCP servers is never part of it.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING

from gateway.access_log import (
    ACCESS,
    ENDED_JSON,
    FRAGMENTS,
    JSON_TEXTS,
    LOGGED_TEXT,
    ended_fragment,
    json_text,
    log_ended,
)
from gateway.intercept.outcome import Outcome
from gateway.logs import JSON_LINES
from gateway.metrics import DURATION_BUCKETS, MCP_BUCKETS, OVERHEAD_BUCKETS, TTFB_BUCKETS
from gateway.ports import UsageSink
from gateway.records import PromptUsage, Record, TokenUsage, ToolUsage

if TYPE_CHECKING:
    from gateway.tracing import InterceptionTrace

OTHER = "other"
DEFAULT_MODEL_PATTERN = r"[A-Za-z0-9._:@/-]{1,100}"
# The positions of a usage list (``GatewayStats.usage``): the token types (label ``type``),
# then prompts, client tool calls and injected tool calls.
TOKEN_TYPES = (
    "input",
    "output",
    "cache_read",
    "cache_write",
    "cache_write_5m",
    "cache_write_1h",
    "reasoning",
)
PROMPTS, TOOL_CALLS, INJECTED_CALLS = 7, 8, 9
_USAGE_SLOTS = 10


class Histogram:
    """Bucket counts and a sum; ``bounds`` are the buckets' upper bounds (``le``), ascending."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # Not cumulative: counts[i] holds the values in (bounds[i-1], bounds[i]], the last +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


# Distinct ``actor`` labels kept when metrics_actor_labels is on; later actors are ``other``.
MAX_ACTOR_LABELS = 100


class ModelLabels:
    """The ``model`` label of a requested model: itself while it matches the pattern and fewer
    than ``max_models`` distinct models were kept, else ``other`` (clients choose the name)."""

    __slots__ = ("_kept", "_max", "_pattern")

    def __init__(self, pattern: str = DEFAULT_MODEL_PATTERN, max_models: int = 50) -> None:
        self._pattern = re.compile(pattern)
        self._max = max_models
        self._kept: dict[str, str] = {}

    def __call__(self, model: str) -> str:
        kept = self._kept.get(model)
        if kept is not None:
            return kept
        if len(self._kept) >= self._max or not self._pattern.fullmatch(model):
            return OTHER
        self._kept[model] = model
        return model


class RouteStats:
    """The counters of one (provider, api): interceptions, latency, upstream calls."""

    __slots__ = (
        "api",
        "durations",
        "ended",
        "inflight",
        "models",
        "names",
        "overhead",
        "provider",
        "ttfb",
        "upstream",
    )

    def __init__(self, provider: str, api: str) -> None:
        self.provider = provider
        self.api = api
        # As log lines carry them (a validated provider name, a dialect's name).
        self.names = (provider.encode(), api.encode())
        self.inflight = 0
        # (model label, end status, actor label) -> interceptions ended so.
        self.ended: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, Histogram] = {}  # by end status
        self.ttfb = Histogram(TTFB_BUCKETS)
        self.overhead = Histogram(OVERHEAD_BUCKETS)
        # Upstream calls by HTTP status, or "error" when no response came.
        self.upstream: dict[int | str, int] = {}
        # Requested model -> (its label, its usage list), for the models kept as labels (a
        # bounded set) when there is no actor label: one lookup per request.
        self.models: dict[str, tuple[str, list[int]]] = {}


class McpServerStats:
    """Tool calls on one MCP server: by outcome, and how long they took."""

    __slots__ = ("duration", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.duration = Histogram(MCP_BUCKETS)


class GatewayStats:
    """Every counter the data plane keeps for its metrics, for one daemon."""

    def __init__(
        self,
        model_pattern: str = DEFAULT_MODEL_PATTERN,
        max_models: int = 50,
        actor_labels: bool = False,
    ) -> None:
        """``actor_labels``: interceptions and tokens get an ``actor`` label (for a known, small
        set of actors; past ``MAX_ACTOR_LABELS`` distinct actors the label is ``other``: in
        personal mode every client key is an actor, so clients could grow it at will)."""
        self.model_label = ModelLabels(model_pattern, max_models)
        self.actor_labels = actor_labels
        self.actor_label = ModelLabels(r"[^\x00-\x1f]{1,200}", MAX_ACTOR_LABELS)
        self.routes: dict[tuple[str, str], RouteStats] = {}
        # (provider, model label, actor label) -> token counts by type, prompts, tool calls.
        self.usage: dict[tuple[str, str, str], list[int]] = {}
        self.mcp: dict[str, McpServerStats] = {}
        # (provider, route, provider's status or "error") -> passthrough requests.
        self.passthrough: dict[tuple[str, str, int | str], int] = {}

    def route(self, provider: str, api: str) -> RouteStats:
        """The counters of (provider, api), created on first use."""
        found = self.routes.get((provider, api))
        if found is None:
            found = self.routes[provider, api] = RouteStats(provider, api)
        return found

    def labels(self, route: RouteStats, model: str, actor: str) -> tuple[str, list[int]]:
        """The model label of ``model`` and the usage list of (route's provider, that label,
        ``actor``'s label), created on first use."""
        label = self.model_label(model)
        actor = self.actor_label(actor) if self.actor_labels else ""
        key = (route.provider, label, actor)
        usage = self.usage.get(key)
        if usage is None:
            usage = self.usage[key] = [0] * _USAGE_SLOTS
        if label is model and not self.actor_labels:
            route.models[model] = (label, usage)
        return label, usage

    def mcp_call(self, server: str, outcome: str, seconds: float) -> None:
        """One injected tool call on ``server``: ``ok``, ``tool_error``, ``timeout``, ``error``."""
        found = self.mcp.get(server)
        if found is None:
            found = self.mcp[server] = McpServerStats()
        found.outcomes[outcome] = found.outcomes.get(outcome, 0) + 1
        found.duration.observe(seconds)

    def passthrough_done(self, provider: str, route: str, code: int | str) -> None:
        """One passthrough request relayed: the provider's status, or ``error``."""
        key = (provider, route, code)
        self.passthrough[key] = self.passthrough.get(key, 0) + 1


class Observation:
    """One interception as the metrics and the log see it, and the sink of its records.

    Made when the interception starts (``inflight`` goes up); :meth:`finish`, called once with
    the end record, counts it, observes its histograms and logs its line. The relay adds to
    ``busy`` and sets ``first_byte`` and ``tail`` (see the module docstring). ``spool`` is the
    sink behind it, for what needs no counting (the end record).
    """

    __slots__ = (
        "actor_id",
        "actor_label",
        "busy",
        "cache_read",
        "cache_write",
        "client",
        "first_byte",
        "id",
        "input",
        "model",
        "model_label",
        "output",
        "route",
        "spool",
        "started",
        "streaming",
        "tail",
        "trace",
        "usage",
    )

    def __init__(
        self,
        stats: GatewayStats,
        spool: UsageSink,
        route: RouteStats,
        interception_id: str,
        model: str,
        actor_id: str,
        client: str,
        streaming: bool,
        started: float,
        busy: float,
    ) -> None:
        """``started``: the ``perf_counter`` time the request arrived; ``busy``: the gateway's
        own time so far."""
        self.spool = spool
        self.route = route
        self.id = interception_id
        self.model = model
        found = route.models.get(model)
        if found is None:
            found = stats.labels(route, model, actor_id)
        self.model_label, self.usage = found
        self.actor_id = actor_id
        self.actor_label = stats.actor_label(actor_id) if stats.actor_labels else ""
        self.client = client
        self.streaming = streaming
        self.started = started
        self.busy = busy
        self.first_byte = self.tail = 0.0
        self.input = self.output = self.cache_read = self.cache_write = 0
        # Its spans, when tracing is on (set by the handler).
        self.trace: InterceptionTrace | None = None
        route.inflight += 1

    def submit(self, record: Record) -> None:
        """Count ``record`` and pass it on to the spool."""
        if type(record) is TokenUsage:
            usage = self.usage
            usage[0] += record.input
            usage[1] += record.output
            usage[2] += record.cache_read
            usage[3] += record.cache_write
            usage[4] += record.cache_write_5m
            usage[5] += record.cache_write_1h
            usage[6] += record.reasoning
            self.input += record.input
            self.output += record.output
            self.cache_read += record.cache_read
            self.cache_write += record.cache_write
        elif type(record) is PromptUsage:
            self.usage[PROMPTS] += 1
        elif type(record) is ToolUsage:
            self.usage[INJECTED_CALLS if record.injected else TOOL_CALLS] += 1
        self.spool.submit(record)

    async def persist(self) -> None:
        """The spool's ``persist``."""
        await self.spool.persist()

    def finish(self, outcome: Outcome) -> None:
        """The interception ended as ``outcome`` says: count it and log its line."""
        now = perf_counter()
        route = self.route
        route.inflight -= 1
        status = outcome.status
        ended = route.ended
        key = (self.model_label, status, self.actor_label)
        ended[key] = ended.get(key, 0) + 1
        # Histogram.observe, inlined: three calls fewer per request.
        started = self.started
        duration = now - started
        histogram = route.durations.get(status)
        if histogram is None:
            histogram = route.durations[status] = Histogram(DURATION_BUCKETS)
        histogram.counts[bisect_left(histogram.bounds, duration)] += 1
        histogram.sum += duration
        ttfb = (self.first_byte or now) - started
        histogram = route.ttfb
        histogram.counts[bisect_left(histogram.bounds, ttfb)] += 1
        histogram.sum += ttfb
        tail = self.tail
        overhead = self.busy + (now - tail if tail else 0.0)
        histogram = route.overhead
        histogram.counts[bisect_left(histogram.bounds, overhead)] += 1
        histogram.sum += overhead
        if self.trace is not None:
            self.trace.end(
                status,
                outcome.error_type,
                outcome.error_message,
                outcome.upstream_status,
                (self.input, self.output, self.cache_read, self.cache_write),
            )
        mode = ACCESS.mode()
        if mode == JSON_LINES:
            try:
                names = route.names
                model, actor_id, client, streaming = (
                    self.model,
                    self.actor_id,
                    self.client,
                    self.streaming,
                )
                ACCESS.add_json(
                    ENDED_JSON,
                    (
                        self.id.encode(),
                        FRAGMENTS.get((names, model, actor_id, client, streaming))
                        or ended_fragment(names, model, actor_id, client, streaming),
                        status.encode(),
                        outcome.upstream_status,
                        JSON_TEXTS.get(outcome.error_type) or json_text(outcome.error_type),
                        int(duration * 1e6),
                        int(ttfb * 1e6),
                        int(overhead * 1e6),
                        self.input,
                        self.output,
                        self.cache_read,
                        self.cache_write,
                    ),
                )
                return
            except TypeError:  # text that is not UTF-8: the generic line escapes it
                pass
        if mode:
            log_ended(
                (
                    self.id,
                    route.provider,
                    route.api,
                    self.model[:LOGGED_TEXT],
                    self.actor_id,
                    self.client,
                    self.streaming,
                    status,
                    outcome.upstream_status,
                    outcome.error_type,
                    int(duration * 1e6),
                    int(ttfb * 1e6),
                    int(overhead * 1e6),
                    self.input,
                    self.output,
                    self.cache_read,
                    self.cache_write,
                )
            )
