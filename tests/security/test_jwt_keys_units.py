"""Token keys and refusals without a sidecar: the exact reason a client reads for each bad
token, keys loaded from a PEM file, a JWKS file or a secret, and a JWKS URL served on loopback
(fetched, kept while the URL fails, refetched for an unknown kid at most once per cooldown)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web

from sidecar.security.jwt import JwksFetcher, KeySet, Unauthorized, Verifier, load_static_keys
from sidecar.settings import AuthSettings, Secret
from tests.support.auth_helpers import AUDIENCE, ISSUER, make_issuer

SECRET = "a-test-secret-of-at-least-32-bytes!!"


def settings(**changes: Any) -> AuthSettings:
    base: dict[str, Any] = {"mode": "jwt", "algorithms": ["HS256"], "issuer": ISSUER,
                            "audience": AUDIENCE, "leeway_s": 0}
    return AuthSettings(**{**base, **changes})


def token(**claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
            "scope": "sidecar:chat", **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET,
                      algorithm="HS256")


async def reason(raw: str, **changes: Any) -> Unauthorized:
    checker = Verifier(settings(**changes))
    checker.use_keys(KeySet({None: SECRET}))
    with pytest.raises(Unauthorized) as caught:
        await checker.verify(raw)
    return caught.value


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 60}, "The token has expired."),
        ({"iat": int(time.time()) + 600}, "The token is not valid yet (iat or nbf is ahead)."),
        ({"aud": "other"}, f"The token's audience is not `{AUDIENCE}`."),
        ({"iss": "https://other/"}, f"The token's issuer is not `{ISSUER}`."),
        ({"sub": None}, "The token lacks the required `sub` claim."),
        ({"sub": 5}, "The token is invalid."),
        ({"scope": 5}, "The token's `scope` claim is not a list of scopes."),
        ({"scope": ["a", 1]}, "The token's `scope` claim is not a list of scopes."),
        ({"models": "gpt"}, "The token's `models` claim is not a list of model names."),
        ({"models": ["a", 2]}, "The token's `models` claim is not a list of model names."),
    ],
)
async def test_each_bad_claim_is_refused_with_its_own_reason(claims: dict[str, Any],
                                                            message: str) -> None:
    assert (await reason(token(**claims))).message == message


async def test_an_empty_tenant_claim_is_refused_naming_the_claim() -> None:
    caught = await reason(token(tenant=""), tenant_claim="tenant")
    assert caught.message == "The token's `tenant` claim is not a string."


async def test_a_token_signed_with_another_key_says_the_signature_does_not_verify() -> None:
    other = jwt.encode({"sub": "x"}, "another-secret-of-at-least-32-bytes!", algorithm="HS256")
    assert (await reason(other)).message == "The token's signature does not verify."


async def test_a_token_with_an_algorithm_not_accepted_lists_the_accepted_ones() -> None:
    raw = jwt.encode({"sub": "x"}, SECRET * 2, algorithm="HS512")
    caught = await reason(raw, algorithms=["HS256", "HS384"])
    assert caught.message == "The token's algorithm is not accepted (accepted: HS256, HS384)."


async def test_a_header_that_is_not_json_is_refused_as_malformed() -> None:
    caught = await reason("not-a-token")
    assert caught.message == "The token is not a well-formed JWT (header)."


async def test_a_models_claim_is_ignored_when_no_claim_is_configured() -> None:
    checker = Verifier(settings(models_claim=None))
    checker.use_keys(KeySet({None: SECRET}))
    principal = await checker.verify(token(models="not a list"))
    assert principal.models is None and principal.may_use("anything")


async def test_without_a_token_cache_every_token_is_verified_again() -> None:
    checker = Verifier(settings(token_cache_size=0))
    checker.use_keys(KeySet({None: SECRET}))
    raw = token()
    assert (await checker.verify(raw)).tenant == "alice"
    checker.use_keys(KeySet({None: "a-different-secret-of-32-bytes!!!!!"}))
    with pytest.raises(Unauthorized):
        await checker.verify(raw)


def test_static_keys_come_from_a_pem_file_a_jwks_file_or_a_secret(tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, kid="k1")
    pem = load_static_keys(settings(public_key_file=str(issuer.public_path)), None)
    assert pem is not None and pem.get("any kid") is not None
    jwks = load_static_keys(settings(jwks_file=str(issuer.jwks_path), algorithms=["RS256"]),
                            None)
    assert jwks is not None and jwks.get("k1") is not None and jwks.get("k2") is None
    secret = load_static_keys(settings(), Secret(SECRET))
    assert secret is not None and secret.get(None) == SECRET
    assert load_static_keys(settings(), None) is None


async def test_a_pem_key_verifies_the_issuers_tokens(tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path)
    pinned = settings(algorithms=["RS256"], public_key_file=str(issuer.public_path))
    checker = Verifier(pinned)
    checker.use_keys(load_static_keys(pinned, None))
    assert (await checker.verify(issuer.token())).tenant == "tenant-a"


class KeyServer:
    """A JWKS URL on loopback whose answer a test can change."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.status = 200
        self.hits = 0
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await asyncio.sleep(self.delay)
        return web.Response(body=self.body, status=self.status,
                            content_type="application/json")


