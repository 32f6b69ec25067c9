"""Start-up failures: one line on stderr naming the setting, exit status 2, nothing left running.

``aibridged serve`` runs as a real process for each mistake an operator makes (a port in use, a
YAML typo, bad JSON in a variable, a missing token or TLS file, state a push would be refused
for). Before, most of them ended in a traceback with status 1, some with "Unclosed client
session" after it, and a YAML file could hold an MCP regex that made every request a 500.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.server import ControlServer
from gateway.config import ConfigError, load_settings
from gateway.daemon import Daemon
from tests.conftest import CONTROL_TOKEN, GatewayFactory, anthropic_provider
from tests.processes import AIBRIDGED, clean_env, free_port

UPSTREAM = "http://127.0.0.1:9"  # never called: none of these daemons serves a request


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port another process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": "127.0.0.1:0",
        "control_listen": f"127.0.0.1:{free_port()}",
        "spool_path": str(tmp_path / "spool.db"),
        "providers": [anthropic_provider(UPSTREAM)],
    }
    settings.update(overrides)
    return settings


async def fail_to_start(
    tmp_path: Path, settings: dict[str, Any] | str | bytes, env: dict[str, str] | None = None
) -> str:
    """Run ``aibridged serve`` on this config; assert status 2 in time; its stderr."""
    path = tmp_path / "aibridged.yaml"
    if isinstance(settings, bytes):
        path.write_bytes(settings)
    else:
        path.write_text(settings if isinstance(settings, str) else yaml.safe_dump(settings))
    proc = await asyncio.create_subprocess_exec(
        AIBRIDGED,
        "serve",
        "--config",
        str(path),
        env={**clean_env(), **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # Generous for a loaded machine; a daemon left half-started would hang here instead.
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    assert "Unclosed" not in text
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert text.startswith("aibridged: ")
    return text


async def test_listen_port_in_use(tmp_path: Path, taken: int) -> None:
    # The control plane and metrics had started by then: they are stopped before the exit.
    settings = config(tmp_path, listen=f"127.0.0.1:{taken}", control_token=CONTROL_TOKEN)
    err = await fail_to_start(tmp_path, settings)
    assert err == f"aibridged: listen: cannot listen on 127.0.0.1:{taken}: address already in use\n"


async def test_control_listen_port_in_use(tmp_path: Path, taken: int) -> None:
    settings = config(tmp_path, control_listen=f"127.0.0.1:{taken}", control_token=CONTROL_TOKEN)
    err = await fail_to_start(tmp_path, settings)
    assert err.startswith(f"aibridged: control_listen: cannot listen on 127.0.0.1:{taken}: ")
    assert "in use" in err


@pytest.mark.parametrize("what", ["directory", "file"])
async def test_control_listen_path_that_is_not_a_socket(tmp_path: Path, what: str) -> None:
    """gRPC would add a line of its own on stderr; the file is never removed for a socket."""
    path = tmp_path / "control.sock"
    if what == "directory":
        path.mkdir()
    else:
        path.write_text("keep me\n")
    settings = config(tmp_path, control_listen=f"unix:{path}", control_token=CONTROL_TOKEN)
    err = await fail_to_start(tmp_path, settings)
    assert err == (
        f"aibridged: control_listen: cannot listen on unix:{path}: {path} exists and is not a"
        " socket\n"
    )
    assert path.is_dir() if what == "directory" else path.read_text() == "keep me\n"


async def test_metrics_listen_port_in_use(tmp_path: Path, taken: int) -> None:
    settings = config(tmp_path, metrics_listen=f"127.0.0.1:{taken}", control_token=CONTROL_TOKEN)
    err = await fail_to_start(tmp_path, settings)
    assert err.startswith(f"aibridged: metrics_listen: cannot listen on 127.0.0.1:{taken}: ")


async def test_yaml_syntax_error(tmp_path: Path) -> None:
    err = await fail_to_start(tmp_path, "listen: [\nproviders: {\n")
    assert err.startswith("aibridged: invalid configuration: ")
    assert "aibridged.yaml: not valid YAML at line " in err


@pytest.mark.parametrize(
    ("text", "shape"), [("- listen\n- spool_path\n", "list"), ("just words\n", "str")]
)
async def test_yaml_whose_top_level_is_not_a_mapping(tmp_path: Path, text: str, shape: str) -> None:
    err = await fail_to_start(tmp_path, text)
    assert err == (
        f"aibridged: invalid configuration: {tmp_path / 'aibridged.yaml'}: the top level must be"
        f" a mapping of settings, not a {shape}\n"
    )


async def test_yaml_file_that_is_not_utf8(tmp_path: Path) -> None:
    err = await fail_to_start(tmp_path, b"listen: \xff\xfe\n")
    assert err.endswith("aibridged.yaml: not UTF-8 text\n")


async def test_bad_json_in_an_environment_variable(tmp_path: Path) -> None:
    err = await fail_to_start(tmp_path, config(tmp_path), env={"AIBRIDGED_PROVIDERS": "[{"})
    assert err.startswith("aibridged: invalid configuration: AIBRIDGED_PROVIDERS: not valid JSON")


async def test_invalid_value_is_one_line(tmp_path: Path) -> None:
    settings = config(tmp_path, ping_interval=0, providers=[{"name": "x", "type": "gemini"}])
    err = await fail_to_start(tmp_path, settings)
    assert "ping_interval: " in err and "providers[0].type: " in err


async def test_missing_control_token_file(tmp_path: Path) -> None:
    absent = tmp_path / "absent-token"
    err = await fail_to_start(tmp_path, config(tmp_path, control_token_file=str(absent)))
    reason = "No such file or directory"
    assert err == f"aibridged: control_token_file: cannot read {absent}: {reason}\n"


async def test_empty_control_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    err = await fail_to_start(tmp_path, config(tmp_path, control_token_file=str(empty)))
    assert err == f"aibridged: control_token_file: {empty} is empty\n"


@pytest.mark.parametrize(
    "setting",
    ["control_tls_cert_file", "control_tls_key_file", "control_tls_client_ca_file"],
)
async def test_unreadable_tls_file(tmp_path: Path, setting: str) -> None:
    files = {
        "control_tls_cert_file": tmp_path / "cert.pem",
        "control_tls_key_file": tmp_path / "key.pem",
        "control_tls_client_ca_file": tmp_path / "ca.pem",
    }
    for name, path in files.items():
        if name != setting:
            path.write_text("-----BEGIN CERTIFICATE-----\n")
    # A directory where the file should be: unreadable even to root.
    files[setting].mkdir()
    settings = config(
        tmp_path, control_token=CONTROL_TOKEN, **{k: str(v) for k, v in files.items()}
    )
    err = await fail_to_start(tmp_path, settings)
    assert err.startswith(f"aibridged: {setting}: cannot read {files[setting]}: ")


async def test_tls_files_that_are_not_pem(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    settings = config(
        tmp_path,
        control_token=CONTROL_TOKEN,
        control_tls_cert_file=str(cert),
        control_tls_key_file=str(key),
    )
    err = await fail_to_start(tmp_path, settings)
    assert err.startswith("aibridged: control_tls_cert_file: not a usable PEM certificate")


async def test_spool_path_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings = config(tmp_path, spool_path=str(tmp_path / "a-file" / "spool.db"))
    err = await fail_to_start(tmp_path, settings)
    assert err.startswith(f"aibridged: spool_path: cannot open {tmp_path / 'a-file' / 'spool.db'}")


async def test_spool_path_that_is_not_a_database(tmp_path: Path) -> None:
    """Not ours: it is neither tightened (with a warning line before the error) nor changed."""
    spool = tmp_path / "notes.txt"
    spool.write_text("not a database, but readable by all\n")
    spool.chmod(0o644)
    err = await fail_to_start(tmp_path, config(tmp_path, spool_path=str(spool)))
    assert err == f"aibridged: spool_path: cannot open {spool}: file is not a database\n"
    assert spool.read_text() == "not a database, but readable by all\n"
    assert spool.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("field", ["tool_allow_regex", "tool_deny_regex"])
async def test_invalid_mcp_regex_in_yaml(tmp_path: Path, field: str) -> None:
    server = {"id": "tools", "url": "http://127.0.0.1:9/mcp", field: "[a-"}
    err = await fail_to_start(tmp_path, config(tmp_path, mcp_servers=[server]))
    assert err.startswith(
        f"aibridged: invalid configuration: mcp_servers[0].{field}: invalid regex: "
    )


# -- in process: what a failed start leaves behind ---------------------------------------------


async def test_failed_start_stops_what_it_started(
    tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AIBRIDGED_PROVIDERS", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    control_port = free_port()
    settings = config(
        tmp_path,
        listen=f"127.0.0.1:{taken}",
        control_listen=f"127.0.0.1:{control_port}",
        control_token=CONTROL_TOKEN,
    )
    writers_before = {t for t in threading.enumerate() if t.name == "spool-writer"}
    with pytest.raises(ConfigError, match=r"^listen: cannot listen on "):
        await Daemon.start(load_settings(None, **settings))
    # The spool's writer thread is gone and the control port is free again.
    assert {t for t in threading.enumerate() if t.name == "spool-writer"} <= writers_before
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", control_port))
    # The same spool opens again at once (it was closed, not left to a finaliser).
    daemon = await Daemon.start(load_settings(None, **{**settings, "listen": "127.0.0.1:0"}))
    await daemon.stop()


async def test_control_plane_failing_after_its_server_started_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AIBRIDGED_PROVIDERS", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    control_port = free_port()
    settings = config(
        tmp_path, control_listen=f"127.0.0.1:{control_port}", control_token=CONTROL_TOKEN
    )

    async def broken(self: ControlServer, ready: bool) -> None:
        raise RuntimeError("health service failed")  # once the gRPC server is serving

    monkeypatch.setattr(ControlServer, "set_ready", broken)
    writers_before = {t for t in threading.enumerate() if t.name == "spool-writer"}
    with pytest.raises(RuntimeError, match="health service failed"):
        await Daemon.start(load_settings(None, **settings))
    assert {t for t in threading.enumerate() if t.name == "spool-writer"} <= writers_before
    with socket.socket() as probe:  # the gRPC server let go of its port
        probe.bind(("127.0.0.1", control_port))


# -- a provider without its central key ---------------------------------------------------------


def _keyless_provider(url: str) -> dict[str, Any]:
    provider = anthropic_provider(url, api_key_env="H5_SURELY_UNSET_PROVIDER_KEY")
    del provider["api_key"]
    return provider


async def test_missing_central_key_is_a_startup_warning_with_gateway_keys(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="aibridged"):
        gw = await make_gateway(providers=[_keyless_provider("http://127.0.0.1:9")])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "provider has no central key: requests get 401 unless the client sends its own "
        "provider key in x-aibridged-provider-key"
    ]
    assert getattr(warnings[0], "unset", None) == "H5_SURELY_UNSET_PROVIDER_KEY"
    assert gw.daemon.state.current.providers["anthropic"].api_key == ""


async def test_missing_central_key_is_expected_in_personal_mode(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="aibridged"):
        await make_gateway(providers=[_keyless_provider("http://127.0.0.1:9")], api_keys=[])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    infos = [r for r in caplog.records if "no central key" in r.getMessage()]
    assert [r.levelno for r in infos] == [logging.INFO]
