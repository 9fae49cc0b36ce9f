"""A browser on the same machine, with auth off: another site's page cannot drive the API or the
admin API (Origin), a rebound DNS name cannot either (Host), and bodies a page may send without
asking first (text/plain, forms) are refused; SDKs and curl, which send no Origin, are served."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import orjson

from tests.support.sidecar import Sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "gpt-test", "messages": USER}
EVIL = "https://evil.example"


def port_of(sidecar: Sidecar) -> str:
    return sidecar.url.rsplit(":", 1)[1]


def test_a_chat_post_from_another_sites_page_is_403(sidecar: Sidecar,
                                                    upstream: MockUpstream) -> None:
    response = httpx.post(sidecar.base_url + "/chat/completions", json=CHAT,
                          headers={"Origin": EVIL})
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "origin_not_allowed" and error["type"] == "permission_error"
    assert upstream.requests == []


def test_an_opaque_origin_is_refused(sidecar: Sidecar) -> None:
    response = httpx.post(sidecar.base_url + "/chat/completions", json=CHAT,
                          headers={"Origin": "null"})
    assert response.status_code == 403


def test_a_text_plain_chat_post_is_415(sidecar: Sidecar, upstream: MockUpstream) -> None:
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": kind} if kind else {}
        response = httpx.post(sidecar.base_url + "/chat/completions",
                              content=orjson.dumps(CHAT), headers=headers)
        assert response.status_code == 415, kind
        assert response.json()["error"]["code"] == "unsupported_media_type"
    assert upstream.requests == []


def test_an_admin_change_from_another_origin_is_refused_and_changes_nothing(
        sidecar: Sidecar) -> None:
    before = httpx.get(sidecar.url + "/admin/api/routes").json()["models"]
    change = {"model": "gpt-test", "targets": [{"provider": "mock", "model": "mock-gpt",
                                                 "weight": 0}]}
    response = httpx.put(sidecar.url + "/admin/api/routes", json=change,
                         headers={"Origin": "http://localhost:3000"})
    assert response.status_code == 403
    plain = httpx.put(sidecar.url + "/admin/api/routes", content=orjson.dumps(change),
                      headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    assert httpx.get(sidecar.url + "/admin/api/routes").json()["models"] == before


def test_a_rebound_host_name_is_refused(sidecar: Sidecar) -> None:
    for path in ("/v1/models", "/admin/api/routes"):
        response = httpx.get(sidecar.url + path,
                             headers={"Host": f"attacker.example:{port_of(sidecar)}"})
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "host_not_allowed"


def test_the_sidecars_own_origin_and_loopback_names_are_served(sidecar: Sidecar) -> None:
    own = httpx.post(sidecar.base_url + "/chat/completions", json=CHAT,
                     headers={"Origin": sidecar.url})
    assert own.status_code == 200
    for host in (f"localhost:{port_of(sidecar)}", f"127.0.0.1:{port_of(sidecar)}", "localhost"):
        assert httpx.get(sidecar.base_url + "/models", headers={"Host": host}).status_code == 200


def test_sdk_requests_without_an_origin_are_unaffected(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from mock: hi"


def test_names_in_allowed_hosts_are_accepted(sidecar_factory: Callable[..., Sidecar]) -> None:
    named = sidecar_factory(server='allowed_hosts = ["sidecar.internal"]')
    host = f"sidecar.internal:{port_of(named)}"
    response = httpx.post(named.base_url + "/chat/completions", json=CHAT,
                          headers={"Host": host, "Origin": f"http://{host}"})
    assert response.status_code == 200
    other = httpx.get(named.base_url + "/models", headers={"Host": "other.internal"})
    assert other.status_code == 403
