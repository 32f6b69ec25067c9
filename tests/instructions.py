"""CPU instructions per streamed request, counted by valgrind's callgrind: a repeatable figure.

Throughput on a shared 2-core VM drifts by several percent between runs, so small changes to the
hot path cannot be judged by ``tests/benchmark.py`` alone. This runs the gateway (or the bare
relay) under ``valgrind --tool=callgrind`` in front of the benchmark's fake upstream, warms it
up, then counts every instruction the process (all its threads) executes for N streamed requests
at concurrency 10. The count is the same from run to run within about 1%, whatever else the
machine does. Needs valgrind (Debian package ``valgrind``); takes about a minute.
``--api`` picks the API of the streamed requests (the benchmark's streams and requests).

    .venv/bin/python tests/instructions.py [--requests N] [--target gateway|bare] [--keep FILE]
        [--api messages|chat|responses] [--log-level info]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import uvloop
import yaml

from tests import benchmark as bench

WARMUP = 200
CONCURRENCY = 10


async def load(url: str, headers: dict[str, str], n: int, api: bench.Api) -> int:
    """Send ``n`` streamed requests, ``CONCURRENCY`` at a time; how many failed (the first
    errors printed)."""
    target = bench.Target("target", url, headers, api)
    body = bench.request_body(api)
    limit = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> None:
            async with limit:
                await bench.one_request(session, target, body)

        await asyncio.gather(*(one() for _ in range(n)))
    for error in target.errors:
        print(f"failed: {error}", file=sys.stderr)
    return target.failed


def wait_for_port(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 300  # Python under valgrind starts slowly
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--target", choices=("gateway", "bare"), default="gateway")
    parser.add_argument("--keep", metavar="FILE", help="keep the callgrind output here")
    parser.add_argument("--api", choices=tuple(bench.APIS), default="messages")
    parser.add_argument(
        "--log-level",
        default="warning",
        help="the gateway's log_level (info: one access line per request, the default's cost)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="aibridged-instr-") as tmp_name:
        tmp = Path(tmp_name)
        out = Path(args.keep) if args.keep else tmp / "callgrind.out"
        grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        grind.append(f"--callgrind-out-file={out}")
        try:
            api = bench.APIS[args.api]
            _, upstream = bench.spawn_self(procs, "--upstream")
            if args.target == "bare":
                cmd = [*grind, sys.executable, bench.__file__, "--bare", upstream]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                procs.append(proc)
                assert proc.stdout is not None
                url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
                headers = api.headers(bench.UPSTREAM_KEY)
            else:
                config_proc, url = bench.start_gateway(tmp, upstream)  # writes the config
                config_proc.kill()
                config_proc.wait()
                config_file = tmp / "aibridged.yaml"
                config = yaml.safe_load(config_file.read_text())
                config["log_level"] = args.log_level
                config_file.write_text(yaml.safe_dump(config))
                serve = [sys.executable, "-m", "gateway", "serve", "--config"]
                cmd = [*grind, *serve, str(tmp / "aibridged.yaml")]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(proc)
                wait_for_port(proc, url)
                headers = api.headers(bench.GATEWAY_KEY)
            url += f"/{api.provider}{api.path}"
            failed = uvloop.run(load(url, headers, WARMUP, api))
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True)
            failed += uvloop.run(load(url, headers, args.requests, api))
            subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], capture_output=True)
            proc.send_signal(signal.SIGINT if args.target == "bare" else signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.kill()
                p.wait()
        if failed:
            print(f"{failed} requests failed", file=sys.stderr)
            return 1
        summary = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True)
        match = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", summary.stdout)
        if match is None:
            print("no totals in the callgrind output", file=sys.stderr)
            return 1
        total = int(match.group(1).replace(",", ""))
    per_request = total / args.requests
    print(f"{args.target}, {args.api}: {per_request:,.0f} instructions per streamed request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