def jwks(kid: str) -> bytes:
    key = jwt.utils.base64url_encode(SECRET.encode()).decode()
    return orjson.dumps({"keys": [{"kty": "oct", "k": key, "kid": kid, "alg": "HS256"}]})


@pytest.fixture
async def served() -> AsyncIterator[tuple[KeyServer, str, aiohttp.ClientSession]]:
    server = KeyServer(jwks("one"))
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        yield server, f"http://127.0.0.1:{port}/jwks", session
    await runner.cleanup()


async def test_a_fetched_key_set_is_kept_while_the_url_fails(
        served: tuple[KeyServer, str, aiohttp.ClientSession]) -> None:
    server, url, session = served
    fetcher = JwksFetcher(url, settings(), session)
    await fetcher.refresh()
    assert fetcher.keys is not None and fetcher.keys.get("one") is not None
    first = fetcher.keys
    server.status = 500
    await fetcher.refresh()
    assert fetcher.keys is first
    server.status, server.body = 200, b"not json"
    await fetcher.refresh()
    assert fetcher.keys is first
    assert fetcher.fetches == 3


async def test_concurrent_refreshes_share_one_fetch(
        served: tuple[KeyServer, str, aiohttp.ClientSession]) -> None:
    server, url, session = served
    server.delay = 0.05
    fetcher = JwksFetcher(url, settings(), session)
    await asyncio.gather(*(fetcher.refresh() for _ in range(5)))
    assert server.hits == 1 and fetcher.fetches == 1


async def test_an_unknown_kid_refetches_at_most_once_per_cooldown(
        served: tuple[KeyServer, str, aiohttp.ClientSession]) -> None:
    server, url, session = served
    fetcher = JwksFetcher(url, settings(jwks_cooldown_s=60), session)
    checker = Verifier(settings(jwks_cooldown_s=60))
    checker.use_fetcher(fetcher)
    assert not checker.ready
    assert await fetcher.refresh_on_unknown_kid()
    assert checker.ready
    server.body = jwks("two")
    raw = jwt.encode({"sub": "x"}, SECRET, algorithm="HS256", headers={"kid": "two"})
    with pytest.raises(Unauthorized) as caught:
        await checker.verify(raw)
    assert caught.value.code == "unknown_key"
    assert server.hits == 1  # inside the cooldown: no second fetch
    assert not await fetcher.refresh_on_unknown_kid()


async def test_an_unknown_kid_after_the_cooldown_finds_the_new_key(
        served: tuple[KeyServer, str, aiohttp.ClientSession]) -> None:
    server, url, session = served
    fetcher = JwksFetcher(url, settings(jwks_cooldown_s=0.01), session)
    checker = Verifier(settings())
    checker.use_fetcher(fetcher)
    await fetcher.refresh()
    server.body = jwks("two")
    await asyncio.sleep(0.02)
    now = int(time.time())
    raw = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "iat": now,
                      "exp": now + 60}, SECRET, algorithm="HS256", headers={"kid": "two"})
    assert (await checker.verify(raw)).tenant == "bob"
    assert server.hits == 2


