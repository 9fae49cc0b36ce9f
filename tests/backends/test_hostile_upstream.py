"""Hostile upstreams: answers that inflate without end, streams that never end an event,
redirects to other hosts, and errors that quote the operator's key back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.sidecar import UPSTREAM_KEY, Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]
BOMB = 128 << 20  # inflated bytes; about 128 KiB on the wire
FLOOD = 64 << 20
HEADER_SECRET = "org-header-secret-0123456789"
# Small limits keep the tests fast; the defaults (64 MiB, 4 MiB) work the same way.
PROVIDER_EXTRA = f"""max_response_bytes = 1048576
max_event_bytes = 65536
headers = {{ "X-Org-Token" = "{HEADER_SECRET}" }}
"""


def hostile_config(mock: MockUpstream, routing: str | None = None) -> str:
    """base_config, with the limits and a secret header in its `[providers.mock]` table
    (which ends with max_retry_wait_s)."""
    text = base_config(mock) if routing is None else base_config(mock, routing=routing)
    return text.replace("max_retry_wait_s = 3\n", "max_retry_wait_s = 3\n" + PROVIDER_EXTRA, 1)


@pytest.fixture(scope="module")
def hostile(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Sidecar]:
    instance = start_sidecar(hostile_config(mock_upstream), tmp_path_factory.mktemp("hostile"))
    yield instance
    instance.stop()


@pytest.fixture
def elsewhere() -> Iterator[MockUpstream]:
    """Another host, which a redirect points to: it records whatever reaches it."""
    other = MockUpstream()
    other.start()
    yield other
    other.stop()


def post(sidecar: Sidecar, mock: dict[str, object], **body: object) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=20,
                      json={"model": "gpt-test", "messages": USER, "mock": mock, **body})


def stream_raw(sidecar: Sidecar, mock: dict[str, object]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", sidecar.base_url + "/chat/completions", timeout=20,
                      json={"model": "gpt-test", "messages": USER, "stream": True,
                            "mock": mock}) as response:
        return response, b"".join(response.iter_raw())


def events(raw: bytes) -> list[bytes]:
    return [block[6:] for block in raw.split(b"\n\n") if block.startswith(b"data: ")]


def peak_rss(sidecar: Sidecar) -> int:
    """The most memory the sidecar's process has held since it started."""
    status = Path(f"/proc/{sidecar.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def aborted(upstream: MockUpstream, key: str) -> bool:
    deadline = time.monotonic() + 5
    while key not in upstream.aborted:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- sizes ---------------------------------------------------------------------------------


def test_gzip_bomb_is_a_502_and_its_connection_is_closed(hostile: Sidecar,
                                                         upstream: MockUpstream) -> None:
    before = peak_rss(hostile)
    response = post(hostile, {"gzip_bomb": BOMB, "key": "bomb"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert "max_response_bytes" in error["message"] and error["type"] == "upstream_error"
    assert aborted(upstream, "bomb")  # the upstream saw us hang up
    # Counted as it inflated: the sidecar never held the 128 MiB.
    assert peak_rss(hostile) - before < 48 << 20


def test_stream_without_event_separators_ends_in_an_error_event(
        hostile: Sidecar, upstream: MockUpstream) -> None:
    before = peak_rss(hostile)
    response, raw = stream_raw(hostile, {"sse_flood": FLOOD, "flood_after": 1, "key": "flood"})
    assert response.status_code == 200
    sent = events(raw)
    assert orjson.loads(sent[0])["choices"][0]["delta"]["role"] == "assistant"
    assert "max_event_bytes" in orjson.loads(sent[-1])["error"]["message"]
    assert b"[DONE]" not in raw
    assert aborted(upstream, "flood")
    assert peak_rss(hostile) - before < 48 << 20


def test_stream_without_event_separators_from_the_start_is_a_502(hostile: Sidecar) -> None:
    response, raw = stream_raw(hostile, {"sse_flood": FLOOD, "key": "flood0"})
    assert response.status_code == 502
    assert "max_event_bytes" in orjson.loads(raw)["error"]["message"]


def test_hostile_answers_do_not_hold_up_other_requests(hostile: Sidecar,
                                                       upstream: MockUpstream) -> None:
    flood = {"sse_flood": FLOOD, "flood_after": 1}
    stream_raw(hostile, flood)  # the mock builds its payloads once; now they are ready
    post(hostile, {"gzip_bomb": BOMB})
    upstream.reset()
    with ThreadPoolExecutor(4) as pool:
        hostile_calls = [pool.submit(stream_raw, hostile, flood),
                         pool.submit(post, hostile, {"gzip_bomb": BOMB}),
                         pool.submit(stream_raw, hostile, flood)]
        deadline = time.monotonic() + 5
        while len(upstream.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        started = time.monotonic()
        plain = post(hostile, {})
        waited = time.monotonic() - started
        for call in hostile_calls:
            call.result()
    assert plain.status_code == 200
    assert waited < 2.0, f"a plain request waited {waited:.2f}s behind hostile answers"


# -- redirects -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [307, 302])
def test_upstream_redirect_is_a_502_and_is_not_followed(
        hostile: Sidecar, elsewhere: MockUpstream, status: int) -> None:
    location = f"{elsewhere.base_url}/chat/completions?token=location-secret"
    response = post(hostile, {"redirect": location, "redirect_status": status})
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert f"HTTP {status}" in message
    assert "location-secret" not in message and elsewhere.base_url not in message
    assert elsewhere.hits == []  # neither the prompt nor our headers went there


def test_upstream_redirect_of_a_stream_is_a_502(hostile: Sidecar,
                                                elsewhere: MockUpstream) -> None:
    response, _ = stream_raw(hostile, {"redirect": f"{elsewhere.base_url}/chat/completions"})
    assert response.status_code == 502
    assert elsewhere.hits == []


# -- the operator's key --------------------------------------------------------------------


def assert_scrubbed(text: str | bytes) -> None:
    raw = text.encode() if isinstance(text, str) else text
    assert UPSTREAM_KEY.encode() not in raw and HEADER_SECRET.encode() not in raw
    assert b"[redacted]" in raw


@pytest.mark.parametrize("status", [400, 404, 422, 429])
def test_upstream_4xx_quoting_our_key_reaches_the_client_scrubbed(
        hostile: Sidecar, status: int) -> None:
    response = post(hostile, {"status": status, "echo_headers": True})
    assert response.status_code == status
    assert_scrubbed(response.json()["error"]["message"])


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx_quoting_our_key_reaches_the_client_scrubbed(
        hostile: Sidecar, status: int) -> None:
    response = post(hostile, {"status": status, "echo_headers": True})
    assert response.status_code in (502, 503)
    assert_scrubbed(response.json()["error"]["message"])


def test_mid_stream_error_event_quoting_our_key_is_scrubbed(hostile: Sidecar) -> None:
    response, raw = stream_raw(hostile, {"error_event": True, "echo_headers": True})
    assert response.status_code == 200
    error = orjson.loads(events(raw)[1])["error"]
    assert "mock error mid-stream" in error["message"]
    assert_scrubbed(raw)


def test_rest_reason_quoting_a_key_is_scrubbed_everywhere(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    routing = "failures_before_cooldown = 1\ncooldown_s = 30\nprobe_interval_s = 0"
    sidecar = start_sidecar(hostile_config(mock_upstream, routing), tmp_path)
    try:
        code = f"key Bearer {UPSTREAM_KEY} and sk-someone-elses-key-0123 refused"
        error = {"message": "no", "type": "server_error", "param": None, "code": code}
        # A 429 keeps the upstream's code, which becomes the rest's reason.
        first = post(sidecar, {"status": 429, "error": error})
        assert first.status_code == 429
        assert_scrubbed(first.text)
        resting = post(sidecar, {})  # the target rests: the 503 quotes why
        assert resting.json()["error"]["code"] == "no_healthy_target"
        assert "[redacted]" in resting.json()["error"]["message"]
        routes = httpx.get(sidecar.url + "/admin/api/routes", timeout=5).text
        assert sidecar.wait_for_log("target resting")
        for seen in (resting.text, routes, sidecar.logs()):
            assert UPSTREAM_KEY not in seen and "sk-someone-elses" not in seen
    finally:
        sidecar.stop()
