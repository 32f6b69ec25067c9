"""deploy/grafana and deploy/prometheus against the metrics contract.

The dashboard's queries and the alert rules name only metric families and labels of the public
metrics contract (issue 11) and parse; promtool accepts the example config and the rules pass
their unit tests; a real Prometheus server scraping a daemon that served real SDK traffic
returns the tokens the spool recorded, and data for every dashboard query.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from control.v1 import control_pb2 as pb
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.testing import Reply, load_txtar
from tests.conftest import (
    CONTROL_METADATA,
    CONTROL_TOKEN,
    FIXTURES,
    GATEWAY_KEY,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    by_kind,
    replayed_sections,
)
from tests.mcp_server import McpTestServer, running_mcp_server
from tests.processes import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "aibridged.json"

# The public metrics contract (issue 11): family -> labels.
CONTRACT: dict[str, frozenset[str]] = {
    name: frozenset(labels.split())
    for name, labels in {
        "aibridged_interceptions_total": "provider api model status",
        "aibridged_interceptions_inflight": "provider api",
        "aibridged_interception_duration_seconds": "provider api status",
        "aibridged_time_to_first_byte_seconds": "provider api",
        "aibridged_gateway_overhead_seconds": "provider api",
        "aibridged_upstream_requests_total": "provider api code",
        "aibridged_passthrough_total": "provider route code",
        "aibridged_client_disconnects_total": "provider api",
        "aibridged_tokens_total": "provider model type",
        "aibridged_prompts_total": "provider model",
        "aibridged_tool_calls_total": "provider model injected",
        "aibridged_mcp_calls_total": "mcp_server outcome",
        "aibridged_mcp_call_duration_seconds": "mcp_server",
        "aibridged_usage_spool_records": "",
        "aibridged_usage_oldest_unacked_age_seconds": "",
        "aibridged_usage_records_dropped_total": "reason",
        "aibridged_usage_records_delivered_total": "",
        "aibridged_control_pushes_total": "kind outcome",
        "aibridged_control_applied_version": "kind",
        "aibridged_control_last_push_timestamp_seconds": "kind",
        "aibridged_build_info": "version",
    }.items()
}
HISTOGRAMS = {
    "aibridged_interception_duration_seconds",
    "aibridged_time_to_first_byte_seconds",
    "aibridged_gateway_overhead_seconds",
    "aibridged_mcp_call_duration_seconds",
}
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus to every series


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name a query may use, with its labels (histograms as _bucket/_sum/_count)."""
    series = {"up": TARGET_LABELS}
    for name, labels in CONTRACT.items():
        if name in HISTOGRAMS:
            series[f"{name}_bucket"] = labels | {"le"} | TARGET_LABELS
            series[f"{name}_sum"] = series[f"{name}_count"] = labels | TARGET_LABELS
        else:
            series[name] = labels | TARGET_LABELS
    return series


SERIES = series_labels()
_METRIC = re.compile(r"\b(?:aibridged_\w+|up)\b(?!\s*\()")
_SELECTOR = re.compile(r"\b(aibridged_\w+|up)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
# A Grafana legend's {{label}}, an alert annotation's $labels.label.
_TEMPLATE_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}|\$labels\.(\w+)")


def promql_problems(expr: str, *, legend: str = "") -> list[str]:
    """Metric names outside the contract, and labels the named series do not carry."""
    problems = []
    names = set(_METRIC.findall(expr))
    if not names:
        problems.append(f"names no aibridged metric: {expr}")
    problems += [f"unknown series {n}" for n in names if n not in SERIES]
    known = frozenset().union(*(SERIES.get(n, frozenset()) for n in names))
    for name, matchers in _SELECTOR.findall(expr):
        for label in _MATCHER.findall(matchers):
            if label not in SERIES.get(name, frozenset()):
                problems.append(f"{name} has no label {label}")
    for group in _GROUPING.findall(expr):
        for label in (part.strip() for part in group.split(",")):
            if label and label not in known:
                problems.append(f"no series of {sorted(names)} has label {label}")
    for match in _TEMPLATE_LABEL.findall(legend):
        label = next(filter(None, match))
        if label not in known:
            problems.append(f"legend label {label} is not on {sorted(names)}")
    return problems


