"""Keys from a JWKS URL: fetched in the background, refetched on an unknown kid at most once
per cooldown, and the last good set keeps working while the identity provider is down."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.jwks_server import JwksServer
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("jwks-issuer"), kid="key-1")


@pytest.fixture
def jwks(issuer: Issuer) -> Iterator[JwksServer]:
    server = JwksServer(issuer.jwks_path.read_bytes())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sidecar_jwks(mock_upstream: MockUpstream, jwks: JwksServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    config = base_config(mock_upstream) + jwt_config(
        f'jwks_url = "{jwks.url}"', extra="jwks_refresh_s = 0.3\njwks_cooldown_s = 60")
    instance = start_sidecar(config, tmp_path_factory.mktemp("jwks-sidecar"))
    yield instance
    instance.stop()


def call(sidecar: Sidecar, token: str) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions",
                      headers={"Authorization": f"Bearer {token}"},
                      json={"model": "gpt-test", "messages": USER})


def test_keys_from_the_url_verify_tokens(sidecar_jwks: Sidecar, issuer: Issuer) -> None:
    assert call(sidecar_jwks, issuer.token()).status_code == 200
    assert httpx.get(sidecar_jwks.url + "/readyz").status_code == 200


def test_unknown_kid_flood_fetches_at_most_once_per_cooldown(
        mock_upstream: MockUpstream, issuer: Issuer, jwks: JwksServer,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # No scheduled refresh inside this test: every fetch after start-up is the flood's doing.
    config = base_config(mock_upstream) + jwt_config(
        f'jwks_url = "{jwks.url}"', extra="jwks_refresh_s = 3600\njwks_cooldown_s = 2")
    flood = [issuer.token(headers={"kid": f"unknown-{i}"}, sub=f"t{i}") for i in range(40)]
    late = issuer.token(headers={"kid": "unknown-late"})
    sidecar = start_sidecar(config, tmp_path_factory.mktemp("flood"))
    try:
        assert jwks.fetches == 1  # the start-up fetch
        time.sleep(2.1)  # past the cooldown that start-up fetch began
        started = time.monotonic()
        with httpx.Client() as client:
            for token in flood:
                response = client.post(sidecar.base_url + "/chat/completions",
                                       headers={"Authorization": f"Bearer {token}"},
                                       json={"model": "gpt-test", "messages": USER})
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "unknown_key"
        assert time.monotonic() - started < 2  # the whole flood fell in one cooldown
        assert jwks.fetches == 2  # one refetch for the whole flood
        time.sleep(2.1)  # a new cooldown window allows one more
        assert call(sidecar, late).status_code == 401
        assert jwks.fetches == 3
        assert call(sidecar, issuer.token()).status_code == 200
    finally:
        sidecar.stop()


def test_identity_provider_down_keeps_the_last_good_keys(
        sidecar_jwks: Sidecar, issuer: Issuer, jwks: JwksServer) -> None:
    assert call(sidecar_jwks, issuer.token(sub="before")).status_code == 200
    jwks.up = False
    failed_from = jwks.fetches
    deadline = time.monotonic() + 5
    while jwks.fetches < failed_from + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jwks.fetches >= failed_from + 2  # refreshes happened, and failed
    # A token never seen before (not in the verified-token cache) still verifies.
    assert call(sidecar_jwks, issuer.token(sub="during-outage")).status_code == 200
    assert sidecar_jwks.wait_for_log("keeping the last good set")
