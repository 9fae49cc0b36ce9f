"""Typed settings from a TOML file and the environment, validated once, with errors that name
the file, the key and what is wrong."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect

from sidecar.settings import (
    AnyProvider,
    ModelSettings,
    Secret,
    Settings,
    UpstreamSettings,
)
from sidecar.transport.checks import upstream_problem

DEFAULT_CONFIG = "config/sidecar.toml"

_RESERVED = ("source", "api_keys", "jwt_secret", "cache_secret", "listen_addresses")


class ConfigError(Exception):
    """A configuration problem, phrased for the operator who has to fix it."""


def default_config_path() -> str:
    return os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG


def load(path: str | os.PathLike[str], *, host: str | None = None,
         port: int | None = None) -> Settings:
    """Read, validate and resolve a config file. Raises ConfigError with a readable message.

    `host` and `port` (the command line's) replace server.host and server.port before any
    check, so every way of choosing the address meets the same checks."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    if host is not None or port is not None:
        server = data.setdefault("server", {})
        if not isinstance(server, dict):
            raise ConfigError(f"{source}: `server`: expected a table")
        server.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    return from_mapping(data, source=source)


def from_mapping(data: dict[str, object], *, source: str = "<memory>") -> Settings:
    for reserved in _RESERVED:
        if reserved in data:
            raise ConfigError(f"{source}: unknown key `{reserved}`")
    # Tables keyed by name are converted one entry at a time, so an error can say which entry.
    rest = dict(data)
    tables: dict[str, dict[str, Any]] = {}
    sections: tuple[tuple[str, Any], ...] = (("providers", AnyProvider), ("models", ModelSettings))
    for section, kind in sections:
        entries = rest.pop(section, {})
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: `{section}`: expected a table")
        tables[section] = {
            name: _convert(value, kind, source, f"{section}.{table_key(name)}")
            for name, value in entries.items()
        }
    settings: Settings = _convert(rest, Settings, source, "")
    settings.providers = tables["providers"]
    settings.models = tables["models"]
    settings.source = source
    _check(settings)
    _check_server(settings)
    _check_auth(settings)
    settings.api_keys = _resolve_keys(settings)
    if settings.auth.mode == "jwt" and settings.auth.secret_env:
        value = os.environ.get(settings.auth.secret_env, "")
        if len(value) < 32:
            raise ConfigError(
                f"{source}: `auth.secret_env`: the environment variable {settings.auth.secret_env} "
                "must hold a secret of at least 32 characters"
            )
        settings.jwt_secret = Secret(value)
    _check_cache(settings)
    _check_metrics(settings)
    return settings


def _check_metrics(settings: Settings) -> None:
    metrics, src = settings.metrics, settings.source
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", metrics.path) or metrics.path.startswith(
            ("/v1/", "/admin")) or metrics.path in ("/healthz", "/readyz"):
        raise ConfigError(f"{src}: `metrics.path`: expected a path of its own such as "
                          f"\"/metrics\", got {metrics.path!r}")
    if metrics.listen:
        metrics_listener(metrics.listen, src)


