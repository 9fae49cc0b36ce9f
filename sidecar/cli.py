"""The `sidecar` command: serve, check-config, token, gen-key, gen-cert."""

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

    token = commands.add_parser("token", help="mint a token for development from a local key")
    token.add_argument("--config", help="take issuer, audience, algorithm and claim names "
                       "from this config's [auth]")
    token.add_argument("--key", help="private key PEM (RS*/ES*/PS*/EdDSA)")
    token.add_argument("--secret-env", help="environment variable holding an HS* secret")
    token.add_argument("--sub", required=True, help="the tenant")
    token.add_argument("--scope", default="sidecar:chat", help="space-separated scopes")
    token.add_argument("--models", help="comma-separated public model names this token may use")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--issuer")
    token.add_argument("--audience")
    token.add_argument("--algorithm")
    token.add_argument("--kid")

    gen_key = commands.add_parser("gen-key", help="write a token-signing key pair and a JWKS")
    gen_key.add_argument("--out", required=True)
    gen_key.add_argument("--kid", default="dev-1")

    gen_cert = commands.add_parser("gen-cert", help="write a development CA, server and "
                                   "client certificates")
    gen_cert.add_argument("--out", required=True)
    gen_cert.add_argument("--hosts", default="localhost,127.0.0.1",
                          help="comma-separated names and addresses of the server")
    gen_cert.add_argument("--days", type=int, default=365)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    if args.command in ("gen-key", "gen-cert"):
        return _generate(args)
    return _check(args)


def _token(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    import jwt

    auth = config.AuthSettings()
    if args.config:
        settings = _load(args.config)
        if settings is None:
            return 2
        auth = settings.auth
    issuer = args.issuer or auth.issuer
    audience = args.audience or auth.audience
    if not issuer or not audience:
        print("sidecar: token needs --issuer and --audience (or --config with [auth])",
              file=sys.stderr)
        return 2
    if args.secret_env:
        key: object = os.environ.get(args.secret_env, "")
        algorithm = args.algorithm or "HS256"
        if not key:
            print(f"sidecar: the environment variable {args.secret_env} is not set",
                  file=sys.stderr)
            return 2
    elif args.key:
        key = Path(args.key).read_bytes()
        algorithm = args.algorithm or auth.algorithms[0]
    else:
        print("sidecar: token needs --key PATH or --secret-env NAME", file=sys.stderr)
        return 2
    now = int(time.time())
    claims: dict[str, object] = {"iss": issuer, "aud": audience, "sub": args.sub, "iat": now,
                                 "exp": now + args.ttl, auth.scope_claim: args.scope}
    if args.models:
        claims[auth.models_claim or "models"] = [m for m in args.models.split(",") if m]
    headers = {"kid": args.kid} if args.kid else None
    print(jwt.encode(claims, key, algorithm=algorithm, headers=headers))  # type: ignore[arg-type]
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidecar.security import certs

    out = Path(args.out)
    if args.command == "gen-key":
        paths = certs.generate_issuer(out, args.kid)
    else:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        paths = certs.generate_tls(out, hosts, args.days)
    for path in paths:
        print(path)
    return 0


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
