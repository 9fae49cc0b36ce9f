"""The app served in the test's own event loop on loopback, and blockbuster around the part of
a test where any blocking call on that loop must fail it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from aiohttp import web
from blockbuster import BlockBuster


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """The app's base URL (http://127.0.0.1:PORT) while the block runs."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def no_blocking() -> Iterator[None]:
    """Only what runs inside is watched: clients made or closed outside are not the product."""
    blockbuster = BlockBuster()
    blockbuster.activate()
    try:
        yield
    finally:
        blockbuster.deactivate()
