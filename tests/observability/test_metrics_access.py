"""Who may read the metrics, where they are served, the rolling stats of the admin API, and the
settings that shape them: the sidecar as a real process, reached over loopback."""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from sidecar import config
from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.sidecar import ROOT, Sidecar, base_config, closed_port, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "Hello there"}]
Factory = Callable[..., Sidecar]


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("issuer"))


def secured_config(mock: MockUpstream, issuer: Issuer, extra: str = "") -> str:
    return base_config(mock) + jwt_config(f'public_key_file = "{issuer.public_path}"') + extra


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_with_auth_on_metrics_need_the_metrics_or_the_admin_scope(
        sidecar_factory: Factory, mock_upstream: MockUpstream, issuer: Issuer) -> None:
    secured = sidecar_factory(secured_config(mock_upstream, issuer))
    url = secured.url + "/metrics"
    missing = httpx.get(url)
    assert missing.status_code == 401, missing.text
    assert missing.json()["error"]["code"] == "missing_token"
    chat_only = httpx.get(url, headers=bearer(issuer.token(scope="sidecar:chat")))
    assert chat_only.status_code == 403
    assert "sidecar:metrics" in chat_only.json()["error"]["message"]
    for scope in ("sidecar:metrics", "sidecar:admin"):
        allowed = httpx.get(url, headers=bearer(issuer.token(scope=scope)))
        assert allowed.status_code == 200, (scope, allowed.text)
        assert "llm_sidecar_requests_total" in allowed.text
    # The refusals are logged with their reason, as on every other path.
    assert secured.wait_for_log('"auth_error":"missing_token"')


def test_the_loopback_listener_serves_metrics_without_a_token_and_the_main_one_none(
        sidecar_factory: Factory, mock_upstream: MockUpstream, issuer: Issuer) -> None:
    secured = sidecar_factory(secured_config(
        mock_upstream, issuer, '\n[metrics]\nlisten = "127.0.0.1:0"\npath = "/scrape"\n'))
    assert secured.wait_for_log('"metrics_url"')
    found = re.search(r'"metrics_url":"(http://127\.0\.0\.1:\d+/scrape)"', secured.logs())
    assert found, secured.logs()
    token = issuer.token(scope="sidecar:chat")
    assert httpx.post(secured.base_url + "/chat/completions", headers=bearer(token),
                      json={"model": "gpt-test", "messages": USER}).status_code == 200
    scraped = httpx.get(found[1])
    assert scraped.status_code == 200
    assert re.search(r'llm_sidecar_requests_total\{[^}]*model="gpt-test"[^}]*\} 1\.0',
                     scraped.text), scraped.text[:2000]
    admin = bearer(issuer.token(scope="sidecar:admin"))
    assert httpx.get(secured.url + "/scrape", headers=admin).status_code == 404
    assert httpx.get(secured.url + "/metrics", headers=admin).status_code == 404


def test_with_auth_off_metrics_refuse_another_sites_host(sidecar: Sidecar) -> None:
    assert httpx.get(sidecar.url + "/metrics").status_code == 200
    rebound = httpx.get(sidecar.url + "/metrics", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403
    assert rebound.json()["error"]["code"] == "host_not_allowed"


def test_metrics_off_serve_neither_metrics_nor_stats(sidecar_factory: Factory) -> None:
    off = sidecar_factory(extra="\n[metrics]\nenabled = false\n")
    assert httpx.post(off.base_url + "/chat/completions",
                      json={"model": "gpt-test", "messages": USER}).status_code == 200
    assert httpx.get(off.url + "/metrics").status_code == 404
    assert httpx.get(off.url + "/admin/api/stats").status_code == 404


def test_a_refusal_of_the_request_budget_is_counted_once(sidecar_factory: Factory) -> None:
    limited = sidecar_factory(extra="\n[limits]\nrequests_per_minute = 1\n")
    statuses = [httpx.post(limited.base_url + "/chat/completions",
                           json={"model": "gpt-test", "messages": USER}).status_code
                for _ in range(2)]
    assert statuses == [200, 429]
    text = httpx.get(limited.url + "/metrics").text
    assert 'llm_sidecar_rate_limit_refusals_total{limit="requests"} 1.0' in text
    assert re.search(r'llm_sidecar_requests_total\{[^}]*status_class="4xx"[^}]*\} 1\.0', text)


SPLIT = """
[models."split"]
targets = [ { provider = "mock", model = "mock-a", weight = 1 },
            { provider = "mock", model = "mock-b", weight = 1 } ]
"""


def test_stats_give_rate_latency_errors_and_traffic_share_per_target(
        sidecar_factory: Factory) -> None:
    counted = sidecar_factory(extra=SPLIT)
    with httpx.Client(base_url=counted.base_url, timeout=30) as client:
        for _ in range(40):
            assert client.post("/chat/completions", json={
                "model": "split", "messages": USER}).status_code == 200
        for _ in range(2):
            assert client.post("/chat/completions", json={
                "model": "dead", "messages": USER}).status_code == 502
    stats = httpx.get(counted.url + "/admin/api/stats").json()["windows"]
    assert set(stats) == {"1m", "5m"}
    for window, seconds in (("1m", 60), ("5m", 300)):
        rows = {(r["model"], r["target"]): r for r in stats[window]}
        split = [rows[("split", t)] for t in ("mock/mock-a", "mock/mock-b")]
        assert sum(r["requests"] for r in split) == 40
        assert sum(r["traffic_share"] for r in split) == pytest.approx(1.0)
        for row in split:
            # Weights 1:1 over 40 requests: a share outside this is a 1 in 10,000 event.
            assert 0.15 < row["traffic_share"] < 0.85
            assert row["error_share"] == 0.0
            assert row["rate_per_s"] == round(row["requests"] / seconds, 3)
            assert 0 < row["p50_ms"] <= row["p95_ms"]
        # Failures are charged to the target that failed.
        dead = rows[("dead", "dead/nothing")]
        assert (dead["requests"], dead["error_share"]) == (2, 1.0)


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.168.1.5:9464", "localhost:9464",
                                    "127.0.0.1", "127.0.0.1:99999"])