# --- Grafana --------------------------------------------------------------------------------


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_dashboard_queries_name_only_contract_metrics_and_their_labels() -> None:
    board = dashboard()
    problems, named = [], set()
    charts = [p for p in panels(board) if p["type"] != "row"]
    assert len({p["id"] for p in panels(board)}) == len(list(panels(board)))
    for panel in charts:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            expr = target["expr"]
            named |= set(_METRIC.findall(expr))
            found = promql_problems(expr, legend=target.get("legendFormat", ""))
            problems += [f"{panel['title']}: {p}" for p in found]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "provider", "api", "model"):
        query = variables[name]["query"]
        assert query.startswith("label_values(") and query.endswith(f", {name})")
        problems += [f"variable {name}: {p}" for p in promql_problems(query[13 : -len(name) - 3])]
    assert problems == []
    # Every family of the contract is on the dashboard.
    assert {family(n) for n in named} == set(CONTRACT)


def family(series: str) -> str:
    """The metric family a series belongs to (a histogram's _bucket, _sum, _count: itself)."""
    base = re.sub(r"_(bucket|sum|count)$", "", series)
    return base if base in HISTOGRAMS else series


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    rules = []
    for i, panel in enumerate(p for p in panels(dashboard()) if p["type"] != "row"):
        for j, target in enumerate(panel["targets"]):
            expr = target["expr"].replace("$__rate_interval", "5m")
            expr = re.sub(r"\$(\w+)", r"\1", expr)
            rules.append({"record": f"panel_{i}_{j}", "expr": expr})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Prometheus -----------------------------------------------------------------------------

ALERTS = {
    "AibridgedDown",
    "AibridgedAbsent",
    "AibridgedHighErrorRatio",
    "AibridgedUpstreamErrors",
    "AibridgedUpstreamOverloaded",
    "AibridgedMcpCallsFailing",
    "AibridgedSpoolBacklogGrowing",
    "AibridgedDeliveryLag",
    "AibridgedUsageRecordsDropped",
}


