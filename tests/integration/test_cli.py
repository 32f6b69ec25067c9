"""The command line an operator meets: ``--version``, ``serve --help``, ``check-config``, and the
startup line naming the base URL clients use. Each runs the installed ``aibridged`` script."""

from __future__ import annotations

import asyncio
import importlib.metadata
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import __version__
from gateway.config import Settings
from tests.conftest import GATEWAY_KEY, anthropic_provider
from tests.processes import AIBRIDGED, DaemonProcess, clean_env, free_port

UPSTREAM = "http://127.0.0.1:9"  # never called: none of these daemons serves a request


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``aibridged ARGS`` in ``tmp_path`` with a clean environment; wide help lines."""
    return subprocess.run(
        [AIBRIDGED, *args],
        cwd=tmp_path,
        env={**clean_env(), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    """A valid configuration (central key, one gateway key) with ``overrides``."""
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": "127.0.0.1:0",
        "control_listen": f"127.0.0.1:{free_port()}",
        "spool_path": str(tmp_path / "spool.db"),
        "providers": [anthropic_provider(UPSTREAM)],
        "api_keys": [{"key": GATEWAY_KEY, "actor_id": "u-1"}],
    }
    settings.update(overrides)
    path = tmp_path / "aibridged.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_version_is_the_installed_package_version(tmp_path: Path) -> None:
    result = run(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"aibridged {importlib.metadata.version('aibridged')}\n"
    assert __version__ == importlib.metadata.version("aibridged")


def test_serve_help_gives_each_settings_meaning_variable_and_default(tmp_path: Path) -> None:
    result = run(tmp_path, "serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        meaning = " ".join(field.description.split())
        assert f"{meaning} [env AIBRIDGED_{name.upper()}" in text, name
        if field.default_factory is None:
            assert "--" + name.replace("_", "-") in text, name
    # Defaults as an operator reads them.
    for shown in (
        "[env AIBRIDGED_LISTEN; default: 127.0.0.1:8080]",
        "[env AIBRIDGED_METRICS_LISTEN; default: 127.0.0.1:2112]",
        "[env AIBRIDGED_SPOOL_PATH; default: aibridged.db]",
        "[env AIBRIDGED_SHUTDOWN_GRACE; default: 30.0]",
        "[env AIBRIDGED_ALLOW_BYOK; default: true]",
        "[env AIBRIDGED_CONTROL_TOKEN_FILE; default: unset]",
        "--on-client-disconnect drain|cancel",
    ):
        assert shown in text


def test_check_config_summarises_a_valid_configuration(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("control-token-0123456789\n")
    claude = anthropic_provider(UPSTREAM, name="claude")
    path = write_config(
        tmp_path,
        listen="0.0.0.0:8080",  # taken or not: nothing is bound
        control_token_file=str(token),
        providers=[anthropic_provider(UPSTREAM), claude],
    )
    result = run(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1
    line = result.stdout.strip()
    assert line.startswith("aibridged: configuration OK: listen 0.0.0.0:8080;")
    assert "providers anthropic,claude;" in line
    assert "gateway keys 1;" in line
    assert "control 127.0.0.1:" in line
    # Nothing was started: no spool file was created.
    assert not (tmp_path / "spool.db").exists()


def test_check_config_does_not_bind_the_ports_a_running_daemon_holds(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        path = write_config(
            tmp_path, listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{port}"
        )
        result = run(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr


def test_check_config_names_providers_without_a_central_key(tmp_path: Path) -> None:
    keyless = {"name": "anthropic", "type": "anthropic", "api_key_env": "NO_SUCH_KEY_VARIABLE"}
    path = write_config(tmp_path, providers=[keyless])
    result = run(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "no central key for anthropic (NO_SUCH_KEY_VARIABLE unset)" in result.stdout


BAD_CONFIGS: dict[str, tuple[dict[str, Any], list[str], str]] = {
    # Only the state's rules (those of the host's pushes) refuse this one.
    "mcp regex": (
        {"mcp_servers": [{"id": "docs", "url": "http://127.0.0.1:9/mcp", "tool_deny_regex": "("}]},
        [],
        "aibridged: invalid configuration: mcp_servers[0].tool_deny_regex: invalid regex",
    ),
    "token file": (
        {"control_token_file": "/nonexistent/token"},
        [],
        "aibridged: control_token_file: cannot read /nonexistent/token",
    ),
    "tls file": (
        {"control_token": "control-token-0123456789", "control_tls_cert_file": "CERT"},
        [],
        "aibridged: control_tls_cert_file",
    ),
    "flag value": (
        {},
        ["--shutdown-grace", "-1"],
        "aibridged: invalid configuration: shutdown_grace",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
async def test_check_config_refuses_what_start_up_refuses_with_the_same_line(
    tmp_path: Path, case: str
) -> None:
    overrides, flags, expected = BAD_CONFIGS[case]
    if overrides.get("control_tls_cert_file") == "CERT":
        for name in ("cert.pem", "key.pem"):
            (tmp_path / name).write_text("not PEM\n")
        overrides = {
            **overrides,
            "control_tls_cert_file": str(tmp_path / "cert.pem"),
            "control_tls_key_file": str(tmp_path / "key.pem"),
        }
    path = write_config(tmp_path, **overrides)
    checked = run(tmp_path, "check-config", "--config", str(path), *flags)
    assert checked.returncode == 2
    assert checked.stdout == ""
    assert checked.stderr.startswith(expected), checked.stderr
    assert checked.stderr.count("\n") == 1
    # `serve` on the same configuration stops with the very same line.
    served = await asyncio.wait_for(
        asyncio.to_thread(run, tmp_path, "serve", "--config", str(path), *flags), 90
    )
    assert served.returncode == 2
    assert served.stderr == checked.stderr


def test_check_config_names_a_missing_file(tmp_path: Path) -> None:
    result = run(tmp_path, "check-config", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert result.stderr == (
        f"aibridged: invalid configuration: config file not found: {tmp_path / 'absent.yaml'}\n"
    )


async def test_startup_line_gives_each_providers_base_url(tmp_path: Path) -> None:
    daemon = DaemonProcess(
        tmp_path,
        UPSTREAM,
        providers=[anthropic_provider(UPSTREAM), anthropic_provider(UPSTREAM, name="claude")],
    )
    # A wildcard address: clients on this machine reach it over loopback.
    daemon.config.write_text(
        daemon.config.read_text().replace(f"127.0.0.1:{daemon.port}", f"0.0.0.0:{daemon.port}")
    )
    try:
        await daemon.start()
        daemon.terminate()
        assert await asyncio.wait_for(daemon.wait(), 60) == 0
    finally:
        await daemon.close()
    log = (tmp_path / "daemon-0.log").read_text()
    [line] = [line for line in log.splitlines() if "aibridged serving" in line]
    assert (
        f"clients use http://127.0.0.1:{daemon.port}/anthropic "
        f"http://127.0.0.1:{daemon.port}/claude"
    ) in line
