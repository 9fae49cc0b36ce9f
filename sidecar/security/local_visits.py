"""With auth off, the admin page's forms carry a CSRF token that needs no session kept on the
server: the browser's cookie holds when it was issued and 256 random bits, and the token is an
HMAC of that cookie under a key drawn when the process starts. Nothing is stored per visit,
so no number of visits (another site can make a browser load the page as often as it likes)
can push the operator's token out; a restart ends every token, as it would a session."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from sidecar.security.sessions import ID_BYTES, ID_CHARS, Session

WHO = "anonymous"
# A cookie issued in the future by more than this is not one of ours (clock steps aside).
CLOCK_SLACK_S = 60
# "<unix seconds>.<43 characters>": a cookie far longer than this is not one of ours.
MAX_COOKIE_CHARS = ID_CHARS + 12


class LocalVisits:
    """Issue and check the one local operator's cookie and the CSRF token derived from it."""

    def __init__(self, ttl_s: float) -> None:
        self._key = secrets.token_bytes(32)
        self._ttl = ttl_s

    def open(self) -> tuple[str, Session]:
        """A new cookie value, and the session it stands for."""
        issued = int(time.time())
        cookie = f"{issued}.{secrets.token_urlsafe(ID_BYTES)}"
        return cookie, Session(WHO, self._csrf(cookie), issued + self._ttl)

    def get(self, cookie: str) -> Session | None:
        """The session a cookie stands for; None for a malformed or ended one."""
        if len(cookie) > MAX_COOKIE_CHARS:
            return None
        issued_text, _, nonce = cookie.partition(".")
        if not issued_text.isdigit() or len(nonce) != ID_CHARS:
            return None
        issued = int(issued_text)
        now = time.time()
        if issued + self._ttl <= now or issued > now + CLOCK_SLACK_S:
            return None
        return Session(WHO, self._csrf(cookie), issued + self._ttl)

    def _csrf(self, cookie: str) -> str:
        digest = hmac.new(self._key, cookie.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
