"""What the sidecar holds in memory with the embedded model loaded: the process's resident
size, read from /proc, once the model is ready and after a few requests."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support.sidecar import ROOT, Sidecar, start_sidecar

GOAL_MB = 700


def resident_mb(sidecar: Sidecar) -> float:
    status = Path(f"/proc/{sidecar.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_embedded_model_in_bfloat16_stays_under_the_memory_goal(tmp_path: Path) -> None:
    config = (ROOT / "config" / "sidecar.toml").read_text().replace("port = 8080", "port = 0")
    config = config.replace('engine = "auto"', 'engine = "transformers"\ndtype = "bfloat16"')
    config += f'\n[routing]\nstate_file = "{tmp_path / "routes.json"}"\n'
    sidecar = start_sidecar(config, tmp_path / "run")
    try:
        deadline = time.monotonic() + 120
        while httpx.get(sidecar.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, sidecar.logs()[-2000:]
            time.sleep(0.1)
        loaded = resident_mb(sidecar)
        client = sidecar.client()
        for i in range(4):
            reply = client.chat.completions.create(
                model="local", messages=[{"role": "user", "content": f"Tell story {i}."}],
                max_tokens=32)
            assert reply.choices[0].message.content
        served = resident_mb(sidecar)
        assert loaded < GOAL_MB, f"{loaded:.0f} MB resident once loaded"
        assert served < GOAL_MB, f"{served:.0f} MB resident after four requests"
    finally:
        sidecar.stop()
