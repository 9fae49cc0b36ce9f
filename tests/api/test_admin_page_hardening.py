"""The admin page against what another site can make a browser do, over plain HTTP with the
app served in the test's loop: security headers on every answer under /admin/ (errors too),
no confirm form prepared by a link from elsewhere, CSRF tokens that no flood of visits can
evict, a limit on login attempts per address, and the cookie's Secure setting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar import config
from sidecar.app import create_app
from sidecar.errors import RateLimited
from sidecar.security.login_attempts import LoginAttempts
from tests.api.test_admin_page import CSP, admin_token, settings_for
from tests.support.admin_page import PageClient
from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.in_process import serving
from tests.support.sidecar import UPSTREAM_KEY
from tests.support.upstream_mock import MockUpstream

LOCAL_ENGINE = """
[providers.local]
kind = "local"
engine = "transformers"
max_seq_len = 256
max_batch_size = 1

[models."local"]
targets = [ { provider = "local" } ]
"""


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("issuer"))


async def _client(settings: config.Settings) -> AsyncIterator[PageClient]:
    async with serving(create_app(settings)) as url, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield PageClient(http, url)


@pytest.fixture
async def secured(mock_upstream: MockUpstream, issuer: Issuer, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PageClient]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    auth = jwt_config(f'public_key_file = "{issuer.public_path}"')
    async for client in _client(settings_for(mock_upstream, tmp_path, auth)):
        yield client


@pytest.fixture
async def local(mock_upstream: MockUpstream, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PageClient]:
    """Auth off, with a local provider whose engine the page can load and unload."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    async for client in _client(settings_for(mock_upstream, tmp_path, LOCAL_ENGINE)):
        yield client


# -- headers -------------------------------------------------------------------------------


async def test_errors_under_admin_carry_the_security_headers(secured: PageClient) -> None:
    for method, path, status in [("GET", "/admin/static/nope.js", 404),
                                 ("GET", "/admin/nope", 404), ("PUT", "/admin/login", 405),
                                 ("POST", "/admin/", 405)]:
        async with secured.http.request(method, secured.url + path,
                                        allow_redirects=False) as answer:
            assert answer.status == status, (method, path)
            assert answer.headers.get("Content-Security-Policy") == CSP, (method, path)
            assert answer.headers.get("X-Content-Type-Options") == "nosniff", (method, path)
            assert answer.headers.get("X-Frame-Options") == "DENY", (method, path)
            assert answer.headers.get("Cache-Control") == "no-store", (method, path)
            assert (await answer.json())["error"]["message"], (method, path)
    # The JSON API's answers are not pages: no page policy there.
    async with secured.http.get(secured.url + "/admin/api/nope") as answer:
        assert answer.status in (401, 404)
        assert "Content-Security-Policy" not in answer.headers


# -- auth off: CSRF tokens without sessions ------------------------------------------------


