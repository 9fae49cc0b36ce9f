"""Live weight changes, kept in a state file of our own (the operator's TOML is never
rewritten) and applied again at start. The file is checked as the admin API checks a change:
an entry that does not pass is reported and ignored, and the TOML's weights stand."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from sidecar.errors import InvalidRequest
from sidecar.routing.table import RouteTable

log = logging.getLogger("sidecar.routing")


class RouteState:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.changed: dict[str, list[dict[str, Any]]] = {}
        self.lock = asyncio.Lock()

    def read(self) -> dict[str, Any]:
        """The saved changes, or nothing. Reads a file: call it from a thread."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            saved = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.error("route state file is not JSON; ignoring it",
                      extra={"fields": {"path": str(self.path)}})
            return {}
        if not isinstance(saved, dict):
            log.error("route state file is not a JSON object; ignoring it",
                      extra={"fields": {"path": str(self.path)}})
            return {}
        return saved

    def apply(self, table: RouteTable, saved: dict[str, Any]) -> None:
        for model, targets in saved.items():
            try:
                _, after = table.update(model, targets)
            except InvalidRequest as exc:
                # The config changed since (a provider or model removed), or the file was
                # damaged or edited by hand: the config wins.
                log.warning("saved routes do not fit the config; ignored",
                            extra={"fields": {"model": model[:100], "path": str(self.path),
                                              "reason": exc.message}})
                continue
            self.changed[model] = after

    def write(self) -> None:
        """Atomically replace the state file. Writes a file: call it from a thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(self.changed, option=orjson.OPT_INDENT_2))
        os.replace(temporary, self.path)
