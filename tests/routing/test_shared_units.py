"""Weight changes shared through a real redis-server, driven without a sidecar: a signed change
from another member is applied, saved and audited; a forged, malformed, own or unfitting one
changes nothing; Redis away makes a publish report False."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.observability.audit import AuditTrail
from sidecar.routing.shared import CHANNEL, RouteSync
from sidecar.routing.state import RouteState
from sidecar.routing.table import Route, RouteTable, Target
from tests.support.redis_server import RedisServer
from tests.support.sidecar import closed_port

SECRET = b"fleet-secret-0123456789abcdef0123"
A = Target("p", "a", 3)
B = Target("q", "b", 1)


def table() -> RouteTable:
    return RouteTable({"m": Route("m", [A, B])}, ["p", "q"])


class Member:
    def __init__(self, url: str, directory: Path, secret: bytes = SECRET) -> None:
        self.table = table()
        self.state = RouteState(str(directory / f"{id(self)}.json"))
        self.audit = AuditTrail()
        self.sync = RouteSync(url, self.table, self.state, 1.0, secret, self.audit)

    def weight_of_b(self) -> float:
        return float(self.table.to_json()["m"][1]["weight"])


@pytest.fixture
async def listening(server: RedisServer, tmp_path: Path) -> AsyncIterator[Member]:
    member = Member(server.url, tmp_path)
    task = asyncio.create_task(member.sync.run())
    raw = aioredis.Redis.from_url(server.url)
    for _ in range(100):  # until its subscription is in place
        counts = await raw.pubsub_numsub(CHANNEL)
        if counts and counts[0][1] >= 1:
            break
        await asyncio.sleep(0.02)
    await raw.aclose()
    yield member
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await member.sync.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: a connection completes (the kernel queues it)
    and nothing ever answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


@pytest.fixture
def black_hole_port() -> Iterator[int]:
    """A port whose listener's queue is full: a new connection is never completed."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield int(listener.getsockname()[1])


def signed(change: dict[str, Any], secret: bytes = SECRET) -> bytes:
    """A change as the fleet signs it, written out from the rule rather than by RouteSync."""
    body = orjson.dumps(change)
    sig = hmac.new(secret, b"routes\0" + body, hashlib.sha256).hexdigest()
    return orjson.dumps({"body": body.decode(), "sig": sig})