def test_a_metrics_listener_must_be_a_loopback_address_and_port(listen: str) -> None:
    with pytest.raises(config.ConfigError, match=r"`metrics\.listen`"):
        config.from_mapping({"models": {"m": {"targets": [{"provider": "p"}]}},
                             "providers": {"p": {"kind": "openai",
                                                 "base_url": "http://127.0.0.1:1/v1"}},
                             "metrics": {"listen": listen}})


@pytest.mark.parametrize("path", ["metrics", "/v1/metrics", "/admin/metrics", "/healthz",
                                  "/metrics?x=1"])
def test_the_metrics_path_must_be_a_path_of_its_own(path: str) -> None:
    with pytest.raises(config.ConfigError, match=r"`metrics\.path`"):
        config.from_mapping({"models": {"m": {"targets": [{"provider": "p"}]}},
                             "providers": {"p": {"kind": "openai",
                                                 "base_url": "http://127.0.0.1:1/v1"}},
                             "metrics": {"path": path}})


def test_the_served_certificates_expiry_is_a_gauge(sidecar_factory: Factory,
                                                   tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "sidecar", "gen-cert", "--out", str(tmp_path),
                           "--hosts", "127.0.0.1", "--days", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    served = sidecar_factory(server=f'tls_cert = "{tmp_path / "cert.pem"}"\n'
                                    f'tls_key = "{tmp_path / "key.pem"}"')
    expires = x509.load_pem_x509_certificate(
        (tmp_path / "cert.pem").read_bytes()).not_valid_after_utc.timestamp()
    text = httpx.get(served.url + "/metrics",
                     verify=ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))).text
    found = re.search(r"^llm_sidecar_tls_certificate_expiry_timestamp_seconds (\S+)$", text,
                      re.M)
    assert found, text[-2000:]
    assert float(found[1]) == expires


def test_a_dead_redis_shows_as_failures_and_an_open_circuit(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{closed_port()}/0"
    counted = start_sidecar(base_config(mock_upstream, extra=f"""
[cache]
enabled = true
redis_url = "{dead}"
secret_env = "SIDECAR_CACHE_SECRET"
circuit_s = 30
"""), tmp_path, env={"SIDECAR_CACHE_SECRET": "fleet-cache-secret-0123456789abcdef"})
    try:
        before = httpx.get(counted.url + "/metrics").text
        assert "llm_sidecar_cache_redis_circuit_open" in before  # exported from the start
        reply = httpx.post(counted.base_url + "/chat/completions", timeout=30, json={
            "model": "gpt-test", "messages": USER, "temperature": 0})
        assert reply.status_code == 200  # Redis is an accelerator: the answer comes uncached
        after = httpx.get(counted.url + "/metrics").text
    finally:
        counted.stop()
    failures = re.search(r"^llm_sidecar_cache_redis_failures_total (\S+)$", after, re.M)
    assert failures is not None and float(failures[1]) >= 1
    assert "llm_sidecar_cache_redis_circuit_open 1.0" in after
