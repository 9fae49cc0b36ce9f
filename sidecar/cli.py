"""The `sidecar` command: serve, check-config, routes, token, gen-key, gen-cert,
install-service."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from sidecar import __version__, config, install
from sidecar.observability import logging as slog
from sidecar.settings import AnyProvider, AuthSettings, LocalProviderSettings, Settings


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

    routes = commands.add_parser("routes", help="show or change live weights of a running "
                                 "sidecar")
    routes.add_argument("action", choices=["show", "set"])
    routes.add_argument("model", nargs="?", help="(set) the public model to change")
    routes.add_argument("weights", nargs="*", metavar="PROVIDER[/MODEL]=WEIGHT",
                        help="(set) new weights")
    routes.add_argument("--fallback-only", action="append", default=[], metavar="TARGET",
                        help="(set) make a target fallback-only")
    routes.add_argument("--in-rotation", action="append", default=[], metavar="TARGET",
                        help="(set) put a fallback-only target back in rotation")
    routes.add_argument("--url", help="the sidecar (default: from --config, else "
                        "http://127.0.0.1:8080)")
    routes.add_argument("--config", help="config file to take the address (and, with TLS, "
                        "the certificate to trust) from")
    routes.add_argument("--cacert", help="CA certificate (PEM) to trust for an https:// "
                        "sidecar (default: with --config, its server.tls_cert)")
    routes.add_argument("--token-env", default="SIDECAR_TOKEN",
                        help="environment variable holding an admin token (default: "
                        "SIDECAR_TOKEN)")

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

    install.add_arguments(commands.add_parser(
        "install-service", help="make a virtual environment in its final place, install the "
        "package into it, write the systemd unit and the config directory"))

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "install-service":
        return install.run(args)
    if args.command == "token":
        return _token(args)
    if args.command == "routes":
        return _routes(args)
    if args.command in ("gen-key", "gen-cert"):
        return _generate(args)
    return _check(args)


def _routes(args: argparse.Namespace) -> int:
    import json
    import os
    import urllib.error
    import urllib.request

    url = args.url
    cacert = args.cacert
    if args.config:
        settings = _load(args.config)
        if settings is None:
            return 2
        if not url:
            host, port = settings.server.host, settings.server.port
            scheme = "https" if settings.server.tls_cert else "http"
            url = f"{scheme}://{_url_host(host)}:{port}"
        cacert = cacert or settings.server.tls_cert or None
    url = url or "http://127.0.0.1:8080"
    headers = {"Content-Type": "application/json"}
    token = os.environ.get(args.token_env)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = None
    method = "GET"
    if args.action == "set":
        changes: dict[str, dict[str, object]] = {}
        try:
            for item in args.weights:
                name, _, value = item.partition("=")
                changes.setdefault(name, {})["weight"] = float(value)
        except ValueError:
            print("sidecar: weights are PROVIDER[/MODEL]=NUMBER", file=sys.stderr)
            return 2
        for name in args.fallback_only:
            changes.setdefault(name, {})["fallback_only"] = True
        for name in args.in_rotation:
            changes.setdefault(name, {})["fallback_only"] = False
        if not args.model or not changes:
            print("sidecar: routes set MODEL PROVIDER[/MODEL]=WEIGHT ...", file=sys.stderr)
            return 2
        targets = []
        for name, change in changes.items():
            provider, _, model = name.partition("/")
            targets.append({"provider": provider, **({"model": model} if model else {}),
                            **change})
        body = json.dumps({"model": args.model, "targets": targets}).encode()
        method = "PUT"
    if not url.startswith(("http://", "https://")):
        print("sidecar: --url must be http:// or https://", file=sys.stderr)
        return 2
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
        url.rstrip("/") + "/admin/api/routes", data=body, headers=headers, method=method)
    try:
        context = _trusting(cacert) if url.startswith("https://") else None
        with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        print(f"sidecar: {exc.code}: {detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        hint = "" if cacert or not url.startswith("https://") else \
            " (for a private CA, give --cacert or --config)"
        print(f"sidecar: cannot reach {url}: {exc}{hint}", file=sys.stderr)
        return 1
    _print_routes(answer)
    return 0


def _url_host(host: str) -> str:
    host = host or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # noqa: S104 (every address: this machine answers on loopback)
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    return f"[{host}]" if ":" in host else host


def _trusting(cacert: str | None) -> ssl.SSLContext:
    """Trust the system's CAs, or only `cacert`. A self-signed server certificate (or the
    server's own leaf, as server.tls_cert names it) is trusted as it is: partial chains count."""
    context = ssl.create_default_context(cafile=cacert)
    if cacert:
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _print_routes(answer: dict[str, Any]) -> None:
    """Each model, its targets with weight and health: resting (for how long, and why when
    the server says) or its provider down."""
    health = answer.get("health") or {}
    resting = health.get("resting_targets_s") or {}
    reasons = health.get("resting_reasons") or {}
    down = health.get("providers_down_s") or {}
    models = answer.get("models", {answer.get("model"): answer.get("targets", [])})
    for model, targets in models.items():
        print(model)
        for target in targets:
            label = f"{target['provider']}/{target['model']}"
            notes = ["fallback only"] if target["fallback_only"] else []
            if label in resting:
                why = reasons.get(label)
                notes.append(f"resting {resting[label]:.0f}s" + (f": {why}" if why else ""))
            if target["provider"] in down:
                notes.append(f"provider down {down[target['provider']]:.0f}s")
            state = "  (" + "; ".join(notes) + ")" if notes else ""
            print(f"  {label}  weight {target['weight']:g}{state}")


