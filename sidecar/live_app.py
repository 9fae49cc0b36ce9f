"""The application that new requests go to, and the switch to another one between two requests.

A config reload builds a whole new application (its parts in their cleanup contexts, as at
start) beside the running one, then switches: requests that arrive afterwards are handled by
the new one, while requests already in flight finish on the application they started on, with
its backends, pools and settings. The old application is torn down once those requests have
ended. The listeners, their connections and the metrics listener belong to the process and
stay through a switch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web, web_app
from aiohttp.web_request import BaseRequest

from sidecar.api import metrics
from sidecar.appkeys import SETTINGS
from sidecar.config import metrics_listener

log = logging.getLogger("sidecar")


class AppBuild(web.AppRunner):
    """One build of the application, started without a listener of its own: its server's
    handler and request factory are what the edge calls while it is the current one."""

    async def shutdown(self) -> None:
        # Not the app's on_shutdown: a retired build is not the server stopping (the drain,
        # and the readiness it reports, belong to the server).
        pass

    @property
    def web_server(self) -> web.Server:
        assert self.server is not None, "set up first"
        return self.server


class LiveApp:
    """The current application build, the builds being retired, and the switch between them."""

    def __init__(self) -> None:
        self._current: AppBuild | None = None
        # Builds waiting for their requests to end, and every retiring task (one that is past
        # its wait is tearing its build down).
        self._retiring: dict[AppBuild, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def app(self) -> web.Application:
        assert self._current is not None, "started first"
        return self._current.app

    async def start(self, app: web.Application) -> None:
        """Build `app`'s parts and hand it the next request."""
        self.take_over(await self.start_beside(app), ())

    async def start_beside(self, app: web.Application) -> AppBuild:
        """Build `app`'s parts without handing it any request yet. Raises what a part raised,
        with the parts already built torn down again."""
        build = AppBuild(app, handler_cancellation=True)
        try:
            await build.setup()
        except BaseException:
            await build.cleanup()
            raise
        return build

    def take_over(self, build: AppBuild, in_flight: Collection[asyncio.Task[Any]]) -> None:
        """Hand new requests to `build`; the build it replaces is torn down once `in_flight`,
        the requests it is serving now, have all ended."""
        old, self._current = self._current, build
        if old is not None:
            task = self._retiring[old] = asyncio.create_task(
                self._retire(old, set(in_flight)), name="retire-app")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retire(self, build: AppBuild, requests: set[asyncio.Task[Any]]) -> None:
        # No cap of our own: cutting a stream here would be the reload's doing. Streams end by
        # themselves (upstream idle timeouts), or at the latest in the server's drain.
        if requests:
            await asyncio.wait(requests)
        del self._retiring[build]
        await build.cleanup()
        _forget_middleware_chains()
        log.info("the application of the previous config is closed")

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        assert self._current is not None
        return await self._current.web_server.request_handler(request)

    def make_request(self, *args: Any) -> BaseRequest:
        assert self._current is not None
        return self._current.web_server.request_factory(*args)

    async def close(self) -> None:
        """Tear down every build, the retiring ones first (their requests are over: the server
        drained them)."""
        waiting = list(self._retiring)
        for build in waiting:
            self._retiring[build].cancel()
        # Those past their wait finish tearing down; the others stop waiting.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for build in waiting:
            if self._retiring.pop(build, None) is not None:
                await build.cleanup()
        if self._current is not None:
            await self._current.cleanup()
            self._current = None


def _forget_middleware_chains() -> None:
    """aiohttp keeps each handler's middleware chain in a cache keyed by the applications it
    ran in (up to 1024 entries): a retired build that served a request would stay in memory,
    whole, until pushed out. The chains of the current build are made again on their next
    request, at the cost of one small function per route."""
    cached = getattr(web_app, "_cached_build_middleware", None)
    clear = getattr(cached, "cache_clear", None)
    if callable(clear):
        clear()


@asynccontextmanager
async def metrics_listening(live: LiveApp) -> AsyncIterator[None]:
    """metrics.listen: the metrics on a loopback listener of their own, without a token, for
    the process's lifetime; each scrape reads the application current at that moment."""
    settings = live.app[SETTINGS]
    if not settings.metrics.enabled or not settings.metrics.listen:
        yield
        return
    host, port = metrics_listener(settings.metrics.listen, settings.source)

    async def scrape(request: web.Request) -> web.StreamResponse:
        return await metrics.scrape_handler(live.app, loopback_listener=True)(request)

    scraping = web.Application()
    scraping.router.add_get(settings.metrics.path, scrape)
    runner = web.AppRunner(scraping, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0]
        # Not "address": that field names the main listener in the `serving` line.
        log.info("serving metrics", extra={"fields": {
            "metrics_url": f"http://{_host(bound[0])}:{bound[1]}{settings.metrics.path}"}})
        yield
    finally:
        await runner.cleanup()


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
