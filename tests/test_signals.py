"""Signals: SIGHUP never stops the process (it reloads the config: tests/test_reload.py);
SIGTERM says not ready at once, lets requests in flight finish for drain_timeout_s (once), then
ends those still running with an answer."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from tests.support.sidecar import Sidecar, base_config
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "x"}]


def draining_config(upstream: MockUpstream, drain_timeout_s: float) -> str:
    return (base_config(upstream)
            .replace("drain_timeout_s = 5", f"drain_timeout_s = {drain_timeout_s}")
            .replace("timeout_read_s = 1.5", "timeout_read_s = 30"))


@dataclass
class Call:
    """A request made from a thread; `started` once its first bytes (or its answer) arrive."""

    started: threading.Event = field(default_factory=threading.Event)
    raw: bytes = b""
    status: int = 0
    error: str = ""
    ended_at: float = 0.0


def in_background(sidecar: Sidecar, body: dict[str, object]) -> tuple[Call, threading.Thread]:
    call = Call()

    def run() -> None:
        try:
            with httpx.stream("POST", sidecar.base_url + "/chat/completions", json=body,
                              timeout=30) as response:
                call.status = response.status_code
                for chunk in response.iter_raw():
                    call.raw += chunk
                    call.started.set()
        except httpx.HTTPError as exc:
            call.error = type(exc).__name__
        finally:
            call.ended_at = time.monotonic()
            call.started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return call, thread


def long_stream(chunks: int = 80) -> dict[str, object]:
    return {"model": "gpt-test", "messages": USER, "stream": True,
            "mock": {"chunks": chunks, "chunk_delay": 0.1}}


def test_sighup_reloads_the_config_and_the_sidecar_keeps_serving(
        sidecar_factory: Callable[..., Sidecar]) -> None:
    sidecar = sidecar_factory()
    sidecar.process.send_signal(signal.SIGHUP)
    assert sidecar.wait_for_log('"msg":"config reloaded"')
    assert sidecar.process.poll() is None
    reply = httpx.post(sidecar.base_url + "/chat/completions",
                       json={"model": "gpt-test", "messages": USER})
    assert reply.status_code == 200


def test_readyz_says_503_as_soon_as_sigterm_arrives(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream) -> None:
    sidecar = sidecar_factory(draining_config(upstream, 3))
    assert httpx.get(sidecar.url + "/readyz").status_code == 200
    call, thread = in_background(sidecar, long_stream(20))
    assert call.started.wait(10) and not call.error
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.wait_for_log("stopping: draining")
    ready = httpx.get(sidecar.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["reason"] == "draining"
    thread.join(15)
    assert call.raw.endswith(b"data: [DONE]\n\n")  # it had time to finish
    assert sidecar.process.wait(10) == 0


def test_a_stream_still_open_is_ended_after_the_drain_timeout_once_not_twice(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream) -> None:
    sidecar = sidecar_factory(draining_config(upstream, 2))
    call, thread = in_background(sidecar, long_stream())
    assert call.started.wait(10) and not call.error
    sent = time.monotonic()
    sidecar.process.send_signal(signal.SIGTERM)
    thread.join(15)
    # aiohttp alone waits the drain timeout for the handler, then as long again.
    assert 1.8 < call.ended_at - sent < 3.3
    assert not call.raw.endswith(b"data: [DONE]\n\n")
    assert sidecar.process.wait(10) == 0
    assert sidecar.wait_for_log("ending requests still in flight")


def test_a_stream_ended_by_the_drain_ends_with_an_error_event(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream) -> None:
    sidecar = sidecar_factory(draining_config(upstream, 1))
    call, thread = in_background(sidecar, long_stream())
    assert call.started.wait(10) and not call.error
    sidecar.process.send_signal(signal.SIGTERM)
    thread.join(15)
    assert b'"code":"server_shutting_down"' in call.raw
    assert b"[DONE]" not in call.raw


def test_a_request_still_waiting_at_the_deadline_gets_a_503(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream) -> None:
    sidecar = sidecar_factory(draining_config(upstream, 1))
    call, thread = in_background(sidecar, {"model": "gpt-test", "messages": USER,
                                           "mock": {"delay_s": 20}})
    assert upstream_received(upstream)
    sidecar.process.send_signal(signal.SIGTERM)
    thread.join(15)
    assert call.status == 503, (call.error, call.raw)
    assert b'"code":"server_shutting_down"' in call.raw
    assert sidecar.process.wait(10) == 0


def upstream_received(upstream: MockUpstream, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while upstream.count() == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_fifty_streams_open_at_sigterm_finish_or_end_with_an_error_event_past_the_drain(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream) -> None:
    """Half the streams end within the drain and get every word and [DONE]; the other half
    outlast it and get the shutting-down error event; /readyz says 503 all along; exit 0."""
    sidecar = sidecar_factory(draining_config(upstream, 3))
    outcomes: dict[int, str] = {}
    words: dict[int, int] = {}
    started = threading.Barrier(51, timeout=30)

    def stream(n: int) -> None:
        chunks = 10 if n % 2 else 100  # 1 s, or 10 s at 0.1 s a chunk
        client = sidecar.client(timeout=30)
        count = 0
        try:
            for chunk in client.chat.completions.create(
                    model="gpt-test", messages=USER, stream=True,  # type: ignore[arg-type]
                    extra_body={"mock": {"chunks": chunks, "chunk_delay": 0.1}}):
                if chunk.choices and chunk.choices[0].delta.content:
                    count += 1
                    if count == 1:
                        started.wait()
            outcomes[n] = "complete"
        except openai.APIError as exc:
            outcomes[n] = str(getattr(exc, "code", None) or exc.message)
        finally:
            words[n] = count

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    started.wait()  # every stream has its first word
    sent = time.monotonic()
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.wait_for_log("stopping: draining")
    ready = httpx.get(sidecar.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["reason"] == "draining"
    for thread in threads:
        thread.join(20)
    assert sidecar.process.wait(10) == 0
    assert time.monotonic() - sent < 3 + 3  # the drain, then a second to close
    assert [outcomes[n] for n in range(1, 50, 2)] == ["complete"] * 25
    assert [words[n] for n in range(1, 50, 2)] == [10] * 25
    assert [outcomes[n] for n in range(0, 50, 2)] == ["server_shutting_down"] * 25
    assert sidecar.wait_for_log('"requests":25')  # "ending requests still in flight"


def test_new_connections_are_refused_after_a_short_grace_while_streams_go_on(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream) -> None:
    sidecar = sidecar_factory(draining_config(upstream, 5))
    call, thread = in_background(sidecar, long_stream())
    assert call.started.wait(10) and not call.error
    sent = time.monotonic()
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.wait_for_log("stopping: draining")
    assert httpx.get(sidecar.url + "/readyz").status_code == 503  # still accepted: 503
    assert sidecar.wait_for_log("no longer accepting connections", timeout=5)
    assert time.monotonic() - sent > 1.8
    received = len(call.raw)
    with pytest.raises(httpx.ConnectError):
        httpx.get(sidecar.url + "/readyz")
    time.sleep(0.5)
    assert len(call.raw) > received  # the open stream goes on
    thread.join(15)
    assert b'"code":"server_shutting_down"' in call.raw
    assert sidecar.process.wait(10) == 0
