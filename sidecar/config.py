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
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect
from msgspec import Meta, Struct

DEFAULT_CONFIG = "config/sidecar.toml"

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
    # TLS: both set to serve HTTPS; a client CA to require client certificates (mTLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # A connection must deliver a request's headers within this long of opening, or of its
    # previous answer (slowloris); it is also how long an idle keep-alive connection stays.
    header_timeout_s: PositiveFloat = 15.0
    # A request body must arrive within this long (slow POST).
    body_timeout_s: PositiveFloat = 30.0
    max_connections: Annotated[int, Meta(ge=1)] = 4096
    max_headers: Annotated[int, Meta(ge=8)] = 100
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024
    # Names a browser may use for this server in its Host header, besides the listen address
    # and the loopback names (with auth off, any other Host is refused: DNS rebinding).
    allowed_hosts: list[str] = []


class UpstreamSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    """What every upstream provider has, whatever protocol it speaks: its key, timeouts,
    retries and limits."""

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
    # A whole JSON answer, counted after decompression as it arrives; past it the answer is
    # a 502 and the connection is closed (a small gzip body can inflate to gigabytes).
    max_response_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    # One event of a stream, likewise: a stream that never separates its events is cut here.
    max_event_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024


class ProviderSettings(UpstreamSettings, tag_field="kind", tag="openai"):
    """An upstream that speaks the OpenAI API (kind = "openai")."""

    base_url: str


class AnthropicProviderSettings(UpstreamSettings, tag_field="kind", tag="anthropic"):
    """An upstream that speaks Anthropic's Messages API (kind = "anthropic"); OpenAI clients
    reach it through a translation."""

    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    # Anthropic requires max_tokens; OpenAI clients often leave it out.
    default_max_tokens: Annotated[int, Meta(ge=1)] = 4096


class LocalProviderSettings(Struct, kw_only=True, forbid_unknown_fields=True, tag_field="kind",
                            tag="local"):
    """A model served inside this process (kind = "local")."""

    # "auto": exllamav2 when a CUDA GPU and the package are usable, else transformers (CPU).
    engine: Literal["auto", "exllamav2", "transformers"] = "auto"
    # "builtin:smollm2-135m-instruct", or a model directory (config.json, tokenizer.json,
    # *.safetensors; EXL2 or FP16/BF16 for exllamav2).
    model: str = "builtin:smollm2-135m-instruct"
    max_seq_len: Annotated[int, Meta(ge=16)] = 4096
    max_batch_size: Annotated[int, Meta(ge=1, le=1024)] = 16  # sequences generated at once
    # Requests waiting beyond the running ones; one more gets a 503 (or spills over).
    max_queue: Annotated[int, Meta(ge=0)] = 64
    cache: Literal["fp16", "q8", "q6", "q4"] = "fp16"  # exllamav2's KV cache
    # A request that names no max_tokens may use the rest of the context (as OpenAI's API
    # does) unless this is set.
    default_max_tokens: Annotated[int, Meta(ge=0)] = 0
    # Jobs active and no token for this long: /readyz says not ready (a hung engine).
    stall_s: PositiveFloat = 30.0
    # A request that arrives while the model loads waits this long, then gets a 503.
    load_wait_s: Annotated[float, Meta(ge=0)] = 60.0
    # The CPU engine's weights. "auto": bfloat16 where the CPU computes it natively
    # (AVX512-BF16, AMX), which halves the bytes read per token; float32 elsewhere, where
    # bfloat16 would be emulated and slow.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # The CPU engine generates at idle priority (SCHED_IDLE), so request handling always
    # runs first. On a machine whose cores are always busy that can starve the model: set
    # false there.
    idle_priority: bool = True


AnyProvider = ProviderSettings | AnthropicProviderSettings | LocalProviderSettings


class TargetSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    provider: str
    model: str | None = None
    weight: Annotated[float, Meta(ge=0, le=1_000_000)] = 1.0
    # Used only when every other target failed or rests.
    fallback_only: bool = False


class ModelSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    targets: list[TargetSettings]
    # A local target whose queue is full or whose model is not ready passes the request to
    # the next target instead of making it wait or fail.
    spill_over: bool = True
    # Prompts estimated at this many tokens or more go to the non-local targets (0: off).
    prefer_local_below_tokens: Annotated[int, Meta(ge=0)] = 0


class RoutingSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    # A target that failed (connect error, 5xx, 429, timeout) this many times in a row rests
    # cooldown_s (or as long as its Retry-After asks).
    cooldown_s: PositiveFloat = 30.0
    failures_before_cooldown: Annotated[int, Meta(ge=1)] = 3
    # Retries and fallbacks together at most this share of requests (plus a small floor).
    retry_budget_ratio: Annotated[float, Meta(ge=0, le=1)] = 0.2
    # A cheap GET {base_url}/models per upstream this often; 0 turns probing off.
    probe_interval_s: Annotated[float, Meta(ge=0)] = 15.0
    # Live weight changes are kept here (not in the operator's TOML) and survive a restart.
    state_file: str = "state/routes.json"
    # The longest a target rests, whatever an upstream's Retry-After asks.
    max_rest_s: Annotated[float, Meta(gt=0, le=86_400)] = 300.0


Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
    "HS256", "HS384", "HS512",
]


class AuthSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    mode: Literal["none", "jwt"] = "none"
    # Pinned here; the token's own header never chooses.
    algorithms: Annotated[list[Algorithm], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["RS256"]
    )
    public_key_file: str | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    secret_env: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_s: Annotated[float, Meta(ge=0, le=300)] = 30.0
    tenant_claim: str = "sub"
    scope_claim: str = "scope"
    chat_scope: str = "sidecar:chat"
    admin_scope: str = "sidecar:admin"
    models_claim: str | None = "models"
    # Needed to run without authentication on an address other than loopback.
    allow_unauthenticated: bool = False
    jwks_refresh_s: PositiveFloat = 300.0
    # An unknown `kid` refetches the key set at most this often.
    jwks_cooldown_s: PositiveFloat = 30.0
    jwks_timeout_s: PositiveFloat = 5.0
    # Verified tokens kept, so a token used again costs a dict look-up, not a signature check.
    token_cache_size: Annotated[int, Meta(ge=0)] = 10_000


class LimitsSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    requests_per_minute: Annotated[int, Meta(ge=0)] = 0  # per tenant; 0 = no limit
    tokens_per_minute: Annotated[int, Meta(ge=0)] = 0  # per tenant; 0 = no limit
    # Reserved for a request that names no max_tokens, until its usage settles the count.
    default_max_tokens: Annotated[int, Meta(ge=1)] = 512
    max_concurrent_requests: Annotated[int, Meta(ge=1)] = 512  # whole process


class CacheSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = False
    ttl_s: PositiveFloat = 3600.0
    memory_items: Annotated[int, Meta(ge=1)] = 1024  # answers kept in this process
    # "deterministic": temperature 0 or a seed; "always"; "never".
    cache_when: Literal["deterministic", "always", "never"] = "deterministic"
    # A Redis shared by a fleet of sidecars (redis:// or rediss://); "" keeps answers in this
    # process only.
    redis_url: str = ""
    # redis_url names one node of a Redis Cluster; the others are found from it.
    cluster: bool = False
    # A slow or dead Redis costs a request at most this, then it goes on uncached.
    timeout_ms: Annotated[float, Meta(gt=0, le=10_000)] = 100.0
    # After a Redis failure, how long to stop asking it.
    circuit_s: PositiveFloat = 5.0
    # Identical misses on several sidecars: one fetches under a Redis lock held at most this
    # long, the others wait for its answer.
    lock_s: PositiveFloat = 10.0
    # The environment variable holding the key-hashing secret, the same on every sidecar that
    # shares the Redis (>= 32 characters); without Redis a random one per process is used.
    secret_env: str | None = None


class LoggingSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One JSON line per request at info level.
    requests: bool = True


class MetricsSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    # Where the Prometheus text is served (on the main listener unless `listen` is set).
    path: str = "/metrics"
    # "host:port" of a listener of its own for scrapers, loopback only; it needs no token.
    listen: str = ""


class Settings(Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    providers: dict[str, AnyProvider] = {}
    models: dict[str, ModelSettings] = {}
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    routing: RoutingSettings = msgspec.field(default_factory=RoutingSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    # Filled in by load(): never read from the file.
    source: str = "<memory>"
    api_keys: dict[str, Secret] = {}
    jwt_secret: Secret | None = None
    cache_secret: Secret | None = None
    # server.host resolved once at load: what the loopback check saw is what is bound.
    listen_addresses: list[str] = []


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
