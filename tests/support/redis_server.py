"""A real redis-server on a free loopback port, owned by the test that starts it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.support.sidecar import closed_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = closed_port()
        while self.port > 50000:  # a cluster node also listens on port + 10000
            self.port = closed_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []
        self.ping_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run(["redis-cli", "-p", str(self.port), *self.ping_args, "ping"],
                                   capture_output=True, text=True)
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stored(self) -> list[str]:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "--scan"],
                             capture_output=True, text=True)
        return out.stdout.split()
