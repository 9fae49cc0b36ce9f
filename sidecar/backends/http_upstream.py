"""What every HTTP upstream shares, whatever protocol it speaks: connect, headers and
idle-read timeouts, retries with backoff before the first byte (honouring a bounded
Retry-After), answers bounded in size as they arrive, redirects never followed, and the
upstream's words scrubbed of the operator's key. The bytes travel on the sidecar's own
transport (sidecar/transport/), one pooled client per upstream origin. A subclass says how it
authenticates, where a call goes and how its streams end."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncGenerator
from time import perf_counter
from urllib.parse import urlsplit

from sidecar import __version__
from sidecar.backends.base import HEARTBEAT, Call
from sidecar.backends.upstream_answers import (
    FIELD_CHARS,
    default_type,
    error_fields,
    field,
    retry_after,
)
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
from sidecar.transport import Response, UpstreamClient
from sidecar.transport.errors import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    HeadersTimeout,
    ReadTimeout,
    TransportError,
)

log = logging.getLogger("sidecar.upstream")

_BACKOFF_BASE_S = 0.25
_BACKOFF_CAP_S = 8.0
_ERROR_BODY_LIMIT = 64 * 1024


class HttpUpstream:
    # What a stream that ends cleanly ends with, as the error for one that does not says.
    stream_end = "[DONE]"

    def __init__(self, name: str, settings: UpstreamSettings, base_url: str,
                 api_key: Secret | None, client: UpstreamClient,
                 heartbeat_s: float) -> None:
        self.name = name
        # The path the base URL names (e.g. /v1); the origin is the client's.
        self._base = urlsplit(base_url).path.rstrip("/")
        self._client = client
        self._settings = settings
        self._heartbeat_s = heartbeat_s
        # The compressed bytes, if an upstream sends them anyway, are inflated and counted.
        headers = {
            "User-Agent": f"llm-sidecar/{__version__}",
            **settings.headers,
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
        }
        if api_key is not None:
            headers.update(self.auth_headers(api_key.reveal()))
        self._headers = headers
        self._fixed: bytes | None = None  # the headers, encoded at the first request
        # What must never come back out of this upstream's answers: its key, and the values of
        # the headers configured for it.
        self._secrets = secrets_of(
            [api_key.reveal() if api_key is not None else None, *settings.headers.values()])
        self._secret_bytes = byte_forms(self._secrets)
        self._idle_s = settings.timeout_read_s
        self._headers_s = settings.timeout_headers_s or settings.timeout_read_s

    def auth_headers(self, key: str) -> dict[str, str]:  # the headers that carry the key
        raise NotImplementedError

    def path(self, call: Call) -> str:  # where a call is sent, below the origin
        raise NotImplementedError

    def ends(self, data: bytes) -> bool:  # the stream's last event (not passed on)
        raise NotImplementedError

    async def close(self) -> None:
        """The client belongs to the app, which closes it."""

    def _header_block(self) -> bytes:
        if self._fixed is None:
            self._fixed = self._client.header_block(self._headers)
        return self._fixed

    async def _probe(self, path: str) -> bool:
        """GET path: any answer below 500 means the upstream is there."""
        response: Response | None = None
        try:
            async with asyncio.timeout(self._settings.timeout_connect_s + 2):
                response = await self._client.request(
                    "GET", path, self._header_block(), headers_timeout_s=self._headers_s)
                await response.read_all(self._idle_s, _ERROR_BODY_LIMIT)
            response.release()
            return response.status < 500
        except (TransportError, TimeoutError):
            if response is not None:
                response.close()
            return False

    async def complete(self, call: Call) -> bytes:
        response = await self._send(call)
        started = perf_counter()
        whole = False
        try:
            body = await self._read_body(response)
            whole = True
        except ReadTimeout:
            raise self._read_timeout() from None
        except TransportError as exc:
            raise UpstreamError(
                f"The upstream `{self.name}` broke off its answer: {exc}."
            ) from None
        finally:
            call.timing.upstream += perf_counter() - started
            # An answer cut short (too large, broken) takes its connection with it: the rest
            # of it is never read, so the connection can never serve another request.
            if whole:
                response.release()
            else:
                response.close()
        # The length was checked as it arrived; this catches an HTML error page or a
        # proxy's banner without parsing every answer twice.
        if body[:1] != b"{" or body[-1:] != b"}":
            body = body.strip()
        if not (body[:1] == b"{" and body[-1:] == b"}"):
            raise UpstreamError(
                f"The upstream `{self.name}` answered with something that is not a JSON object."
            )
        return body

    async def _read_body(self, response: Response) -> bytes:
        """The whole answer, counted as it arrives after decompression: a few compressed
        kilobytes may inflate to gigabytes."""
        limit = self._settings.max_response_bytes
        length = response.content_length
        if length is not None and length > limit and "content-encoding" not in response.headers:
            raise self._too_large(limit)
        chunks: list[bytes] = []
        size = 0
        idle = self._idle_s
        while chunk := await response.read(idle):
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
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                kind = scrub(kind[:FIELD_CHARS], self._secrets)
                raise UpstreamError(
                    f"The upstream `{self.name}` did not answer a streaming request with an "
                    f"event stream (Content-Type: {kind or 'none'})."
                )
            limit = self._settings.max_event_bytes
            splitter = EventSplitter(limit)
            secrets = self._secret_bytes
            timing = call.timing
            heartbeat = self._heartbeat_s
            idle = self._idle_s
            while True:
                started = perf_counter()
                try:
                    chunk = await response.read(idle, heartbeat)
                except ReadTimeout:
                    raise self._read_timeout() from None
                except TransportError as exc:
                    raise UpstreamError(
                        f"The connection to the upstream `{self.name}` broke mid-stream: "
                        f"{exc}."
                    ) from None
                timing.upstream += perf_counter() - started
                if chunk is None:  # silent for a heartbeat's time
                    yield HEARTBEAT
                    continue
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
            # A stream we leave early (client gone, error) aborts the connection, which is
            # how the upstream learns to stop generating. One that ended cleanly may still
            # hold the chunked body's last bytes: it is kept once they are in.
            if finished:
                response.release_at_end()
            else:
                response.close()

    async def _send(self, call: Call) -> Response:
        path = self.path(call)
        rid = call.request_id
        extra = (b"X-Request-Id: " + rid.encode("latin-1", "replace") + b"\r\n"
                 if "\r" not in rid and "\n" not in rid else b"")
        fixed = self._header_block()
        attempt = 0
        while True:
            started = perf_counter()
            try:
                # A redirect is never followed: it would re-send the prompt, and the configured
                # headers, to a host the operator never named.
                response = await self._client.request(
                    "POST", path, fixed, call.body, extra, headers_timeout_s=self._headers_s)
            except HeadersTimeout:
                call.timing.upstream += perf_counter() - started
                raise self._read_timeout() from None
            except (ConnectFailed, Disconnected) as exc:
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
            except TransportError as exc:
                call.timing.upstream += perf_counter() - started
                raise UpstreamError(f"The upstream `{self.name}` answered with something "
                                    f"that is not a valid HTTP response: {exc}.") from None
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
                asked = retry_after(response.headers)
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

    async def _status_error(self, response: Response,
                            asked: float | None) -> SidecarError:
        status = response.status
        raw = await self._error_body(response)
        upstream = {key: scrub(str(value), self._secrets)
                    for key, value in error_fields(raw).items() if value is not None}
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
            kind = upstream.get("type", "")[:FIELD_CHARS] or default_type(status)
            return UpstreamStatus(status, message, kind, param=field(upstream.get("param")),
                                  code=field(upstream.get("code")), headers=headers)
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

    async def _error_body(self, response: Response) -> bytes:
        """The first 64 KiB of an error answer; the connection is kept only if that was all."""
        chunks: list[bytes] = []
        size = 0
        try:
            while size < _ERROR_BODY_LIMIT and (chunk := await response.read(self._idle_s)):
                chunks.append(chunk)
                size += len(chunk)
        except TransportError:
            response.close()
            return b"".join(chunks)[:_ERROR_BODY_LIMIT]
        if size < _ERROR_BODY_LIMIT:
            response.release()
        else:
            response.close()
        return b"".join(chunks)[:_ERROR_BODY_LIMIT]

    def _unreachable(self, exc: TransportError) -> UpstreamError:
        if isinstance(exc, ConnectTimeout):
            return UpstreamTimeout(
                f"Could not connect to the upstream `{self.name}` within "
                f"{self._settings.timeout_connect_s:g}s."
            )
        return UpstreamUnreachable(f"Could not reach the upstream `{self.name}`: {exc}.")


def _backoff(attempt: int) -> float:
    return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * (1 << attempt)) * random.uniform(0.5, 1.5)
