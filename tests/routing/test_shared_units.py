"""Weight changes shared through a real redis-server, driven without a sidecar: a signed change
from another member is applied, saved and audited; a forged, malformed, own or unfitting one
changes nothing; Redis away makes a publish report False."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    instance = RedisServer(tmp_path_factory.mktemp("redis"))
    instance.start()
    yield instance
    instance.stop()


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


async def test_a_publish_with_redis_away_reports_false(tmp_path: Path) -> None:
    member = Member(f"redis://127.0.0.1:{closed_port()}", tmp_path)
    try:
        assert await member.sync.publish("m", [{"provider": "q", "weight": 4}]) is False
    finally:
        await member.sync.close()
