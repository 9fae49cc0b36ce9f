"""The admin page under /admin/: its parts (templates, static files, sessions), the checks
every page and form passes, login and logout. The pages themselves are
sidecar/api/admin_page_views.py's; every change they make goes through
sidecar/api/admin_changes.py, as the JSON admin API's do."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.api.admin_page_access import SECURITY_HEADERS, Form, PageAccess, Visit
from sidecar.api.http import error_response
from sidecar.appkeys import ADMIN_PAGE, REDIS, SETTINGS, VERIFIER
from sidecar.errors import RouteNotFound, SidecarError
from sidecar.resources import data_dir
from sidecar.security.jwt import Forbidden, Unauthorized
from sidecar.security.sessions import SessionStore

log = logging.getLogger("sidecar.audit")
# web/ sits beside the package in the repository: templates/ and static/.
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript"}
PageHandler = Callable[[web.Request, Visit, Form | None], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class AdminPage:
    """The page's parts, owned by the app: who may see it, and its files, read at start."""

    access: PageAccess
    templates: dict[str, str] = field(default_factory=dict)
    static: dict[str, tuple[bytes, str]] = field(default_factory=dict)


def install(app: web.Application) -> None:
    """Register the page (when admin_page.enabled): its routes and its part."""
    if not app[SETTINGS].admin_page.enabled:
        return
    templates: dict[str, str] = {}
    # The templates are read in a thread at start into this mapping: rendering never touches
    # the disk on the event loop.
    aiohttp_jinja2.setup(app, loader=jinja2.DictLoader(templates), autoescape=True,
                         default_helpers=False, filters={"utc": _utc, "brief": brief},
                         # A name a template misspells fails its test instead of showing blank.
                         undefined=jinja2.StrictUndefined)
    app.cleanup_ctx.append(_make_part(templates))
    app.on_response_prepare.append(_page_headers)
    # Imported here: the pages' module uses this one's helpers (render, page, see_other).
    from sidecar.api import admin_page_views

    app.router.add_get("/admin", _to_overview)
    app.router.add_get("/admin/static/{name}", _static)
    app.router.add_get("/admin/login", _login_form)
    app.router.add_post("/admin/login", _login)
    app.router.add_post("/admin/logout", page(_logout, changes=True))
    for path, handler, kind in admin_page_views.PAGES:
        if kind == "form":
            app.router.add_post(path, page(handler, changes=True))
        else:
            app.router.add_get(path, page(handler, prepares=kind == "prepare"))


def is_page_path(path: str) -> bool:
    """Under /admin/ but not the JSON admin API: answered as the page's."""
    if path.startswith("/admin/api/") or path == "/admin/api":
        return False
    return path == "/admin" or path.startswith("/admin/")


async def _page_headers(request: web.Request, response: web.StreamResponse) -> None:
    # Every answer under the page's paths, errors included (an unknown file, a wrong method,
    # aiohttp's own 404 and 405), carries the page's security headers.
    if is_page_path(request.path):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)


