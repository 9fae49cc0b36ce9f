"""Who may use the admin page, and how a browser proves it on every request.

Auth off: the page is open where the JSON admin API is (loopback), with the same Host and
Origin checks; the forms' CSRF token is derived from a cookie, with nothing kept per visit
(sidecar/security/local_visits.py). Auth on: a login form takes an admin-scope token, checks
it as the API does and opens a server-side session (sidecar/security/sessions.py); the
browser keeps only the session's id, in an HttpOnly, SameSite=Strict cookie. Either way every
state-changing form carries the session's CSRF token and is refused when Origin or
Sec-Fetch-Site says another site sent it; the login form carries a nonce of its own. The JSON
admin API never reads the cookie (it takes Bearer tokens only)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import jwt
from aiohttp import hdrs, web
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from sidecar.api.middleware import BrowserCheck
from sidecar.errors import BrowserRefused, InvalidRequest, UnsupportedMediaType
from sidecar.security.jwt import Forbidden, Unauthorized, Verifier
from sidecar.security.local_visits import LocalVisits
from sidecar.security.login_attempts import LoginAttempts
from sidecar.security.sessions import Session, SessionStore
from sidecar.settings import Settings

# Every page and static file: no script but our own file, no framing, no sniffing, no
# Referer leaving with a page's URL, and nothing cached by the browser or a proxy. Forms post
# only here, and an injected <base> cannot move relative links and form targets elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
Form = MultiDictProxy[str | bytes | bytearray | FileField]
# A token is a few hundred bytes; a login form field past this is not one.
MAX_TOKEN_CHARS = 8192
LOGIN_NONCE_S = 600
# Sec-Fetch-Site values a form of this page sends (a user typing the URL: "none").
_OWN_SITE = frozenset({"same-origin", "none"})


@dataclass(frozen=True, slots=True)
class Visit:
    """A request of a logged-in browser: its session, and that session's id."""

    session_id: str
    session: Session
    # Auth off: this very request set the cookie (it came without one).
    opened_now: bool = False


