"""Reloading the whole config on SIGHUP: a good config serves the next request while requests in
flight finish on the config they started with; a broken one changes nothing and says why; key
files are read again; live weights stay; systemd hears RELOADING then READY."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.backends.test_local import local_config, wait_ready
from tests.support.auth_helpers import jwt_config, make_issuer
from tests.support.jwks_server import JwksServer
from tests.support.notify_socket import NotifySocket
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "x"}]


def two_provider_config(first: MockUpstream, second: MockUpstream, serving: str,
                        key_file: Path, extra: str = "") -> str:
    """`gpt-test` served by the provider named `serving` ("first" or "second")."""
    return f"""
[server]
host = "127.0.0.1"
port = 0
drain_timeout_s = 5

[providers.first]
kind = "openai"
base_url = "{first.base_url}"
api_key_file = "{key_file}"
timeout_read_s = 30

[providers.second]
kind = "openai"
base_url = "{second.base_url}"
api_key_file = "{key_file}"
timeout_read_s = 30

[models."gpt-test"]
targets = [ {{ provider = "{serving}", model = "upstream-model" }} ]

[models."other"]
targets = [ {{ provider = "first", weight = 1 }}, {{ provider = "second", weight = 1 }} ]

[routing]
state_file = "@STATE@"
probe_interval_s = 0
{extra}
"""


@pytest.fixture
def second_upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream()
    mock.start()
    yield mock
    mock.stop()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "upstream"
    path.parent.mkdir()
    path.write_text("sk-first-key-0123456789\n")
    return path


def rewrite(sidecar: Sidecar, text: str) -> None:
    config = sidecar.log_path.parent / "sidecar.toml"
    state = sidecar.log_path.parent / "routes.json"
    config.write_text(text.replace("@STATE@", str(state)), encoding="utf-8")


def reload(sidecar: Sidecar, done: str = '"msg":"config reloaded"') -> None:
    before = sidecar.logs().count(done)
    sidecar.process.send_signal(signal.SIGHUP)
    assert sidecar.wait_for_log_count(done, before + 1, timeout=15), sidecar.logs()[-2000:]


def target_of(sidecar: Sidecar, model: str = "gpt-test") -> str:
    raw = sidecar.client().chat.completions.with_raw_response.create(
        model=model, messages=USER)  # type: ignore[arg-type]
    return raw.headers["x-sidecar-target"]


def test_a_good_config_serves_the_next_request_while_a_stream_in_flight_finishes_on_the_old(
        upstream: MockUpstream, second_upstream: MockUpstream, key_file: Path,
        tmp_path: Path) -> None:
    sidecar = start_sidecar(two_provider_config(upstream, second_upstream, "first", key_file),
                            tmp_path / "s")
    try:
        assert target_of(sidecar) == "first/upstream-model"
        words: list[str] = []
        first_word = threading.Event()

        def stream() -> None:
            for chunk in sidecar.client().chat.completions.create(
                    model="gpt-test", messages=USER, stream=True,  # type: ignore[arg-type]
                    extra_body={"mock": {"chunks": 30, "chunk_delay": 0.1}}):
                if chunk.choices and chunk.choices[0].delta.content:
                    words.append(chunk.choices[0].delta.content)
                    first_word.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_word.wait(10)
        rewrite(sidecar, two_provider_config(upstream, second_upstream, "second", key_file))
        reload(sidecar)
        assert target_of(sidecar) == "second/upstream-model"
        assert second_upstream.count() == 1
        assert reader.is_alive()  # the reload did not wait for the stream, nor cut it
        reader.join(15)
        assert len(words) == 30  # every word, from the first upstream, to its end
        assert upstream.count() == 2  # the first request and the stream; nothing after
        # The old build closes once its last request is over, not before.
        assert sidecar.wait_for_log("the application of the previous config is closed")
        assert sidecar.logs().index("previous config is closed") > \
            sidecar.logs().index('"msg":"config reloaded"')
    finally:
        assert sidecar.stop() == 0


def test_a_broken_config_changes_nothing_and_systemd_is_told_why(
        upstream: MockUpstream, second_upstream: MockUpstream, key_file: Path,
        tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    sidecar = start_sidecar(two_provider_config(upstream, second_upstream, "first", key_file),
                            tmp_path / "s", env={"NOTIFY_SOCKET": notify.address})
    try:
        notify.read_until("READY")
        broken = two_provider_config(upstream, second_upstream, "second", key_file).replace(
            'provider = "second", model', 'provider = "nobody", model')
        rewrite(sidecar, broken)
        reload(sidecar, "config reload refused")
        reloading = notify.read_until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        ready = notify.read_until("READY")  # after RELOADING: read_until keeps the order
        assert "reload refused" in ready["STATUS"]
        assert "models.gpt-test.targets[0].provider" in ready["STATUS"]
        assert "unknown provider 'nobody'" in sidecar.logs()
        assert target_of(sidecar) == "first/upstream-model"
        assert second_upstream.count() == 0
        # Not TOML at all: the same.
        rewrite(sidecar, "[server\nport = ")
        reload(sidecar, "config reload refused")
        assert "not valid TOML" in notify.read_until("READY")["STATUS"]
        assert target_of(sidecar) == "first/upstream-model"
    finally:
        assert sidecar.stop() == 0
        notify.sock.close()


def test_a_changed_key_file_is_read_again_on_reload(
        upstream: MockUpstream, second_upstream: MockUpstream, key_file: Path,
        tmp_path: Path) -> None:
    config = two_provider_config(upstream, second_upstream, "first", key_file)
    sidecar = start_sidecar(config, tmp_path / "s")
    try:
        target_of(sidecar)
        assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-first-key-0123456789"
        key_file.write_text("sk-rotated-key-9876543210\n")
        reload(sidecar)
        target_of(sidecar)
        assert upstream.requests[-1].headers["Authorization"] == \
            "Bearer sk-rotated-key-9876543210"
        # An empty key file is a broken config: the rotated key stays in use.
        key_file.write_text("")
        reload(sidecar, "config reload refused")
        target_of(sidecar)
        assert upstream.requests[-1].headers["Authorization"] == \
            "Bearer sk-rotated-key-9876543210"
        assert "sk-rotated" not in sidecar.logs()
    finally:
        assert sidecar.stop() == 0


def test_weights_changed_through_the_admin_api_stay_through_a_reload(
        upstream: MockUpstream, second_upstream: MockUpstream, key_file: Path,
        tmp_path: Path) -> None:
    config = two_provider_config(upstream, second_upstream, "first", key_file)
    sidecar = start_sidecar(config, tmp_path / "s")
    try:
        changed = httpx.put(sidecar.url + "/admin/api/routes", json={
            "model": "other", "targets": [{"provider": "first", "weight": 0}]})
        assert changed.status_code == 200, changed.text
        # The file's change touches another model; the state file wins for `other`.
        rewrite(sidecar, two_provider_config(upstream, second_upstream, "second", key_file))
        reload(sidecar)
        routes = httpx.get(sidecar.url + "/admin/api/routes").json()["models"]
        weights = {t["provider"]: t["weight"] for t in routes["other"]}
        assert weights == {"first": 0, "second": 1}
        assert {target_of(sidecar, "other") for _ in range(10)} == {"second/other"}
    finally:
        assert sidecar.stop() == 0


def test_a_local_engine_is_kept_while_its_settings_stay_and_replaced_when_they_change(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    config = local_config(mock_upstream)
    sidecar = start_sidecar(config, tmp_path / "s")
    loaded = '"msg":"local model loaded"'
    try:
        wait_ready(sidecar)
        assert sidecar.logs().count(loaded) == 1
        # Another model's table changes; the local provider's does not.
        rewrite(sidecar, config.replace('[models."mock-429"]', '[models."renamed-429"]'))
        reload(sidecar)
        assert httpx.get(sidecar.url + "/readyz").status_code == 200  # no load to wait for
        reply = sidecar.client().chat.completions.create(
            model="local", messages=USER, max_tokens=2)  # type: ignore[arg-type]
        assert reply.choices[0].message.content is not None
        assert sidecar.logs().count(loaded) == 1
        # The local provider's own settings change: a new engine, loaded afresh.
        rewrite(sidecar, config.replace("max_queue = 1", "max_queue = 2"))
        reload(sidecar)
        assert sidecar.wait_for_log_count(loaded, 2, timeout=120), sidecar.logs()[-2000:]
        wait_ready(sidecar)
        engines = httpx.get(sidecar.url + "/admin/api/engines").json()["engines"]
        assert engines["local"]["max_queue"] == 2, engines
        # The engine it replaced had no request left: it is unloaded, once.
        assert sidecar.wait_for_log('"msg":"local model unloaded"', timeout=10)
        assert sidecar.logs().count('"msg":"local model unloaded"') == 1
    finally:
        assert sidecar.stop() == 0


def requests_counted(sidecar: Sidecar) -> float:
    text = httpx.get(sidecar.url + "/metrics").text
    return sum(float(m[1]) for m in re.finditer(
        r'^llm_sidecar_requests_total\{[^}]*model="gpt-test"[^}]*\} (\S+)$', text, re.M))


def test_limits_and_metrics_keep_counting_through_a_reload_that_leaves_them_alone(
        upstream: MockUpstream, second_upstream: MockUpstream, key_file: Path,
        tmp_path: Path) -> None:
    limits = "\n[limits]\nrequests_per_minute = 3\n"
    config = two_provider_config(upstream, second_upstream, "first", key_file, limits)
    sidecar = start_sidecar(config, tmp_path / "s")
    try:
        for _ in range(2):
            target_of(sidecar)
        assert requests_counted(sidecar) == 2
        rewrite(sidecar, config.replace("timeout_read_s = 30", "timeout_read_s = 31"))
        reload(sidecar)
        target_of(sidecar)  # the third of the minute
        assert requests_counted(sidecar) == 3  # not 1: the counters went on
        with pytest.raises(openai.RateLimitError):
            target_of(sidecar)  # the fourth: the tenant's minute did not start again
        # New limits are new counts.
        rewrite(sidecar, config.replace("requests_per_minute = 3", "requests_per_minute = 5"))
        reload(sidecar)
        assert target_of(sidecar) == "first/upstream-model"
    finally:
        assert sidecar.stop() == 0


def test_requests_arriving_during_reloads_all_get_answers(
        upstream: MockUpstream, second_upstream: MockUpstream, key_file: Path,
        tmp_path: Path) -> None:
    sidecar = start_sidecar(two_provider_config(upstream, second_upstream, "first", key_file),
                            tmp_path / "s")
    statuses: list[int] = []
    done = threading.Event()

    def keep_asking() -> None:
        with httpx.Client() as client:
            while not done.is_set():
                statuses.append(client.post(sidecar.base_url + "/chat/completions", json={
                    "model": "other", "messages": USER}).status_code)

    askers = [threading.Thread(target=keep_asking) for _ in range(4)]
    try:
        for asker in askers:
            asker.start()
        for count in range(1, 11):
            # Some answers between two reloads, however slow the machine is today.
            deadline, asked = time.monotonic() + 10, len(statuses)
            while len(statuses) < asked + 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            reload(sidecar)
            assert sidecar.logs().count('"msg":"config reloaded"') == count
    finally:
        done.set()
        for asker in askers:
            asker.join(10)
        assert sidecar.stop() == 0
    assert len(statuses) > 40
    assert set(statuses) == {200}


def test_a_reload_whose_key_set_cannot_be_fetched_keeps_the_running_keys(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path / "issuer", kid="key-1")
    jwks = JwksServer(issuer.jwks_path.read_bytes())
    jwks.start()
    config = base_config(mock_upstream) + jwt_config(
        f'jwks_url = "{jwks.url}"', extra="jwks_refresh_s = 3600\njwks_cooldown_s = 60")
    sidecar = start_sidecar(config, tmp_path / "s")
    bearer = {"Authorization": f"Bearer {issuer.token()}"}
    body = {"model": "gpt-test", "messages": USER}
    try:
        assert httpx.post(sidecar.base_url + "/chat/completions", headers=bearer,
                          json=body).status_code == 200
        jwks.up = False
        reload(sidecar, "config reload refused")
        assert "no key set could be fetched" in sidecar.logs()
        assert httpx.post(sidecar.base_url + "/chat/completions", headers=bearer,
                          json=body).status_code == 200
        assert httpx.get(sidecar.url + "/readyz").status_code == 200
        jwks.up = True
        reload(sidecar)
        assert httpx.post(sidecar.base_url + "/chat/completions", headers=bearer,
                          json=body).status_code == 200
    finally:
        assert sidecar.stop() == 0
        jwks.stop()
