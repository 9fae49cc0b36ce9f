"""What the service tells systemd, read from a notify socket of our own (a path one and an
abstract one), and the watchdog's pings, which come from the event loop itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.service import Notifier, watchdog
from tests.backends.test_local import local_config
from tests.support.notify_socket import NotifySocket
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    name = f"@llm-sidecar-test-{os.getpid()}-{time.monotonic_ns()}" \
        if request.param == "abstract" else str(tmp_path / "notify.sock")
    server = NotifySocket(name)
    yield server
    server.sock.close()


def test_ready_reloading_status_and_stopping_reach_systemd_in_order(
        notify: NotifySocket, mock_upstream: MockUpstream, tmp_path: Path) -> None:
    sidecar = start_sidecar(base_config(mock_upstream), tmp_path / "s",
                            env={"NOTIFY_SOCKET": notify.address})
    try:
        ready = notify.read_until("READY")
        assert ready["STATUS"].startswith("serving 4 models on http://127.0.0.1:")
        sidecar.process.send_signal(signal.SIGHUP)
        reloading = notify.read_until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notify.read_until("READY")["READY"] == "1"  # reloaded: ready again
    finally:
        assert sidecar.stop() == 0
    assert notify.read_until("STOPPING")["STATUS"].startswith("draining")


def test_a_model_still_loading_asks_for_more_time_before_ready(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))  # the socket's kind is tested above
    sidecar = start_sidecar(local_config(mock_upstream), tmp_path / "s",
                            env={"NOTIFY_SOCKET": notify.address})
    try:
        extend = notify.read_until("EXTEND_TIMEOUT_USEC", timeout=60)
        assert int(extend["EXTEND_TIMEOUT_USEC"]) >= 10_000_000
        assert extend["STATUS"] == "loading local"
        assert "READY" not in extend
        notify.read_until("READY", timeout=120)
        assert _ready(sidecar)  # READY=1 came once the model was in
    finally:
        sidecar.stop()
        notify.sock.close()


def _ready(sidecar: Sidecar) -> bool:
    import httpx

    return httpx.get(sidecar.url + "/readyz").status_code == 200


def test_watchdog_pings_come_from_the_loop_and_stop_while_it_is_blocked(tmp_path: Path) -> None:
    server = NotifySocket(str(tmp_path / "watchdog.sock"))
    notifier = Notifier({"NOTIFY_SOCKET": server.address, "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_s == 0.05  # half of what systemd asked for
    arrivals: list[float] = []

    async def run() -> None:
        task = asyncio.create_task(watchdog(notifier))
        await asyncio.sleep(0.3)
        time.sleep(0.5)  # the loop is wedged: nothing may ping meanwhile
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(run())
    server.sock.settimeout(0)
    while True:
        try:
            assert server.sock.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            break
        arrivals.append(time.monotonic())
    notifier.close()
    server.sock.close()
    assert len(arrivals) >= 8  # about one every 50 ms while the loop ran
    assert len(arrivals) <= 16  # and none piled up during the half second it was wedged


def test_watchdog_pings_are_not_sent_for_another_process() -> None:
    other = str(os.getpid() + 1)
    assert Notifier({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": other}).watchdog_s == 0
    assert Notifier({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}).watchdog_s
    assert not Notifier({}).enabled  # outside systemd nothing is sent
