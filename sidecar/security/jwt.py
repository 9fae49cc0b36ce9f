"""Bearer tokens: verified with pinned algorithms against keys from a PEM file, a JWKS file,
a JWKS URL (fetched in the background with the app's HTTP session) or an HMAC secret."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from sidecar.errors import SidecarError
from sidecar.settings import AuthSettings, Secret

log = logging.getLogger("sidecar.auth")


class Unauthorized(SidecarError):
    status = 401
    type = "authentication_error"
    code = "invalid_token"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        error = "invalid_request" if code == "missing_token" else "invalid_token"
        description = message.replace('"', "'")
        super().__init__(message, code=code, headers={
            "WWW-Authenticate": f'Bearer realm="llm-sidecar", error="{error}", '
                                f'error_description="{description}"'})


def bearer(header: str | None, missing: str) -> str:
    """The token of an `Authorization: Bearer <token>` header; `missing`: the refusal's words
    when there is no header."""
    if header is None:
        raise Unauthorized(missing, code="missing_token")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("The Authorization header must be `Bearer <token>`.",
                           code="missing_token")
    return token


class Forbidden(SidecarError):
    status = 403
    type = "permission_error"
    code = "insufficient_scope"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for, from a verified token (or the single tenant of auth = none)."""

    tenant: str
    scopes: frozenset[str]
    models: frozenset[str] | None  # None: every model

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal("anonymous", frozenset(), None)


class KeySet:
    """Keys by `kid`; the key without a kid (a PEM file, a secret) answers every kid."""

    def __init__(self, keys: Mapping[str | None, Any]) -> None:
        self._keys = dict(keys)

    def get(self, kid: str | None) -> Any | None:
        if kid in self._keys:
            return self._keys[kid]
        return self._keys.get(None) if None in self._keys and len(self._keys) == 1 else None

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def from_jwks(cls, raw: bytes, algorithms: list[str]) -> KeySet:
        document = orjson.loads(raw)
        keys: dict[str | None, Any] = {}
        for entry in document.get("keys", []):
            if entry.get("use", "sig") != "sig":
                continue
            try:
                jwk = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue  # a key type we cannot use is skipped, not fatal
            if jwk.algorithm_name not in algorithms and "alg" in entry:
                continue
            keys[entry.get("kid")] = jwk.key
        if not keys:
            raise ValueError("the key set holds no usable signing key")
        return cls(keys)


class JwksFetcher:
    """Keeps a remote key set fresh; the last good set keeps working while the URL is down."""

    def __init__(self, url: str, settings: AuthSettings, session: aiohttp.ClientSession) -> None:
        self._url = url
        self._settings = settings
        self._session = session
        self.keys: KeySet | None = None
        self.fetches = 0
        self._last_attempt = -1e9
        self._inflight: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        """Fetch once; concurrent callers share the same fetch."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        loop = asyncio.get_running_loop()
        self._inflight = loop.create_future()
        try:
            await self._fetch()
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    async def _fetch(self) -> None:
        self._last_attempt = time.monotonic()
        self.fetches += 1
        timeout = aiohttp.ClientTimeout(total=self._settings.jwks_timeout_s)
        try:
            async with self._session.get(self._url, timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                raw = await response.read()
            self.keys = KeySet.from_jwks(raw, list(self._settings.algorithms))
            log.info("key set fetched",
                     extra={"fields": {"url": self._url, "keys": len(self.keys)}})
        except (aiohttp.ClientError, TimeoutError, ValueError, orjson.JSONDecodeError) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("key set fetch failed; keeping the last good set",
                        extra={"fields": {"url": self._url, "error": reason}})

    async def refresh_on_unknown_kid(self) -> bool:
        """Refetch for an unknown kid, at most once per cooldown. True if a fetch happened."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return True
        if time.monotonic() - self._last_attempt < self._settings.jwks_cooldown_s:
            return False
        await self.refresh()
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.jwks_refresh_s)
            await self.refresh()


