"""The settings' types: every table and key of the config file, with its type, range and
default (docs/configuration.md says what each means). Loading and checking them is
sidecar/config.py's."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

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
    # How long a stopping server waits for requests in flight before it ends them (a stream
    # with an error event, a request with a 503).
    drain_timeout_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    # The former name of drain_timeout_s, still read: when set, it is the drain's length.
    shutdown_timeout_s: Annotated[float, Meta(ge=0, le=3600)] | None = None
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
    # WebSockets: the browser origins (scheme://host[:port]) that may open one; a socket
    # opened with any other Origin is refused (cross-site WebSocket hijacking). Empty: only
    # clients that send no Origin (SDKs, servers).
    ws_allowed_origins: list[str] = []
    # The largest message a WebSocket client may send, and how many it may send a minute.
    ws_max_message_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    ws_messages_per_minute: Annotated[int, Meta(ge=1)] = 120
    # How long a ticket from POST /v1/ws-tickets may wait to open its one socket.
    ws_ticket_ttl_s: PositiveFloat = 30.0


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
    # Waiting for the response's headers once the request is sent; unset: timeout_read_s.
    timeout_headers_s: PositiveFloat | None = None
    # A pooled keep-alive connection unused this long is closed.
    keepalive_s: PositiveFloat = 30.0
    # An egress HTTP proxy (CONNECT for https); unset: HTTPS_PROXY / HTTP_PROXY and NO_PROXY
    # from the environment; "" means none.
    proxy: str | None = None
    # The CA bundle that signs this upstream's certificate; unset: the system's CAs.
    ca_file: str | None = None

    def __repr__(self) -> str:
        # The proxy URL may carry user:password: a repr (a log line, a traceback) shows
        # neither.
        shown = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "proxy" and value:
                value = without_credentials(value)
            shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


def without_credentials(url: str) -> str:
    """`url` with everything between its scheme and its last "@" (user:password, even one
    holding an unescaped "/" or "@") replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


class ProviderSettings(UpstreamSettings, tag_field="kind", tag="openai"):
    """An upstream that speaks the OpenAI API (kind = "openai")."""

    base_url: str
    # It serves the Responses API too (POST {base_url}/responses): Responses requests pass
    # through to it as bytes, rather than translated into chat completions.
    responses: bool = False


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


class AdminPageSettings(Struct, kw_only=True, forbid_unknown_fields=True):
    # The admin page under /admin/ (the JSON admin API under /admin/api/ is always there).
    enabled: bool = True
    # How long a login lasts: at most this, and never past the token's own expiry (8 h at most).
    session_ttl_s: Annotated[float, Meta(gt=0, le=28_800)] = 28_800.0
    # Sessions kept in this process when there is no Redis; the oldest go first.
    max_sessions: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    # Login form posts accepted from one remote address in a minute; past it, 429.
    login_attempts_per_minute: Annotated[int, Meta(ge=1, le=10_000)] = 10
    # Secure, __Host- cookies: "auto" when the sidecar itself ends TLS (server.tls_cert); true
    # when TLS ends in front of it (a proxy), false never.
    secure_cookies: Literal["auto"] | bool = "auto"


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
    admin_page: AdminPageSettings = msgspec.field(default_factory=AdminPageSettings)
    # Filled in by load(): never read from the file.
    source: str = "<memory>"
    api_keys: dict[str, Secret] = {}
    jwt_secret: Secret | None = None
    cache_secret: Secret | None = None
    # server.host resolved once at load: what the loopback check saw is what is bound.
    listen_addresses: list[str] = []
