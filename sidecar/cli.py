"""The `sidecar` command: serve, check-config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar import __version__, config
from sidecar.observability import logging as slog


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sidecar", description="An OpenAI-compatible sidecar for local and upstream models."
    )
    parser.add_argument("--version", action="version", version=f"llm-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="config file (default: $SIDECAR_CONFIG or "
                       f"{config.DEFAULT_CONFIG})")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")

    check = commands.add_parser("check-config", help="validate a config and print its routes")
    check.add_argument("path", nargs="?", help="config file (default: as for serve)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _check(args)


def _load(path: str | None) -> config.Settings | None:
    try:
        return config.load(path or config.default_config_path())
    except config.ConfigError as exc:
        print(f"sidecar: config error: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 2
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    writer = slog.configure(settings.logging.level)
    from sidecar.server import run

    try:
        run(settings, writer)
    except OSError as exc:
        writer.close()
        print(f"sidecar: cannot listen on {settings.server.host}:{settings.server.port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 1
    writer.close()
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = _load(args.path)
    if settings is None:
        return 2
    rows = config.describe_routes(settings)
    header = ("model", "provider", "upstream model", "weight", "upstream")
    table = [header] + [
        (model, provider, upstream, f"{weight:g}", settings.providers[provider].base_url)
        for model, provider, upstream, weight in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"{settings.source}: ok, {len(settings.models)} models, "
          f"{len(settings.providers)} providers")
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0
