"""Gateway overhead benchmark: direct to a fake provider vs. a bare relay vs. ``aibridged serve``.

Four OS processes share the cores: a fake upstream (this script with ``--upstream``), a bare
relay (``--bare``: aiohttp + uvloop, parses each SSE event, no auth, no records; the floor a
Python relay can reach), the real gateway (``aibridged serve``) and the load generator.
Throughput runs in rounds, each target once per round in rotating order; per-round ratios are
reported as median [min-max]. TTFB at concurrency 1 interleaves the targets request by request.

A last phase measures, in-process, how fast ``StreamUsage`` delivers spooled records to a gRPC
client for several ``max_batch`` sizes (``--skip-usage-stream`` skips it). Another measures, also
in-process, the latency the injected-tool (agentic) loop adds over the MCP call itself: a real MCP
server, a fake provider scripted for the two-turn ``injected_add`` exchange, and the gateway all
run in this process's event loop (``--skip-loop`` skips it).

``--api`` picks the API the throughput and TTFB phases drive: Anthropic Messages (the default),
OpenAI Chat Completions, OpenAI Responses, or ``all`` (the phases once per API, each with fresh
processes, figures under the API's name). Every API streams the same answer text: the Messages
stream is a recorded fixture, the OpenAI ones are synthetic, built here in the shape of OpenAI's.

    .venv/bin/python tests/benchmark.py [--quick] [--api messages|chat|responses|all]
        [--rounds R] [--duration D] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import orjson
import uvloop
import yaml
from aiohttp import web

from control.server import ControlServer
from control.servicer import ControlServicer
from control.spool import Spool
from control.v1 import control_pb2 as pb
from control.v1 import control_pb2_grpc
from gateway.config import load_settings
from gateway.daemon import Daemon
from gateway.records import (
    InterceptionEnded,
    InterceptionStarted,
    PromptUsage,
    Record,
    TokenUsage,
)
from gateway.state import McpServer, Snapshot, StateHolder
from gateway.testing import FakeUpstream, Reply, load_txtar, split_events
from gateway.tools.mcp_pool import McpPool
from tests.mcp_server import McpTestServer, running_mcp_server

if TYPE_CHECKING:
    from control.v1.control_pb2_grpc import ControlServiceAsyncStub

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "anthropic" / "text.txtar"
OPENAI_FIXTURES = ROOT / "tests" / "fixtures" / "openai"
GATEWAY_KEY = "gw-bench"
UPSTREAM_KEY = "sk-bench"
CONCURRENCY = 50
WARMUP = 1.0
END = b'data: {"type":"message_stop"}'
FORWARDED = ("content-type", "anthropic-version", "x-api-key", "authorization")
RATIOS = (("gateway", "direct"), ("bare", "direct"), ("gateway", "bare"))
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}


@dataclass(frozen=True)
class Api:
    """One API the load phases drive: its route, its request and what a whole stream looks like."""

    name: str
    provider: str  # the gateway's provider (and route prefix) serving it
    path: str  # the upstream path, also the route's path under /{provider}
    fixture: Path  # a txtar whose "request" section is the request body (stream forced on)
    first: bytes  # every whole stream opens so
    last: bytes  # and its last event opens so
    hidden: bytes = b""  # what no stream may show the client (Chat's usage-only chunk)

    def headers(self, key: str) -> dict[str, str]:
        """Request headers carrying ``key`` the way this API's clients send it."""
        if self.provider == "anthropic":
            return {
                "content-type": "application/json",
                "anthropic-version": "2023-06-01",
                "x-api-key": key,
            }
        return {"content-type": "application/json", "authorization": f"Bearer {key}"}

    def whole(self, data: bytes) -> bool:
        """Whether ``data`` is a whole stream of this API."""
        body = data.rstrip()
        return body.startswith(self.first) and body[body.rfind(b"\n\n") + 2 :].startswith(self.last)


