"""The admin page over plain HTTP, the app served in the test's loop: login and sessions,
CSRF and cross-site refusals, cookie attributes and security headers, bad weights refused with
the error on the page, hostile names shown escaped, and no page handler blocking the loop."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from sidecar import config
from sidecar.app import create_app
from tests.support.admin_page import PageClient
from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.in_process import no_blocking, serving
from tests.support.sidecar import UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream

HOSTILE_MODEL = "<script>alert('model')</script>"
HOSTILE_WHO = '<img src=x onerror="alert(1)">'
PAIR = f"""
[models."pair"]
targets = [ {{ provider = "mock", model = "a", weight = 1 }},
            {{ provider = "mock", model = "b", weight = 3 }} ]

[models."{HOSTILE_MODEL}"]
targets = [ {{ provider = "mock", model = "x" }} ]

[cache]
enabled = true
"""
CSP = "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"


def settings_for(mock: MockUpstream, tmp_path: Path, auth: str) -> config.Settings:
    path = tmp_path / "sidecar.toml"
    path.write_text(base_config(mock, extra=PAIR + auth).replace(
        "@STATE@", str(tmp_path / "state.json")))
    return config.load(path)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture
async def secured(mock_upstream: MockUpstream, issuer: Issuer, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PageClient]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    settings = settings_for(mock_upstream, tmp_path,
                            jwt_config(f'public_key_file = "{issuer.public_path}"'))
    async with serving(create_app(settings)) as url, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield PageClient(http, url)


@pytest.fixture
async def local(mock_upstream: MockUpstream, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PageClient]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    async with serving(create_app(settings_for(mock_upstream, tmp_path, ""))) as url, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield PageClient(http, url)


def admin_token(issuer: Issuer, **claims: object) -> str:
    return issuer.token(scope="sidecar:admin", sub=claims.pop("sub", "ops"), **claims)


async def pair_weights(client: PageClient, token: str | None = None) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.http.get(client.url + "/admin/api/routes", headers=headers) as response:
        assert response.status == 200
        routes = await response.json()
    return [t["weight"] for t in routes["models"]["pair"]]


def weights_form(csrf: str, weights: list[str], **more: str) -> dict[str, str]:
    form = {"csrf": csrf, "model": "pair", "targets": str(len(weights)), "action": "save"}
    for i, (upstream, weight) in enumerate(zip(("a", "b"), weights, strict=False)):
        form |= {f"provider_{i}": "mock", f"model_{i}": upstream, f"weight_{i}": weight}
    return form | more


# -- logging in ----------------------------------------------------------------------------


async def test_an_admin_token_logs_in_and_the_session_ends_with_the_token(
        secured: PageClient, issuer: Issuer) -> None:
    assert (await secured.get("/admin/")).headers["Location"] == "/admin/login"
    expires_in = 900
    token = admin_token(issuer, exp=int(time.time()) + expires_in)
    answer = await secured.log_in(token)
    assert answer.status == 303 and answer.headers["Location"] == "/admin/"
    session = [c for c in answer.set_cookies if c.startswith("sidecar_session=")]
    assert len(session) == 1
    max_age = int(re.search(r"Max-Age=(\d+)", session[0]).group(1))  # type: ignore[union-attr]
    assert expires_in - 5 <= max_age <= expires_in
    # The token is never echoed into a cookie or a page.
    assert all(token not in c for c in answer.set_cookies)
    overview = await secured.get("/admin/")
    assert overview.status == 200 and "pair" in overview.text and token not in overview.text


async def test_cookie_attributes(secured: PageClient, issuer: Issuer) -> None:
    login_form = await secured.get("/admin/login")
    nonce_cookie = login_form.set_cookies[0]
    assert "HttpOnly" in nonce_cookie and "SameSite=Strict" in nonce_cookie
    answer = await secured.log_in(admin_token(issuer))
    session = next(c for c in answer.set_cookies if c.startswith("sidecar_session="))
    attributes = {part.strip().split("=")[0].lower(): part.strip()
                  for part in session.split(";")[1:]}
    assert attributes["path"] == "Path=/admin"
    assert "httponly" in attributes
    assert attributes["samesite"] == "SameSite=Strict"
    assert "secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    session_id = session.split(";")[0].split("=", 1)[1]
    assert len(session_id) == 43  # 32 random bytes, url-safe base64


async def test_a_chat_scope_token_cannot_log_in(secured: PageClient, issuer: Issuer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    token = issuer.token(scope="sidecar:chat")
    with caplog.at_level(logging.INFO, logger="sidecar.audit"):
        answer = await secured.log_in(token)
    assert answer.status == 403
    assert "sidecar:admin" in answer.text and token not in answer.text
    assert "sidecar_session" not in secured.cookies
    assert (await secured.get("/admin/")).status == 303
    refused = [r for r in caplog.records if r.getMessage() == "admin page login refused"]
    assert len(refused) == 1 and refused[0].fields["reason"] == "insufficient_scope"
    assert all(token not in str(vars(r)) for r in caplog.records)


async def test_a_forged_or_missing_token_cannot_log_in(secured: PageClient,
                                                        issuer: Issuer) -> None:
    for token in ("", "not-a-jwt", admin_token(issuer)[:-4] + "AAAA"):
        answer = await secured.log_in(token)
        assert answer.status == 401, token
        assert "sidecar_session" not in secured.cookies


async def test_the_login_form_needs_its_nonce(secured: PageClient, issuer: Issuer) -> None:
    await secured.get("/admin/login")
    answer = await secured.post("/admin/login", {"token": admin_token(issuer),
                                                 "nonce": "guessed"})
    assert answer.status == 403 and "csrf_failed" in answer.text
    assert "sidecar_session" not in secured.cookies


async def test_a_session_is_refused_after_logout(secured: PageClient, issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer))
    page = await secured.get("/admin/routing")
    kept = dict(secured.cookies)
    logout = await secured.post("/admin/logout", {"csrf": page.field("csrf")})
    assert logout.status == 303 and "sidecar_session" not in secured.cookies
    secured.cookies = kept  # a copy of the cookie, kept after logout
    assert (await secured.get("/admin/")).headers.get("Location") == "/admin/login"
    refused = await secured.post("/admin/routing", weights_form(page.field("csrf"), ["5", "5"]))
    assert refused.status == 403
    assert await pair_weights(secured, admin_token(issuer)) == [1.0, 3.0]


async def test_the_json_admin_api_never_accepts_the_cookie(secured: PageClient,
                                                            issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer))
    cookie = "; ".join(f"{k}={v}" for k, v in secured.cookies.items())
    async with secured.http.get(secured.url + "/admin/api/routes",
                                headers={"Cookie": cookie}) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "missing_token"


# -- forms ---------------------------------------------------------------------------------


async def test_a_post_without_the_csrf_token_is_refused(secured: PageClient,
                                                         issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer))
    page = await secured.get("/admin/routing")
    for csrf in ("", "x" * 43):
        refused = await secured.post("/admin/routing", weights_form(csrf, ["5", "5"]))
        assert refused.status == 403 and "csrf_failed" in refused.text
    flush = await secured.post("/admin/cache", {"scope": "all"})
    assert flush.status == 403
    assert await pair_weights(secured, admin_token(issuer)) == [1.0, 3.0]
    # The same form with its token goes through, as Chromium sends it (with no-referrer, a
    # form's Origin is `null`, and Sec-Fetch-Site says where it came from).
    saved = await secured.post("/admin/routing", weights_form(page.field("csrf"), ["5", "5"]),
                               Origin="null", Sec_Fetch_Site="same-origin")
    assert saved.status == 303
    assert await pair_weights(secured, admin_token(issuer)) == [5.0, 5.0]


async def test_a_multipart_form_is_refused_unread(secured: PageClient, issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer))
    page = await secured.get("/admin/routing")
    form = aiohttp.FormData({"csrf": page.field("csrf"), "scope": "all"})
    form.add_field("upload", b"x" * 1024, filename="big.bin")
    cookie = "; ".join(f"{k}={v}" for k, v in secured.cookies.items())
    async with secured.http.post(secured.url + "/admin/cache", data=form,
                                 headers={"Cookie": cookie}) as response:
        assert response.status == 415


async def test_a_link_from_another_site_opens_the_page(secured: PageClient,
                                                        issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer))
    # Reading changes nothing: a navigation from another site is not refused (a browser
    # would not send the SameSite=Strict cookie with it, and the page asks for a login).
    opened = await secured.get("/admin/", Sec_Fetch_Site="cross-site")
    assert opened.status == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
])
async def test_a_form_from_another_site_is_refused(secured: PageClient, issuer: Issuer,
                                                   headers: dict[str, str]) -> None:
    await secured.log_in(admin_token(issuer))
    page = await secured.get("/admin/routing")
    refused = await secured.post("/admin/routing", weights_form(page.field("csrf"), ["5", "5"]),
                                 **headers)
    assert refused.status == 403
    assert await pair_weights(secured, admin_token(issuer)) == [1.0, 3.0]


@pytest.mark.parametrize(("weights", "extra", "shown"), [
    (["-1", "3"], {}, "must be a number from 0"),
    (["NaN", "3"], {}, "must be a number from 0"),
    (["heavy", "3"], {}, "is not a number"),
    (["1e999", "3"], {}, "must be a number from 0"),
    (["1", "3"], {"provider_1": "nobody"}, "unknown provider"),
    (["0", "0"], {}, "no routable target"),
])
async def test_a_bad_weight_shows_the_error_and_changes_nothing(
        secured: PageClient, issuer: Issuer, weights: list[str], extra: dict[str, str],
        shown: str) -> None:
    await secured.log_in(admin_token(issuer))
    page = await secured.get("/admin/routing")
    answer = await secured.post("/admin/routing",
                                weights_form(page.field("csrf"), weights, **extra))
    assert answer.status == 400
    assert 'role="alert"' in answer.text and shown in answer.text
    assert "<table>" in answer.text  # the page itself, not a bare error
    assert await pair_weights(secured, admin_token(issuer)) == [1.0, 3.0]


async def test_drain_and_back_to_config(secured: PageClient, issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer))
    page = await secured.get("/admin/routing")
    drained = await secured.post("/admin/routing",
                                 weights_form(page.field("csrf"), ["1", "3"], drain="1"))
    assert drained.status == 303
    assert await pair_weights(secured, admin_token(issuer)) == [1.0, 0.0]
    changed = await secured.get("/admin/routing")
    assert changed.text.count('class="marker">changed') >= 2
    back = await secured.post("/admin/routing", {"csrf": page.field("csrf"), "model": "pair",
                                                 "action": "reset"})
    assert back.status == 303
    assert await pair_weights(secured, admin_token(issuer)) == [1.0, 3.0]
    audit = await secured.get("/admin/audit")
    rows = re.findall(r"<tr>\s*<td>[^<]+</td>\s*<td>ops</td>\s*<td>routes changed</td>",
                      audit.text)
    assert len(rows) == 2
    # Newest first: the return to the config (b back at 3) is the first row.
    after = re.findall(r"<td><code>([^<]*)</code></td>\s*</tr>", audit.text)
    assert "mock/b=3.0" in after[0] and "mock/b=0.0" in after[1]


async def test_hostile_names_are_shown_escaped(secured: PageClient, issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer, sub=HOSTILE_WHO))
    page = await secured.get("/admin/routing")
    await secured.post("/admin/cache", {"csrf": page.field("csrf"), "scope": "all"})
    for path in ("/admin/", "/admin/routing", "/admin/audit"):
        shown = (await secured.get(path)).text
        assert HOSTILE_MODEL not in shown and HOSTILE_WHO not in shown
        assert "<script>alert" not in shown and "<img src=x" not in shown
    assert "&lt;script&gt;alert(&#39;model&#39;)&lt;/script&gt;" in \
        (await secured.get("/admin/")).text
    audit = (await secured.get("/admin/audit")).text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in audit


async def test_every_page_carries_the_security_headers(secured: PageClient,
                                                        issuer: Issuer) -> None:
    seen = [await secured.get(path) for path in
            ("/admin/login", "/admin/static/admin.js", "/admin/static/admin.css")]
    await secured.log_in(admin_token(issuer))
    pages = ["/admin/", "/admin/routing", "/admin/engines", "/admin/cache", "/admin/audit"]
    seen += [await secured.get(path) for path in pages]
    for path, answer in zip(["login", "js", "css", *pages], seen, strict=True):
        assert answer.status == 200, path
        assert answer.headers["Content-Security-Policy"] == CSP, path
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        # No inline script or style anywhere: CSP would block it, and nothing needs it.
        assert "<script>" not in answer.text and "style=" not in answer.text, path
        assert "onclick" not in answer.text
    js = await secured.get("/admin/static/admin.js")
    assert js.headers["Content-Type"].startswith("text/javascript")


async def test_the_cache_flush_form(secured: PageClient, issuer: Issuer) -> None:
    await secured.log_in(admin_token(issuer))
    page = await secured.get("/admin/cache")
    empty = await secured.post("/admin/cache", {"csrf": page.field("csrf"), "scope": "tenant",
                                                "tenant": ""})
    assert empty.status == 400 and "Name the tenant" in empty.text
    flushed = await secured.post("/admin/cache", {"csrf": page.field("csrf"), "scope": "all"})
    assert flushed.status == 303 and flushed.headers["Location"] == "/admin/cache?dropped=0"


# -- auth off ------------------------------------------------------------------------------


async def test_with_auth_off_the_page_is_open_on_loopback_with_csrf(
        local: PageClient) -> None:
    page = await local.get("/admin/routing")
    assert page.status == 200 and "sidecar_session" in local.cookies
    assert "Log out" not in page.text
    refused = await local.post("/admin/routing", weights_form("", ["2", "2"]))
    assert refused.status == 403
    rebound = await local.get("/admin/", Host="evil.example")
    assert rebound.status == 403
    saved = await local.post("/admin/routing", weights_form(page.field("csrf"), ["2", "2"]))
    assert saved.status == 303
    assert await pair_weights(local) == [2.0, 2.0]
    audit = await local.get("/admin/audit")
    assert "<td>anonymous</td>" in audit.text


async def test_page_handlers_never_block_the_event_loop(secured: PageClient,
                                                         issuer: Issuer) -> None:
    token = admin_token(issuer)
    with no_blocking():
        await secured.log_in(token)
        for path in ("/admin/", "/admin/routing", "/admin/engines", "/admin/cache",
                     "/admin/audit", "/admin/static/admin.js"):
            assert (await secured.get(path)).status == 200
        page = await secured.get("/admin/routing")
        assert (await secured.post("/admin/routing",
                                   weights_form(page.field("csrf"), ["2", "1"]))).status == 303
        assert (await secured.post("/admin/cache", {"csrf": page.field("csrf"),
                                                    "scope": "all"})).status == 303
        assert (await secured.post("/admin/logout", {"csrf": page.field("csrf")})).status == 303


async def test_the_json_api_flushes_one_tenants_answers(secured: PageClient,
                                                        issuer: Issuer) -> None:
    chat = openai.AsyncOpenAI(base_url=secured.url + "/v1", api_key=issuer.token(sub="tenant-a"))
    for _ in range(2):
        await chat.chat.completions.create(
            model="gpt-test", temperature=0,
            messages=[{"role": "user", "content": "kept"}])
    await chat.close()
    admin = {"Authorization": f"Bearer {admin_token(issuer)}"}

    async def flush(body: object) -> tuple[int, dict[str, object]]:
        async with secured.http.post(secured.url + "/admin/api/cache/flush", json=body,
                                     headers=admin) as response:
            return response.status, await response.json()

    async with secured.http.get(secured.url + "/admin/api/cache", headers=admin) as response:
        counts = await response.json()
    assert counts["hit"] == 1 and counts["memory_entries"] == 1
    status, refused = await flush({"tenant": 5})
    assert status == 400 and refused["error"]["param"] == "tenant"
    assert (await flush({"who": "x"}))[0] == 400
    assert await flush({"tenant": "tenant-b"}) == (200, {"dropped": {"memory": 0, "redis": None}})
    assert await flush({"tenant": "tenant-a"}) == (200, {"dropped": {"memory": 1, "redis": None}})
    assert await flush({}) == (200, {"dropped": {"memory": 0, "redis": None}})


async def test_a_session_ends_on_the_server_when_its_time_is_up(
        mock_upstream: MockUpstream, issuer: Issuer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    settings = settings_for(mock_upstream, tmp_path, jwt_config(
        f'public_key_file = "{issuer.public_path}"') + "\n[admin_page]\nsession_ttl_s = 1\n")
    async with serving(create_app(settings)) as url, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        client = PageClient(http, url)
        answer = await client.log_in(admin_token(issuer))
        assert "Max-Age=1;" in next(c for c in answer.set_cookies if "sidecar_session=" in c)
        assert (await client.get("/admin/")).status == 200
        await asyncio.sleep(1.1)
        # The browser would have dropped the cookie; a kept copy is refused all the same.
        assert (await client.get("/admin/")).headers.get("Location") == "/admin/login"


@pytest.mark.parametrize(("extra", "status", "shown"), [
    ("\n[metrics]\nenabled = false\n", 200, "Metrics are off"),
    ("\n[admin_page]\nenabled = false\n", 404, "Unknown request URL"),
])
async def test_the_page_without_metrics_or_turned_off(
        mock_upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        extra: str, status: int, shown: str) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    async with serving(create_app(settings_for(mock_upstream, tmp_path, extra))) as url, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        client = PageClient(http, url)
        answer = await client.get("/admin/")
        assert answer.status == status and shown in answer.text
        # The JSON admin API is there either way.
        assert (await pair_weights(client)) == [1.0, 3.0]
