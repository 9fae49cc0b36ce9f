"""The admin page's logins: a server-side session per login, named by a random 256-bit id
that only the browser's cookie holds. Kept in Redis when one is configured, so every sidecar of
a fleet accepts it (Redis stores a hash of the id, never the id), in this process otherwise.

A session holds who logged in, the CSRF token of its forms and when it ends; never the token
that logged in."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from sidecar.errors import SidecarError

if TYPE_CHECKING:
    from sidecar.cache.redis_tier import RedisTier

ID_BYTES = 32  # 256 bits
# An id as the cookie carries it: url-safe base64 of 32 bytes is 43 characters.
ID_CHARS = 43


class SessionUnavailable(SidecarError):
    status = 503
    code = "session_store_unavailable"


@dataclass(frozen=True, slots=True)
class Session:
    who: str
    csrf: str
    expires: float  # Unix time

    def encode(self) -> bytes:
        return orjson.dumps({"who": self.who, "csrf": self.csrf, "expires": self.expires})

    @classmethod
    def decode(cls, raw: bytes) -> Session | None:
        try:
            kept = orjson.loads(raw)
            session = cls(str(kept["who"]), str(kept["csrf"]), float(kept["expires"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return session


class SessionStore:
    """Sessions by id, in Redis (`shared`) or in a bounded map of this process."""

    def __init__(self, max_sessions: int, shared: RedisTier | None = None) -> None:
        self._max = max_sessions
        self._shared = shared
        self._kept: OrderedDict[str, Session] = OrderedDict()

    @staticmethod
    def _key(session_id: str) -> str:
        # Whoever reads the Redis (or a dump of it) cannot log in with what is there.
        return "session:" + hashlib.sha256(session_id.encode()).hexdigest()

    async def open(self, who: str, ttl_s: float) -> tuple[str, Session]:
        """A new session for `who`, lasting `ttl_s`: its id and what it holds."""
        session_id = secrets.token_urlsafe(ID_BYTES)
        session = Session(who, secrets.token_urlsafe(ID_BYTES), time.time() + ttl_s)
        if self._shared is not None:
            if not await self._shared.set(self._key(session_id), session.encode(), ttl_s):
                raise SessionUnavailable(
                    "The session store (Redis) did not answer; try logging in again.")
            return session_id, session
        self._drop_expired()
        self._kept[session_id] = session
        while len(self._kept) > self._max:
            self._kept.popitem(last=False)
        return session_id, session

    async def get(self, session_id: str) -> Session | None:
        """The live session of this id; None for an unknown, ended or malformed one."""
        if len(session_id) != ID_CHARS:
            return None
        if self._shared is not None:
            raw = await self._shared.get(self._key(session_id))
            session = Session.decode(raw) if raw is not None else None
        else:
            session = self._kept.get(session_id)
        if session is None or session.expires <= time.time():
            return None
        return session

    async def close(self, session_id: str) -> None:
        """Logout: the session ends on the server, whatever the browser keeps."""
        if len(session_id) != ID_CHARS:
            return
        if self._shared is not None and not await self._shared.delete(self._key(session_id)):
            raise SessionUnavailable(
                "The session store (Redis) did not answer, so the session may still be valid; "
                "log out again.")
        self._kept.pop(session_id, None)

    def _drop_expired(self) -> None:
        """The oldest sessions first, while they have ended: a login costs no scan of them
        all. One that ends sooner than an older one is refused by `get` until it goes."""
        now = time.time()
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if oldest.expires > now:
                return
            self._kept.popitem(last=False)
