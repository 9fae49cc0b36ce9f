"""The in-process response cache: deterministic answers kept per tenant, opt-outs, expiry, and
single flight for identical misses in flight at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.scripted_upstream import ScriptedUpstream, chat_chunk
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]
CACHE = "[cache]\nenabled = true\nttl_s = {ttl}\ncache_when = \"{when}\"\n"


def cached_sidecar(mock: MockUpstream, workdir: Path, ttl: float = 60,
                   when: str = "deterministic", auth: str = "") -> Sidecar:
    return start_sidecar(base_config(mock, extra=CACHE.format(ttl=ttl, when=when)) + auth,
                         workdir)


@pytest.fixture(scope="module")
def cached(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Sidecar]:
    instance = cached_sidecar(mock_upstream, tmp_path_factory.mktemp("cached"))
    yield instance
    instance.stop()


def ask(sidecar: Sidecar, headers: dict[str, str] | None = None, **body: object
        ) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", headers=headers or {}, timeout=30,
                      json={"model": "gpt-test", "messages": USER, **body})


def test_deterministic_request_is_answered_from_the_cache(cached: Sidecar,
                                                         upstream: MockUpstream) -> None:
    first = ask(cached, temperature=0, max_tokens=7)
    second = ask(cached, temperature=0, max_tokens=7)
    assert first.headers["x-sidecar-cache"] == "miss"
    assert second.headers["x-sidecar-cache"] == "hit"
    assert second.content == first.content
    assert upstream.count() == 1
    client = openai.OpenAI(base_url=cached.base_url, api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="gpt-test", messages=USER,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=7)
    assert reply.choices[0].message.content == "Hello from mock: hi"
    assert upstream.count() == 1


def test_a_seed_makes_a_request_deterministic(cached: Sidecar, upstream: MockUpstream) -> None:
    assert ask(cached, seed=42, temperature=0.9).headers["x-sidecar-cache"] == "miss"
    assert ask(cached, seed=42, temperature=0.9).headers["x-sidecar-cache"] == "hit"
    assert ask(cached, seed=43, temperature=0.9).headers["x-sidecar-cache"] == "miss"
    assert upstream.count() == 2


def test_sampling_requests_bypass_the_cache(cached: Sidecar, upstream: MockUpstream) -> None:
    for _ in range(2):
        assert ask(cached, temperature=0.7).headers["x-sidecar-cache"] == "bypass"
    assert upstream.count() == 2


def stream_text(sidecar: Sidecar, **body: object) -> tuple[list[object], str]:
    client = openai.OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="gpt-test", messages=USER, stream=True,  # type: ignore[call-overload]
                                                 **body))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_stream_is_recorded_and_replayed_as_a_stream(cached: Sidecar,
                                                       upstream: MockUpstream) -> None:
    with httpx.stream("POST", cached.base_url + "/chat/completions", json={
            "model": "gpt-test", "messages": USER, "temperature": 0, "stream": True,
            "max_tokens": 11}) as stream:
        assert stream.headers["x-sidecar-cache"] == "miss"
        assert b"".join(stream.iter_raw()).endswith(b"data: [DONE]\n\n")
    first, text = stream_text(cached, temperature=0, max_tokens=11)
    assert upstream.count() == 1
    assert text == "Hello from mock: hi"
    # Asked with usage, which the recording lacks: fetched again, and recorded with it.
    again, same = stream_text(cached, temperature=0, max_tokens=11,
                              stream_options={"include_usage": True})
    assert same == text and upstream.count() == 2
    replayed, same = stream_text(cached, temperature=0, max_tokens=11,
                                 stream_options={"include_usage": True})
    assert same == text and upstream.count() == 2
    assert len({first[0].id, again[0].id, replayed[0].id}) == 3  # type: ignore[attr-defined]
    assert replayed[-1].usage == again[-1].usage  # type: ignore[attr-defined]
    assert replayed[-1].usage is not None and replayed[-1].choices == []  # type: ignore[attr-defined]
    finishes = [c.choices[0].finish_reason for c in replayed if c.choices]  # type: ignore[attr-defined]
    assert finishes[-1] == "stop"
    _, plain = stream_text(cached, temperature=0, max_tokens=11)
    assert plain == text and upstream.count() == 2


def test_a_stream_answers_a_json_request_and_the_other_way_round(
        cached: Sidecar, upstream: MockUpstream) -> None:
    _, text = stream_text(cached, temperature=0, max_tokens=12)
    reply = ask(cached, temperature=0, max_tokens=12)
    assert reply.headers["x-sidecar-cache"] == "hit" and upstream.count() == 1
    assert reply.json()["choices"][0]["message"]["content"] == text
    assert reply.json()["object"] == "chat.completion"
    whole = ask(cached, temperature=0, max_tokens=13).json()
    _, streamed = stream_text(cached, temperature=0, max_tokens=13)
    assert streamed == whole["choices"][0]["message"]["content"] and upstream.count() == 2


def test_a_stream_that_broke_is_not_stored(cached: Sidecar, upstream: MockUpstream) -> None:
    # The identical request twice: had the first been stored, the second would replay it.
    broken = {"chunks": 6, "reset_after": 2, "key": "broken-stream"}
    for _ in range(2):
        with pytest.raises(openai.APIError):
            stream_text(cached, temperature=0, extra_body={"mock": broken})
    assert upstream.count() == 2


@pytest.fixture(scope="module")
def scripted_cached(mock_upstream: MockUpstream, scripted: ScriptedUpstream,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    extra = CACHE.format(ttl=60, when="deterministic") + f"""
[providers.scripted]
kind = "openai"
base_url = "{scripted.base_url}"

