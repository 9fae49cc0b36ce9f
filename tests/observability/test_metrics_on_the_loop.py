"""The metrics never block the event loop: the app in this process under blockbuster, counting
requests and answering scrapes (the certificate read for its expiry included) and stats."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import config
from sidecar.app import create_app
from tests.support.in_process import no_blocking, serving
from tests.support.sidecar import ROOT, UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def in_process(mock_upstream: MockUpstream, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    made = subprocess.run([sys.executable, "-m", "sidecar", "gen-cert", "--out", str(tmp_path),
                           "--hosts", "127.0.0.1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    # The certificate is configured only for its expiry: this listener itself is plain HTTP.
    path = tmp_path / "c.toml"
    path.write_text(base_config(mock_upstream, server=(
        f'tls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"')))
    async with serving(create_app(config.load(path))) as url, \
            httpx.AsyncClient(base_url=url) as client:
        with no_blocking():
            yield client


async def test_counting_scraping_and_stats_never_block_the_event_loop(
        in_process: httpx.AsyncClient) -> None:
    answered = await in_process.post("/v1/chat/completions",
                                     json={"model": "gpt-test", "messages": USER})
    assert answered.status_code == 200
    async with in_process.stream("POST", "/v1/chat/completions", json={
            "model": "gpt-test", "messages": USER, "stream": True}) as streamed:
        assert streamed.status_code == 200
        await streamed.aread()
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        scraped = await in_process.get("/metrics", headers={"Accept": accept,
                                                             "Accept-Encoding": "gzip"})
        assert scraped.status_code == 200
    names = {f.name for f in text_string_to_metric_families(
        (await in_process.get("/metrics")).text)}
    assert "llm_sidecar_tls_certificate_expiry_timestamp_seconds" in names
    stats = await in_process.get("/admin/api/stats")
    assert stats.json()["windows"]["1m"][0]["requests"] == 2
