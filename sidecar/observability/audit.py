"""The audit trail: every change an operator makes while serving (weights, engines, the
cache) as one log line on `sidecar.audit`, and the last few kept in memory, newest first,
for the admin page."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sidecar.audit")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for a change, as the request that carried it says."""

    who: str  # the verified token's tenant, "anonymous" with auth off
    remote: str | None
    request_id: str


@dataclass(frozen=True, slots=True)
class Change:
    at: float  # Unix time
    who: str
    what: str  # "routes changed", "local model change", "cache flushed"
    subject: str  # the model, the provider or the cache tenant
    before: Any
    after: Any


class AuditTrail:
    """The last `keep` changes of this process; older ones are only in the log."""

    def __init__(self, keep: int = 200) -> None:
        self._changes: deque[Change] = deque(maxlen=keep)

    def record(self, what: str, actor: Actor, subject: str, before: Any, after: Any,
               **fields: Any) -> None:
        self._changes.append(Change(time.time(), actor.who, what, subject, before, after))
        log.info(what, extra={"fields": {
            "who": actor.who, "remote": actor.remote, "request_id": actor.request_id,
            "before": before, "after": after, **fields}})

    def newest_first(self) -> list[Change]:
        return list(reversed(self._changes))
