"""The systemd unit parses, runs `sidecar serve`, reloads with SIGHUP and drains on stop."""

from __future__ import annotations

import configparser
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

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
