"""``aibridged`` command line: ``aibridged serve [--config FILE] [--<setting> VALUE ...]``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config import ConfigError, Settings, describe_invalid, load_settings
from gateway.logs import setup_logging

# Settings that are lists of objects come from the YAML file or JSON env vars, not flags.
_STRUCTURED = {"providers", "api_keys", "mcp_servers"}


def build_parser() -> argparse.ArgumentParser:
    """One flag per scalar setting, named after it (``spool_path`` -> ``--spool-path``)."""
    parser = argparse.ArgumentParser(prog="aibridged", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway in the foreground")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    for name, field in Settings.model_fields.items():
        if name in _STRUCTURED:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            serve.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction)
        else:
            serve.add_argument(flag, dest=name, metavar="VALUE", help=f"default: {field.default}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aibridged`` script.

    Exit status 2 with one line on stderr naming the setting when the daemon cannot start
    (invalid configuration, a port in use, an unreadable file); 0 after a graceful shutdown.
    """
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None
    }
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        return _cannot_start(str(exc))
    except ValidationError as exc:
        return _cannot_start(describe_invalid(exc))
    setup_logging(settings.log_level)
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
