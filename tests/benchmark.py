"""Gateway overhead benchmark: direct to a fake provider vs. through ``aibridged serve``.

Three OS processes share the cores as in production: a fake upstream (this script with
``--upstream``), the real gateway (``aibridged serve``) and the load generator (this process).
Phases run direct, gateway, direct; the direct figures are the best of the two direct runs
(highest req/s, lowest p50, lowest p99, each taken separately).

    .venv/bin/python tests/benchmark.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
import yaml
from aiohttp import web

from gateway.testing import Reply, load_txtar, split_events

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "anthropic" / "text.txtar"
GATEWAY_KEY = "gw-bench"
CONCURRENCY = 50
WARMUP = 1.0
END = b'data: {"type":"message_stop"}'


# --- process 1: the fake upstream -------------------------------------------------------------


async def run_upstream() -> None:
    reply = Reply.from_section(load_txtar(FIXTURE)["streaming"])
    events = split_events(reply.body)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(status=200, headers=reply.headers)
        await out.prepare(request)
        for event in events:
            await out.write(event)
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/messages", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


# --- process 3: the load generator ------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]
    completed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(message)


@dataclass
class RunResult:
    rps: float
    p50_ms: float
    p99_ms: float


def request_body() -> bytes:
    body = orjson.loads(load_txtar(FIXTURE)["request"])
    body["stream"] = True
    return orjson.dumps(body)


async def one_request(session: aiohttp.ClientSession, target: Target, body: bytes) -> float | None:
    """Send one streaming request, read it to the end; its TTFB in seconds, or None on failure."""
    t0 = time.perf_counter()
    try:
        async with session.post(target.url, data=body, headers=target.headers) as resp:
            first = await resp.content.readany()
            ttfb = time.perf_counter() - t0
            data = first + await resp.content.read()
            if resp.status != 200:
                target.fail(f"HTTP {resp.status}: {data[:300]!r}")
                return None
    except (TimeoutError, aiohttp.ClientError) as exc:
        target.fail(f"{type(exc).__name__}: {exc}")
        return None
    if not data.startswith(b"event: message_start") or not data.rstrip().endswith(END):
        target.fail(f"incomplete stream ({len(data)} bytes): ...{data[-120:]!r}")
        return None
    target.completed += 1
    return ttfb


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


async def run_target(target: Target, body: bytes, duration: float, n_ttfb: int) -> RunResult:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        begin = time.perf_counter() + WARMUP
        end = begin + duration
        in_window = 0

        async def worker() -> None:
            nonlocal in_window
            while time.perf_counter() < end:
                ok = await one_request(session, target, body) is not None
                if ok and begin <= time.perf_counter() <= end:
                    in_window += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        ttfbs = []
        for _ in range(n_ttfb):
            ttfb = await one_request(session, target, body)
            if ttfb is not None:
                ttfbs.append(ttfb * 1000)
    ttfbs = sorted(ttfbs) or [math.nan]
    return RunResult(in_window / duration, percentile(ttfbs, 0.5), percentile(ttfbs, 0.99))


# --- process 2: the gateway, and the orchestration --------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(tmp: Path, upstream_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    provider = {"name": "anthropic", "type": "anthropic", "base_url": upstream_url}
    config = {
        "listen": f"127.0.0.1:{port}",
        "spool_path": str(tmp / "spool.db"),
        "log_level": "warning",
        "providers": [{**provider, "api_key": "sk-bench"}],
        "api_keys": [{"key": GATEWAY_KEY, "actor_id": "bench", "username": "bench"}],
    }
    (tmp / "aibridged.yaml").write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).parent / "aibridged"), "serve", "--config"]
    with (tmp / "gateway.log").open("wb") as log:
        proc = subprocess.Popen([*cmd, str(tmp / "aibridged.yaml")], stdout=log, stderr=log)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("gateway did not answer /healthz within 30 s")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def count_records(spool: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall()
    finally:
        db.close()
    return {str(kind): int(n) for kind, n in rows}


async def load(targets: list[Target], duration: float, n_ttfb: int) -> list[RunResult]:
    body = request_body()
    results = []
    for target in targets:
        r = await run_target(target, body, duration, n_ttfb)
        print(f"  {target.name:8}{r.rps:9.1f} req/s  p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms")
        results.append(r)
    return results


def bench(args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    duration, n_ttfb = (3.0, 100) if args.quick else (8.0, 400)
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream"], stdout=subprocess.PIPE)
    procs.append(upstream)
    assert upstream.stdout is not None
    upstream_url = f"http://127.0.0.1:{int(upstream.stdout.readline())}"
    gateway, gateway_url = start_gateway(tmp, upstream_url)
    procs.append(gateway)
    wait_healthy(gateway_url, gateway)

    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    direct = Target("direct", upstream_url + "/v1/messages", {**headers, "x-api-key": "sk-bench"})
    via = Target(
        "gateway", gateway_url + "/anthropic/v1/messages", {**headers, "x-api-key": GATEWAY_KEY}
    )
    print(f"phases (direct, gateway, direct): {CONCURRENCY} streams x {duration:g} s after")
    print(f"{WARMUP:g} s warm-up, then {n_ttfb} sequential requests for TTFB")
    d1, g, d2 = uvloop.run(load([direct, via, direct], duration, n_ttfb))

    rss = peak_rss_mib(gateway.pid)
    gateway.send_signal(signal.SIGTERM)
    try:
        exit_code: int | None = gateway.wait(timeout=30)
    except subprocess.TimeoutExpired:
        exit_code = None
    records = count_records(tmp / "spool.db")
    ended = records.get("interception_ended", 0)

    d = RunResult(max(d1.rps, d2.rps), min(d1.p50_ms, d2.p50_ms), min(d1.p99_ms, d2.p99_ms))
    ratio = g.rps / d.rps if d.rps else math.nan
    figures: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "concurrency": CONCURRENCY,
        "duration_s": duration,
        "ttfb_requests": n_ttfb,
        "direct_note": "best of two direct runs (before and after gateway), per metric",
        "direct": vars(d),
        "gateway": vars(g),
        "direct_runs": [vars(d1), vars(d2)],
        "throughput_ratio": ratio,
        "added_ttfb_p50_ms": g.p50_ms - d.p50_ms,
        "added_ttfb_p99_ms": g.p99_ms - d.p99_ms,
        "gateway_requests_completed": via.completed,
        "gateway_requests_failed": via.failed,
        "direct_requests_failed": direct.failed,
        "records": records,
        "records_match": ended == via.completed,
        "gateway_peak_rss_mib": rss,
        "gateway_exit_code": exit_code,
    }
    print(f"\n{'':22}{'direct*':>12}{'gateway':>12}{'gw/direct | added':>20}")
    print(f"{'throughput (req/s)':22}{d.rps:12.1f}{g.rps:12.1f}{ratio:20.3f}")
    print(f"{'TTFB p50 (ms)':22}{d.p50_ms:12.3f}{g.p50_ms:12.3f}{g.p50_ms - d.p50_ms:+20.3f}")
    print(f"{'TTFB p99 (ms)':22}{d.p99_ms:12.3f}{g.p99_ms:12.3f}{g.p99_ms - d.p99_ms:+20.3f}")
    print(f"* {figures['direct_note']}")
    print(f"gateway peak RSS (VmHWM): {rss:.1f} MiB; exit code after SIGTERM: {exit_code}")
    print(f"records by kind: {json.dumps(records, sort_keys=True)}")
    print(f"interception_ended records: {ended}; gateway requests completed: {via.completed}")
    ok = True
    if ended != via.completed:
        print(f"!!! MISMATCH: {ended} interception_ended records vs {via.completed} requests !!!")
        ok = False
    for target in (direct, via):
        if target.failed:
            print(f"!!! {target.failed} {target.name} requests FAILED; first errors:")
            print("\n".join(f"    {err}" for err in target.errors))
            ok = False
    if exit_code != 0:
        print(f"!!! gateway did not exit 0 within 30 s after SIGTERM (exit code {exit_code})")
        ok = False
    if not ok:
        print("gateway log tail:\n" + (tmp / "gateway.log").read_text()[-3000:])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s throughput, 100 TTFB requests")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        uvloop.run(run_upstream())
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="aibridged-bench-") as tmp:
        try:
            return bench(args, Path(tmp), procs)
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
