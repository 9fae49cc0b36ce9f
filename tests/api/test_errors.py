"""Bad input gets a clear error in the OpenAI shape, names the param, and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.support.auth_helpers import jwt_config, make_issuer
from tests.support.sidecar import Sidecar, base_config
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "no-such-model" in caught.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-test", "messages": []}, "messages"),
        ({"model": "gpt-test", "messages": [{"role": "robot", "content": "x"}]},
         "messages[0].role"),
        ({"model": "gpt-test", "messages": USER, "max_tokens": "many"}, "max_tokens"),
        ({"model": "gpt-test", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": 42, "messages": USER}, "model"),
        ({"messages": USER}, "model"),
    ],
)
def test_invalid_fields_get_400_naming_the_param(sidecar: Sidecar, upstream: MockUpstream,
                                                 body: dict[str, object], param: str) -> None:
    response = httpx.post(sidecar.base_url + "/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert upstream.count() == 0


def test_openai_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-test", messages=[])
    assert caught.value.param == "messages"


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b"", b"null", b"\xff"])
def test_malformed_json_is_400(sidecar: Sidecar, raw: bytes) -> None:
    response = httpx.post(sidecar.base_url + "/chat/completions", content=raw,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "field",
    [{"api_base": "http://127.0.0.1:1/steal"}, {"base_url": "http://127.0.0.1:1"},
     {"api_key": "sk-attacker"}, {"api_version": "2024-01-01"},
     {"metadata": {"litellm": [{"api_base": "http://127.0.0.1:1"}]}}],
)
def test_fields_that_steer_the_key_are_refused_without_any_upstream_call(
        sidecar: Sidecar, upstream: MockUpstream, field: dict[str, object]) -> None:
    for stream in (False, True):
        response = httpx.post(sidecar.base_url + "/chat/completions",
                              json={"model": "gpt-test", "messages": USER, "stream": stream,
                                    **field})
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "forbidden_field"
    assert upstream.requests == []


def test_forbidden_fields_on_every_endpoint(sidecar: Sidecar, upstream: MockUpstream) -> None:
    for path, body in (("/completions", {"model": "gpt-test", "prompt": "x"}),
                       ("/embeddings", {"model": "gpt-test", "input": "x"})):
        response = httpx.post(sidecar.base_url + path, json={**body, "api_base": "http://x"})
        assert response.status_code == 400
    assert upstream.requests == []


def test_body_over_the_limit_is_413(sidecar_factory: object, upstream: MockUpstream) -> None:
    small = sidecar_factory(server="max_body_bytes = 2048")  # type: ignore[operator]
    big = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 4096}]}
    response = httpx.post(small.base_url + "/chat/completions", json=big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    fine = httpx.post(small.base_url + "/chat/completions",
                      json={"model": "gpt-test", "messages": USER})
    assert fine.status_code == 200
    assert upstream.count() == 1


def test_unknown_route_and_wrong_method_use_the_error_shape(sidecar: Sidecar) -> None:
    missing = httpx.post(sidecar.base_url + "/no/such/thing", json={})
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "unknown_url"
    wrong = httpx.get(sidecar.base_url + "/chat/completions")
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "method_not_allowed"


def test_server_stays_healthy_after_bad_input(sidecar: Sidecar, client: openai.OpenAI) -> None:
    for raw in (b"{", b"[" * 10000, b'{"model": "gpt-test", "messages": ' + b"[" * 5000):
        assert httpx.post(sidecar.base_url + "/chat/completions", content=raw,
                          headers={"Content-Type": "application/json"}).status_code == 400
    reply = client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from mock: hi"


def test_a_body_with_a_repeated_key_is_400_and_reaches_no_upstream(
        sidecar: Sidecar, upstream: MockUpstream) -> None:
    raw = b'{"model":"gpt-test","model":"dead","messages":[{"role":"user","content":"hi"}]}'
    response = httpx.post(sidecar.base_url + "/chat/completions", content=raw,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "model"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        # Rewritten (the model is renamed for the upstream) at 300 levels.
        b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"x":'
        + b"[" * 300 + b"]" * 300 + b"}",
        # An escape makes the forbidden-key guard walk the whole body.
        b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"x":'
        + b'{"k\\u0061":' * 1000 + b"1" + b"}" * 1000 + b"}",
    ],
)
def test_deep_nesting_is_400_naming_the_limit_not_500(sidecar: Sidecar, upstream: MockUpstream,
                                                      raw: bytes) -> None:
    response = httpx.post(sidecar.base_url + "/chat/completions", content=raw,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "too_deeply_nested" and "64" in str(error["message"])
    assert upstream.requests == []


def test_auth_refusals_log_their_reason_and_never_the_token(
        mock_upstream: MockUpstream, sidecar_factory: Callable[..., Sidecar],
        tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path / "issuer")
    secured = sidecar_factory(base_config(mock_upstream) + jwt_config(
        f'public_key_file = "{issuer.public_path}"', leeway=0))
    expired = issuer.token(exp=int(time.time()) - 60)
    no_scope = issuer.token(scope="other")
    url = secured.base_url + "/chat/completions"
    body = {"model": "gpt-test", "messages": USER}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {expired}"}
                      ).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {no_scope}"}
                      ).status_code == 403
    assert secured.wait_for_log("insufficient_scope")
    lines = [orjson.loads(line) for line in secured.logs().splitlines()
             if line.startswith("{") and '"path":"/v1/chat/completions"' in line]
    assert [(line["status"], line.get("auth_error")) for line in lines] == [
        (401, "missing_token"), (401, "token_expired"), (403, "insufficient_scope")]
    assert expired not in secured.logs() and no_scope not in secured.logs()
