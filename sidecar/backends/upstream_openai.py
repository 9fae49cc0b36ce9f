"""Any OpenAI-compatible upstream. The client's bytes go out and the upstream's come back;
nothing is translated, so a proxied request costs little more than the socket work."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncGenerator
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from sidecar import __version__
from sidecar.backends.base import HEARTBEAT, Call
from sidecar.config import ProviderSettings, Secret
from sidecar.errors import (
    SidecarError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from sidecar.protocol.sse import DONE, EventSplitter

log = logging.getLogger("sidecar.upstream")

_RETRYABLE_CONNECT = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
)
_BACKOFF_BASE_S = 0.25
_BACKOFF_CAP_S = 8.0
_ERROR_BODY_LIMIT = 64 * 1024


class OpenAIUpstream:
    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        api_key: Secret | None,
        session: aiohttp.ClientSession,
        heartbeat_s: float,
    ) -> None:
        self.name = name
        self._base = settings.base_url.rstrip("/")
        self._session = session
        self._settings = settings
        self._heartbeat_s = heartbeat_s
        headers = {
            "User-Agent": f"llm-sidecar/{__version__}",
            **settings.headers,
            "Content-Type": "application/json",
        }
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.reveal()}"
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.timeout_connect_s,
            sock_read=settings.timeout_read_s,
        )

    async def close(self) -> None:
        """The session belongs to the app, which closes it."""

    async def probe(self) -> bool:
        """GET {base_url}/models: any answer below 500 means the upstream is there."""
        try:
            async with self._session.get(
                f"{self._base}/models",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_connect_s + 2),
            ) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def complete(self, call: Call) -> bytes:
        response = await self._send(call)
        started = perf_counter()
        try:
            body = await response.read()
        except aiohttp.SocketTimeoutError:
            raise self._read_timeout() from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamError(
                f"The upstream `{self.name}` broke off its answer: {type(exc).__name__}."
            ) from None
        finally:
            call.timing.upstream += perf_counter() - started
            response.release()
        # The length was checked by the HTTP client; this catches an HTML error page or a
        # proxy's banner without parsing every answer twice.
        if body[:1] != b"{" or body[-1:] != b"}":
            body = body.strip()
        if not (body[:1] == b"{" and body[-1:] == b"}"):
            raise UpstreamError(
                f"The upstream `{self.name}` answered with something that is not a JSON object."
            )
        return body

    async def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        response = await self._send(call)
        finished = False
        try:
            kind = response.headers.get("Content-Type", "")
            if not kind.startswith("text/event-stream"):
                raise UpstreamError(
                    f"The upstream `{self.name}` did not answer a streaming request with an "
                    f"event stream (Content-Type: {kind or 'none'})."
                )
            splitter = EventSplitter()
            content = response.content
            timing = call.timing
            heartbeat = self._heartbeat_s
            while True:
                started = perf_counter()
                try:
                    async with asyncio.timeout(heartbeat):
                        chunk = await content.readany()
                except aiohttp.SocketTimeoutError:
                    raise self._read_timeout() from None
                except TimeoutError:
                    timing.upstream += perf_counter() - started
                    yield HEARTBEAT
                    continue
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    raise UpstreamError(
                        f"The connection to the upstream `{self.name}` broke mid-stream: "
                        f"{type(exc).__name__}."
                    ) from None
                timing.upstream += perf_counter() - started
                if not chunk:
                    raise UpstreamError(
                        f"The upstream `{self.name}` ended the stream without [DONE]."
                    )
                for data in splitter.feed(chunk):
                    if data == DONE:
                        finished = True
                        return
                    yield data
        finally:
            # A stream we leave early (client gone, error) drops the connection, which is
            # how the upstream learns to stop generating.
            if finished:
                response.release()
            else:
                response.close()

    async def _send(self, call: Call) -> aiohttp.ClientResponse:
        url = f"{self._base}/{call.endpoint}"
        headers = {**self._headers, "X-Request-Id": call.request_id}
        attempt = 0
        while True:
            started = perf_counter()
            try:
                response = await self._session.post(
                    url, data=call.body, headers=headers, timeout=self._timeout
                )
            except aiohttp.SocketTimeoutError:
                call.timing.upstream += perf_counter() - started
                raise self._read_timeout() from None
            except _RETRYABLE_CONNECT as exc:
                call.timing.upstream += perf_counter() - started
                if attempt >= self._settings.max_retries or not call.may_retry():
                    raise self._unreachable(exc) from None
                delay = _backoff(attempt)
                log.warning(
                    "upstream connection failed; retrying",
                    extra={"fields": {"provider": self.name, "error": type(exc).__name__,
                                      "attempt": attempt + 1, "delay_s": round(delay, 3),
                                      "request_id": call.request_id}},
                )
            else:
                call.timing.upstream += perf_counter() - started
                status = response.status
                if status < 400:
                    return response
                error = await self._status_error(response)
                retryable = status == 429 or status >= 500
                asked = _retry_after(response.headers)
                delay = _backoff(attempt) if asked is None else asked
                if (
                    not retryable
                    or attempt >= self._settings.max_retries
                    or delay > self._settings.max_retry_wait_s
                    or not call.may_retry()
                ):
                    raise error
                log.warning(
                    "upstream answered an error; retrying",
                    extra={"fields": {"provider": self.name, "status": status,
                                      "attempt": attempt + 1, "delay_s": round(delay, 3),
                                      "request_id": call.request_id}},
                )
            attempt += 1
            waited = perf_counter()
            await asyncio.sleep(delay)
            call.timing.upstream += perf_counter() - waited

    async def _status_error(self, response: aiohttp.ClientResponse) -> SidecarError:
        status = response.status
        try:
            raw = await response.content.read(_ERROR_BODY_LIMIT)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        finally:
            response.close()
        upstream = _openai_error(raw)
        headers = {}
        retry_after = response.headers.get("Retry-After")
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if status in (401, 403):
            # The operator's credentials were refused; that is not the client's doing, and the
            # upstream's wording may quote part of the key.
            log.error(
                "upstream refused the configured credentials",
                extra={"fields": {"provider": self.name, "status": status}},
            )
            return UpstreamError(
                f"The upstream `{self.name}` refused the sidecar's credentials "
                f"(HTTP {status}); the operator must fix its API key."
            )
        if status < 500:
            message = upstream.get("message") or f"The upstream `{self.name}` answered {status}."
            return UpstreamStatus(
                status,
                str(message),
                str(upstream.get("type") or _default_type(status)),
                param=_opt_str(upstream.get("param")),
                code=_opt_str(upstream.get("code")),
                headers=headers,
            )
        detail = upstream.get("message")
        message = f"The upstream `{self.name}` answered HTTP {status}" + (
            f": {detail}" if detail else "."
        )
        if status in (503, 504):
            code = "upstream_unavailable" if status == 503 else "upstream_timeout"
            return UpstreamStatus(status, message, "upstream_error", code=code, headers=headers)
        return UpstreamError(message, headers=headers)

    def _read_timeout(self) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"The upstream `{self.name}` sent nothing for {self._settings.timeout_read_s:g}s."
        )

    def _unreachable(self, exc: Exception) -> UpstreamError:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamTimeout(
                f"Could not connect to the upstream `{self.name}` within "
                f"{self._settings.timeout_connect_s:g}s."
            )
        return UpstreamUnreachable(
            f"Could not reach the upstream `{self.name}`: {type(exc).__name__}."
        )


def _backoff(attempt: int) -> float:
    return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * (1 << attempt)) * random.uniform(0.5, 1.5)


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _openai_error(raw: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            return error
        if isinstance(error, str):
            return {"message": error}
    return {}


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 404:
        return "not_found_error"
    return "invalid_request_error"


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)
