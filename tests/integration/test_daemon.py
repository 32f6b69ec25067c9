"""``aibridged serve`` as a real process: zero-config start, health, graceful SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.testing import FakeUpstream, Reply, load_txtar, split_events
from tests.conftest import FIXTURES, GATEWAY_KEY
from tests.processes import AIBRIDGED, DaemonProcess, clean_env, free_port, wait_healthy

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")


@pytest.fixture
async def daemon(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[DaemonProcess]:
    daemon = DaemonProcess(tmp_path, upstream.url, shutdown_grace=10)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.close()


async def test_sigterm_drains_in_flight_stream_and_exits_zero(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=0.1))
    body = dict(orjson.loads(TEXT["request"]), stream=True)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{daemon.root}/readyz") as r:
            assert r.status == 200
        resp = await http.post(
            f"{daemon.url}/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}
        )
        first = await resp.content.readany()
        assert b"message_start" in first
        daemon.terminate()
        rest = await resp.read()
    # The in-flight stream finished completely despite the shutdown.
    received = first + rest
    assert received.rstrip().endswith(b'"message_stop"}')
    assert received.count(b"\n\n") == len(split_events(TEXT["streaming"].encode()))
    assert await asyncio.wait_for(daemon.wait(), 15) == 0
    # New connections are refused once it is down.
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(f"{daemon.root}/healthz"):
            pass
    db = sqlite3.connect(daemon.spool_path)
    kinds = dict(db.execute("SELECT kind, COUNT(*) FROM spooled_records GROUP BY kind").fetchall())
    ended = [
        orjson.loads(p)
        for (p,) in db.execute(
            "SELECT payload FROM spooled_records WHERE kind = 'interception_ended'"
        )
    ]
    db.close()
    assert kinds == {
        "interception_started": 1,
        "prompt_usage": 1,
        "token_usage": 1,
        "interception_ended": 1,
    }
    assert ended[0]["status"] == "completed"


async def test_zero_config_personal_mode(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The README's run command: no file, no host; the client's own key is forwarded."""
    port = free_port()
    env = clean_env()
    env["AIBRIDGED_LISTEN"] = f"127.0.0.1:{port}"
    env["AIBRIDGED_METRICS_LISTEN"] = "127.0.0.1:0"
    env["AIBRIDGED_PROVIDERS"] = orjson.dumps(
        [{"name": "anthropic", "type": "anthropic", "base_url": upstream.url}]
    ).decode()
    proc = await asyncio.create_subprocess_exec(
        AIBRIDGED, "serve", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_healthy(port, proc)
        upstream.enqueue(Reply.from_section(TEXT["non-streaming"]))
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/anthropic/v1/messages",
                data=TEXT["request"],
                headers={"x-api-key": "sk-ant-my-own-key-0123456789"},
            ) as r,
        ):
            assert r.status == 200
        assert upstream.requests[-1].headers.getall("x-api-key") == ["sk-ant-my-own-key-0123456789"]
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "personal mode" in log
        assert "sk-ant-my-own-key-0123456789" not in log
        db = sqlite3.connect(tmp_path / "aibridged.db")
        (count,) = db.execute("SELECT COUNT(*) FROM spooled_records").fetchone()
        db.close()
        assert count == 4
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_invalid_config_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("providers:\n  - {name: Bad_Name, type: anthropic}\n")
    proc = await asyncio.create_subprocess_exec(
        AIBRIDGED, "serve", "--config", str(path), env=clean_env(), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"invalid configuration" in err and b"name" in err
    assert b"Traceback" not in err
