"""JWT: every /v1 route needs a valid token; each refusal is a clear 401/403 and the server
stays healthy for the next request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.auth_helpers import (
    AUDIENCE,
    ISSUER,
    Issuer,
    forged_header_token,
    hmac_token_with_public_key,
    jwt_config,
    make_issuer,
    unsigned_token,
)
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture(scope="module")
def secured(mock_upstream: MockUpstream, issuer: Issuer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    config = base_config(mock_upstream) + jwt_config(
        f'public_key_file = "{issuer.public_path}"')
    instance = start_sidecar(config, tmp_path_factory.mktemp("secured"))
    yield instance
    instance.stop()


def call(sidecar: Sidecar, token: str | None, model: str = "gpt-test") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(sidecar.base_url + "/chat/completions", headers=headers,
                      json={"model": model, "messages": USER})


def assert_401(response: httpx.Response, words: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert words in error["message"]
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="llm-sidecar"')


def test_valid_token_is_served_through_the_openai_client(secured: Sidecar, issuer: Issuer) -> None:
    client = openai.OpenAI(base_url=secured.base_url, api_key=issuer.token(), max_retries=0)
    reply = client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from mock: hi"


def test_missing_token_is_401(secured: Sidecar) -> None:
    response = call(secured, None)
    assert_401(response, "Authorization: Bearer")
    assert response.json()["error"]["code"] == "missing_token"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.base_url, api_key="not-a-jwt", max_retries=0
                      ).chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]


@pytest.mark.parametrize("kid", [["a", "b"], {"x": 1}, 7])
def test_a_kid_that_is_not_a_string_is_401_not_500(secured: Sidecar, issuer: Issuer,
                                                   kid: object) -> None:
    now = int(time.time())
    token = forged_header_token({"alg": "RS256", "kid": kid}, iss=ISSUER, aud=AUDIENCE,
                                sub="x", iat=now, exp=now + 60, scope="sidecar:chat")
    assert_401(call(secured, token), "")
    assert call(secured, issuer.token()).status_code == 200


def test_alg_none_is_refused(secured: Sidecar) -> None:
    now = int(time.time())
    token = unsigned_token(iss=ISSUER, aud=AUDIENCE, sub="x", iat=now, exp=now + 60,
                           scope="sidecar:chat")
    assert_401(call(secured, token), "")


def test_hs256_signed_with_the_public_key_is_refused(secured: Sidecar, issuer: Issuer) -> None:
    now = int(time.time())
    token = hmac_token_with_public_key(issuer.public_pem, iss=ISSUER, aud=AUDIENCE, sub="x",
                                       iat=now, exp=now + 60, scope="sidecar:chat")
    assert_401(call(secured, token), "")


def test_expired_beyond_leeway_is_refused_within_leeway_accepted(secured: Sidecar,
                                                                 issuer: Issuer) -> None:
    now = int(time.time())
    response = call(secured, issuer.token(exp=now - 120, iat=now - 600))
    assert_401(response, "expired")
    assert response.json()["error"]["code"] == "token_expired"
    assert call(secured, issuer.token(exp=now - 10, iat=now - 600)).status_code == 200


def test_a_token_accepted_once_is_refused_after_its_exp(mock_upstream: MockUpstream,
                                                         issuer: Issuer, tmp_path: Path) -> None:
    # Leeway 0, so the token's own `exp` is the deadline; the first answer puts it in the
    # verified-token cache, which must not outlive it.
    config = base_config(mock_upstream) + jwt_config(
        f'public_key_file = "{issuer.public_path}"', leeway=0)
    sidecar = start_sidecar(config, tmp_path)
    try:
        exp = int(time.time()) + 2
        token = issuer.token(exp=exp)
        assert call(sidecar, token).status_code == 200
        assert call(sidecar, token).status_code == 200  # from the cache
        time.sleep(max(0.0, exp - time.time()) + 1.1)
        response = call(sidecar, token)
        assert_401(response, "expired")
        assert response.json()["error"]["code"] == "token_expired"
    finally:
        sidecar.stop()


@pytest.mark.parametrize(("claims", "words"), [
    ({"aud": "someone-else"}, "audience"),
    ({"iss": "https://evil.test/"}, "issuer"),
])
def test_wrong_audience_or_issuer_is_refused(secured: Sidecar, issuer: Issuer,
                                             claims: dict[str, str], words: str) -> None:
    assert_401(call(secured, issuer.token(**claims)), words)


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud", "iss"])
def test_missing_required_claim_is_refused(secured: Sidecar, issuer: Issuer, claim: str) -> None:
    assert_401(call(secured, issuer.token(drop=(claim,))), "")


def test_token_from_another_key_is_refused(secured: Sidecar, tmp_path: Path) -> None:
    stranger = make_issuer(tmp_path, kid="dev-1")
    assert_401(call(secured, stranger.token()), "signature")


def test_token_without_the_chat_scope_is_403(secured: Sidecar, issuer: Issuer) -> None:
    response = call(secured, issuer.token(scope="sidecar:admin other"))
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert "sidecar:chat" in response.json()["error"]["message"]


def test_scope_may_be_a_list(secured: Sidecar, issuer: Issuer) -> None:
    assert call(secured, issuer.token(scope=["x", "sidecar:chat"])).status_code == 200


def test_models_claim_restricts_models(secured: Sidecar, issuer: Issuer) -> None:
    token = issuer.token(models=["mock-gpt"])
    refused = call(secured, token, model="gpt-test")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert call(secured, token, model="mock-gpt").status_code == 200
    listed = httpx.get(secured.base_url + "/models", headers={"Authorization": f"Bearer {token}"})
    assert [m["id"] for m in listed.json()["data"]] == ["mock-gpt"]


def test_errors_do_not_echo_the_token(secured: Sidecar, issuer: Issuer) -> None:
    token = issuer.token(aud="nope")
    response = call(secured, token)
    assert token not in response.text
    assert token.split(".")[1] not in response.text
    assert token not in str(response.headers)


def test_huge_authorization_header_is_4xx_and_harmless(secured: Sidecar, issuer: Issuer) -> None:
    response = call(secured, "x" * 10_000)
    assert 400 <= response.status_code < 500
    assert call(secured, issuer.token()).status_code == 200


def test_health_needs_no_token(secured: Sidecar) -> None:
    assert httpx.get(secured.url + "/healthz").status_code == 200
    assert httpx.get(secured.url + "/readyz").status_code == 200


def test_server_is_healthy_after_every_refusal(secured: Sidecar, issuer: Issuer) -> None:
    assert call(secured, issuer.token()).status_code == 200


def test_token_minted_by_the_cli_is_accepted(secured: Sidecar, issuer: Issuer,
                                             tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.sidecar import ROOT

    key = tmp_path / "issuer-key.pem"
    key.write_bytes(issuer.private_pem)
    minted = subprocess.run(
        [sys.executable, "-m", "sidecar", "token", "--key", str(key), "--issuer", ISSUER,
         "--audience", AUDIENCE, "--sub", "cli-user", "--models", "gpt-test", "--ttl", "60",
         "--kid", issuer.kid], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    token = minted.stdout.strip()
    assert call(secured, token).status_code == 200
    assert call(secured, token, model="mock-gpt").status_code == 403


def test_hs256_with_a_secret_from_the_environment(mock_upstream: MockUpstream,
                                                  tmp_path: Path) -> None:
    import jwt

    secret = "s" * 40
    config = base_config(mock_upstream) + f"""
