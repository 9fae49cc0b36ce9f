"""An install that moves: the wheel `python -m build` makes carries everything the code reads
at run time (web/, the default configs, the unit), `sidecar install-service` makes the virtual
environment in its final place and writes the unit and the config directory, and the
installed sidecar answers a chat request with no checkout in sight."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.sidecar import ROOT, UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream

# What a release's source tree holds (tests/ and docs/ are not needed to build).
SOURCE = ("sidecar", "config", "systemd", "web", "pyproject.toml", "setup.py", "MANIFEST.in",
          "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of a copy of this checkout, with a page template in web/ (made here when the
    checkout has no web/ yet) and a key where the docs have people generate keys."""
    tree = tmp_path_factory.mktemp("source")
    for name in SOURCE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns(
                "__pycache__", "_data"))
        elif source.exists():
            shutil.copy(source, tree / name)
    (tree / "web" / "templates").mkdir(parents=True, exist_ok=True)
    (tree / "web" / "templates" / "probe.html").write_text("<p>{{ shipped }}</p>\n")
    (tree / "config" / "keys").mkdir(exist_ok=True)
    (tree / "config" / "keys" / "openai").write_text("sk-must-not-ship\n")
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                            str(tree / "dist"), str(tree)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (found,) = (tree / "dist").glob("llm_sidecar-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Path, Path, str]]:
    """(prefix, destdir, what install-service printed), installed from the wheel alone."""
    base = tmp_path_factory.mktemp("install")
    prefix, destdir = base / "opt" / "llm-sidecar", base / "root"
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "install-service", "--prefix", str(prefix),
         "--destdir", str(destdir), "--pip", f"--no-deps --no-index {wheel}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    # The wheel went in without its dependencies (no network needed, and no second copy of
    # torch): the new environment borrows this one's. A path line in a .pth file adds the
    # folder only: this environment's editable install of the checkout is not among them.
    site = next((prefix / "venv" / "lib").glob("python3.*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    yield prefix, destdir, done.stdout


def venv_python(prefix: Path, code: str) -> str:
    done = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c", code],
                          cwd=prefix, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow
def test_the_wheel_carries_web_the_configs_and_the_unit_but_no_key(
        installed: tuple[Path, Path, str]) -> None:
    prefix = installed[0]
    where = venv_python(prefix, "import sidecar.resources as r; print(r.PACKAGE_DIR); "
                                "print(r.data_dir('web')); print(r.data_dir('config'))")
    package, web, configs = (Path(line) for line in where.splitlines())
    assert package.is_relative_to(prefix / "venv")  # not the checkout
    assert (web / "templates" / "probe.html").read_text() == "<p>{{ shipped }}</p>\n"
    assert (configs / "sidecar.toml").read_bytes() == (ROOT / "config" / "sidecar.toml"
                                                       ).read_bytes()
    assert (configs / "example.toml").exists()
    assert not (configs / "keys").exists()


@pytest.mark.slow
def test_install_service_writes_the_unit_and_config_with_their_final_paths(
        installed: tuple[Path, Path, str]) -> None:
    prefix, destdir, printed = installed
    unit = (destdir / "etc/systemd/system/llm-sidecar.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) serve --config (\S+)$", unit, re.M)
    assert exec_start, unit
    assert exec_start[1] == str(prefix / "venv" / "bin" / "sidecar")
    assert os.access(exec_start[1], os.X_OK)
    assert exec_start[2] == "/etc/llm-sidecar/sidecar.toml"  # the final path, not destdir's
    config_dir = destdir / "etc" / "llm-sidecar"
    assert (config_dir / "sidecar.toml").read_bytes() == \
        (ROOT / "config" / "sidecar.toml").read_bytes()
    assert stat.S_IMODE((config_dir / "credentials").stat().st_mode) == 0o700
    assert printed.splitlines()[-2:] == ["  systemctl daemon-reload",
                                         "  systemctl enable --now llm-sidecar.service"]


@pytest.mark.slow
def test_the_installed_sidecar_answers_a_chat_request(
        installed: tuple[Path, Path, str], upstream: MockUpstream, tmp_path: Path) -> None:
    prefix = installed[0]
    config = tmp_path / "sidecar.toml"
    config.write_text(base_config(upstream).replace("@STATE@", str(tmp_path / "routes.json")))
    log_path = tmp_path / "sidecar.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # started away from the checkout
            [str(prefix / "venv" / "bin" / "sidecar"), "serve", "--config", str(config)],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env={**env, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r'"address":"(http://[^"]+)"', log_path.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        client = openai.OpenAI(base_url=found[1] + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content == "Hello from mock: hello"
    finally:
        process.terminate()
        assert process.wait(15) == 0


def test_make_install_hands_its_paths_to_install_service() -> None:
    # -o: the development environment counts as installed; -n: print, run nothing.
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed-dev", "install",
                          "PREFIX=/srv/sidecar", "DESTDIR=/tmp/pkg"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    command = dry.stdout.replace("\\\n", " ")
    assert "sidecar install-service --prefix '/srv/sidecar'" in command
    assert "--destdir '/tmp/pkg'" in command
    assert f"--pip '{ROOT}[cpu]'" in command