def metrics_listener(listen: str, source: str = "<memory>") -> tuple[str, int]:
    """The host and port of `metrics.listen`: a loopback address, since the listener asks
    for no token and only this machine may reach it."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or int(port) > 65535 or not is_loopback([host] if host
                                                                               else []):
        raise ConfigError(f"{source}: `metrics.listen`: expected a loopback address and port "
                          f"such as \"127.0.0.1:9464\", got {listen!r}")
    return host, int(port)


def _check_cache(settings: Settings) -> None:
    cache, src = settings.cache, settings.source
    if cache.redis_url and urlsplit(cache.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{src}: `cache.redis_url`: expected redis://, rediss:// or unix://")
    if cache.redis_url and not cache.secret_env:
        raise ConfigError(
            f"{src}: `cache.secret_env`: required with cache.redis_url, so that every sidecar "
            "sharing the Redis hashes keys with the same secret"
        )
    if cache.secret_env:
        value = os.environ.get(cache.secret_env, "")
        if len(value) < 32:
            raise ConfigError(
                f"{src}: `cache.secret_env`: the environment variable {cache.secret_env} must "
                "hold a secret of at least 32 characters"
            )
        settings.cache_secret = Secret(value)


def resolve_host(host: str) -> list[str]:
    """The addresses `host` stands for, resolved once (blocking: call before the loop runs)."""
    infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_loopback(addresses: list[str]) -> bool:
    """Every address is a loopback one. Names are not judged: `127.example.internal` can
    resolve anywhere, so only what a name resolved to counts."""
    try:
        return bool(addresses) and all(
            ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses)
    except ValueError:
        return False


def _check_server(settings: Settings) -> None:
    server, src = settings.server, settings.source
    try:
        settings.listen_addresses = resolve_host(server.host)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"{src}: `server.host`: cannot resolve {server.host!r}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError(f"{src}: `server.tls_cert` and `server.tls_key` must be set together")
    if server.tls_client_ca and not server.tls_cert:
        raise ConfigError(f"{src}: `server.tls_client_ca` needs `server.tls_cert` and `tls_key`")


def _check_auth(settings: Settings) -> None:
    auth, src = settings.auth, settings.source
    if auth.mode == "none":
        if not is_loopback(settings.listen_addresses) and not auth.allow_unauthenticated:
            where = settings.server.host or "every address"
            resolved = ", ".join(settings.listen_addresses)
            if resolved and resolved != where:
                where = f"{where} ({resolved})"
            raise ConfigError(
                f"{src}: `auth.mode`: \"none\" would let anyone who reaches "
                f"{where} use the configured keys; set auth.mode = \"jwt\", listen "
                "on 127.0.0.1, or set auth.allow_unauthenticated = true to accept that"
            )
        return
    sources = [name for name in ("public_key_file", "jwks_file", "jwks_url", "secret_env")
               if getattr(auth, name)]
    if len(sources) != 1:
        raise ConfigError(
            f"{src}: `auth`: set exactly one of public_key_file, jwks_file, jwks_url, secret_env "
            f"(found {', '.join(sources) or 'none'})"
        )
    symmetric = {a for a in auth.algorithms if a.startswith("HS")}
    if symmetric and len(symmetric) != len(auth.algorithms):
        # Mixing both kinds is how a public key ends up verifying an HMAC.
        raise ConfigError(f"{src}: `auth.algorithms`: do not mix HS* with public-key algorithms")
    if bool(symmetric) != bool(auth.secret_env):
        raise ConfigError(
            f"{src}: `auth.algorithms`: HS* algorithms go with secret_env, and only with it"
        )
    if auth.jwks_url and urlsplit(auth.jwks_url).scheme not in ("http", "https"):
        raise ConfigError(f"{src}: `auth.jwks_url`: expected an http:// or https:// URL")
    for name in ("issuer", "audience"):
        if not getattr(auth, name):
            raise ConfigError(f"{src}: `auth.{name}`: required when auth.mode = \"jwt\"")


def _convert(value: object, kind: Any, source: str, prefix: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_readable(str(exc), prefix, kind, value)}") from None


def _readable(message: str, prefix: str, kind: Any = None, value: object = None) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.server.port`"; lead with the key.
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        text, where = message, ""
    path = where.strip("`").removeprefix("$")
    if kind is not None:
        text += _hint(text, _type_at(msgspec.inspect.type_info(kind), value, path))
    key = path.lstrip(".")
    if prefix:
        key = f"{prefix}.{key}".replace(".[", "[") if key else prefix
    return f"`{key}`: {text}" if key else text


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]+)`")


def _hint(text: str, node: msgspec.inspect.Type | None) -> str:
    """What the operator probably meant: the valid values, or the nearest known key."""
    unknown = _UNKNOWN_FIELD.match(text)
    if unknown and isinstance(node, msgspec.inspect.StructType):
        names = [f.name for f in node.fields if f.name not in _RESERVED]
        close = difflib.get_close_matches(unknown[1], names, n=1)
        return f"; did you mean `{close[0]}`?" if close else ""
    if text.startswith(("Invalid enum value", "Invalid value")) and isinstance(
            node, msgspec.inspect.LiteralType):
        return " (expected one of: " + ", ".join(f'"{v}"' for v in node.values) + ")"
    return ""


def _type_at(node: msgspec.inspect.Type, value: object, path: str
             ) -> msgspec.inspect.Type | None:
    """The type msgspec was checking at `path` ("$.a.b[0]" without the "$")."""
    for name, index in [*re.findall(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]", path), ("", "")]:
        if isinstance(node, msgspec.inspect.UnionType):
            tagged: list[msgspec.inspect.StructType] = [
                t for t in node.types
                if isinstance(t, msgspec.inspect.StructType) and t.tag_field is not None]
            if tagged and name == tagged[0].tag_field:
                return msgspec.inspect.LiteralType(values=tuple(str(t.tag) for t in tagged))
            tag = value.get(tagged[0].tag_field) if tagged and isinstance(value, dict) else None
            chosen: list[msgspec.inspect.Type] = [t for t in tagged if t.tag == tag] or [
                t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(chosen) != 1:
                return None
            node = chosen[0]
        if name:
            fields = {f.name: f.type for f in getattr(node, "fields", ())}
            if name not in fields:
                return None
            node = fields[name]
            value = value.get(name) if isinstance(value, dict) else None
        elif index:
            inner = getattr(node, "item_type", None) or getattr(node, "value_type", None)
            if inner is None:
                return None
            node = inner
            value = value[int(index)] if isinstance(value, list) and index.isdigit() and \
                int(index) < len(value) else None
    return node


def table_key(name: str) -> str:
    """A table key as TOML would write it: bare when it can be, quoted otherwise."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def _check(settings: Settings) -> None:
    src = settings.source
    for name, provider in settings.providers.items():
        if not isinstance(provider, UpstreamSettings):
            continue
        key = f"providers.{table_key(name)}"
        url = urlsplit(provider.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"{src}: `{key}.base_url`: expected an http:// or https:// URL, "
                f"got {provider.base_url!r}"
            )
        if provider.api_key_env and provider.api_key_file:
            raise ConfigError(f"{src}: `{key}`: set api_key_env or api_key_file, not both")
        problem = upstream_problem(provider)
        if problem is not None:
            raise ConfigError(f"{src}: `{key}.{problem[0]}`: {problem[1]}")
    if not settings.models:
        raise ConfigError(f"{src}: `models`: no model is configured; add a [models.\"NAME\"] table")
    for model, entry in settings.models.items():
        key = f"models.{table_key(model)}"
        if not entry.targets:
            raise ConfigError(f"{src}: `{key}.targets`: needs at least one target")
        for i, target in enumerate(entry.targets):
            if target.provider not in settings.providers:
                known = ", ".join(sorted(settings.providers)) or "none"
                raise ConfigError(
                    f"{src}: `{key}.targets[{i}].provider`: unknown provider "
                    f"{target.provider!r} (configured: {known})"
                )
        if all(t.weight == 0 for t in entry.targets):
            raise ConfigError(
                f"{src}: `{key}.targets`: every weight is 0, so nothing can serve it"
            )
        if all(t.fallback_only for t in entry.targets):
            raise ConfigError(f"{src}: `{key}.targets`: every target is fallback_only")


def _resolve_keys(settings: Settings) -> dict[str, Secret]:
    keys: dict[str, Secret] = {}
    src = settings.source
    for name, provider in settings.providers.items():
        if not isinstance(provider, UpstreamSettings):
            continue
        key = f"providers.{table_key(name)}"
        if provider.api_key_env:
            value = os.environ.get(provider.api_key_env)
            if not value:
                raise ConfigError(
                    f"{src}: `{key}.api_key_env`: the environment variable "
                    f"{provider.api_key_env} is not set"
                )
            keys[name] = Secret(value.strip())
        elif provider.api_key_file:
            try:
                value = Path(provider.api_key_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{src}: `{key}.api_key_file`: cannot read "
                    f"{provider.api_key_file}: {exc.strerror}"
                ) from None
            if not value:
                raise ConfigError(
                    f"{src}: `{key}.api_key_file`: {provider.api_key_file} is empty"
                )
            keys[name] = Secret(value)
    return keys


def describe_routes(settings: Settings) -> list[tuple[str, str, str, float]]:
    """The resolved model -> target table: (public name, provider, upstream model, weight)."""
    rows = []
    for model, entry in settings.models.items():
        for target in entry.targets:
            rows.append((model, target.provider, target.model or model, target.weight))
    return rows