async def test_visits_from_elsewhere_cannot_evict_the_operators_form(
        mock_upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    settings = settings_for(mock_upstream, tmp_path, "\n[admin_page]\nmax_sessions = 2\n")
    async for operator in _client(settings):
        page = await operator.get("/admin/cache")
        assert page.status == 200
        csrf, cookies = page.field("csrf"), dict(operator.cookies)
        # Another site's page makes the browser load /admin/ without the Strict cookie,
        # far more often than sessions would be kept.
        for _ in range(20):
            async with operator.http.get(operator.url + "/admin/",
                                         headers={"Sec-Fetch-Site": "cross-site"}) as answer:
                assert answer.status == 200
                await answer.read()
        operator.cookies = cookies
        flushed = await operator.post("/admin/cache", {"csrf": csrf, "scope": "all"},
                                      Sec_Fetch_Site="same-origin")
        assert flushed.status == 303, flushed.text[:200]
        # A token is good only with the cookie it came with.
        operator.cookies = {}
        other = await operator.get("/admin/cache")
        assert other.field("csrf") != csrf
        refused = await operator.post("/admin/cache", {"csrf": csrf, "scope": "all"},
                                      Sec_Fetch_Site="same-origin")
        assert refused.status == 403 and "CSRF" in refused.text


# -- auth off: a confirm step only from this page ------------------------------------------

CONFIRM_LOAD = "/admin/engines/confirm?name=local&action=load&model=/tmp/elsewhere-model"


async def test_a_link_from_elsewhere_cannot_prepare_an_engine_change(local: PageClient) -> None:
    # Another site links to the confirm step: refused, nothing of the change on the page.
    for site in ("cross-site", "same-site"):
        linked = await local.get(CONFIRM_LOAD, Sec_Fetch_Site=site)
        assert linked.status == 403, site
        assert linked.json_error["type"] == "permission_error"
        assert "elsewhere-model" not in linked.text and 'name="csrf"' not in linked.text
    # A browser that does not say where the request came from, without the page's cookie:
    # the engines page, not a confirm form holding a token of the visit this request opened.
    local.cookies = {}
    fresh = await local.get(CONFIRM_LOAD)
    assert fresh.status == 200 and "sidecar_session" in local.cookies
    assert "elsewhere-model" not in fresh.text and 'value="yes"' not in fresh.text
    assert "Choose the change on this page" in fresh.text
    # The operator's own step, from the engines page: the confirm form.
    mine = await local.get(CONFIRM_LOAD, Sec_Fetch_Site="same-origin")
    assert mine.status == 200
    assert 'name="model" value="/tmp/elsewhere-model"' in mine.text
    assert mine.field("csrf")


# -- login attempts ------------------------------------------------------------------------


async def test_login_attempts_are_limited_per_address(
        mock_upstream: MockUpstream, issuer: Issuer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    auth = jwt_config(f'public_key_file = "{issuer.public_path}"')
    limit = "\n[admin_page]\nlogin_attempts_per_minute = 3\n"
    async for browser in _client(settings_for(mock_upstream, tmp_path, auth + limit)):
        nonce = (await browser.get("/admin/login")).field("nonce")
        for _ in range(3):
            refused = await browser.post("/admin/login", {"token": "not.a.token",
                                                          "nonce": nonce})
            assert refused.status == 401
            nonce = refused.field("nonce")  # each refusal shows the form with a new nonce
        caplog.clear()
        # Past the limit: refused before the token is read, even a good one, and unlogged.
        for token in ("not.a.token", admin_token(issuer)):
            limited = await browser.post("/admin/login", {"token": token, "nonce": nonce})
            assert limited.status == 429
            assert limited.json_error["type"] == "rate_limit_error"
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            assert limited.headers["Cache-Control"] == "no-store"
            assert "sidecar_session" not in browser.cookies
        assert not [r for r in caplog.records if "login refused" in r.getMessage()]


def test_login_attempts_remember_a_bounded_number_of_addresses() -> None:
    attempts = LoginAttempts(per_minute=1, max_addresses=2)
    attempts.take("192.0.2.1")
    with pytest.raises(RateLimited):
        attempts.take("192.0.2.1")
    attempts.take("192.0.2.2")
    attempts.take("192.0.2.3")  # the table is full: the least recently seen goes
    assert len(attempts._seen) == 2 and "192.0.2.1" not in attempts._seen
    attempts.take("192.0.2.1")
    with pytest.raises(RateLimited):
        attempts.take("192.0.2.3")


# -- Secure cookies ------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "secure"), [("true", True), ('"auto"', False),
                                                  ("false", False)])
async def test_secure_cookies_follow_the_setting(
        mock_upstream: MockUpstream, issuer: Issuer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, setting: str, secure: bool) -> None:
    """Plain HTTP here: `true` is for TLS ended in front of the sidecar, `auto` follows
    server.tls_cert (tests/api/test_admin_page_sessions.py has the TLS case)."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    auth = jwt_config(f'public_key_file = "{issuer.public_path}"')
    extra = f"\n[admin_page]\nsecure_cookies = {setting}\n"
    async for browser in _client(settings_for(mock_upstream, tmp_path, auth + extra)):
        answer = await browser.log_in(admin_token(issuer))
        assert answer.status == 303
        prefix = "__Host-" if secure else ""
        session = next(c for c in answer.set_cookies
                       if c.startswith(f"{prefix}sidecar_session="))
        parts = {p.strip().lower() for p in session.split(";")[1:]}
        assert ("secure" in parts) is secure
        assert ("path=/" if secure else "path=/admin") in parts
        assert (await browser.get("/admin/")).status == 200
