"""Limits: per-tenant request and token budgets (429 with Retry-After), and a process-wide cap
on requests in flight that answers a fast 503 instead of queueing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from sidecar.security.limits import Budget
from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.sidecar import base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("limits-issuer"))


def chat(url: str, token: str | None = None, **body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "gpt-test", "messages": USER, **body})


def test_budget_refills_continuously() -> None:
    budget = Budget(60, "requests")  # one a second
    for _ in range(60):
        budget.take("t", 1, now=100.0)
    with pytest.raises(Exception) as caught:
        budget.take("t", 1, now=100.0)
    assert caught.value.headers["Retry-After"] == "1"  # type: ignore[attr-defined]
    budget.take("t", 1, now=101.0)
    budget.take("other", 1, now=101.0)


def test_requests_per_minute_per_tenant(mock_upstream: MockUpstream, issuer: Issuer,
                                        tmp_path: Path) -> None:
    config = base_config(mock_upstream, extra="[limits]\nrequests_per_minute = 3\n") + \
        jwt_config(f'public_key_file = "{issuer.public_path}"')
    sidecar = start_sidecar(config, tmp_path)
    alice, bob = issuer.token(sub="alice"), issuer.token(sub="bob")
    try:
        for _ in range(3):
            assert chat(sidecar.url, alice).status_code == 200
        refused = chat(sidecar.url, alice)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["Retry-After"]) <= 20
        assert chat(sidecar.url, bob).status_code == 200  # another tenant is not affected
        client = openai.OpenAI(base_url=sidecar.base_url, api_key=alice, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
    finally:
        sidecar.stop()


def test_concurrency_cap_answers_503_at_once(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    sidecar = start_sidecar(
        base_config(mock_upstream, extra="[limits]\nmax_concurrent_requests = 2\n"), tmp_path)
    try:
        slow: list[int] = []
        threads = [threading.Thread(target=lambda: slow.append(
            chat(sidecar.url, mock={"delay_s": 1.0}).status_code)) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        started = time.monotonic()
        refused = chat(sidecar.url)
        assert time.monotonic() - started < 0.5
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        for thread in threads:
            thread.join()
        assert slow == [200, 200]
        assert chat(sidecar.url).status_code == 200
    finally:
        sidecar.stop()


def test_token_budget_reserves_then_settles_on_usage(mock_upstream: MockUpstream,
                                                     tmp_path: Path) -> None:
    sidecar = start_sidecar(
        base_config(mock_upstream, extra="[limits]\ntokens_per_minute = 400\n"), tmp_path)
    try:
        # Each reserves about 300 + the prompt; the answer uses a few tokens, so the rest comes
        # back and the next request fits. Without settling, the second would be refused.
        for _ in range(3):
            assert chat(sidecar.url, max_tokens=300).status_code == 200
        for _ in range(2):
            with httpx.stream("POST", sidecar.base_url + "/chat/completions", json={
                    "model": "gpt-test", "messages": USER, "max_tokens": 300, "stream": True,
                    "stream_options": {"include_usage": True}}) as response:
                assert response.status_code == 200
                assert b"[DONE]" in b"".join(response.iter_raw())
        too_big = chat(sidecar.url, max_tokens=1000)
        assert too_big.status_code == 429
        assert "more than the 400" in too_big.json()["error"]["message"]
        first = chat(sidecar.url, max_tokens=300, mock={"delay_s": 0.5})
        assert first.status_code == 200
    finally:
        sidecar.stop()


def test_a_stream_without_usage_keeps_its_reservation(mock_upstream: MockUpstream,
                                                      tmp_path: Path) -> None:
    sidecar = start_sidecar(
        base_config(mock_upstream, extra="[limits]\ntokens_per_minute = 400\n"), tmp_path)
    try:
        with httpx.stream("POST", sidecar.base_url + "/chat/completions", json={
                "model": "gpt-test", "messages": USER, "max_tokens": 300,
                "stream": True}) as response:
            assert b"[DONE]" in b"".join(response.iter_raw())
        # Nothing said how many tokens the stream used, so its 300+ stay spent.
        assert chat(sidecar.url, max_tokens=300).status_code == 429
    finally:
        sidecar.stop()


def test_token_budget_refuses_a_second_reservation_in_flight(mock_upstream: MockUpstream,
                                                            tmp_path: Path) -> None:
    sidecar = start_sidecar(
        base_config(mock_upstream, extra="[limits]\ntokens_per_minute = 400\n"), tmp_path)
    try:
        held: list[int] = []
        thread = threading.Thread(target=lambda: held.append(
            chat(sidecar.url, max_tokens=300, mock={"delay_s": 1.0}).status_code))
        thread.start()
        time.sleep(0.3)
        refused = chat(sidecar.url, max_tokens=300)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        thread.join()
        assert held == [200]
    finally:
        sidecar.stop()
