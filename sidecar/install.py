"""`sidecar install-service`: install the sidecar as a systemd service, in its final place.

A virtual environment's scripts carry the path they were made at, so one built elsewhere and
copied does not run: the environment is made where it will run (PREFIX/venv) and the package
installed into it with pip. The unit is written with that environment's `sidecar`, the config
directory and the credentials directory filled in; the config directory gets the default
config unless it has one; and the two commands that start the service are printed. With
`--destdir` the unit and the config are written under that root (for a package build or a
test) while the paths inside them stay the final ones."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from sidecar.resources import data_dir

UNIT_NAME = "llm-sidecar.service"
# The paths the unit in the repository is written for.
_UNIT_PREFIX = "/opt/llm-sidecar"
_UNIT_CONFIG_DIR = "/etc/llm-sidecar"
DEFAULT_PACKAGE = "llm-sidecar[cpu]"


class InstallError(Exception):
    """A step of the install that failed, said in one sentence."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", default=_UNIT_PREFIX,
                        help="where the virtual environment is made, as PREFIX/venv "
                             f"(default: {_UNIT_PREFIX})")
    parser.add_argument("--config-dir", default=_UNIT_CONFIG_DIR,
                        help=f"the config directory (default: {_UNIT_CONFIG_DIR}); keys go in "
                             "its credentials/ folder")
    parser.add_argument("--unit-dir", default="/etc/systemd/system",
                        help="where the unit file goes (default: /etc/systemd/system)")
    parser.add_argument("--destdir", default="",
                        help="write the unit and the config under this root instead of /, "
                             "with the final paths inside them")
    parser.add_argument("--pip", action="append", default=[], metavar="ARGS",
                        help="the arguments of one `pip install` into the new environment; "
                             f"repeat for several, in order (default: {DEFAULT_PACKAGE!r})")
    parser.add_argument("--system-site-packages", action="store_true",
                        help="let the environment see the interpreter's own packages")


def install_service(args: argparse.Namespace) -> list[str]:
    """Do the install; the commands that start the service. Raises InstallError."""
    prefix = Path(args.prefix).absolute()
    config_dir = Path(args.config_dir).absolute()
    venv = prefix / "venv"
    _make_venv(venv, args.system_site_packages)
    for pip_args in args.pip or [DEFAULT_PACKAGE]:
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
              *shlex.split(pip_args)], f"pip install {pip_args}")
    sidecar = venv / "bin" / "sidecar"
    if not sidecar.exists():
        raise InstallError(f"{sidecar} is missing after the install: was the package installed?")
    root = Path(args.destdir) if args.destdir else Path("/")
    written_config_dir = _under(root, config_dir)
    (written_config_dir / "credentials").mkdir(parents=True, exist_ok=True)
    # Keys go here, readable by root alone; systemd hands each to the service (LoadCredential).
    (written_config_dir / "credentials").chmod(0o700)
    config = written_config_dir / "sidecar.toml"
    if not config.exists():  # never replace an operator's config
        config.write_bytes((data_dir("config") / "sidecar.toml").read_bytes())
    unit_dir = _under(root, Path(args.unit_dir).absolute())
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = (data_dir("systemd") / UNIT_NAME).read_text(encoding="utf-8")
    unit = unit.replace(f"{_UNIT_PREFIX}/venv/", f"{venv}/").replace(
        f"{_UNIT_CONFIG_DIR}/", f"{config_dir}/")
    (unit_dir / UNIT_NAME).write_text(unit, encoding="utf-8")
    return ["systemctl daemon-reload", f"systemctl enable --now {UNIT_NAME}"]


def run(args: argparse.Namespace) -> int:
    try:
        commands = install_service(args)
    except InstallError as exc:
        print(f"sidecar: install-service: {exc}", file=sys.stderr)
        return 1
    print(f"installed {Path(args.prefix).absolute() / 'venv'}, the unit {UNIT_NAME} and the "
          f"config directory {Path(args.config_dir).absolute()}. To start the service:")
    for command in commands:
        print(f"  {command}")
    return 0


def _make_venv(venv: Path, system_site_packages: bool) -> None:
    command = [sys.executable, "-m", "venv", str(venv)]
    if system_site_packages:
        command.append("--system-site-packages")
    _run(command, f"making the virtual environment {venv}")


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603 - our own interpreter, the operator's arguments
    except OSError as exc:
        raise InstallError(f"{what}: {exc.strerror}") from None
    if done.returncode != 0:
        raise InstallError(f"{what} failed:\n{(done.stderr or done.stdout).strip()[-2000:]}")


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to(path.anchor)