APIS = {
    api.name: api
    for api in (
        Api(
            "messages",
            "anthropic",
            "/v1/messages",
            FIXTURE,
            b"event: message_start",
            b"event: message_stop\n" + END,
        ),
        # The client does not ask for usage: the gateway forces include_usage on upstream and
        # must hide the usage-only chunk (its ids are rewritten, so ``first`` stops at the id).
        Api(
            "chat",
            "openai",
            "/v1/chat/completions",
            OPENAI_FIXTURES / "chat" / "text.txtar",
            b'data: {"id":"',
            b"data: [DONE]",
            b'"usage":{"',
        ),
        Api(
            "responses",
            "openai",
            "/v1/responses",
            OPENAI_FIXTURES / "responses" / "text.txtar",
            b"event: response.created\n",
            b"event: response.completed\n",
        ),
    )
}
MESSAGES = APIS["messages"]


# --- the upstream streams ---------------------------------------------------------------------


def messages_texts() -> list[str]:
    """The text deltas of the recorded Messages stream: every API streams the same answer."""
    body = Reply.from_section(load_txtar(FIXTURE)["streaming"]).body
    return [
        orjson.loads(event.split(b"data:", 1)[1])["delta"]["text"]
        for event in split_events(body)
        if event.startswith(b"event: content_block_delta")
    ]


def obfuscation(i: int) -> str:
    """A stand-in for the random padding OpenAI puts in each streamed delta."""
    return "ha7QSWuIrCLSgTxlRNztDyni"[i % 7 : i % 7 + 10 + i % 4]


def chat_stream(include_usage: bool) -> list[bytes]:
    """A synthetic Chat Completions stream (OpenAI's fields, key order, ``obfuscation``): the
    role chunk, a chunk per text delta, the finish chunk; with ``include_usage`` every chunk has
    ``"usage":null`` and the usage-only chunk follows, as OpenAI sends them; ``[DONE]`` last."""
    counter = itertools.count()

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": "chatcmpl-SYNbench000000000000000001",
            "object": "chat.completion.chunk",
            "created": 1767225600,
            "model": "gpt-4.1-mini-2025-04-14",
            "service_tier": "default",
            "system_fingerprint": "fp_synthetic",
            "choices": choices,
        }
        if include_usage:
            obj["usage"] = usage
        obj["obfuscation"] = obfuscation(next(counter))
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    out = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
    out += [chunk(choice({"content": text})) for text in messages_texts()]
    out.append(chunk(choice({}, "stop")))
    if include_usage:
        details = {"reasoning_tokens": 0, "audio_tokens": 0}
        details |= {"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        usage: dict[str, Any] = {"prompt_tokens": 21, "completion_tokens": 74}
        usage |= {
            "total_tokens": 95,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        }
        out.append(chunk([], usage | {"completion_tokens_details": details}))
    return [*out, b"data: [DONE]\n\n"]


def responses_stream() -> list[bytes]:
    """A synthetic Responses stream (OpenAI's events, fields and key order, ``obfuscation``):
    created, in_progress, the message item and its part added, a delta per text delta, the
    done events, and response.completed with the output and usage."""
    texts = messages_texts()
    text = "".join(texts)
    rid = "resp_SYNbench0000000000000000000000000000000000000000001"
    mid = "msg_SYNbench00000000000000000000000000000000000000000001"
    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        fields["sequence_number"] = next(sequence)
        data = orjson.dumps({"type": kind, **dict(sorted(fields.items()))})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": rid, "object": "response", "created_at": 1767874658, "status": status,
            "background": False, "completed_at": 1767874660 if done else None, "error": None,
            "incomplete_details": None, "instructions": None, "max_output_tokens": None,
            "max_tool_calls": None, "model": "gpt-4.1-mini-2025-04-14", "output": output,
            "parallel_tool_calls": True, "previous_response_id": None, "prompt_cache_key": None,
            "prompt_cache_retention": None, "reasoning": {"effort": None, "summary": None},
            "safety_identifier": None, "service_tier": "default" if done else "auto",
            "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
            "tools": [], "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled",
            "usage": usage, "user": None, "metadata": {},
        }  # fmt: skip

    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def item(status: str, content: list[Any]) -> dict[str, Any]:
        return {"id": mid, "type": "message", "status": status, "content": content,
                "role": "assistant"}  # fmt: skip

    at = {"item_id": mid, "output_index": 0, "content_index": 0}
    usage: dict[str, Any] = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}}
    usage |= {"output_tokens": 74, "output_tokens_details": {"reasoning_tokens": 0}}
    message = item("completed", [part(text)])
    return [
        event("response.created", response=response("in_progress", [], None)),
        event("response.in_progress", response=response("in_progress", [], None)),
        event("response.output_item.added", item=item("in_progress", []), output_index=0),
        event("response.content_part.added", part=part(""), **at),
        *(
            event(
                "response.output_text.delta",
                delta=delta,
                logprobs=[],
                obfuscation=obfuscation(i),
                **at,
            )
            for i, delta in enumerate(texts)
        ),
        event("response.output_text.done", text=text, logprobs=[], **at),
        event("response.content_part.done", part=part(text), **at),
        event("response.output_item.done", item=message, output_index=0),
        event(
            "response.completed",
            response=response("completed", [message], usage | {"total_tokens": 86}),
        ),
    ]


