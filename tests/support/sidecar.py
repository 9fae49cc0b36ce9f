"""The sidecar as a real process on loopback, and the configuration the tests give it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from tests.support.upstream_mock import MockUpstream

ROOT = Path(__file__).resolve().parent.parent.parent
UPSTREAM_KEY = "sk-mock-upstream-0123456789abcdef"


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The shared sidecar sees many deliberate failures: no cooldowns or probes unless a test asks.
QUIET_ROUTING = "failures_before_cooldown = 1000\nprobe_interval_s = 0"


def base_config(mock: MockUpstream, *, server: str = "", extra: str = "",
                routing: str = QUIET_ROUTING) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0
heartbeat_s = 0.25
shutdown_timeout_s = 5
{server}

[providers.mock]
kind = "openai"
base_url = "{mock.base_url}"
api_key_env = "MOCK_UPSTREAM_KEY"
timeout_connect_s = 2
timeout_read_s = 1.5
max_retries = 2
max_retry_wait_s = 3

[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:{closed_port()}/v1"
max_retries = 1

[models."gpt-test"]
targets = [ {{ provider = "mock", model = "mock-gpt", weight = 1 }} ]

[models."mock-gpt"]
targets = [ {{ provider = "mock" }} ]

[models."dead"]
targets = [ {{ provider = "dead", model = "nothing" }} ]

[models."mock-429"]
targets = [ {{ provider = "mock", model = "mock-429" }} ]

[routing]
state_file = "@STATE@"
{routing}
{extra}
"""


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="client-key", max_retries=0,
                             **kwargs)  # type: ignore[arg-type]

    def async_client(self, **kwargs: object) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="client-key", max_retries=0,
                                  **kwargs)  # type: ignore[arg-type]

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, timeout: float = 3) -> bool:
        """Log lines are written by a thread a moment later; wait for one."""
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_sidecar(config_text: str, workdir: Path, env: dict[str, str] | None = None) -> Sidecar:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "sidecar.toml"
    config.write_text(config_text.replace("@STATE@", str(workdir / "routes.json")),
                      encoding="utf-8")
    log_path = workdir / "sidecar.log"
    full_env = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "PYTHONUNBUFFERED": "1",
                **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env,
        )
    deadline = time.monotonic() + 60  # a loaded 2-core machine can take that long
    while time.monotonic() < deadline:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        found = re.search(r'"address":"(https?://[^"]+)"', text)
        if found:
            return Sidecar(process, found[1], log_path)
        if process.poll() is not None:
            raise RuntimeError(f"sidecar exited with {process.returncode}:\n{text}")
        time.sleep(0.02)
    process.kill()
    raise RuntimeError(f"sidecar did not start:\n{log_path.read_text()}")