class Verifier:
    """Built with the app; its keys arrive when the app starts (`use_keys` or `use_fetcher`)."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._keys: KeySet | None = None
        self._fetcher: JwksFetcher | None = None
        self._algorithms = list(settings.algorithms)
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._cache_size = settings.token_cache_size
        self._seen_keys: KeySet | None = None

    def use_keys(self, keys: KeySet | None) -> None:
        self._keys = keys

    def use_fetcher(self, fetcher: JwksFetcher) -> None:
        self._fetcher = fetcher

    @property
    def ready(self) -> bool:
        return self._current_keys() is not None

    def _current_keys(self) -> KeySet | None:
        keys = self._fetcher.keys if self._fetcher is not None else self._keys
        if keys is not self._seen_keys:
            # A new key set may have dropped a key: forget what the old one verified.
            self._cache.clear()
            self._seen_keys = keys
        return keys

    async def verify(self, token: str) -> Principal:
        keys = self._current_keys()
        cached = self._cache.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() <= expires:
                return principal
            del self._cache[token]
            raise Unauthorized("The token has expired.", code="token_expired")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("The token is not a well-formed JWT (header).") from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("The token's `kid` header is not a string.")
        key = keys.get(kid) if keys is not None else None
        fetcher = self._fetcher
        if key is None and fetcher is not None and await fetcher.refresh_on_unknown_kid():
            keys = self._current_keys()
            key = keys.get(kid) if keys is not None else None
        if key is None:
            raise Unauthorized("The token's signing key (kid) is not known to this server.",
                               code="unknown_key")
        claims = self._decode(token, key)
        principal = self._principal(claims)
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = (principal, float(claims["exp"]) + self._settings.leeway_s)
        return principal

    def _decode(self, token: str, key: Any) -> dict[str, Any]:
        settings = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=self._algorithms,
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The token has expired.", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("The token is not valid yet (iat or nbf is ahead).") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"The token's audience is not `{settings.audience}`.") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(f"The token's issuer is not `{settings.issuer}`.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"The token lacks the required `{exc.claim}` claim.") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized(
                f"The token's algorithm is not accepted (accepted: {', '.join(self._algorithms)})."
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("The token's signature does not verify.") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("The token is invalid.") from None
        return claims

    def _principal(self, claims: dict[str, Any]) -> Principal:
        settings = self._settings
        tenant = claims.get(settings.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise Unauthorized(f"The token's `{settings.tenant_claim}` claim is not a string.")
        raw_scopes = claims.get(settings.scope_claim, "")
        if isinstance(raw_scopes, str):
            scopes = frozenset(raw_scopes.split())
        elif isinstance(raw_scopes, list) and all(isinstance(s, str) for s in raw_scopes):
            scopes = frozenset(raw_scopes)
        else:
            raise Unauthorized(
                f"The token's `{settings.scope_claim}` claim is not a list of scopes."
            )
        models: frozenset[str] | None = None
        if settings.models_claim and settings.models_claim in claims:
            raw_models = claims[settings.models_claim]
            if not isinstance(raw_models, list) or not all(isinstance(m, str) for m in raw_models):
                raise Unauthorized(
                    f"The token's `{settings.models_claim}` claim is not a list of model names."
                )
            models = frozenset(raw_models)
        return Principal(tenant, scopes, models)


def load_static_keys(settings: AuthSettings, secret: Secret | None) -> KeySet | None:
    """Keys that come from files or the environment; None when they come from a URL.
    Reads files: call it from a thread, not the event loop."""
    if settings.public_key_file:
        pem = Path(settings.public_key_file).read_bytes()
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        return KeySet({None: load_pem_public_key(pem)})
    if settings.jwks_file:
        return KeySet.from_jwks(Path(settings.jwks_file).read_bytes(), list(settings.algorithms))
    if secret is not None:
        return KeySet({None: secret.reveal()})
    return None