async def serve(app: web.Application) -> None:
    """Serve ``app`` on a free loopback port, print the port, run forever."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


# --- child process: the fake upstream ---------------------------------------------------------


async def run_upstream() -> None:
    messages = split_events(Reply.from_section(load_txtar(FIXTURE)["streaming"]).body)
    chat = {usage: chat_stream(usage) for usage in (False, True)}
    streams = {MESSAGES.path: messages, APIS["responses"].path: responses_stream()}

    async def send(request: web.Request, events: list[bytes]) -> web.StreamResponse:
        out = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await out.prepare(request)
        for event in events:
            await out.write(event)
        await out.write_eof()
        return out

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await send(request, streams[request.path])

    async def handle_chat(request: web.Request) -> web.StreamResponse:
        # As OpenAI: "usage":null in each chunk and the usage chunk only when asked for.
        body = await request.read()
        return await send(request, chat[b'"include_usage":true' in body])

    app = web.Application()
    for path in streams:
        app.router.add_post(path, handle)
    app.router.add_post(APIS["chat"].path, handle_chat)
    await serve(app)


# --- child process: the bare relay (calibration floor) ----------------------------------------


async def run_bare(upstream_url: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k in FORWARDED if (v := request.headers.get(k)) is not None}
        path = request.path[request.path.index("/", 1) :]  # /{provider}/v1/... -> /v1/...
        async with session.post(upstream_url + path, data=body, headers=headers) as up:
            content_type = up.headers.get("Content-Type", "text/event-stream")
            out = web.StreamResponse(status=up.status, headers={"Content-Type": content_type})
            await out.prepare(request)
            carry = b""
            async for chunk in up.content.iter_any():
                *events, carry = (carry + chunk).split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:") and line != b"data: [DONE]":
                            orjson.loads(line[5:])
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    for api in APIS.values():
        app.router.add_post(f"/{api.provider}{api.path}", handle)
    await serve(app)


# --- the load generator -----------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]
    api: Api = MESSAGES
    completed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    warmed: bool = False
    rps: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(message)


def request_body(api: Api = MESSAGES) -> bytes:
    """The API's fixture request, streamed (Chat's without ``stream_options``)."""
    body = orjson.loads(load_txtar(api.fixture)["request"])
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
    if not target.api.whole(data):
        target.fail(f"incomplete stream ({len(data)} bytes): ...{data[-120:]!r}")
        return None
    if target.api.hidden and target.api.hidden in data:
        target.fail(f"the client was shown {target.api.hidden!r}: ...{data[-400:]!r}")
        return None
    target.completed += 1
    return ttfb


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values) or [math.nan]
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def throughput(session: aiohttp.ClientSession, t: Target, body: bytes, d: float) -> float:
    """req/s completed within a ``d``-second window; a warm-up precedes a target's first window."""
    begin = time.perf_counter() + (0.0 if t.warmed else WARMUP)
    t.warmed = True
    end = begin + d
    in_window = 0

    async def worker() -> None:
        nonlocal in_window
        while time.perf_counter() < end:
            ok = await one_request(session, t, body) is not None
            if ok and begin <= time.perf_counter() <= end:
                in_window += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return in_window / d