[models."scripted"]
targets = [ {{ provider = "scripted" }} ]
"""
    instance = start_sidecar(base_config(mock_upstream, extra=extra),
                             tmp_path_factory.mktemp("scripted"))
    yield instance
    instance.stop()


def stream_script(sidecar: Sidecar, script: list[str]) -> tuple[str, bytes]:
    """The cache state and the raw bytes of a streamed answer to the scripted model."""
    with httpx.stream("POST", sidecar.base_url + "/chat/completions", timeout=30, json={
            "model": "scripted", "messages": USER, "temperature": 0, "stream": True,
            "script": script}) as stream:
        return stream.headers["x-sidecar-cache"], b"".join(stream.iter_raw())


START = chat_chunk("Hel")
BROKEN_STREAMS = {
    "error_event": [START, '{"error": {"message": "overloaded", "type": "server_error"}}'],
    "data_not_json": [START, "not json", chat_chunk(finish="stop")],
    "data_not_an_object": [START, "[1, 2]", chat_chunk(finish="stop")],
    "choices_not_a_list": [START, '{"choices": "x"}', chat_chunk(finish="stop")],
    "no_finish_reason": [START, chat_chunk("lo")],
}


@pytest.mark.parametrize("name", list(BROKEN_STREAMS))
def test_a_stream_that_did_not_end_well_is_not_stored(scripted_cached: Sidecar,
                                                      scripted: ScriptedUpstream,
                                                      name: str) -> None:
    before = scripted.calls
    for _ in range(2):
        state, raw = stream_script(scripted_cached, BROKEN_STREAMS[name])
        assert state == "miss"
        assert raw.endswith(b"data: [DONE]\n\n")  # passed on as the upstream sent it
    assert scripted.calls == before + 2
    # Nor does it answer the same request asked for as JSON.
    reply = httpx.post(scripted_cached.base_url + "/chat/completions", timeout=30, json={
        "model": "scripted", "messages": USER, "temperature": 0,
        "script": BROKEN_STREAMS[name]})
    assert reply.headers.get("x-sidecar-cache") != "hit"


def test_a_stream_that_ended_well_is_stored(scripted_cached: Sidecar,
                                            scripted: ScriptedUpstream) -> None:
    before = scripted.calls
    script = [START, chat_chunk("lo"), chat_chunk(finish="stop")]
    assert stream_script(scripted_cached, script)[0] == "miss"
    state, raw = stream_script(scripted_cached, script)
    assert state == "hit" and b'"content":"lo"' in raw
    assert scripted.calls == before + 1


def test_any_field_that_can_change_the_answer_changes_the_key(cached: Sidecar,
                                                              upstream: MockUpstream) -> None:
    ask(cached, temperature=0, max_tokens=5)
    assert ask(cached, temperature=0, max_tokens=6).headers["x-sidecar-cache"] == "miss"
    assert ask(cached, temperature=0, max_tokens=5,
               response_format={"type": "json_object"}).headers["x-sidecar-cache"] == "miss"
    # ...and one that cannot, does not.
    assert ask(cached, temperature=0, max_tokens=5,
               user="someone").headers["x-sidecar-cache"] == "hit"


def test_cache_control_opt_outs(cached: Sidecar, upstream: MockUpstream) -> None:
    assert ask(cached, temperature=0, n=3).headers["x-sidecar-cache"] == "miss"
    skipped = ask(cached, {"Cache-Control": "no-cache"}, temperature=0, n=3)
    assert skipped.headers["x-sidecar-cache"] == "miss"  # read skipped, answer fetched again
    assert upstream.count() == 2
    unstored = ask(cached, {"Cache-Control": "no-store"}, temperature=0, n=4)
    assert unstored.headers["x-sidecar-cache"] == "miss"
    assert ask(cached, temperature=0, n=4).headers["x-sidecar-cache"] == "miss"
    assert upstream.count() == 4


def test_errors_are_never_stored(cached: Sidecar, upstream: MockUpstream) -> None:
    failing = ask(cached, temperature=0, mock={"status": 400})
    assert failing.status_code == 400
    assert ask(cached, temperature=0, mock={"status": 400}).status_code == 400
    assert upstream.count() == 2


def test_identical_misses_in_flight_make_one_upstream_call(cached: Sidecar,
                                                           upstream: MockUpstream) -> None:
    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)
                                     ) as client:
            return await asyncio.gather(*(client.post(
                cached.base_url + "/chat/completions",
                json={"model": "gpt-test", "messages": USER, "temperature": 0,
                      "mock": {"delay_s": 0.5, "key": "storm"}}) for _ in range(100)))

    answers = asyncio.run(storm())
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert upstream.count() == 1
    assert sorted(a.headers["x-sidecar-cache"] for a in answers).count("miss") == 1


def test_an_error_in_flight_is_shared_not_retried_by_every_waiter(
        cached: Sidecar, upstream: MockUpstream) -> None:
    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(
                cached.base_url + "/chat/completions",
                json={"model": "gpt-test", "messages": USER, "temperature": 0,
                      "mock": {"delay_s": 0.3, "status": 400}}) for _ in range(20)))

    assert {a.status_code for a in asyncio.run(storm())} == {400}
    assert upstream.count() == 1


def test_entries_expire(mock_upstream: MockUpstream, upstream: MockUpstream,
                        tmp_path: Path) -> None:
    sidecar = cached_sidecar(mock_upstream, tmp_path, ttl=0.5)
    try:
        assert ask(sidecar, temperature=0).headers["x-sidecar-cache"] == "miss"
        assert ask(sidecar, temperature=0).headers["x-sidecar-cache"] == "hit"
        time.sleep(0.6)
        assert ask(sidecar, temperature=0).headers["x-sidecar-cache"] == "miss"
    finally:
        sidecar.stop()


def test_two_tenants_never_share_an_entry(mock_upstream: MockUpstream, upstream: MockUpstream,
                                          tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path / "issuer")
    sidecar = cached_sidecar(mock_upstream, tmp_path / "s", auth=jwt_config(
        f'public_key_file = "{issuer.public_path}"'))
    alice = {"Authorization": f"Bearer {issuer.token(sub='alice')}"}
    bob = {"Authorization": f"Bearer {issuer.token(sub='bob')}"}
    try:
        assert ask(sidecar, alice, temperature=0).headers["x-sidecar-cache"] == "miss"
        assert ask(sidecar, alice, temperature=0).headers["x-sidecar-cache"] == "hit"
        assert ask(sidecar, bob, temperature=0).headers["x-sidecar-cache"] == "miss"
        assert upstream.count() == 2
    finally:
        sidecar.stop()


@pytest.fixture(scope="module")
def tenants_cached(mock_upstream: MockUpstream, scripted: ScriptedUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, Issuer]]:
    workdir = tmp_path_factory.mktemp("tenants")
    issuer = make_issuer(workdir / "issuer")
    extra = CACHE.format(ttl=60, when="deterministic") + f"""
