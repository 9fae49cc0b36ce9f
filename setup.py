"""The wheel's build step: besides the package, it carries `web/`, `config/` (without the keys
and certificates people generate there) and `systemd/` inside the package, in
`sidecar/_data/`, where sidecar/resources.py finds them when the package is installed. Every
other setting is in pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("web", "config", "systemd")
# Never in a wheel: what the docs have people generate beside the config.
NOT_SHIPPED = shutil.ignore_patterns("keys", "tls", "state", "*.pem", "*.key", "__pycache__")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # a checkout finds the folders beside the package
            return
        for name in SHIPPED:
            source = Path(name)
            if source.is_dir():
                target = Path(self.build_lib) / "sidecar" / "_data" / name
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target, ignore=NOT_SHIPPED)


setup(cmdclass={"build_py": BuildWithData})