async def load(targets: list[Target], rounds: int, d: float, n_ttfb: int) -> list[dict[str, Any]]:
    body = request_body(targets[0].api)
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = {
        t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        for t in targets
    }
    per_round: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            rps = {}
            for t in order:
                rps[t.name] = await throughput(sessions[t.name], t, body, d)
                t.rps.append(rps[t.name])
            ratios = {f"{a}/{b}": ratio(rps[a], rps[b]) for a, b in RATIOS}
            per_round.append({"order": [t.name for t in order], "rps": rps, **ratios})
            cells = "  ".join(f"{t.name} {rps[t.name]:7.1f}" for t in targets)
            print(
                f"  round {r + 1}: {cells} req/s  "
                + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items())
            )
        for _ in range(n_ttfb):
            for t in targets:
                ttfb = await one_request(sessions[t.name], t, body)
                if ttfb is not None:
                    t.ttfb_ms.append(ttfb * 1000)
    finally:
        for session in sessions.values():
            await session.close()
    return per_round


# --- usage delivery over StreamUsage (in-process) ---------------------------------------------

USAGE_BATCHES = (1, 100, 500)
USAGE_BATCH1_RECORDS = 10_000
USAGE_TOKEN = "bench"


def usage_records(n: int) -> list[Record]:
    """``n`` records, one interception per four: started, token usage, prompt, ended."""
    prompt = "Summarise the design of the usage spool and its delivery guarantees. " * 3
    out: list[Record] = []
    for i in range(n):
        iid = f"bench-{i // 4:08d}"
        match i % 4:
            case 0:
                out.append(
                    InterceptionStarted(
                        interception_id=iid,
                        provider="anthropic",
                        provider_name="anthropic",
                        model="claude-sonnet-4-5",
                        actor_id="actor-42",
                        username="alice",
                        actor_metadata={"team": "platform"},
                        client="Claude Code",
                        user_agent="claude-cli/2.0.0 (external, cli)",
                        client_session_id="sess-1234",
                        correlating_tool_call_id=None,
                        credential_kind="centralized",
                        credential_hint="sk-a...mnop",
                        streaming=True,
                    )
                )
            case 1:
                out.append(
                    TokenUsage(
                        interception_id=iid,
                        msg_id=f"msg_{i:010d}",
                        input=1200,
                        output=350,
                        cache_read=48_000,
                        cache_write=2048,
                        cache_write_5m=2048,
                    )
                )
            case 2:
                out.append(PromptUsage(interception_id=iid, msg_id=f"msg_{i:010d}", prompt=prompt))
            case _:
                out.append(InterceptionEnded(interception_id=iid, status="completed"))
    return out


async def deliver(stub: ControlServiceAsyncStub, epoch: str, mb: int, n: int) -> float:
    """Seconds from opening ``StreamUsage`` (max_batch ``mb``) until ``n`` records arrived."""
    request = pb.StreamUsageRequest(epoch=epoch, max_batch=mb, max_in_flight=n + 1)
    md = (("authorization", f"Bearer {USAGE_TOKEN}"),)
    got = 0
    t0 = time.perf_counter()
    call = stub.StreamUsage(request, metadata=md)
    try:
        async for batch in call:
            got += len(batch.records)
            if got >= n:
                break
    finally:
        call.cancel()
    elapsed = time.perf_counter() - t0
    if got < n:
        raise RuntimeError(f"StreamUsage ended after {got} of {n} records")
    return elapsed


