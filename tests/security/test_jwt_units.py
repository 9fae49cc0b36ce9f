"""Token verification without I/O: keys by kid, the claims a token must carry, the principal
it yields, and the verified-token cache that must never outlive a token."""

from __future__ import annotations

import time
from typing import Any

import jwt
import orjson
import pytest

from sidecar.security.jwt import ANONYMOUS, KeySet, Principal, Unauthorized, Verifier, bearer
from sidecar.settings import AuthSettings
from tests.support.auth_helpers import forged_header_token

SECRET = "a-test-secret-of-at-least-32-bytes!!"
ISSUER = "https://idp.test/"
AUDIENCE = "llm-sidecar"


def settings(**changes: Any) -> AuthSettings:
    base: dict[str, Any] = {"mode": "jwt", "algorithms": ["HS256"], "issuer": ISSUER,
                            "audience": AUDIENCE, "leeway_s": 0}
    return AuthSettings(**{**base, **changes})


def verifier(**changes: Any) -> Verifier:
    checker = Verifier(settings(**changes))
    checker.use_keys(KeySet({None: SECRET}))
    return checker


def token(secret: str = SECRET, headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
            "scope": "sidecar:chat", **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret,
                      algorithm="HS256", headers=headers)


async def refused(checker: Verifier, raw: str, words: str, code: str = "invalid_token") -> None:
    with pytest.raises(Unauthorized) as caught:
        await checker.verify(raw)
    assert words in caught.value.message
    assert caught.value.code == code
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"].startswith('Bearer realm="llm-sidecar"')


async def test_a_valid_token_yields_its_principal() -> None:
    principal = await verifier().verify(token(scope="sidecar:chat extra", models=["m1"]))
    assert principal == Principal("alice", frozenset({"sidecar:chat", "extra"}),
                                  frozenset({"m1"}))
    assert principal.may_use("m1") and not principal.may_use("m2")
    assert ANONYMOUS.may_use("anything") and ANONYMOUS.tenant == "anonymous"


async def test_scopes_may_be_a_list_and_models_may_be_absent() -> None:
    principal = await verifier().verify(token(scope=["a", "b"]))
    assert principal.scopes == {"a", "b"} and principal.models is None
    assert (await verifier().verify(token(scope=None))).scopes == frozenset()


async def test_claims_named_in_the_settings_are_the_ones_read() -> None:
    checker = verifier(tenant_claim="org", scope_claim="scp", models_claim="allowed")
    principal = await checker.verify(token(org="acme", scp="x", allowed=["m"], models=["z"]))
    assert principal == Principal("acme", frozenset({"x"}), frozenset({"m"}))
    assert (await verifier(models_claim=None).verify(token(models=["m"]))).models is None


@pytest.mark.parametrize(("claims", "words"), [
    ({"sub": 5}, "The token is invalid"),
    ({"sub": ""}, "`sub` claim is not a string"),
    ({"scope": 5}, "not a list of scopes"),
    ({"scope": ["a", 5]}, "not a list of scopes"),
    ({"models": "m"}, "not a list of model names"),
    ({"models": ["m", 5]}, "not a list of model names"),
    ({"aud": "other"}, f"audience is not `{AUDIENCE}`"),
    ({"iss": "https://evil.test/"}, f"issuer is not `{ISSUER}`"),
    ({"iat": int(time.time()) + 3600}, "not valid yet"),
    ({"nbf": int(time.time()) + 3600}, "not valid yet"),
])
async def test_a_token_with_bad_claims_is_refused(claims: dict[str, Any], words: str) -> None:
    await refused(verifier(), token(**claims), words)


@pytest.mark.parametrize("claim", ["exp", "iat", "iss", "aud", "sub"])
async def test_a_token_missing_a_required_claim_is_refused(claim: str) -> None:
    missing: dict[str, Any] = {claim: None}
    raw = token(**missing)
    await refused(verifier(), raw, f"lacks the required `{claim}` claim")


async def test_an_expired_token_is_refused_and_leeway_is_honoured() -> None:
    old = token(exp=int(time.time()) - 10)
    await refused(verifier(), old, "expired", "token_expired")
    assert (await verifier(leeway_s=60).verify(old)).tenant == "alice"


async def test_signatures_algorithms_and_headers_are_checked() -> None:
    await refused(verifier(), token(secret="another-secret-of-at-least-32-bytes"),
                  "signature does not verify")
    await refused(verifier(), "not-a-token", "not a well-formed JWT")
    await refused(verifier(), forged_header_token({"alg": "HS256", "kid": 5}),
                  "not a well-formed JWT")
    header = jwt.utils.base64url_encode(orjson.dumps({"alg": "none"})).decode()
    body = jwt.utils.base64url_encode(orjson.dumps({"sub": "x"})).decode()
    await refused(verifier(), f"{header}.{body}.", "algorithm is not accepted (accepted: HS256)")
    await refused(verifier(), token()[:-4] + "@@@@", "")