def logged(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


async def eventually(check: object, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if callable(check) and check():
            return
        await asyncio.sleep(0.02)


async def test_a_change_from_another_member_is_applied_saved_and_audited(
        server: RedisServer, tmp_path: Path, listening: Member) -> None:
    other = Member(server.url, tmp_path)
    try:
        assert await other.sync.publish("m", [{"provider": "q", "weight": 9}])
        await eventually(lambda: listening.weight_of_b() == 9.0)
        assert listening.weight_of_b() == 9.0
        assert listening.state.changed["m"][1]["weight"] == 9.0
        await eventually(lambda: listening.state.path.exists())
        assert orjson.loads(listening.state.path.read_bytes()) == listening.state.changed
        change = listening.audit.newest_first()[0]
        assert change.what == "routes changed" and change.subject == "m"
        assert change.who == f"sidecar {other.sync.origin}"
        assert change.before[1]["weight"] == 1 and change.after[1]["weight"] == 9.0
    finally:
        await other.sync.close()


async def test_a_change_signed_with_another_secret_changes_nothing(
        server: RedisServer, tmp_path: Path, listening: Member) -> None:
    forger = Member(server.url, tmp_path, secret=b"not-the-fleet-secret-000000000000")
    honest = Member(server.url, tmp_path)
    try:
        assert await forger.sync.publish("m", [{"provider": "q", "weight": 5}])
        raw = aioredis.Redis.from_url(server.url)
        for junk in (b"not json", b"{}", orjson.dumps({"body": "x", "sig": 1})):
            await raw.publish(CHANNEL, junk)
        await raw.aclose()
        # An honest change sent after them is the first one applied.
        assert await honest.sync.publish("m", [{"provider": "q", "weight": 2}])
        await eventually(lambda: listening.weight_of_b() != 1.0)
        assert listening.weight_of_b() == 2.0
        assert len(listening.audit.newest_first()) == 1
    finally:
        await forger.sync.close()
        await honest.sync.close()


async def test_a_members_own_change_and_an_unfitting_one_are_not_applied(
        server: RedisServer, tmp_path: Path, listening: Member) -> None:
    other = Member(server.url, tmp_path)
    try:
        assert await listening.sync.publish("m", [{"provider": "q", "weight": 4}])
        assert await other.sync.publish("m", [{"provider": "nope", "weight": 4}])
        assert await other.sync.publish("m", [{"provider": "q", "weight": 3}])
        await eventually(lambda: listening.weight_of_b() != 1.0)
        assert listening.weight_of_b() == 3.0
        assert [c.after[1]["weight"] for c in listening.audit.newest_first()] == [3.0]
    finally:
        await other.sync.close()


async def test_a_publish_with_redis_away_reports_false(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    member = Member(f"redis://127.0.0.1:{closed_port()}", tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
            assert await member.sync.publish("m", [{"provider": "q", "weight": 4}]) is False
        (record,) = logged(caplog, "route change not shared: redis unavailable")
        assert record.fields == {  # type: ignore[attr-defined]
            "model": "m", "error": "ConnectionError"}
    finally:
        await member.sync.close()


async def test_a_change_signed_by_the_fleets_rule_is_applied_and_logged_to_the_audit(
        server: RedisServer, listening: Member, caplog: pytest.LogCaptureFixture) -> None:
    origin = "another-sidecar-with-a-long-origin"
    raw = aioredis.Redis.from_url(server.url)
    with caplog.at_level(logging.INFO, logger="sidecar.audit"):
        await raw.publish(CHANNEL, signed(
            {"origin": origin, "model": "m", "targets": [{"provider": "q", "weight": 6}]}))
        await raw.aclose()
        await eventually(lambda: logged(caplog, "routes changed"))
    assert listening.weight_of_b() == 6.0
    (record,) = logged(caplog, "routes changed")
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["who"] == "sidecar another-sidecar-" and fields["request_id"] == ""
    assert fields["model"] == "m" and fields["via"] == "redis"
    assert fields["after"][1]["weight"] == 6.0


async def test_a_forged_change_is_logged_as_forged(
        server: RedisServer, tmp_path: Path, listening: Member,
        caplog: pytest.LogCaptureFixture) -> None:
    forger = Member(server.url, tmp_path, secret=b"not-the-fleet-secret-000000000000")
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
            assert await forger.sync.publish("m", [{"provider": "q", "weight": 5}])
            message = "unsigned or forged route change on redis; ignored"
            await eventually(lambda: logged(caplog, message))
        assert len(logged(caplog, message)) == 1
        assert listening.weight_of_b() == 1.0
    finally:
        await forger.sync.close()


async def test_an_unfitting_change_is_logged_with_its_model_cut_short_and_the_reason(
        server: RedisServer, listening: Member, caplog: pytest.LogCaptureFixture) -> None:
    model = "x" * 150
    raw = aioredis.Redis.from_url(server.url)
    message = "shared route change does not fit this config; ignored"
    with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
        await raw.publish(CHANNEL, signed(
            {"origin": "other", "model": model, "targets": [{"provider": "q", "weight": 6}]}))
        await raw.aclose()
        await eventually(lambda: logged(caplog, message))
    (record,) = logged(caplog, message)
    assert record.fields == {  # type: ignore[attr-defined]
        "model": "x" * 100, "reason": f"There is no model `{model}` to change."}
    assert listening.audit.newest_first() == []


async def test_a_publish_to_a_redis_that_does_not_answer_gives_up_within_its_deadline(
        tmp_path: Path, silent_port: int, caplog: pytest.LogCaptureFixture) -> None:
    # A deadline of 0.1 s is raised to half a second: a publish has a round trip to make.
    sync = RouteSync(f"redis://127.0.0.1:{silent_port}", table(),
                     RouteState(str(tmp_path / "state.json")), 0.1, SECRET)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
            async with asyncio.timeout(5):
                assert await sync.publish("m", [{"provider": "q", "weight": 4}]) is False
        assert 0.45 <= time.monotonic() - started < 1.2
        (record,) = logged(caplog, "route change not shared: redis unavailable")
        assert record.fields == {"model": "m", "error": "TimeoutError"}  # type: ignore[attr-defined]
    finally:
        await sync.close()


async def test_sharing_pauses_when_redis_cannot_be_reached_and_tries_again_each_second(
        tmp_path: Path, black_hole_port: int, caplog: pytest.LogCaptureFixture) -> None:
    sync = RouteSync(f"redis://127.0.0.1:{black_hole_port}", table(),
                     RouteState(str(tmp_path / "state.json")), 0.2, SECRET)
    message = "route sharing paused: redis unavailable"
    started = time.time()
    with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
        task = asyncio.create_task(sync.run())
        await eventually(lambda: len(logged(caplog, message)) >= 2, seconds=3.0)
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await sync.close()
    first, second = logged(caplog, message)[:2]
    assert first.fields == {"error": "TimeoutError"}  # type: ignore[attr-defined]
    assert first.created - started < 1.0  # the connect timeout, not the system's
    assert 1.0 <= second.created - first.created < 1.8


class _NoGoodbye:
    async def aclose(self) -> None:
        await asyncio.Event().wait()


async def test_a_goodbye_redis_never_completes_is_waited_for_two_seconds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sync = RouteSync(f"redis://127.0.0.1:{closed_port()}", table(),
                     RouteState(str(tmp_path / "state.json")), 0.2, SECRET)
    await sync._redis.aclose()
    sync._redis = _NoGoodbye()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
        async with asyncio.timeout(5):
            await sync.close()
    assert 1.9 <= time.monotonic() - started < 2.8
    assert logged(caplog, "redis did not close the route-sharing connection in 2 s")
