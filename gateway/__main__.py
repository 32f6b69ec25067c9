"""``aibridged`` command line: ``aibridged serve [--config FILE] [--<setting> VALUE ...]``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config import ConfigError, Settings, load_settings
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
    """Entry point of the ``aibridged`` script."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None
    }
    try:
        settings = load_settings(args.config, **overrides)
    except (ConfigError, ValidationError) as exc:
        print(f"aibridged: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from gateway.daemon import serve

    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve(settings))
    else:
        asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
