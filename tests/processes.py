"""``aibridged serve`` as a real OS process, for the tests that need signals and restarts."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import CONTROL_TOKEN, GATEWAY_KEY, anthropic_provider

AIBRIDGED = str(Path(sys.executable).with_name("aibridged"))


def free_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without any setting or key meant for the daemon."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIBRIDGED_", "ANTHROPIC_"))}


async def wait_healthy(port: int, proc: asyncio.subprocess.Process) -> None:
    """Wait until the daemon on ``port`` answers ``/healthz`` (it must not exit meanwhile)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(20):
        while True:
            assert proc.returncode is None, "daemon exited during startup"
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


class DaemonProcess:
    """``aibridged serve`` on a YAML config in ``tmp_path``, restartable on the same spool.

    The config serves ``upstream_url`` as the default provider with the central key, and alice's
    gateway key; ``control=True`` turns the gRPC control plane on (with ``CONTROL_TOKEN``), and
    keyword arguments override or add settings. Each run's stderr goes to ``daemon-<n>.log``.
    """

    def __init__(
        self, tmp_path: Path, upstream_url: str, *, control: bool = False, **overrides: Any
    ) -> None:
        self.dir = tmp_path
        self.port = free_port()
        self.control_port = free_port() if control else None
        self.spool_path = tmp_path / "spool.db"
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "metrics_listen": "127.0.0.1:0",
            "spool_path": str(self.spool_path),
            "providers": [anthropic_provider(upstream_url)],
            "api_keys": [{"key": GATEWAY_KEY, "actor_id": "u-1", "username": "alice"}],
            # Tests read key=value lines; stderr is a file, so the default would be JSON
            # (tests/integration/test_logs.py covers that default with log_format=None).
            "log_format": "text",
        }
        if control:
            config["control_listen"] = f"127.0.0.1:{self.control_port}"
            config["control_token"] = CONTROL_TOKEN
        config.update(overrides)
        self.config = tmp_path / "aibridged.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self._proc: asyncio.subprocess.Process | None = None
        self.runs = 0

    @property
    def root(self) -> str:
        """Base URL of the data plane."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL clients use for the default provider (``/anthropic``)."""
        return f"{self.root}/anthropic"

    @property
    def control_target(self) -> str:
        """``host:port`` of the gRPC control plane (needs ``control=True``)."""
        assert self.control_port is not None, "start the daemon with control=True"
        return f"127.0.0.1:{self.control_port}"

    @property
    def proc(self) -> asyncio.subprocess.Process:
        """The current run's process."""
        assert self._proc is not None, "the daemon was never started"
        return self._proc

    async def start(self) -> None:
        """Run the daemon and wait until it is healthy."""
        log = os.open(self.dir / f"daemon-{self.runs}.log", os.O_WRONLY | os.O_CREAT)
        self.runs += 1
        try:
            self._proc = await asyncio.create_subprocess_exec(
                AIBRIDGED, "serve", "--config", str(self.config), env=clean_env(), stderr=log
            )
        finally:
            os.close(log)
        await wait_healthy(self.port, self._proc)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed."""
        self.proc.kill()

    def terminate(self) -> None:
        """SIGTERM: the daemon drains what is in flight and shuts down."""
        self.proc.terminate()

    async def wait(self) -> int:
        """Wait for the current run to exit; its exit code."""
        return await self.proc.wait()

    async def close(self) -> None:
        """Kill the current run if it is still up, and reap it (for teardown)."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()
