"""aibridged: a gateway daemon for AI traffic.

aibridged serve [--config FILE] [--<setting> VALUE ...]         run the gateway
aibridged check-config [--config FILE] [--<setting> VALUE ...]  validate the settings, exit
aibridged --version
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from gateway import __version__
from gateway.config import ConfigError, Settings, describe_invalid, load_settings
from gateway.logs import setup_logging

# Settings that are lists of objects come from the YAML file or JSON env vars, not flags.
_STRUCTURED = {"providers", "api_keys", "mcp_servers"}

_SOURCES = """\
Each setting comes from, in increasing priority: its default, the YAML file (--config), the
environment variable AIBRIDGED_<NAME>, the flag.
"""


def build_parser() -> argparse.ArgumentParser:
    """``serve`` and ``check-config`` take one flag per scalar setting (``--spool-path``)."""
    parser = argparse.ArgumentParser(
        prog="aibridged", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"aibridged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary in (
        ("serve", "run the gateway in the foreground"),
        ("check-config", "validate the settings as start-up would; exit 0 (summary) or 2"),
    ):
        command = sub.add_parser(
            name,
            help=summary,
            description=f"{summary}.\n\n{_SOURCES}",
            epilog=_structured_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_setting_flags(command)
    return parser


def _add_setting_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    for name, field in Settings.model_fields.items():
        if name in _STRUCTURED:
            continue
        flag = "--" + name.replace("_", "-")
        # argparse %-formats help strings.
        text = _setting_help(name, field).replace("%", "%%")
        if field.annotation is bool:
            command.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            literal = typing.get_origin(field.annotation) is typing.Literal
            metavar = "|".join(typing.get_args(field.annotation)) if literal else "VALUE"
            command.add_argument(flag, dest=name, metavar=metavar, help=text)


def _setting_help(name: str, field: FieldInfo) -> str:
    return f"{field.description} [env AIBRIDGED_{name.upper()}; default: {_default(field)}]"


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _structured_help() -> str:
    lines = ["lists of objects, from the YAML file or as JSON in the variable:"]
    for name in sorted(_STRUCTURED):
        field = Settings.model_fields[name]
        lines.append(f"  {name}: {field.description} [env AIBRIDGED_{name.upper()}]")
    lines += [
        "",
        "traces (OpenTelemetry, the standard variables): on when OTEL_EXPORTER_OTLP_ENDPOINT or",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; OTEL_EXPORTER_OTLP_PROTOCOL grpc or",
        "http/protobuf (default); OTEL_SERVICE_NAME (default aibridged), OTEL_TRACES_SAMPLER,",
        "OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_*; OTEL_SDK_DISABLED=true turns them off.",
    ]
    return "\n".join(lines)


def check_config(settings: Settings) -> str:
    """Check what start-up checks before it listens; a one-line summary of the result.

    The state (providers, keys, MCP servers) by the rules pushes follow, the control token file
    and the TLS files. Nothing is opened or bound: the daemon may be running. Failures are a
    :class:`ConfigError` naming the setting.
    """
    from control.server import load_tls
    from gateway.state import Snapshot, unset_key_envs
    from gateway.trace_settings import TraceSettingsError, trace_export

    snap = Snapshot.from_settings(settings)
    try:
        export = trace_export(os.environ)
    except TraceSettingsError as exc:
        raise ConfigError(str(exc)) from None
    control = "off"
    if settings.control_bearer() is not None:
        tls = load_tls(
            settings.control_tls_cert_file,
            settings.control_tls_key_file,
            settings.control_tls_client_ca_file,
        )
        control = settings.control_listen + (" (TLS)" if tls else "")
    if snap.managed:
        mode = "managed by a host (require_control)"
    elif snap.personal_mode:
        mode = "personal mode (no gateway keys)"
    else:
        mode = f"gateway keys {len(snap.keys)}"
    parts = [
        f"listen {settings.listen}",
        f"providers {','.join(snap.providers) or 'none'}",
        mode,
        f"MCP servers {len(snap.mcp_servers)}",
        f"control {control}",
        f"metrics {settings.metrics_listen if settings.metrics_enabled else 'off'}",
        f"spool {settings.spool_path}",
        f"tracing {export.describe() if export else 'off'}",
    ]
    missing = {} if snap.managed else unset_key_envs(settings)
    if missing:
        parts.append(
            "no central key for " + ",".join(f"{p} ({v} unset)" for p, v in missing.items())
        )
    return "configuration OK: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aibridged`` script.

    Exit status 2 with one line on stderr naming the setting when the daemon cannot start
    (invalid configuration, a port in use, an unreadable file); 0 after a graceful shutdown.
    ``check-config`` exits 0 with a one-line summary on stdout, or 2 the same way.
    """
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None
    }
    try:
        settings = load_settings(args.config, **overrides)
        if args.command == "check-config":
            print(f"aibridged: {check_config(settings)}")
            return 0
    except ConfigError as exc:
        return _cannot_start(str(exc))
    except ValidationError as exc:
        return _cannot_start(describe_invalid(exc))
    setup_logging(settings.log_level, settings.log_format)
    from gateway.daemon import serve

    try:
        if settings.event_loop == "uvloop":
            import uvloop

            uvloop.run(serve(settings))
        else:
            asyncio.run(serve(settings))
    except ConfigError as exc:  # start-up failed; Daemon.start stopped what it had started
        return _cannot_start(str(exc))
    return 0


def _cannot_start(message: str) -> int:
    print(f"aibridged: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