def _token(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    import jwt

    auth = AuthSettings()
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


def _load(path: str | None, host: str | None = None,
          port: int | None = None) -> Settings | None:
    try:
        return config.load(path or config.default_config_path(), host=host, port=port)
    except config.ConfigError as exc:
        print(f"sidecar: config error: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    # The flags go through the same checks as the file (no auth is refused off loopback).
    settings = _load(args.config, args.host, args.port)
    if settings is None:
        return 2
    writer = slog.configure(settings.logging.level)
    # The log is JSON lines: no library's progress bar (tqdm reads this when imported).
    os.environ.setdefault("TQDM_DISABLE", "1")
    from sidecar.engines.errors import EngineUnusable
    from sidecar.server import run

    path = args.config or config.default_config_path()
    try:
        # SIGHUP reads the file again with the same command-line overrides.
        run(settings, writer, functools.partial(config.load, path, host=args.host,
                                                port=args.port))
    except EngineUnusable as exc:
        writer.close()
        print(f"sidecar: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        writer.close()
        print(f"sidecar: cannot listen on {settings.server.host}:{settings.server.port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 1
    writer.close()
    return 0


def _where(provider: AnyProvider) -> str:
    if isinstance(provider, LocalProviderSettings):
        return f"in process ({provider.engine}: {provider.model})"
    return provider.base_url


def _check(args: argparse.Namespace) -> int:
    settings = _load(args.path)
    if settings is None:
        return 2
    rows = config.describe_routes(settings)
    header = ("model", "provider", "upstream model", "weight", "upstream")
    table = [header] + [
        (model, provider, upstream, f"{weight:g}", _where(settings.providers[provider]))
        for model, provider, upstream, weight in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    # Engines are judged first, so the verdict line is never "ok" for a config that fails.
    engines, problems = _check_engines(settings)
    counts = f"{len(settings.models)} models, {len(settings.providers)} providers"
    if problems:
        print(f"{settings.source}: not servable here, {counts}")
    else:
        print(f"{settings.source}: ok, {counts}")
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    for line in engines:
        print(line)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def _check_engines(settings: Settings) -> tuple[list[str], list[str]]:
    """Whether each local provider's engine can run on this machine, as `serve` would find:
    the lines that say it can, and those that say it cannot."""
    local = {name: p for name, p in settings.providers.items()
             if isinstance(p, LocalProviderSettings)}
    if not local:
        return [], []
    from sidecar.engines.errors import EngineUnusable
    from sidecar.engines.factory import make_engine

    fine: list[str] = []
    problems: list[str] = []
    for name, provider in local.items():
        key = f"providers.{config.table_key(name)}"
        try:
            engine = make_engine(provider)
        except EngineUnusable as exc:
            problems.append(f"{key}: cannot run here: {exc}")
            continue
        fine.append(f"{key}: engine {engine.kind} can run here")
    return fine, problems