class PageAccess:
    def __init__(self, settings: Settings, verifier: Verifier | None,
                 sessions: SessionStore) -> None:
        self._verifier = verifier
        self._admin_scope = settings.auth.admin_scope
        self._ttl = settings.admin_page.session_ttl_s
        self.sessions = sessions
        self.login_attempts = LoginAttempts(settings.admin_page.login_attempts_per_minute)
        # Auth off: no sessions kept, only cookies and the CSRF tokens derived from them.
        self._local = LocalVisits(self._ttl) if verifier is None else None
        self._browsers = BrowserCheck(settings)
        secure = settings.admin_page.secure_cookies
        # "auto": Secure when this process ends TLS; a proxy that ends it says so by config.
        self.secure_cookies = bool(settings.server.tls_cert) if secure == "auto" else secure
        # Over TLS the __Host- prefix pins the cookie to this origin (no Domain, Secure);
        # browsers accept that prefix only with Path=/, so over TLS the path is /. The JSON
        # admin API and /v1/ never read it.
        prefix = "__Host-" if self.secure_cookies else ""
        self.cookie = f"{prefix}sidecar_session"
        self.login_cookie = f"{prefix}sidecar_login"
        self._path = "/" if self.secure_cookies else "/admin"

    @property
    def auth_on(self) -> bool:
        return self._verifier is not None

    def set_cookie(self, response: web.StreamResponse, name: str, value: str,
                   max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path=self._path, httponly=True,
                            secure=self.secure_cookies, samesite="Strict")

    def clear_cookie(self, response: web.StreamResponse, name: str) -> None:
        self.set_cookie(response, name, "", 0)

    async def visit(self, request: web.Request) -> Visit | None:
        """The browser's live session, if it has one. Reading a page changes nothing, and
        another site cannot read the answer (no CORS), so only the Host is checked here (a
        rebound DNS name could read it); a link from another site still opens the page."""
        self._browsers.check_host(request)
        session_id = request.cookies.get(self.cookie, "")
        if not session_id:
            return None
        if self._local is not None:
            session = self._local.get(session_id)
        else:
            session = await self.sessions.get(session_id)
        return Visit(session_id, session) if session is not None else None

    def open_local(self) -> Visit:
        """Auth off: the one local operator's cookie, for the forms' CSRF tokens."""
        assert self._local is not None, "a local visit is opened only with auth off"
        session_id, session = self._local.open()
        return Visit(session_id, session, opened_now=True)

    def check_prepared_here(self, request: web.Request) -> None:
        """A page that prepares a change (a confirm step, its form pre-filled from the URL)
        is shown only when this site's page, or the user typing the URL, asked for it: a link
        from another site would put its own values into a form holding a valid token."""
        self._browsers.check_host(request)
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in _OWN_SITE:
            raise BrowserRefused(f"A change prepared by a link from another site "
                                 f"(`Sec-Fetch-Site: {site[:40]}`) is not shown; choose it "
                                 "on this page.")

    def check_sender(self, request: web.Request) -> None:
        """Refuse a request that another site's page made the browser send: a Host that is
        not this server, an Origin of another site, or Sec-Fetch-Site saying so."""
        self._browsers.check_host(request)
        headers = request.headers
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site not in _OWN_SITE:
            raise BrowserRefused(f"A form sent from another site (`Sec-Fetch-Site: {site[:40]}`) "
                                 "is not accepted.")
        origin = headers.get(hdrs.ORIGIN)
        if origin is None:
            return
        if origin.lower() == "null":
            # Our own pages' forms are sent with `Origin: null`: Referrer-Policy: no-referrer
            # hides the origin too. The browser still says where the form came from.
            if site != "same-origin":
                raise BrowserRefused("A form sent from an opaque origin is not accepted.")
            return
        if origin.lower() != f"{request.scheme}://{headers.get(hdrs.HOST)}".lower():
            raise BrowserRefused(f"Requests from the origin `{origin[:100]}` are not accepted.")

    async def form(self, request: web.Request) -> Form:
        """A form's fields, as our pages send them: URL-encoded, never multipart (whose file
        parts aiohttp would write to disk)."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(
                "A form must be sent as application/x-www-form-urlencoded.")
        return await request.post()

    def check_csrf(self, visit: Visit, form: Form) -> None:
        sent = form.get("csrf")
        if not isinstance(sent, str) or not hmac.compare_digest(
                sent.encode(), visit.session.csrf.encode()):
            raise Forbidden("The form's CSRF token is missing or wrong; reload the page.",
                            code="csrf_failed")

    def remember_login_nonce(self, response: web.StreamResponse, nonce: str) -> None:
        """The login form's nonce goes in the form and in a short-lived cookie, which must
        agree when the form comes back."""
        self.set_cookie(response, self.login_cookie, nonce, LOGIN_NONCE_S)

    def check_login_nonce(self, request: web.Request,
                          form: Form) -> None:
        kept = request.cookies.get(self.login_cookie, "")
        sent = form.get("nonce")
        if not kept or not isinstance(sent, str) or not hmac.compare_digest(
                sent.encode(), kept.encode()):
            raise Forbidden("The login form's nonce is missing or wrong; reload the page.",
                            code="csrf_failed")

    async def log_in(self, token: object) -> tuple[str, Session, int]:
        """Check an admin-scope token as the API does; open its session (id, session, TTL)."""
        verifier = self._verifier
        if verifier is None:
            raise InvalidRequest("Auth is off: the page needs no login.")
        if not isinstance(token, str) or not token.strip():
            raise Unauthorized("Paste a token with the admin scope.", code="missing_token")
        token = token.strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("That is too long to be a token.")
        principal = await verifier.verify(token)
        if self._admin_scope not in principal.scopes:
            raise Forbidden(f"The token lacks the `{self._admin_scope}` scope the admin page "
                            "needs.")
        # Verified above; only its expiry is read again, to end the session no later.
        expires = jwt.decode(token, options={"verify_signature": False}).get("exp")
        left = float(expires) - time.time() if isinstance(expires, int | float) else 0.0
        ttl = int(min(self._ttl, left))
        if ttl <= 0:
            raise Unauthorized("The token expires too soon to log in with.",
                               code="token_expired")
        session_id, session = await self.sessions.open(principal.tenant, ttl)
        return session_id, session, ttl


Page = Callable[[web.Request, Visit], Awaitable[web.StreamResponse]]
