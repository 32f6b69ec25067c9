"""The usage spool under faults: a full disk, a crash mid-stream, a second daemon on the same spool.

Each test runs ``aibridged serve`` as a real process (tests/processes.py) and looks at what a
user would: the records a host reads after a restart, the daemon's log lines and exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import resource
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson

from control.v1 import control_pb2 as pb
from control.v1 import control_pb2_grpc
from gateway.testing import FakeUpstream, Reply, load_txtar
from tests.conftest import FIXTURES, GATEWAY_KEY
from tests.integration.test_usage_durability import KINDS, Reader, ask, get_status, kind
from tests.processes import AIBRIDGED, DaemonProcess, clean_env

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
HEADERS = {"x-api-key": GATEWAY_KEY, "content-type": "application/json"}
RECORDS_PER_REQUEST = 4  # interception_started, prompt_usage, token_usage, interception_ended


def _big_request(n: int) -> bytes:
    """The fixture's request with a 40 KB prompt: the journal (8 MiB) fills in ~200 requests."""
    body: dict[str, Any] = orjson.loads(TEXT["request"])
    body["messages"][0]["content"][0]["text"] = f"request {n}: " + "lorem ipsum " * 3400
    return orjson.dumps(body)


async def _send(url: str, count: int, first: int, concurrency: int = 8) -> int:
    """``count`` blocking requests, ``concurrency`` at a time; how many were answered 200."""
    answered = 0
    numbers = iter(range(first, first + count))

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal answered
        for n in numbers:
            async with http.post(f"{url}/v1/messages", data=_big_request(n), headers=HEADERS) as r:
                await r.read()
                answered += r.status == 200

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return answered


async def _read_all(target: str) -> list[pb.UsageRecord]:
    """Every record a host reads from the daemon, in batches small enough for 40 KB prompts."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = control_pb2_grpc.ControlServiceStub(channel)
        high = (await get_status(stub)).high_watermark
        reader = Reader(stub, max_batch=50, max_in_flight=10_000_000)
        try:
            await reader.until(lambda records: bool(records) and records[-1].seq >= high)
        finally:
            await reader.close()
        return reader.records


def _log_lines(daemon: DaemonProcess, run: int) -> list[str]:
    return (daemon.dir / f"daemon-{run}.log").read_text().splitlines()


def _field(line: str, name: str) -> int:
    match = re.search(rf"\b{name}=(\d+)", line)
    assert match, f"no {name}= in {line!r}"
    return int(match.group(1))


async def test_full_disk_then_sigterm_every_answered_request_is_kept_or_counted_lost(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Records present after the restart + records the shutdown counted lost = records answered.

    The disk "fills up" while the daemon runs: its file-size limit (RLIMIT_FSIZE) drops below
    the spool's write offsets, so every SQLite write fails (the journal, mapped and reserved at
    start, still takes records until it is full). Then SIGTERM, and a restart without the limit.
    """
    upstream.default = Reply.from_section(TEXT["non-streaming"])
    daemon = DaemonProcess(tmp_path, upstream.url, control=True, spool_flush_timeout=0.5)
    try:
        await daemon.start()
        # ~1.2 MB committed: SQLite's next writes land past 1 MiB, the limit set below. The
        # daemon's log stays far below it (and Python ignores SIGXFSZ: writes fail with EFBIG).
        answered = await _send(daemon.url, 30, 0)
        limit = 1 << 20
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        answered += await _send(daemon.url, 300, 30)
        assert answered == 330, "a full spool disk must not fail requests"
        daemon.terminate()
        assert await daemon.wait() == 0
        lines = _log_lines(daemon, 0)
        assert any("usage spool cannot write" in line for line in lines), "disk never filled"

        await daemon.start()
        records = await _read_all(daemon.control_target)
    finally:
        await daemon.close()

    errors = [line for line in lines if " ERROR aibridged.spool " in line]
    lost = sum(_field(line, "dropped") for line in errors if "DROPPED" in line)
    kept = sum(_field(line, "records") for line in errors if "kept in the journal" in line)
    replayed_lines = [line for line in _log_lines(daemon, 1) if "journal replayed" in line]
    replayed = sum(_field(line, "records") for line in replayed_lines)
    assert kept, "the journal should have kept records the full disk refused"
    assert replayed == kept, "what the shutdown said the journal kept is replayed"
    assert lost, "the journal (8 MiB) cannot hold 300 requests of 40 KB: some must be lost"
    # The run's records, without the 'interrupted' ends the restart adds to the interceptions
    # whose end record was among the lost ones.
    interrupted = {
        r.interception_id
        for r in records
        if kind(r) == "interception_ended" and r.interception_ended.status == "interrupted"
    }
    ours = [
        r
        for r in records
        if not (kind(r) == "interception_ended" and r.interception_id in interrupted)
    ]
    assert len(ours) + lost == RECORDS_PER_REQUEST * answered, (
        f"{len(ours)} records present + {lost} counted lost != {answered} requests answered"
    )
    assert len(records) - len(ours) == len(interrupted), "an interrupted end for a finished one"
    assert len({r.record_id for r in records}) == len(records)