[auth]
mode = "jwt"
algorithms = ["HS256"]
secret_env = "SIDECAR_JWT_SECRET"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
"""
    sidecar = start_sidecar(config, tmp_path, env={"SIDECAR_JWT_SECRET": secret})
    try:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "h", "iat": now, "exp": now + 60,
                  "scope": "sidecar:chat"}
        assert call(sidecar, jwt.encode(claims, secret, algorithm="HS256")).status_code == 200
        forged = jwt.encode(claims, "x" * 40, algorithm="HS256")
        assert_401(call(sidecar, forged), "signature")
    finally:
        sidecar.stop()


@pytest.mark.parametrize("token", [
    "a.b.c", "...", "e30.e30.", "e30.e30.e30", "bm90IGpzb24.e30.", "W10.e30.",
    "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "eyJhbGciOiJSUzI1NiJ9.W10.c2ln",
    "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOiJzb29uIn0.c2ln", "\u00e9\u00e9.\u00e9.\u00e9",
])
def test_malformed_tokens_are_401_never_5xx(secured: Sidecar, token: str) -> None:
    response = httpx.post(secured.base_url + "/chat/completions",
                          headers={"Authorization": f"Bearer {token}".encode()},
                          json={"model": "gpt-test", "messages": USER})
    assert response.status_code == 401
