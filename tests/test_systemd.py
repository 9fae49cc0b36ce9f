"""The systemd unit parses, runs `sidecar serve`, reloads with SIGHUP and drains on stop."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from sidecar.engines import models
from tests.support.sidecar import ROOT, start_sidecar

UNIT = ROOT / "systemd" / "llm-sidecar.service"


def service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_unit_runs_the_server_and_reloads_with_sighup() -> None:
    service = service_section()
    assert service["ExecStart"].split()[1:3] == ["serve", "--config"]
    assert "-HUP" in service["ExecReload"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "llm-sidecar"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_every_line_of_the_unit() -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                            text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "llm-sidecar.service:" in line and "is not executable" not in line]
    # Only the missing /opt install may be reported on a development machine.
    assert complaints == []


def test_the_unit_gives_the_embedded_model_a_cache_without_a_home(tmp_path: Path) -> None:
    """Started with the unit's environment (its cache directory moved under tmp_path) and no
    usable home, as systemd runs it, the sidecar finds its model there and answers."""
    service = service_section()
    assert service["CacheDirectory"] == "llm-sidecar"
    unit_text = UNIT.read_text()
    env = dict(re.findall(r"^Environment=([A-Z_]+)=(\S+)$", unit_text, re.M))
    assert env["SIDECAR_CACHE_DIR"] == "/var/cache/llm-sidecar"
    cache = tmp_path / "var-cache"
    env = {k: v.replace("/var/cache/llm-sidecar", str(cache)) for k, v in env.items()}
    converted = models.resolve("builtin:smollm2-135m-instruct")  # this machine's copy
    shutil.copytree(converted, cache / converted.name)
    config = (ROOT / "config" / "sidecar.toml").read_text().replace("port = 8080", "port = 0")
    config += f'\n[routing]\nstate_file = "{tmp_path / "routes.json"}"\n'
    sidecar = start_sidecar(config, tmp_path / "run",
                            env={**env, "HOME": "/nonexistent", "XDG_CACHE_HOME": ""})
    try:
        deadline = time.monotonic() + 60
        while httpx.get(sidecar.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, sidecar.logs()[-2000:]
            time.sleep(0.1)
        reply = sidecar.client().chat.completions.create(
            model="local", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
    finally:
        sidecar.stop()


def test_unit_waits_for_ready_and_has_a_watchdog() -> None:
    service = service_section()
    assert service["Type"] == "notify"  # started means listening with the models loaded
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) >= 10
