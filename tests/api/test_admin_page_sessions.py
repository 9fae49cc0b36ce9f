"""Admin page sessions beyond one process and one scheme: a fleet on one real redis-server
accepts a login made on any of its sidecars (and a logout on any ends it everywhere), Redis
keeps only a hash of the id, a weight saved on one page shows in the other's audit, and a
flush of every tenant's answers empties Redis of them; over TLS the cookie is __Host-
prefixed and Secure."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from sidecar import config
from sidecar.app import create_app
from tests.support.admin_page import PageClient
from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.in_process import serving
from tests.support.redis_server import RedisServer
from tests.support.sidecar import ROOT, UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream

SECRET = "fleet-admin-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def load(text: str, path: Path) -> config.Settings:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("@STATE@", str(path.parent / "state.json")))
    return config.load(path)


async def test_a_fleet_on_one_redis_shares_sessions(
        mock_upstream: MockUpstream, issuer: Issuer, redis_server: RedisServer,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("SIDECAR_CACHE_SECRET", SECRET)
    text = base_config(mock_upstream, extra=f"""
[cache]
enabled = true
redis_url = "{redis_server.url}"
secret_env = "SIDECAR_CACHE_SECRET"
""") + jwt_config(f'public_key_file = "{issuer.public_path}"')
    async with serving(create_app(load(text, tmp_path / "one" / "c.toml"))) as one, \
            serving(create_app(load(text, tmp_path / "two" / "c.toml"))) as two, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        first = PageClient(http, one)
        assert (await first.log_in(issuer.token(scope="sidecar:admin", sub="ops"))).status == 303
        session_id = first.cookies["sidecar_session"]
        second = PageClient(http, two, dict(first.cookies))
        page = await second.get("/admin/routing")
        assert page.status == 200 and "gpt-test" in page.text
        kept = redis_server.stored()
        assert f"sc:session:{hashlib.sha256(session_id.encode()).hexdigest()}" in kept
        assert not any(session_id in key for key in kept)
        # A weight saved on one sidecar's page reaches the other, whose audit page says so.
        saved = await first.post("/admin/routing", {
            "csrf": page.field("csrf"), "model": "gpt-test", "targets": "1", "action": "save",
            "provider_0": "mock", "model_0": "mock-gpt", "weight_0": "7"})
        assert saved.status == 303
        deadline = time.monotonic() + 5
        while "mock/mock-gpt=7.0" not in (audit := (await second.get("/admin/audit")).text):
            assert time.monotonic() < deadline, "the change did not reach the other sidecar"
            await asyncio.sleep(0.05)
        assert "<td>sidecar " in audit and "<td>ops</td>" not in audit
        assert "<td>ops</td>" in (await first.get("/admin/audit")).text
        # Flushing every tenant's answers on one sidecar empties Redis of them too (else
        # they would come straight back); sessions stay.
        chat = openai.AsyncOpenAI(base_url=one + "/v1", api_key=issuer.token(), max_retries=0)
        await chat.chat.completions.create(model="gpt-test", temperature=0, messages=[
            {"role": "user", "content": "kept in redis"}])
        await chat.close()
        deadline = time.monotonic() + 5
        while not [k for k in redis_server.stored() if len(k) == 3 + 64]:
            assert time.monotonic() < deadline, "the answer was not stored in redis"
            await asyncio.sleep(0.05)
        page = await second.get("/admin/cache")
        flushed = await second.post("/admin/cache", {"csrf": page.field("csrf"), "scope": "all"})
        assert flushed.headers["Location"] == "/admin/cache?dropped=0&redis=1"
        left = redis_server.stored()
        assert not [k for k in left if len(k) == 3 + 64] and any("session:" in k for k in left)
        shown = await second.get("/admin/cache?dropped=0&redis=1")
        assert "0 answers dropped in this process, 1 in Redis." in shown.text
        assert (await second.post("/admin/logout", {"csrf": page.field("csrf")})).status == 303
        assert (await first.get("/admin/")).headers.get("Location") == "/admin/login"


@contextlib.asynccontextmanager
async def serving_tls(app: web.Application, certs: Path) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_over_tls_the_cookie_is_host_prefixed_and_secure(
        mock_upstream: MockUpstream, issuer: Issuer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    made = subprocess.run([sys.executable, "-m", "sidecar", "gen-cert", "--out", str(tmp_path),
                           "--hosts", "127.0.0.1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    text = base_config(mock_upstream, server=(
        f'tls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"'
    )) + jwt_config(f'public_key_file = "{issuer.public_path}"')
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    async with serving_tls(create_app(load(text, tmp_path / "c.toml")), tmp_path) as url, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                  connector=aiohttp.TCPConnector(ssl=trust)) as http:
        client = PageClient(http, url)
        answer = await client.log_in(issuer.token(scope="sidecar:admin"))
        assert answer.status == 303
        session = next(c for c in answer.set_cookies if c.startswith("__Host-sidecar_session="))
        parts = {p.strip().lower() for p in session.split(";")[1:]}
        assert {"secure", "httponly", "path=/", "samesite=strict"} <= parts
        assert not any(p.startswith("domain") for p in parts)
        assert (await client.get("/admin/")).status == 200


async def test_with_redis_away_a_login_is_refused_not_kept_elsewhere(
        mock_upstream: MockUpstream, issuer: Issuer, redis_server: RedisServer,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("SIDECAR_CACHE_SECRET", SECRET)
    text = base_config(mock_upstream, extra=f"""
[cache]
enabled = true
redis_url = "{redis_server.url}"
secret_env = "SIDECAR_CACHE_SECRET"
timeout_ms = 100
""") + jwt_config(f'public_key_file = "{issuer.public_path}"')
    async with serving(create_app(load(text, tmp_path / "c.toml"))) as url, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        client = PageClient(http, url)
        form = await client.get("/admin/login")
        redis_server.pause()
        try:
            answer = await client.post("/admin/login", {
                "token": issuer.token(scope="sidecar:admin"), "nonce": form.field("nonce")})
        finally:
            redis_server.resume()
        assert answer.status == 503 and "session_store_unavailable" in answer.text
        assert "sidecar_session" not in client.cookies
