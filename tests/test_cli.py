"""The CLI against a running sidecar: `routes` reaches one served over TLS (trusting --cacert or
the config's certificate) and shows each target's health."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.sidecar import ROOT, UPSTREAM_KEY, Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream


def sidecar_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The tests' configs read the upstream's key from the environment, as serve does.
    env = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
    return subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    result = sidecar_cli("gen-cert", "--out", str(out), "--hosts", "localhost,127.0.0.1")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def tls(mock_upstream: MockUpstream, certs: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Sidecar]:
    server = f'tls_cert = "{certs / "cert.pem"}"\ntls_key = "{certs / "key.pem"}"'
    instance = start_sidecar(base_config(mock_upstream, server=server),
                             tmp_path_factory.mktemp("tls"))
    yield instance
    instance.stop()


def config_of(sidecar: Sidecar) -> str:
    return str(sidecar.log_path.parent / "sidecar.toml")


def test_routes_show_trusts_the_ca_given_with_cacert(tls: Sidecar, certs: Path) -> None:
    assert tls.url.startswith("https://")
    result = sidecar_cli("routes", "show", "--url", tls.url, "--cacert", str(certs / "ca.pem"))
    assert result.returncode == 0, result.stderr
    assert "gpt-test" in result.stdout.splitlines()


def test_routes_show_trusts_the_certificate_the_config_serves(tls: Sidecar) -> None:
    result = sidecar_cli("routes", "show", "--url", tls.url, "--config", config_of(tls))
    assert result.returncode == 0, result.stderr
    assert "  mock/mock-gpt  weight 1" in result.stdout


def test_routes_show_without_a_ca_says_how_to_give_one(tls: Sidecar) -> None:
    result = sidecar_cli("routes", "show", "--url", tls.url)
    assert result.returncode == 1
    assert "--cacert" in result.stderr and "Traceback" not in result.stderr


def test_routes_show_prints_a_resting_target(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    sidecar = start_sidecar(base_config(mock_upstream, routing="failures_before_cooldown = 1\n"
                                        "probe_interval_s = 0\ncooldown_s = 600"), tmp_path)
    try:
        failed = httpx.post(sidecar.base_url + "/chat/completions", timeout=10,
                            json={"model": "dead", "messages": [{"role": "user",
                                                                 "content": "x"}]})
        assert failed.status_code >= 500
        result = sidecar_cli("routes", "show", "--url", sidecar.url)
    finally:
        sidecar.stop()
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "dead/nothing" in x)
    assert "(resting " in line
    assert "unreachable" in line.lower() or "reach" in line  # and why it rests
    healthy = next(x for x in result.stdout.splitlines() if "mock/mock-gpt" in x)
    assert "resting" not in healthy