async def test_an_unknown_kid_during_a_fetch_waits_for_it_and_finds_the_new_key(
        served: tuple[KeyServer, str, aiohttp.ClientSession]) -> None:
    server, url, session = served
    fetcher = JwksFetcher(url, settings(jwks_cooldown_s=60), session)
    checker = Verifier(settings(jwks_cooldown_s=60))
    checker.use_fetcher(fetcher)
    await fetcher.refresh()
    server.body, server.delay = jwks("two"), 0.1
    background = asyncio.create_task(fetcher.refresh())  # the interval's refresh, under way
    async with asyncio.timeout(5):
        while server.hits < 2:
            await asyncio.sleep(0.005)
    now = int(time.time())
    raw = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "iat": now,
                      "exp": now + 60}, SECRET, algorithm="HS256", headers={"kid": "two"})
    # Inside the cooldown, but a fetch is in flight: the token waits for it, not a refusal.
    assert (await checker.verify(raw)).tenant == "bob"
    assert await fetcher.refresh_on_unknown_kid() is False  # nothing in flight any more
    await background
    assert server.hits == 2 and fetcher.fetches == 2


async def test_the_background_refresh_fetches_on_its_interval(
        served: tuple[KeyServer, str, aiohttp.ClientSession]) -> None:
    server, url, session = served
    fetcher = JwksFetcher(url, settings(jwks_refresh_s=0.02), session)
    task = asyncio.create_task(fetcher.run())
    await asyncio.sleep(0.01)
    assert server.hits == 0  # it waits one interval first: the app fetched at start
    for _ in range(200):  # a loaded machine may take longer than two intervals
        if server.hits >= 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert server.hits >= 2


def test_a_jwks_without_keys_or_with_a_bad_key_first_is_read_as_far_as_it_goes() -> None:
    with pytest.raises(ValueError) as caught:
        KeySet.from_jwks(b"{}", ["HS256"])
    assert str(caught.value) == "the key set holds no usable signing key"
    good = orjson.loads(jwks("good"))["keys"][0]
    keys = KeySet.from_jwks(orjson.dumps({"keys": [{"kty": "nonsense"}, good]}), ["HS256"])
    assert keys.get("good") is not None


async def test_a_cached_token_past_its_exp_gets_the_expired_reason() -> None:
    checker = Verifier(settings())
    checker.use_keys(KeySet({"k": SECRET}))
    now = int(time.time())
    raw = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "a", "iat": now, "exp": now + 1},
                     SECRET, algorithm="HS256", headers={"kid": "k"})
    await checker.verify(raw)
    await asyncio.sleep(max(0.0, now + 1.05 - time.time()))
    with pytest.raises(Unauthorized) as caught:
        await checker.verify(raw)
    assert caught.value.message == "The token has expired."
    other = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256", headers={"kid": "z"})
    with pytest.raises(Unauthorized) as unknown:
        await checker.verify(other)
    assert unknown.value.message == (
        "The token's signing key (kid) is not known to this server.")


async def test_fetches_are_logged_with_the_url_and_what_went_wrong(
        served: tuple[KeyServer, str, aiohttp.ClientSession],
        caplog: pytest.LogCaptureFixture) -> None:
    server, url, session = served
    fetcher = JwksFetcher(url, settings(jwks_timeout_s=0.2), session)
    with caplog.at_level(logging.INFO, logger="sidecar.auth"):
        await fetcher.refresh()
        server.status = 500
        await fetcher.refresh()
        server.status, server.delay = 200, 2.0
        started = time.monotonic()
        await fetcher.refresh()
        assert time.monotonic() - started < 1.5  # the fetch timeout, not the server, ended it
    lines = [(r.getMessage(), r.__dict__["fields"]) for r in caplog.records
             if r.name == "sidecar.auth"]
    assert lines == [
        ("key set fetched", {"url": url, "keys": 1}),
        ("key set fetch failed; keeping the last good set", {"url": url, "error": "HTTP 500"}),
        ("key set fetch failed; keeping the last good set",
         {"url": url, "error": "TimeoutError"}),
    ]


async def test_a_token_while_the_jwks_url_has_never_answered_is_an_unknown_key(
        served: tuple[KeyServer, str, aiohttp.ClientSession]) -> None:
    server, url, session = served
    server.status = 500
    checker = Verifier(settings())
    checker.use_fetcher(JwksFetcher(url, settings(), session))
    raw = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256", headers={"kid": "one"})
    with pytest.raises(Unauthorized) as caught:
        await checker.verify(raw)
    assert caught.value.code == "unknown_key"
    assert server.hits == 1
