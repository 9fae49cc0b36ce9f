"""Typed settings from a TOML file and the environment, validated once, with errors that name
the file, the key and what is wrong."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct

DEFAULT_CONFIG = "config/sidecar.toml"
T = TypeVar("T")

PositiveFloat = Annotated[float, Meta(gt=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]


class Secret:
    """A value that never shows itself in a repr, a log line or an error."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class ServerSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    # A comment line on an SSE stream whose upstream has been silent this long keeps
    # proxies and clients from timing the connection out.
    heartbeat_s: PositiveFloat = 15.0
    # How long a stopping server waits for requests in flight before it closes them.
    shutdown_timeout_s: Annotated[float, Meta(ge=0)] = 30.0


class ProviderSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["openai"]
    base_url: str
    api_key_env: str | None = None
    api_key_file: str | None = None
    timeout_connect_s: PositiveFloat = 5.0
    # Idle time between two reads of the upstream's answer; never a cap on a whole stream.
    timeout_read_s: PositiveFloat = 120.0
    max_retries: Annotated[int, Meta(ge=0, le=10)] = 2
    # An upstream that asks us to wait longer than this gets its 429/503 passed to the client
    # (with its Retry-After) instead of holding the request here.
    max_retry_wait_s: Annotated[float, Meta(ge=0)] = 20.0
    # Connections kept to this upstream at most; 0 means no cap of our own.
    max_connections: Annotated[int, Meta(ge=0)] = 0
    headers: dict[str, str] = {}


class TargetSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    provider: str
    model: str | None = None
    weight: Annotated[float, Meta(ge=0)] = 1.0


class ModelSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    targets: list[TargetSettings]


class LoggingSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One JSON line per request at info level.
    requests: bool = True


class Settings(Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    providers: dict[str, ProviderSettings] = {}
    models: dict[str, ModelSettings] = {}
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    # Filled in by load(): never read from the file.
    source: str = "<memory>"
    api_keys: dict[str, Secret] = {}


class ConfigError(Exception):
    """A configuration problem, phrased for the operator who has to fix it."""


def default_config_path() -> str:
    return os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG


def load(path: str | os.PathLike[str]) -> Settings:
    """Read, validate and resolve a config file. Raises ConfigError with a readable message."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return from_mapping(data, source=source)


def from_mapping(data: dict[str, object], *, source: str = "<memory>") -> Settings:
    for reserved in ("source", "api_keys"):
        if reserved in data:
            raise ConfigError(f"{source}: unknown key `{reserved}`")
    # Tables keyed by name are converted one entry at a time, so an error can say which entry.
    rest = dict(data)
    tables: dict[str, dict[str, Any]] = {}
    for section, kind in (("providers", ProviderSettings), ("models", ModelSettings)):
        entries = rest.pop(section, {})
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: `{section}`: expected a table")
        tables[section] = {
            name: _convert(value, kind, source, f"{section}.{_key(name)}")
            for name, value in entries.items()
        }
    settings = _convert(rest, Settings, source, "")
    settings.providers = tables["providers"]
    settings.models = tables["models"]
    settings.source = source
    _check(settings)
    settings.api_keys = _resolve_keys(settings)
    return settings


def _convert(value: object, kind: type[T], source: str, prefix: str) -> T:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_readable(str(exc), prefix)}") from None


def _readable(message: str, prefix: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.server.port`"; lead with the key.
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        text, where = message, ""
    key = where.strip("`").removeprefix("$").lstrip(".")
    if prefix:
        key = f"{prefix}.{key}".replace(".[", "[") if key else prefix
    return f"`{key}`: {text}" if key else text


def _key(name: str) -> str:
    """A table key as TOML would write it: bare when it can be, quoted otherwise."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def _check(settings: Settings) -> None:
    src = settings.source
    for name, provider in settings.providers.items():
        url = urlsplit(provider.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"{src}: `providers.{name}.base_url`: expected an http:// or https:// URL, "
                f"got {provider.base_url!r}"
            )
        if provider.api_key_env and provider.api_key_file:
            raise ConfigError(
                f"{src}: `providers.{name}`: set api_key_env or api_key_file, not both"
            )
    if not settings.models:
        raise ConfigError(f"{src}: `models`: no model is configured; add a [models.\"NAME\"] table")
    for model, entry in settings.models.items():
        if not entry.targets:
            raise ConfigError(f"{src}: `models.{model}.targets`: needs at least one target")
        for i, target in enumerate(entry.targets):
            if target.provider not in settings.providers:
                known = ", ".join(sorted(settings.providers)) or "none"
                raise ConfigError(
                    f"{src}: `models.{model}.targets[{i}].provider`: unknown provider "
                    f"{target.provider!r} (configured: {known})"
                )
        if all(t.weight == 0 for t in entry.targets):
            raise ConfigError(
                f"{src}: `models.{model}.targets`: every weight is 0, so nothing can serve it"
            )


def _resolve_keys(settings: Settings) -> dict[str, Secret]:
    keys: dict[str, Secret] = {}
    src = settings.source
    for name, provider in settings.providers.items():
        if provider.api_key_env:
            value = os.environ.get(provider.api_key_env)
            if not value:
                raise ConfigError(
                    f"{src}: `providers.{name}.api_key_env`: the environment variable "
                    f"{provider.api_key_env} is not set"
                )
            keys[name] = Secret(value.strip())
        elif provider.api_key_file:
            try:
                value = Path(provider.api_key_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{src}: `providers.{name}.api_key_file`: cannot read "
                    f"{provider.api_key_file}: {exc.strerror}"
                ) from None
            if not value:
                raise ConfigError(
                    f"{src}: `providers.{name}.api_key_file`: {provider.api_key_file} is empty"
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