def test_alert_rules_name_only_contract_metrics_and_carry_severity_and_text() -> None:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    problems = []
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        text = " ".join(rule["annotations"].values())
        found = promql_problems(rule["expr"], legend=text)
        problems += [f"{rule['alert']}: {p}" for p in found]
    assert problems == []
    # Every alert has a unit test.
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    assert tested == ALERTS


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=" ".join,
)
def test_promtool_accepts_the_config_and_the_rules_pass_their_tests(args: list[str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run(
        [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- A real Prometheus server ---------------------------------------------------------------

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
ADD = load_txtar(FIXTURES / "anthropic" / "injected_add.txtar")
JSON = {"Content-Type": "application/json"}


@asynccontextmanager
async def running_prometheus(tmp_path: Path, binary: str, target: str) -> AsyncIterator[str]:
    """A Prometheus server scraping ``target`` every second with deploy's alert rules; its URL."""
    config = tmp_path / "prometheus.yml"
    scrape = {"job_name": "aibridged", "static_configs": [{"targets": [target]}]}
    intervals = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    rules = [str(PROMETHEUS / "alerts.yml")]
    config.write_text(
        yaml.safe_dump({"global": intervals, "rule_files": rules, "scrape_configs": [scrape]})
    )
    url = f"http://127.0.0.1:{free_port()}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--log.level=warn",
            stdout=log,
            stderr=log,
        )
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
                try:
                    async with http.get(f"{url}/-/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def send_traffic(gw: Gateway) -> None:
    """What an operator's dashboard shows: a push, streams, an injected tool call, upstream
    5xx and 529, a passthrough request."""
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        provider = pb.Provider(
            name="anthropic",
            type=pb.PROVIDER_TYPE_ANTHROPIC,
            base_url=gw.upstream.url,
            api_key=UPSTREAM_KEY,
        )
        pushed = await ControlServiceStub(channel).PutProviders(
            pb.PutProvidersRequest(config_version=1, providers=[provider], allow_byok=True),
            metadata=CONTROL_METADATA,
        )
        assert pushed.applied_version == 1
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0)
    gw.upstream.enqueue(*[Reply.from_section(TEXT["streaming"])] * 2)
    for _ in range(2):
        async with client.messages.stream(**orjson.loads(TEXT["request"])) as stream:
            await stream.get_final_message()
    gw.upstream.enqueue(*(Reply.from_section(ADD[s]) for s in replayed_sections(True, follow=True)))
    async with client.messages.stream(**orjson.loads(ADD["request"])) as stream:
        await stream.get_final_message()
    for status, kind in ((500, "api_error"), (529, "overloaded_error")):
        body = {"type": "error", "error": {"type": kind, "message": "synthetic"}}
        gw.upstream.enqueue(Reply(status=status, headers=JSON, body=orjson.dumps(body)))
        with pytest.raises(anthropic.APIStatusError):
            await client.messages.create(**orjson.loads(TEXT["request"]))
    gw.upstream.enqueue(Reply(headers=JSON, body=b'{"data": [], "has_more": false}'))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.url}/v1/models", headers={"x-api-key": GATEWAY_KEY}) as resp,
    ):
        assert resp.status == 200


def as_promql(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable on "All"."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$(job|instance|provider|api|model)\b", ".*", expr)


async def query(http: aiohttp.ClientSession, url: str, expr: str) -> list[dict[str, Any]]:
    """The result of an instant query (which must be valid)."""
    async with http.get(f"{url}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_the_tokens_sent_and_every_panel_has_data(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    async with running_mcp_server(McpTestServer()) as mcp_url:
        gw = await make_gateway(
            control_token=CONTROL_TOKEN, mcp_servers=[{"id": "tools", "url": mcp_url}]
        )
        target = f"127.0.0.1:{gw.daemon.metrics_port}"
        async with (
            running_prometheus(tmp_path, binary, target) as url,
            aiohttp.ClientSession() as http,
        ):
            await send_traffic(gw)
            tokens = by_kind(await gw.records(), "token_usage")
            sent = {kind: sum(t[kind] for t in tokens) for kind in ("input", "output")}
            assert sent["output"] > 0
            targets = [
                (panel["title"], as_promql(target["expr"]))
                for panel in panels(dashboard())
                if panel["type"] != "row"
                for target in panel["targets"]
            ]
            scraped: dict[str, float] = {}
            empty = targets
            # Until Prometheus has scraped the traffic (a generous bound: scrapes are 1 s apart).
            deadline = asyncio.get_running_loop().time() + 90
            while True:
                for kind in sent:
                    expr = f'sum(aibridged_tokens_total{{job="aibridged", type="{kind}"}})'
                    found = await query(http, url, expr)
                    scraped[kind] = float(found[0]["value"][1]) if found else -1.0
                empty = [(t, e) for t, e in targets if not await query(http, url, e)]
                if (scraped == sent and not empty) or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(1)
            # Each variable's label_values(selector, label) offers values.
            offered: dict[str, list[str]] = {}
            for variable in dashboard()["templating"]["list"]:
                values = re.fullmatch(r"label_values\((.*), (\w+)\)", as_promql(variable["query"]))
                if variable["type"] == "query" and values:
                    selector, label = values.groups()
                    async with http.get(f"{url}/api/v1/series", params={"match[]": selector}) as r:
                        series = (await r.json())["data"]
                    offered[variable["name"]] = sorted({s[label] for s in series if label in s})
            async with http.get(f"{url}/api/v1/rules") as resp:
                groups = (await resp.json())["data"]["groups"]
            async with http.get(f"http://{target}/metrics") as resp:
                exposition = await resp.read()
    lint = await promtool_check_metrics(exposition)
    exposed: dict[str, set[str]] = {}
    for metric in text_string_to_metric_families(exposition.decode()):
        for sample in metric.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    assert scraped == sent
    assert empty == []
    assert offered["job"] == ["aibridged"]
    assert offered["instance"] == [target]
    assert offered["provider"] == ["anthropic"]
    assert offered["api"] == ["messages"]
    assert offered["model"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} == ALERTS
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    assert lint == ""
    # The daemon serves each series of the contract with exactly its labels.
    contract = {name: set(labels - TARGET_LABELS) for name, labels in SERIES.items()}
    del contract["up"]
    assert {name: exposed.get(name) for name in contract} == contract


async def promtool_check_metrics(exposition: bytes) -> str:
    """promtool's complaints about an exposition ("" when it is clean or promtool is absent)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return ""
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(exposition), 60)
    return out.decode() if proc.returncode else ""