def _make_part(templates: dict[str, str]
               ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def admin_page(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        verifier = app[VERIFIER]
        # Sessions are logins: with auth off there are none (PageAccess derives the forms'
        # CSRF tokens from a cookie instead), so page views never reach a shared Redis.
        shared = app[REDIS] if verifier is not None else None
        part = AdminPage(PageAccess(settings, verifier,
                                    SessionStore(settings.admin_page.max_sessions, shared)))
        read = await asyncio.to_thread(_read_web_dir)
        templates.update(read[0])
        part.static = read[1]
        part.templates = templates
        app[ADMIN_PAGE] = part
        yield

    return admin_page


def _read_web_dir() -> tuple[dict[str, str], dict[str, tuple[bytes, str]]]:
    """Reads files (from the checkout, or the copy an installed wheel carries): call it
    from a thread."""
    root = data_dir("web")
    templates = {p.name: p.read_text("utf-8") for p in (root / "templates").glob("*.html")}
    static = {p.name: (p.read_bytes(), STATIC_TYPES[p.suffix])
              for p in (root / "static").iterdir() if p.suffix in STATIC_TYPES}
    return templates, static


def see_other(location: str) -> web.Response:
    """Post/Redirect/Get: after a form, the browser asks for a page again."""
    return web.Response(status=303, headers={"Location": location})


def secured(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.update(SECURITY_HEADERS)
    return response


def page(handler: PageHandler, *, changes: bool = False, prepares: bool = False) -> Handler:
    """A page (GET) or a form's target (POST, `changes`): the session is checked first; a
    form must also come from this site and carry the session's CSRF token. A page that
    `prepares` a change must be asked for by this site's page (or typed in)."""

    async def serve(request: web.Request) -> web.StreamResponse:
        access = request.app[ADMIN_PAGE].access
        try:
            if prepares:
                access.check_prepared_here(request)
            visit = await access.visit(request)
            if changes:
                access.check_sender(request)
                if visit is None:
                    raise Forbidden("There is no session: open the page (and log in) first.",
                                    code="no_session")
                form = await access.form(request)
                access.check_csrf(visit, form)
                return secured(await handler(request, visit, form))
            if visit is not None:
                return secured(await handler(request, visit, None))
            if access.auth_on:
                return secured(see_other("/admin/login"))
            visit = access.open_local()
            response = await handler(request, visit, None)
            access.set_cookie(response, access.cookie, visit.session_id,
                              int(visit.session.expires - time.time()))
            return secured(response)
        except SidecarError as exc:
            return secured(error_response(exc))

    return serve


def render(request: web.Request, template: str, visit: Visit | None, status: int = 200,
           **context: Any) -> web.Response:
    access = request.app[ADMIN_PAGE].access
    context.setdefault("error", "")
    context.setdefault("notice", "")
    return aiohttp_jinja2.render_template(template, request, {
        **context, "csrf": visit.session.csrf if visit is not None else "",
        "who": visit.session.who if visit is not None else "", "auth_on": access.auth_on,
        "now": time.strftime("%H:%M:%S", time.gmtime())}, status=status)


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def brief(value: Any) -> str:
    """A change's before or after in a line: targets as provider/model=weight, else JSON."""
    if value is None:
        return "none"
    if isinstance(value, list) and all(isinstance(t, dict) and "provider" in t for t in value):
        return ", ".join(
            f"{t['provider']}/{t.get('model', '')}={t.get('weight', '')}"
            + (" (fallback only)" if t.get("fallback_only") else "") for t in value)
    text = orjson.dumps(value).decode()
    return text if len(text) <= 300 else text[:299] + "…"


async def _to_overview(request: web.Request) -> web.StreamResponse:
    return secured(see_other("/admin/"))


async def _static(request: web.Request) -> web.StreamResponse:
    found = request.app[ADMIN_PAGE].static.get(request.match_info["name"])
    if found is None:
        raise RouteNotFound(f"There is no static file {request.path[:100]}.")
    body, content_type = found
    return secured(web.Response(body=body, content_type=content_type, charset="utf-8"))


async def _login_form(request: web.Request) -> web.StreamResponse:
    access = request.app[ADMIN_PAGE].access
    try:
        if not access.auth_on or await access.visit(request) is not None:
            return secured(see_other("/admin/"))
    except SidecarError as exc:
        return secured(error_response(exc))
    return secured(_login_page(request, "", 200))


def _login_page(request: web.Request, error: str, status: int) -> web.Response:
    nonce = secrets.token_urlsafe(32)
    response = render(request, "login.html", None, status, title="Log in", error=error,
                      nonce=nonce)
    request.app[ADMIN_PAGE].access.remember_login_nonce(response, nonce)
    return response


async def _login(request: web.Request) -> web.StreamResponse:
    access = request.app[ADMIN_PAGE].access
    try:
        # Before anything costs a verification or a log line.
        access.login_attempts.take(request.remote or "")
        access.check_sender(request)
        form = await access.form(request)
        access.check_login_nonce(request, form)
        session_id, session, ttl = await access.log_in(form.get("token"))
    except (Unauthorized, Forbidden) as exc:
        # Why, and from where; never the token.
        log.warning("admin page login refused", extra={"fields": {
            "remote": request.remote, "reason": exc.code or exc.type}})
        if exc.code == "csrf_failed":
            return secured(error_response(exc))
        # A token that does not verify, or lacks the scope: the form again, with why.
        return secured(_login_page(request, exc.message, exc.status))
    except SidecarError as exc:
        return secured(error_response(exc))
    log.info("admin page login", extra={"fields": {
        "who": session.who, "remote": request.remote, "session_s": ttl}})
    response = see_other("/admin/")
    access.set_cookie(response, access.cookie, session_id, ttl)
    access.clear_cookie(response, access.login_cookie)
    return secured(response)


async def _logout(request: web.Request, visit: Visit, form: Form | None) -> web.StreamResponse:
    access = request.app[ADMIN_PAGE].access
    if access.auth_on:
        await access.sessions.close(visit.session_id)
    response = see_other("/admin/login" if access.auth_on else "/admin/")
    access.clear_cookie(response, access.cookie)
    return response