async def test_sigkill_mid_stream_the_restart_ends_each_open_interception_interrupted(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Interceptions cut by a crash get an ``interrupted`` end at the next start, exactly once."""
    streaming = Reply.from_section(TEXT["streaming"])
    upstream.default = dataclasses.replace(streaming, hang_after=5)  # mid-stream for good
    daemon = DaemonProcess(tmp_path, upstream.url, control=True)
    in_flight: list[str] = []
    body = dict(orjson.loads(TEXT["request"]), stream=True)

    async def stream(http: aiohttp.ClientSession, started: asyncio.Event) -> None:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.post(f"{daemon.url}/v1/messages", json=body, headers=HEADERS) as r:
                async for line in r.content:
                    if line.startswith(b"data:") and b'"message_start"' in line:
                        in_flight.append(orjson.loads(line[5:])["message"]["id"])
                        started.set()

    try:
        await daemon.start()
        async with aiohttp.ClientSession() as http:
            upstream.enqueue(streaming, streaming)
            done = [await ask(http, daemon.url, stream=True) for _ in range(2)]
            events = [asyncio.Event() for _ in range(5)]
            tasks = [asyncio.create_task(stream(http, e)) for e in events]
            async with asyncio.timeout(10):
                for event in events:
                    await event.wait()
            await asyncio.sleep(0.3)  # the writer commits the started records (20 ms linger)
            daemon.kill()
            await asyncio.gather(*tasks)
        await daemon.wait()
        await daemon.start()
        records = await _read_all(daemon.control_target)
        daemon.kill()
        await daemon.wait()
        await daemon.start()  # a second restart adds nothing: they are ended already
        again = await _read_all(daemon.control_target)
    finally:
        await daemon.close()

    assert len(set(in_flight)) == 5
    ends = {
        r.interception_id: r.interception_ended for r in records if kind(r) == "interception_ended"
    }
    started = {r.interception_id for r in records if kind(r) == "interception_started"}
    assert started == set(done) | set(in_flight)
    assert {i: e.status for i, e in ends.items()} == {
        **dict.fromkeys(done, "completed"),
        **dict.fromkeys(in_flight, "interrupted"),
    }
    assert Counter(kind(r) for r in records)["interception_ended"] == 7, "one end each"
    assert {ends[i].error_type for i in in_flight} == {"gateway_stopped"}
    assert len(again) == len(records)


async def test_a_second_daemon_on_the_same_spool_exits_2_and_leaves_the_first_alone(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """One line naming spool_path, exit status 2, no traceback; the first keeps its journal.

    The exit status and the single line come from the daemon's start-up error handling
    (``ConfigError`` at start: issue 9 item 17); the spool raises that error.
    """
    upstream.default = Reply.from_section(TEXT["non-streaming"])
    first = DaemonProcess(tmp_path, upstream.url, control=True)
    (tmp_path / "second").mkdir()
    second = DaemonProcess(tmp_path / "second", upstream.url, spool_path=str(first.spool_path))
    try:
        await first.start()
        proc = await asyncio.create_subprocess_exec(
            AIBRIDGED,
            "serve",
            "--config",
            str(second.config),
            env=clean_env(),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        message = err.decode()
        assert proc.returncode == 2, message
        assert "Traceback" not in message
        (line,) = message.strip().splitlines()
        assert f"spool_path {first.spool_path}: in use by another aibridged process" in line

        # The first daemon's journal still works: a kill right after a response loses nothing.
        async with aiohttp.ClientSession() as http:
            interception_id = await ask(http, first.url)
        first.kill()
        await first.wait()
        await first.start()
        records = await _read_all(first.control_target)
    finally:
        await first.close()
    assert {kind(r) for r in records if r.interception_id == interception_id} == KINDS