async def usage_stream(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aibridged-bench-usage-") as tmp:
        spool = Spool(Path(tmp) / "spool.db")
        await spool.start()
        stop = asyncio.Event()
        server: ControlServer | None = None
        try:
            records = usage_records(n)
            t0 = time.perf_counter()
            for start in range(0, n, 10_000):
                for record in records[start : start + 10_000]:
                    spool.submit(record)
                await spool.flush()
            fill_s = time.perf_counter() - t0
            state = StateHolder(Snapshot(providers={}, keys={}))
            servicer = ControlServicer(state, spool, stop, lambda: None, time.time())
            server = ControlServer(servicer, USAGE_TOKEN, "127.0.0.1:0")
            await server.start(data_plane_ready=True)
            rows = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = control_pb2_grpc.ControlServiceStub(channel)
                for mb in USAGE_BATCHES:
                    count = min(n, USAGE_BATCH1_RECORDS) if mb == 1 else n
                    elapsed = await deliver(stub, spool.epoch, mb, count)
                    rows.append(
                        {
                            "max_batch": mb,
                            "records": count,
                            "seconds": elapsed,
                            "records_per_s": count / elapsed,
                        }
                    )
        finally:
            stop.set()
            if server is not None:
                await server.stop(0)
            await spool.close()
    return {"spooled": n, "spool_fill_records_per_s": n / fill_s, "runs": rows}


def run_usage_stream(quick: bool) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    figures: dict[str, Any] = uvloop.run(usage_stream(n))
    print(f"\nStreamUsage delivery (in-process, {n} spooled records, no acks)")
    print(f"  spool fill: {figures['spool_fill_records_per_s']:9.0f} records/s")
    print(f"  {'max_batch':>9}  {'records':>8}  {'records/s':>10}")
    for row in figures["runs"]:
        print(f"  {row['max_batch']:9}  {row['records']:8}  {row['records_per_s']:10.0f}")
    return figures


# --- agentic loop overhead (in-process) -------------------------------------------------------

LOOP_FIXTURE = ROOT / "tests" / "fixtures" / "anthropic" / "injected_add.txtar"
LOOP_WARMUP = 10
LOOP_ANSWER = b'"text":"5."'


@dataclass
class LoopTimings:
    loop_ms: list[float] = field(default_factory=list)
    direct_ms: list[float] = field(default_factory=list)
    mcp_ms: list[float] = field(default_factory=list)


async def read_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> bytes:
    """POST ``body``, read the response to the end; raise unless it is a complete SSE stream."""
    async with session.post(url, data=body, headers=headers) as resp:
        data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {data[:300]!r}")
    if not data.rstrip().endswith(END):
        raise RuntimeError(f"{url}: incomplete stream ({len(data)} bytes): ...{data[-120:]!r}")
    return data


async def agentic_loop(n: int) -> dict[str, Any]:
    """Interleave, ``n`` times: a looped request via the gateway, its two upstream streams
    fetched directly back to back, and one MCP ``add`` call through a separate ``McpPool``."""
    add = load_txtar(LOOP_FIXTURE)
    turn1 = Reply.from_section(add["streaming"])
    turn2 = Reply.from_section(add["streaming/tool-call"])
    body = orjson.loads(add["request"])
    body["stream"] = True
    request = orjson.dumps(body)
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    timings = LoopTimings()
    with tempfile.TemporaryDirectory(prefix="aibridged-bench-loop-") as tmp:
        async with running_mcp_server(McpTestServer()) as mcp_url:
            upstream = await FakeUpstream().start()
            settings = load_settings(
                None,
                listen="127.0.0.1:0",
                metrics_listen="127.0.0.1:0",
                spool_path=Path(tmp) / "spool.db",
                log_level="warning",
                shutdown_grace=2.0,
                providers=[
                    {
                        "name": "anthropic",
                        "type": "anthropic",
                        "base_url": upstream.url,
                        "api_key": "sk-bench",
                    }
                ],
                api_keys=[{"key": GATEWAY_KEY, "actor_id": "bench", "username": "bench"}],
                mcp_servers=[{"id": "tools", "url": mcp_url}],
            )
            daemon = await Daemon.start(settings)
            pool = McpPool()
            pool.configure({"tools": McpServer(id="tools", url=mcp_url)}, {})
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            try:
                gateway_url = f"http://127.0.0.1:{daemon.port}/anthropic/v1/messages"
                gateway_headers = {**headers, "x-api-key": GATEWAY_KEY}
                direct_url = upstream.url + "/v1/messages"
                direct_headers = {**headers, "x-api-key": "sk-bench"}

                async def via_gateway() -> float:
                    upstream.enqueue(turn1, turn2)
                    before = len(upstream.requests)
                    t0 = time.perf_counter()
                    data = await read_stream(session, gateway_url, request, gateway_headers)
                    elapsed = time.perf_counter() - t0
                    if len(upstream.requests) - before != 2 or LOOP_ANSWER not in data:
                        raise RuntimeError(f"the loop did not run: ...{data[-300:]!r}")
                    if b"bmcp_tools_add" in data:
                        raise RuntimeError("the injected tool_use leaked to the client")
                    return elapsed

                # One looped request captures the bodies the gateway sends upstream, so the
                # direct baseline replays exactly those (tools injected, tool_result appended).
                await via_gateway()
                first, second = (r.body for r in upstream.requests[-2:])
                if b'"tool_result"' not in second or b'"text":"5"' not in second:
                    raise RuntimeError(f"no tool result in the continuation: {second[-300:]!r}")

                async def direct_pair() -> float:
                    upstream.enqueue(turn1, turn2)
                    t0 = time.perf_counter()
                    await read_stream(session, direct_url, first, direct_headers)
                    await read_stream(session, direct_url, second, direct_headers)
                    return time.perf_counter() - t0

                async def mcp_call() -> float:
                    t0 = time.perf_counter()
                    result = await pool.call("bench", "tools", "add", {"a": 2, "b": 3})
                    elapsed = time.perf_counter() - t0
                    if result.is_error or result.content != [{"type": "text", "text": "5"}]:
                        raise RuntimeError(f"unexpected MCP result: {result}")
                    return elapsed

                for i in range(LOOP_WARMUP + n):
                    loop_s = await via_gateway()
                    direct_s = await direct_pair()
                    mcp_s = await mcp_call()
                    if i >= LOOP_WARMUP:
                        timings.loop_ms.append(loop_s * 1000)
                        timings.direct_ms.append(direct_s * 1000)
                        timings.mcp_ms.append(mcp_s * 1000)
            finally:
                await session.close()
                await pool.close()
                await daemon.stop()
                await upstream.close()

    def pcts(values: list[float]) -> dict[str, float]:
        return {"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99)}

    loop, direct, mcp = pcts(timings.loop_ms), pcts(timings.direct_ms), pcts(timings.mcp_ms)
    return {
        "mode": "in-process",
        "requests": n,
        "warmup_requests": LOOP_WARMUP,
        "loop_request": loop,
        "direct_two_streams": direct,
        "mcp_call": mcp,
        "loop_overhead_p50_ms": loop["p50_ms"] - direct["p50_ms"] - mcp["p50_ms"],
    }


def run_agentic_loop(quick: bool) -> dict[str, Any]:
    n = 50 if quick else 200
    figures: dict[str, Any] = uvloop.run(agentic_loop(n))
    print(f"\nagentic loop overhead (in-process, {n} sequential requests, interleaved; ms)")
    print(f"  {'':22}{'p50':>9}{'p99':>9}")
    rows = (
        ("loop request (total)", "loop_request"),
        ("direct two streams", "direct_two_streams"),
        ("MCP call (add)", "mcp_call"),
    )
    for label, key in rows:
        print(f"  {label:22}{figures[key]['p50_ms']:9.3f}{figures[key]['p99_ms']:9.3f}")
    overhead = figures["loop_overhead_p50_ms"]
    print(f"  {'loop overhead':22}{overhead:9.3f}   (loop p50 - direct p50 - MCP p50)")
    return figures


# --- orchestration ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_self(procs: list[subprocess.Popen[bytes]], *flags: str) -> tuple[int, str]:
    """Re-run this script with hidden ``flags``; its pid and the URL of the port it prints."""
    proc = subprocess.Popen([sys.executable, __file__, *flags], stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip():
        raise RuntimeError(f"child {flags} exited early with code {proc.wait()}")
    return proc.pid, f"http://127.0.0.1:{int(line)}"


def start_gateway(tmp: Path, upstream_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    providers = [
        {"name": "anthropic", "type": "anthropic", "base_url": upstream_url},
        {"name": "openai", "type": "openai", "base_url": upstream_url + "/v1"},
    ]
    config = {
        "listen": f"127.0.0.1:{port}",
        "metrics_listen": "127.0.0.1:0",
        "spool_path": str(tmp / "spool.db"),
        "log_level": "warning",
        "providers": [{**provider, "api_key": UPSTREAM_KEY} for provider in providers],
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


# An interception per gateway request: started, its one upstream response's usage, ended.
INTERCEPTION_KINDS = ("interception_started", "token_usage", "interception_ended")


def count_records(spool: Path) -> dict[str, int]:
    """Records by kind, and ``completed``: the interception_ended records with that status."""
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT kind, COUNT(*) FROM spooled_records GROUP BY kind").fetchall()
        (completed,) = db.execute(
            "SELECT COUNT(*) FROM spooled_records WHERE kind = 'interception_ended'"
            " AND json_extract(payload, '$.status') = 'completed'"
        ).fetchone()
    finally:
        db.close()
    return {**{str(kind): int(n) for kind, n in rows}, "completed": int(completed)}


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill the processes of ``procs`` still running (last first) and reap them all."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def bench_api(
    api: Api, args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen[bytes]]
) -> tuple[dict[str, Any], bool]:
    """The throughput and TTFB phases for ``api`` with fresh processes: its figures, and
    whether every request succeeded and the spool holds one whole interception per request."""
    rounds, duration, n_ttfb = phase_sizes(args)
    tmp.mkdir()
    first = len(procs)
    _, upstream_url = spawn_self(procs, "--upstream")
    bare_pid, bare_url = spawn_self(procs, "--bare", upstream_url)
    gateway, gateway_url = start_gateway(tmp, upstream_url)
    procs.append(gateway)
    wait_healthy(gateway_url, gateway)

    route = f"/{api.provider}{api.path}"
    direct = Target("direct", upstream_url + api.path, api.headers(UPSTREAM_KEY), api)
    bare = Target("bare", bare_url + route, api.headers(UPSTREAM_KEY), api)
    via = Target("gateway", gateway_url + route, api.headers(GATEWAY_KEY), api)
    targets = [direct, bare, via]
    print(f"\n== {api.name}: POST {route} ==")
    print(f"throughput: {rounds} rounds x (direct, bare, gateway) in rotating order,")
    print(f"{CONCURRENCY} streams x {duration:g} s each ({WARMUP:g} s warm-up on first use)")
    per_round = uvloop.run(load(targets, rounds, duration, n_ttfb))

    rss = {"gateway": peak_rss_mib(gateway.pid), "bare": peak_rss_mib(bare_pid)}
    gateway.send_signal(signal.SIGTERM)
    try:
        exit_code: int | None = gateway.wait(timeout=30)
    except subprocess.TimeoutExpired:
        exit_code = None
    stop(procs[first:])
    records = count_records(tmp / "spool.db")
    counts = {kind: records.get(kind, 0) for kind in (*INTERCEPTION_KINDS, "completed")}
    records_match = all(n == via.completed for n in counts.values())

    ratios = {f"{a}/{b}": spread([row[f"{a}/{b}"] for row in per_round]) for a, b in RATIOS}
    rps = {t.name: statistics.median(t.rps) for t in targets}
    ttfb = {
        t.name: {"p50_ms": percentile(t.ttfb_ms, 0.5), "p99_ms": percentile(t.ttfb_ms, 0.99)}
        for t in targets
    }
    added = {
        name: {k: ttfb[name][k] - ttfb["direct"][k] for k in ("p50_ms", "p99_ms")}
        for name in ("bare", "gateway")
    }
    figures: dict[str, Any] = {
        "route": route,
        "per_round": per_round,
        "throughput_rps_median": rps,
        "throughput_ratios": ratios,
        "ttfb": ttfb,
        "added_ttfb": added,
        "requests": {t.name: {"completed": t.completed, "failed": t.failed} for t in targets},
        "records": records,
        "records_match": records_match,
        "peak_rss_mib": rss,
        "gateway_exit_code": exit_code,
    }

    def fmt(key: str) -> str:
        s = ratios[key]
        return f"{key:15}{s['median']:6.3f}  [{s['min']:.3f}-{s['max']:.3f}]"

    print(f"\nthroughput, median of {rounds} rounds   per-round ratio: median [min-max]")
    print(f"  direct  {rps['direct']:9.1f} req/s")
    print(f"  bare    {rps['bare']:9.1f} req/s   {fmt('bare/direct')}")
    print(f"  gateway {rps['gateway']:9.1f} req/s   {fmt('gateway/direct')}")
    print(f"  {'':28}{fmt('gateway/bare')}")
    print(f"TTFB at concurrency 1, {n_ttfb} interleaved requests per target (ms)")
    print(f"  {'':8}{'p50':>9}{'p99':>9}{'added p50':>12}{'added p99':>12}")
    for t in targets:
        cells = "".join(f"{v:9.3f}" for v in ttfb[t.name].values())
        cells += "".join(f"{v:+12.3f}" for v in added.get(t.name, {}).values())
        print(f"  {t.name:8}{cells}")
    print(f"peak RSS (VmHWM): gateway {rss['gateway']:.1f} MiB, bare relay {rss['bare']:.1f} MiB")
    print(f"gateway exit code after SIGTERM: {exit_code}; records by kind (bare relay: none):")
    print(f"  {json.dumps(records, sort_keys=True)}")
    print(
        f"gateway requests completed: {via.completed}; interceptions started / with token usage"
        f" / ended / ended completed: {' / '.join(str(n) for n in counts.values())}"
    )
    ok = True
    if not records_match:
        print(f"!!! MISMATCH: records {counts} vs {via.completed} gateway requests !!!")
        ok = False
    for target in targets:
        if target.failed:
            print(f"!!! {target.failed} {target.name} requests FAILED; first errors:")
            print("\n".join(f"    {err}" for err in target.errors))
            ok = False
    if exit_code != 0:
        print(f"!!! gateway did not exit 0 within 30 s after SIGTERM (exit code {exit_code})")
        ok = False
    if not ok:
        print("gateway log tail:\n" + (tmp / "gateway.log").read_text()[-3000:])
    return figures, ok


def phase_sizes(args: argparse.Namespace) -> tuple[int, float, int]:
    """Throughput rounds, seconds per target per round, TTFB requests per target."""
    rounds = args.rounds or (3 if args.quick else 5)
    duration = args.duration or (2.0 if args.quick else 4.0)
    return rounds, duration, 100 if args.quick else 400


def print_summary(figures: dict[str, Any], names: list[str]) -> None:
    """One line per API: direct req/s, median ratios, added TTFB."""
    print("\nsummary: median per-round ratios; TTFB added by the gateway at concurrency 1 (ms)")
    head = ("direct req/s", "gateway/direct", "bare/direct", "gateway/bare", "p50", "p99")
    print(f"  {'':10}" + "".join(f"{h:>16}" for h in head))
    for name in names:
        f = figures[name]
        cells = [f"{f['throughput_rps_median']['direct']:16.1f}"]
        for key in ("gateway/direct", "bare/direct", "gateway/bare"):
            cells.append(f"{f['throughput_ratios'][key]['median']:16.3f}")
        cells += [f"{f['added_ttfb']['gateway'][k]:+16.3f}" for k in ("p50_ms", "p99_ms")]
        print(f"  {name:10}" + "".join(cells))


def bench(args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    rounds, duration, n_ttfb = phase_sizes(args)
    names = list(APIS) if args.api == "all" else [args.api]
    figures: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": WARMUP,
        "ttfb_requests": n_ttfb,
        "apis": names,
    }
    ok = True
    for name in names:
        figures[name], api_ok = bench_api(APIS[name], args, tmp / name, procs)
        ok = ok and api_ok
    if len(names) > 1:
        print_summary(figures, names)
    if not args.skip_usage_stream:
        figures["usage_stream"] = run_usage_stream(args.quick)
    if not args.skip_loop:
        try:
            figures["agentic_loop"] = run_agentic_loop(args.quick)
        except Exception as exc:
            print(f"!!! agentic loop phase FAILED: {type(exc).__name__}: {exc}")
            ok = False
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 2 s, 100 TTFB requests")
    parser.add_argument(
        "--api",
        choices=(*APIS, "all"),
        default="messages",
        help="the API the throughput and TTFB phases drive (all: each in turn)",
    )
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 5, quick 3)")
    parser.add_argument("--duration", type=float, help="seconds per target per round (4, quick 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--skip-usage-stream", action="store_true", help="skip the StreamUsage delivery phase"
    )
    parser.add_argument(
        "--skip-loop", action="store_true", help="skip the agentic loop overhead phase"
    )
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", metavar="UPSTREAM_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        uvloop.run(run_upstream())
        return 0
    if args.bare:
        uvloop.run(run_bare(args.bare))
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="aibridged-bench-") as tmp:
        try:
            return bench(args, Path(tmp), procs)
        finally:
            stop(procs)


if __name__ == "__main__":
    sys.exit(main())
