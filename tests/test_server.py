"""The process: start-up failures are one clear line, SIGTERM drains requests in flight."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.sidecar import ROOT, Sidecar
from tests.support.upstream_mock import MockUpstream


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_zero(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream) -> None:
    sidecar = sidecar_factory()
    result: dict[str, bytes] = {}
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", sidecar.base_url + "/chat/completions", timeout=30,
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}],
                                "stream": True, "mock": {"chunks": 10, "chunk_delay": 0.1}}
                          ) as response:
            chunks = []
            for chunk in response.iter_raw():
                chunks.append(chunk)
                started.set()
            result["raw"] = b"".join(chunks)

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(10)
    assert sidecar.stop() == 0
    reader.join(10)
    assert result["raw"].endswith(b"data: [DONE]\n\n")
    assert sidecar.wait_for_log('"msg":"stopped"')


def test_bad_config_stops_start_up_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = -1\n")
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "`server.port`" in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(sidecar: Sidecar, tmp_path: Path) -> None:
    port = sidecar.url.rsplit(":", 1)[1]
    config = tmp_path / "c.toml"
    config.write_text((ROOT / "config" / "sidecar.toml").read_text())
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--config", str(config),
                             "--port", port], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
