"""What every HTTP upstream shares, whatever protocol it speaks: the pooled session, connect
and idle-read timeouts, retries with backoff before the first byte (honouring a bounded
Retry-After), answers bounded in size as they arrive, redirects never followed, and the
upstream's words scrubbed of the operator's key. A subclass says how it authenticates, where a
call goes and how its streams end."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncGenerator
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from sidecar import __version__
from sidecar.backends.base import HEARTBEAT, Call
from sidecar.errors import (
    SidecarError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from sidecar.protocol.sse import EventSplitter, EventTooLarge
from sidecar.security.scrub import byte_forms, scrub, scrub_bytes, secrets_of
from sidecar.settings import Secret, UpstreamSettings

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
# An upstream asking for a longer wait is passed on as asking for this; the router rests a
# target at most `routing.max_rest_s` whatever it asks.
_RETRY_AFTER_CAP_S = 86_400.0
# Upstream words quoted in a short field (an error's type, code or param, a Content-Type).
_FIELD_CHARS = 100


class HttpUpstream:
    # What a stream that ends cleanly ends with, as the error for one that does not says.
    stream_end = "[DONE]"

    def __init__(self, name: str, settings: UpstreamSettings, base_url: str,
                 api_key: Secret | None, session: aiohttp.ClientSession,
                 heartbeat_s: float) -> None:
        self.name = name
        self._base = base_url.rstrip("/")
        self._session = session
        self._settings = settings
        self._heartbeat_s = heartbeat_s
        headers = {
            "User-Agent": f"llm-sidecar/{__version__}",
            **settings.headers,
            "Content-Type": "application/json",
        }
        if api_key is not None:
            headers.update(self.auth_headers(api_key.reveal()))
        self._headers = headers
        # What must never come back out of this upstream's answers: its key, and the values of
        # the headers configured for it.
        self._secrets = secrets_of(
            [api_key.reveal() if api_key is not None else None, *settings.headers.values()])
        self._secret_bytes = byte_forms(self._secrets)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.timeout_connect_s,
            sock_read=settings.timeout_read_s,
        )

    def auth_headers(self, key: str) -> dict[str, str]:  # the headers that carry the key
        raise NotImplementedError

    def url(self, call: Call) -> str:  # where a call is sent
        raise NotImplementedError

    def ends(self, data: bytes) -> bool:  # the stream's last event (not passed on)
        raise NotImplementedError

    async def close(self) -> None:
        """The session belongs to the app, which closes it."""

    async def _probe(self, url: str) -> bool:
        """GET url: any answer below 500 means the upstream is there."""
        try:
            async with self._session.get(
                url,
                headers=self._headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_connect_s + 2),
            ) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def complete(self, call: Call) -> bytes:
        response = await self._send(call)
        started = perf_counter()
        whole = False
        try:
            body = await self._read_body(response)
            whole = True
        except aiohttp.SocketTimeoutError:
            raise self._read_timeout() from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamError(
                f"The upstream `{self.name}` broke off its answer: {type(exc).__name__}."
            ) from None
        finally:
            call.timing.upstream += perf_counter() - started
            # An answer cut short (too large, broken) takes its connection with it: the rest
            # of it is never read, so the connection can never serve another request.
            if whole:
                response.release()
            else:
                response.close()
        # The length was checked by the HTTP client; this catches an HTML error page or a
        # proxy's banner without parsing every answer twice.
        if body[:1] != b"{" or body[-1:] != b"}":
            body = body.strip()
        if not (body[:1] == b"{" and body[-1:] == b"}"):
            raise UpstreamError(
                f"The upstream `{self.name}` answered with something that is not a JSON object."
            )
        return body

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole answer, counted as it arrives after decompression (the HTTP client
        inflates it for us): a few compressed kilobytes may inflate to gigabytes."""
        limit = self._settings.max_response_bytes
        length = response.content_length
        if length is not None and length > limit and "Content-Encoding" not in response.headers:
            raise self._too_large(limit)
        content = response.content
        chunks: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, limit: int) -> UpstreamError:
        return UpstreamError(
            f"The upstream `{self.name}` answered with more than {limit} bytes "
            f"(providers.{self.name}.max_response_bytes)."
        )

    async def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        response = await self._send(call)
        finished = False
        try:
            kind = response.headers.get("Content-Type", "")
            if not kind.startswith("text/event-stream"):
                kind = scrub(kind[:_FIELD_CHARS], self._secrets)
                raise UpstreamError(
                    f"The upstream `{self.name}` did not answer a streaming request with an "
                    f"event stream (Content-Type: {kind or 'none'})."
                )
            limit = self._settings.max_event_bytes
            splitter = EventSplitter(limit)
            secrets = self._secret_bytes
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
                        f"The upstream `{self.name}` ended the stream without "
                        f"{self.stream_end}."
                    )
                too_large = None
                try:
                    events = splitter.feed(chunk)
                except EventTooLarge as exc:
                    events, too_large = exc.events, exc
                for data in events:
                    if self.ends(data):
                        finished = True
                        return
                    # An error event quotes the upstream's words, which may quote our key. (One
                    # scan of each event; the answer's own content is passed on as it came.)
                    if b'"error"' in data:
                        data = scrub_bytes(data, secrets, shapes=True)
                    yield data
                if too_large is not None:
                    raise UpstreamError(
                        f"The upstream `{self.name}` sent a stream event of more than {limit} "
                        f"bytes (providers.{self.name}.max_event_bytes)."
                    )
        finally:
            # A stream we leave early (client gone, error) drops the connection, which is
            # how the upstream learns to stop generating.
            if finished:
                response.release()
            else:
                response.close()

    async def _send(self, call: Call) -> aiohttp.ClientResponse:
        url = self.url(call)
        headers = {**self._headers, "X-Request-Id": call.request_id}
        attempt = 0
        while True:
            started = perf_counter()
            try:
                # A redirect is never followed: it would re-send the prompt, and the configured
                # headers, to a host the operator never named.
                response = await self._session.post(
                    url, data=call.body, headers=headers, timeout=self._timeout,
                    allow_redirects=False,
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
                if status < 300:
                    return response
                if status < 400:
                    response.close()
                    # The Location is not quoted: it may carry a token in its query.
                    raise UpstreamError(
                        f"The upstream `{self.name}` answered HTTP {status}, a redirect, which "
                        f"the sidecar does not follow; check providers.{self.name}.base_url."
                    )
                asked = _retry_after(response.headers)
                error = await self._status_error(response, asked)
                retryable = status == 429 or status >= 500
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

    async def _status_error(self, response: aiohttp.ClientResponse,
                            asked: float | None) -> SidecarError:
        status = response.status
        try:
            raw = await response.content.read(_ERROR_BODY_LIMIT)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        finally:
            response.close()
        upstream = {key: scrub(str(value), self._secrets)
                    for key, value in _error_fields(raw).items() if value is not None}
        headers = {}
        if asked is not None:  # as a number the client can use, whatever the upstream wrote
            headers["Retry-After"] = str(math.ceil(asked))
        if status in (401, 403):
            # The operator's credentials were refused; that is not the client's doing, and the
            # upstream's wording may quote part of the key.
            log.error("upstream refused the configured credentials",
                      extra={"fields": {"provider": self.name, "status": status}})
            return UpstreamError(
                f"The upstream `{self.name}` refused the sidecar's credentials "
                f"(HTTP {status}); the operator must fix its API key."
            )
        if status < 500:
            message = upstream.get("message") or f"The upstream `{self.name}` answered {status}."
            kind = upstream.get("type", "")[:_FIELD_CHARS] or _default_type(status)
            return UpstreamStatus(status, message, kind, param=_field(upstream.get("param")),
                                  code=_field(upstream.get("code")), headers=headers)
        detail = upstream.get("message")
        message = f"The upstream `{self.name}` answered HTTP {status}" + (
            f": {detail}" if detail else "."
        )
        if status in (503, 504, 529):  # 529: Anthropic's "overloaded", a 503 by another name
            code = "upstream_timeout" if status == 504 else "upstream_unavailable"
            return UpstreamStatus(503 if status == 529 else status, message, "upstream_error",
                                  code=code, headers=headers)
        return UpstreamError(message, headers=headers)

    def _read_timeout(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"The upstream `{self.name}` sent nothing for "
                               f"{self._settings.timeout_read_s:g}s.")

    def _unreachable(self, exc: Exception) -> UpstreamError:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamTimeout(
                f"Could not connect to the upstream `{self.name}` within "
                f"{self._settings.timeout_connect_s:g}s."
            )
        return UpstreamUnreachable(f"Could not reach the upstream `{self.name}`: "
                                   f"{type(exc).__name__}.")


def _backoff(attempt: int) -> float:
    return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * (1 << attempt)) * random.uniform(0.5, 1.5)


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), at
    most a day; None when neither says a number of seconds we can use (junk, negative, not
    finite), so the caller's own backoff applies."""
    value = headers.get("retry-after-ms")
    if value is not None:
        milliseconds = _seconds(value)
        if milliseconds is not None:
            return min(milliseconds / 1000.0, _RETRY_AFTER_CAP_S)
    value = headers.get("Retry-After")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None:
        try:
            seconds = max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return None
    return min(seconds, _RETRY_AFTER_CAP_S)


def _seconds(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _error_fields(raw: bytes) -> dict[str, Any]:
    """The `error` object of an error body, OpenAI's or Anthropic's (both nest it there)."""
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


def _field(value: str | None) -> str | None:
    return value if value is None else value[:_FIELD_CHARS]