[providers.scripted]
kind = "openai"
base_url = "{scripted.base_url}"

[models."scripted"]
targets = [ {{ provider = "scripted" }} ]
"""
    config = base_config(mock_upstream, extra=extra) + jwt_config(
        f'public_key_file = "{issuer.public_path}"')
    instance = start_sidecar(config, workdir / "sidecar")
    yield instance, issuer
    instance.stop()


def ask_as(sidecar: Sidecar, issuer: Issuer, tenant: str, question: str,
           delay_s: float = 0) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {issuer.token(sub=tenant)}"},
                      json={"model": "scripted", "temperature": 0, "delay_s": delay_s,
                            "messages": [{"role": "user", "content": question}]})


def test_a_tenant_hits_its_own_entry_after_another_tenant_missed(
        tenants_cached: tuple[Sidecar, Issuer], scripted: ScriptedUpstream) -> None:
    sidecar, issuer = tenants_cached
    before = scripted.calls
    alice = ask_as(sidecar, issuer, "alice", "in turn")
    bob = ask_as(sidecar, issuer, "bob", "in turn")
    again = ask_as(sidecar, issuer, "alice", "in turn")
    assert [r.headers["x-sidecar-cache"] for r in (alice, bob, again)] == ["miss", "miss", "hit"]
    assert again.json()["choices"] == alice.json()["choices"]
    assert bob.json()["choices"] != alice.json()["choices"]
    assert scripted.calls == before + 2


def test_two_tenants_asking_at_once_each_get_their_own_answer(
        tenants_cached: tuple[Sidecar, Issuer], scripted: ScriptedUpstream) -> None:
    sidecar, issuer = tenants_cached
    before = scripted.calls
    with ThreadPoolExecutor(2) as pool:
        # Both in flight together: one fetch must not answer the other tenant.
        alice, bob = pool.map(lambda tenant: ask_as(sidecar, issuer, tenant, "at once", 0.5),
                              ["alice", "bob"])
    assert [r.headers["x-sidecar-cache"] for r in (alice, bob)] == ["miss", "miss"]
    assert scripted.calls == before + 2
    assert alice.json()["choices"] != bob.json()["choices"]
    again = ask_as(sidecar, issuer, "bob", "at once", 0.5)
    assert again.headers["x-sidecar-cache"] == "hit"
    assert again.json()["choices"] == bob.json()["choices"]


def test_cache_when_always_and_never(mock_upstream: MockUpstream, upstream: MockUpstream,
                                     tmp_path: Path) -> None:
    always = cached_sidecar(mock_upstream, tmp_path / "a", when="always")
    never = cached_sidecar(mock_upstream, tmp_path / "n", when="never")
    try:
        ask(always, temperature=0.9)
        assert ask(always, temperature=0.9).headers["x-sidecar-cache"] == "hit"
        assert ask(never, temperature=0).headers["x-sidecar-cache"] == "bypass"
    finally:
        always.stop()
        never.stop()