async def test_a_token_accepted_once_is_refused_once_expired() -> None:
    checker = verifier()
    raw = token(exp=int(time.time()) + 1)
    assert (await checker.verify(raw)).tenant == "alice"
    assert (await checker.verify(raw)).tenant == "alice"  # from the cache
    time.sleep(max(0.0, jwt.decode(raw, options={"verify_signature": False})["exp"]
                   - time.time()) + 0.05)
    await refused(checker, raw, "expired", "token_expired")
    await refused(checker, raw, "expired", "token_expired")  # and not cached since


async def test_the_cache_keeps_a_token_for_its_leeway_past_exp() -> None:
    checker = verifier(leeway_s=30)
    raw = token(exp=int(time.time()) - 5)
    assert (await checker.verify(raw)).tenant == "alice"
    checker.use_keys(checker._keys)  # same keys: the cache stands
    assert (await checker.verify(raw)).tenant == "alice"


async def test_a_new_key_set_forgets_what_the_old_one_verified() -> None:
    checker = verifier()
    raw = token()
    assert (await checker.verify(raw)).tenant == "alice"
    checker.use_keys(KeySet({None: "a-new-secret-of-at-least-32-bytes!!!"}))
    await refused(checker, raw, "signature does not verify")


async def test_the_cache_holds_at_most_its_size() -> None:
    checker = verifier(token_cache_size=2)
    tokens = [token(sub=f"t{i}") for i in range(3)]
    for raw in tokens:
        await checker.verify(raw)
    assert len(checker._cache) == 2 and tokens[0] not in checker._cache
    assert len(verifier(token_cache_size=0)._cache) == 0
    uncached = verifier(token_cache_size=0)
    await uncached.verify(tokens[0])
    assert uncached._cache == {}


def test_a_key_set_answers_by_kid() -> None:
    keys = KeySet({"a": 1, "b": 2})
    assert keys.get("a") == 1 and keys.get("b") == 2 and keys.get("c") is None
    assert keys.get(None) is None and len(keys) == 2
    single = KeySet({None: 3})
    assert single.get("anything") == 3 and single.get(None) == 3
    assert KeySet({None: 3, "a": 1}).get("z") is None


def test_a_jwks_keeps_the_usable_signing_keys() -> None:
    jwk = {"kty": "oct", "k": jwt.utils.base64url_encode(SECRET.encode()).decode()}
    document = {"keys": [{**jwk, "kid": "sig", "alg": "HS256"},
                         {**jwk, "kid": "enc", "use": "enc"},
                         {**jwk, "kid": "other-alg", "alg": "HS512"},
                         {**jwk, "kid": "no-alg"},
                         {"kty": "nonsense", "kid": "bad"}]}
    keys = KeySet.from_jwks(orjson.dumps(document), ["HS256"])
    assert keys.get("sig") is not None and keys.get("no-alg") is not None
    assert keys.get("enc") is None and keys.get("other-alg") is None and keys.get("bad") is None
    assert len(keys) == 2
    with pytest.raises(ValueError, match="no usable signing key"):
        KeySet.from_jwks(b'{"keys": []}', ["HS256"])


async def test_a_token_for_an_unknown_kid_is_refused() -> None:
    checker = Verifier(settings())
    assert not checker.ready
    await refused(checker, token(), "signing key (kid) is not known", "unknown_key")
    checker.use_keys(KeySet({"a": SECRET}))
    assert checker.ready
    await refused(checker, token(headers={"kid": "b"}), "not known", "unknown_key")
    assert (await checker.verify(token(headers={"kid": "a"}))).tenant == "alice"


def test_an_unauthorized_answer_says_why_in_its_header() -> None:
    missing = Unauthorized('No "token"', code="missing_token")
    assert missing.headers["WWW-Authenticate"] == (
        'Bearer realm="llm-sidecar", error="invalid_request", '
        "error_description=\"No 'token'\"")
    assert 'error="invalid_token"' in Unauthorized("bad").headers["WWW-Authenticate"]


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer   ", "Token abc"])
def test_a_header_without_a_bearer_token_is_a_missing_token(header: str | None) -> None:
    with pytest.raises(Unauthorized) as caught:
        bearer(header, "No header here.")
    assert caught.value.code == "missing_token"
    assert caught.value.message == ("No header here." if header is None else
                                    "The Authorization header must be `Bearer <token>`.")


def test_the_bearer_token_is_read_whatever_the_schemes_case() -> None:
    assert bearer("Bearer abc.def", "") == "abc.def"
    assert bearer("bearer  abc ", "") == "abc"
