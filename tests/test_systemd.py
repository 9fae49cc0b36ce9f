"""The systemd unit parses, runs `sidecar serve`, reloads with SIGHUP and drains on stop."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sidecar.engines import models
from sidecar.server import CLOSE_S
from sidecar.settings import ServerSettings
from tests.support.sidecar import ROOT, UPSTREAM_KEY, base_config, closed_port, start_sidecar
from tests.support.upstream_mock import MockUpstream

UNIT = ROOT / "systemd" / "llm-sidecar.service"


def service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_unit_runs_the_server_and_reloads_with_sighup() -> None:
    service = service_section()
    assert service["ExecStart"].split()[1:3] == ["serve", "--config"]
    # systemd sends SIGHUP itself and waits for RELOADING=1 then READY=1.
    assert service["Type"] == "notify-reload"
    assert "ExecReload" not in service
    assert service["KillSignal"] == "SIGTERM"
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "llm-sidecar"


def test_the_stop_timeout_leaves_room_for_the_whole_drain() -> None:
    drain = ServerSettings().drain_timeout_s
    assert float(service_section()["TimeoutStopSec"]) >= drain + CLOSE_S + 5


def test_the_unit_names_no_provider_and_reaches_no_device_but_the_gpus() -> None:
    unit_lines = [line for line in UNIT.read_text().splitlines()
                  if line and not line.startswith("#")]
    assert not [line for line in unit_lines if line.startswith(("LoadCredential", "Environment"
                                                                "File", "SetCredential"))]
    assert service_section()["DevicePolicy"] == "closed"
    allowed = [line.split("=", 1)[1] for line in unit_lines if line.startswith("DeviceAllow=")]
    assert allowed and all(re.fullmatch(r"char-nvidia[a-z-]* rw", a) for a in allowed)
    assert service_section()["PrivateDevices"] == "no"  # it would hide /dev/nvidia*


def before_253_variant(tmp_path: Path) -> Path:
    """The unit as docs/operations.md tells systemd older than 253 to run it."""
    variant = tmp_path / UNIT.name
    variant.write_text(UNIT.read_text().replace(
        "Type=notify-reload\n", "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n"))
    return variant


def systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    found = re.match(r"systemd (\d+)", out)
    assert found, out
    return int(found[1])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_every_line_of_the_unit(tmp_path: Path) -> None:
    def complaints(unit: Path) -> list[str]:
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                                text=True, timeout=60)
        # Only the missing /opt install may be reported on a development machine.
        return [line for line in (result.stdout + result.stderr).splitlines()
                if "llm-sidecar.service" in line and "is not executable" not in line]

    if systemd_version() >= 253:
        assert complaints(UNIT) == []
    else:
        # An older systemd knows every line but the reload type, and takes the documented
        # variant whole.
        assert [line.split(": ", 1)[1] for line in complaints(UNIT)] == [
            "Failed to parse service type, ignoring: notify-reload"]
        assert complaints(before_253_variant(tmp_path)) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_sandbox_scores_an_exposure_of_two_or_less(tmp_path: Path) -> None:
    units = [UNIT] if systemd_version() >= 253 else [UNIT, before_253_variant(tmp_path)]
    for unit in units:
        result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                                capture_output=True, text=True, timeout=60)
        found = re.search(r"Overall exposure level for llm-sidecar\.service: (\d+\.\d+)",
                          result.stdout)
        assert found, result.stdout[-2000:] + result.stderr
        assert float(found[1]) <= 2.0, result.stdout


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
    assert service["Type"] == "notify-reload"  # started means listening with the models loaded
    assert service["NotifyAccess"] == "main"
    assert "AF_UNIX" in service["RestrictAddressFamilies"]  # the notify socket
    assert int(service["WatchdogSec"]) >= 10


def systemd_runs_services() -> str:
    """Why a transient service cannot be started here, or "" when it can."""
    if shutil.which("systemd-run") is None or shutil.which("systemctl") is None:
        return "systemd-run is not installed"
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not the init system here (no /run/systemd/system)"
    probe = subprocess.run(["systemd-run", "--wait", "--quiet", "--collect", "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"systemd-run cannot start a service here: {probe.stderr.strip()[:200]}"
    return ""


@pytest.mark.skipif(bool(systemd_runs_services()), reason=systemd_runs_services() or "-")
def test_systemd_starts_it_as_a_notify_service_reloads_and_stops_it(
        tmp_path: Path, mock_upstream: MockUpstream) -> None:
    """For real: `systemctl start` returns once READY=1 came, reload waits for RELOADING and
    READY, and stop drains to exit 0."""
    tmp_path.chmod(0o755)
    config = tmp_path / "sidecar.toml"
    port = closed_port()
    config.write_text(base_config(mock_upstream).replace("port = 0", f"port = {port}")
                      .replace("@STATE@", str(tmp_path / "routes.json")))
    name = f"llm-sidecar-test-{time.monotonic_ns()}"
    started = subprocess.run(
        ["systemd-run", f"--unit={name}", "--collect", "--quiet",
         "-p", "Type=notify", "-p", "NotifyAccess=main",
         "-p", "ExecReload=/bin/kill -HUP $MAINPID", "-p", f"WorkingDirectory={ROOT}",
         "-p", f"Environment=MOCK_UPSTREAM_KEY={UPSTREAM_KEY}",
         sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        # systemd-run returns once the service reported READY=1.
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        reloaded = subprocess.run(["systemctl", "reload", name], capture_output=True,
                                  text=True, timeout=60)
        assert reloaded.returncode == 0, reloaded.stderr
        status = subprocess.run(["systemctl", "show", "-p", "StatusText", "--value", name],
                                capture_output=True, text=True, timeout=30).stdout
        assert status.startswith("serving 4 models on"), status
    finally:
        subprocess.run(["systemctl", "stop", name], capture_output=True, timeout=60)
    result = subprocess.run(["systemctl", "show", "-p", "ExecMainStatus", "--value", name],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    assert result in ("0", ""), result  # "" once the unit is collected
