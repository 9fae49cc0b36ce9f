"""No secret reaches a log line or an error body: a whole failing run, logged at debug level,
is scanned for the provider key, the tokens and the Authorization header values."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.support.auth_helpers import jwt_config, make_issuer
from tests.support.sidecar import UPSTREAM_KEY, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


def test_a_failing_run_logs_no_secret(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path / "issuer")
    file_key = "sk-from-file-abcdef0123456789"
    (tmp_path / "key").write_text(file_key)
    extra = f"""
[providers.filed]
kind = "openai"
base_url = "{mock_upstream.base_url}"
api_key_file = "{tmp_path / 'key'}"
max_retries = 1

[models."filed"]
targets = [ {{ provider = "filed", model = "mock-gpt" }} ]

[logging]
level = "debug"
"""
    config = base_config(mock_upstream, extra=extra) + jwt_config(
        f'public_key_file = "{issuer.public_path}"')
    sidecar = start_sidecar(config, tmp_path / "run")
    good = issuer.token()
    bad_tokens = [issuer.token(aud="other"), issuer.token(exp=int(time.time()) - 999),
                  issuer.token(scope="none"), "garbage." + good.split(".")[1] + ".sig"]
    bodies: list[str] = []
    try:
        def post(token: str, **body: object) -> None:
            response = httpx.post(sidecar.base_url + "/chat/completions", timeout=30,
                                  headers={"Authorization": f"Bearer {token}"},
                                  json={"model": "gpt-test", "messages": USER, **body})
            bodies.append(response.text + str(response.headers))

        for token in bad_tokens:
            post(token)
        echo = {"message": f"Incorrect API key provided: {UPSTREAM_KEY}", "type": "x",
                "code": "invalid_api_key", "param": None}
        post(good, mock={"status": 401, "error": echo})
        post(good, model="filed", mock={"status": 401, "error": {
            "message": f"bad key {file_key}"}})
        post(good, mock={"status": 500})
        post(good, mock={"fail_first": 5, "disconnect": True, "key": "scan"})
        post(good, mock={"garbage": True})
        post(good, model="dead")
        post(good, api_key="sk-client-tries-its-own-key-999")
        post(good, stream=True, mock={"chunks": 5, "reset_after": 2})
        post(good)
    finally:
        sidecar.stop()
    logs = sidecar.logs()
    assert '"status":401' in logs and '"status":502' in logs  # the run did fail, and was logged
    secrets = [UPSTREAM_KEY, file_key, good, *bad_tokens, "sk-client-tries-its-own-key-999"]
    secrets += [token.split(".")[1] for token in [good, *bad_tokens]]
    for secret in secrets:
        assert secret not in logs
        for body in bodies:
            assert secret not in body
    assert "Bearer ey" not in logs
    assert "Authorization" not in logs
