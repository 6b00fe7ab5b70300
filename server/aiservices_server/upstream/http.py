"""The one shared HTTP transport for upstream calls, and posting JSON through it safely.

httpx-aiohttp's transport: httpx's default transport costs far more CPU per call and degrades
with hundreds of slow calls in flight (figures in docs/performance.md).

The transport never decompresses (it turns aiohttp's auto-decompression off) and httpx decodes
a body only when it is read with aread() or aiter_bytes(); the upstream clients read raw bytes
and ask for uncompressed replies, so a reply costs no more memory than its bytes on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from aiservices_server.jsonbounds import may_hold_more_values
from aiservices_server.tracing import NO_TRACER, Attributes, AttributeValue, Tracer
from aiservices_server.upstream.refiner import (
    UpstreamAttempt,
    UpstreamBadReply,
    UpstreamError,
    UpstreamReplyTooLarge,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

KEEPALIVE_SECONDS = 30.0
USER_AGENT = "aiservices/0.1"
DEFAULT_MAX_REPLY_BYTES = 4 * 1024 * 1024
# A longer Retry-After is no use to a caller and would not fit a protobuf Duration anyway.
MAX_RETRY_AFTER = 86_400.0
# An error reply's body is only drained, so the connection can be reused; a longer one is not
# worth reading and the connection is closed instead.
MAX_ERROR_BODY_BYTES = 64 * 1024
# Parsing JSON costs time per value built, not per byte: 4 MiB of nested empty lists holds the
# event loop for a second (the cyclic GC makes it superlinear), while 100,000 values of any
# shape parse in about 10 ms. A refine reply holds a few dozen.
MAX_REPLY_VALUES = 100_000
# A trace id is passed on to callers and logs: a short token of safe characters or nothing.
MAX_TRACE_ID_CHARS = 128
_TRACE_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_TRACE_ID_CHARS}}}")
# Retry-After delays are honoured only when this much time is left for the retried attempt.
MIN_ATTEMPT_SECONDS = 0.5

# (status or failure kind, seconds): reported once per HTTP attempt, for metrics.
ResponseObserver = Callable[[str, float], None]


def trace_token(value: object) -> str:
    """`value` when it is a short token of safe characters, else "".

    An upstream's trace id reaches callers and the access log as is, so anything else (an
    object, a long string, control characters) is dropped rather than escaped or cut.
    """
    if isinstance(value, str) and len(value) <= MAX_TRACE_ID_CHARS and _TRACE_ID.fullmatch(value):
        return value
    return ""


def build_http_transport(*, max_connections: int) -> httpx.AsyncBaseTransport:
    """The transport every upstream call goes through: at most `max_connections` open, idle
    ones kept 30 s, no proxy or netrc settings read from the environment.

    Requests are built as `httpx.Request`s and sent with `handle_async_request`, so nothing
    follows redirects or keeps cookies. Each attempt runs under one `asyncio.timeout`, bounded by
    the caller's deadline, which covers connecting, sending and reading together.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    return AiohttpTransport(limits=limits, trust_env=False)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, delay), MAX_RETRY_AFTER)


def classify(exc: httpx.TransportError) -> UpstreamError:
    """Map httpx errors, native or from its aiohttp transport (which reports a dropped
    connection as ConnectTimeout), to our kinds by looking at the underlying cause."""
    cause = exc.__cause__
    native = not isinstance(cause, aiohttp.ClientError)
    if isinstance(cause, aiohttp.ClientConnectorError) or (
        native and isinstance(exc, httpx.ConnectError)
    ):
        return UpstreamUnavailable("could not connect to the upstream", sent=False)
    if isinstance(cause, aiohttp.ServerTimeoutError) or (
        native and isinstance(exc, httpx.TimeoutException)
    ):
        return UpstreamTimeout("the upstream did not answer in time")
    return UpstreamUnavailable("the upstream closed the connection", sent=True)


def check_value_count(text: str | bytes | bytearray) -> None:
    """UpstreamReplyTooLarge when a JSON parse of `text` might build more than
    MAX_REPLY_VALUES values, so no reply within the byte cap holds the event loop for long."""
    if may_hold_more_values(text, MAX_REPLY_VALUES):
        raise UpstreamReplyTooLarge(
            f"the upstream reply is too large: more than {MAX_REPLY_VALUES:,} JSON values"
        )


def load_reply(body: bytes | bytearray) -> Any:
    """The upstream's JSON reply, its values counted first (`check_value_count`); raises only
    UpstreamBadReply (or its subclass)."""
    check_value_count(body)
    try:
        return orjson.loads(body)
    except (ValueError, RecursionError):
        raise UpstreamBadReply("the upstream reply is not JSON") from None


def _too_many_bytes(limit: int) -> str:
    return f"the upstream reply is too large: more than {limit:,} bytes"


async def read_capped(response: httpx.Response, limit: int) -> bytearray:
    """The body as it came over the wire, at most `limit` bytes, else UpstreamReplyTooLarge.

    Refused before reading when Content-Length says it is longer; otherwise counted chunk by
    chunk (the transport yields at most 16 KiB at a time), so a chunked or endless body never
    holds more than `limit` bytes. Raw bytes are read, never decoded: see `_check_encoding`.
    The caller closes the response, which drops a connection left half-read.
    """
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise UpstreamReplyTooLarge(_too_many_bytes(limit))
    body = bytearray()
    async for chunk in response.aiter_raw():
        if len(body) + len(chunk) > limit:
            raise UpstreamReplyTooLarge(_too_many_bytes(limit))
        body += chunk
    return body


def _check_encoding(response: httpx.Response) -> None:
    """Only identity bodies are accepted, and requests say so (`Accept-Encoding: identity`).

    Replies are a few KB, so compression saves nothing worth a decoder, and a decoder is what
    turns a small gzip body into gigabytes. A reply compressed anyway is refused unread.
    """
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UpstreamBadReply("the upstream reply uses a content encoding that is not supported")


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """What bounds every request to an upstream: `timeout` seconds at most (less when the
    caller has less time left), `max_retries` retries where safe, `max_reply_bytes` read of a
    reply; `observer` hears of every attempt (status or failure kind, seconds), for metrics;
    `tracer` makes each attempt a client span (when traces are on)."""

    timeout: float
    max_retries: int = 1
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    observer: ResponseObserver | None = None
    tracer: Tracer = NO_TRACER


@dataclass(frozen=True, slots=True)
class Answer:
    """A 2xx reply: its body as it came over the wire (within the byte cap), and the attempt."""

    body: bytes | bytearray
    attempt: UpstreamAttempt


class JsonEndpoint:
    """POSTs JSON to one upstream URL through the shared transport.

    Reads at most `max_reply_bytes` of a reply, uncompressed, and releases the connection as
    soon as it stops reading: an oversized reply is an UpstreamReplyTooLarge. A non-2xx reply is
    an UpstreamStatusError (with the Retry-After it gave).

    Retries only where it is safe and can help: a connection that failed before the request was
    sent, and 429/503 with a Retry-After that fits in the time left.

    Each HTTP attempt is an UpstreamAttempt: the answer carries the last one, and so does every
    UpstreamError out of `post()` (None when no attempt was made). `observer`, when given, hears
    of every attempt as it ends, retried ones included.

    When traces are on, each attempt is a client span, child of the `traceparent` given to
    `post()` (the tool span's), and the `traceparent` sent upstream names that span;
    `span_attributes` (GenAI: the operation, the requested model) describe every one of them,
    and `describe_reply` what a 2xx reply says (the model, its token usage, finish reasons).
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        url: str,
        limits: UpstreamLimits,
        *,
        headers: Mapping[str, str],
        span_attributes: Attributes | None = None,
        describe_reply: Callable[[bytes | bytearray], Attributes] | None = None,
    ) -> None:
        self._transport = transport
        self._url = httpx.URL(url)  # parsed once, not per call
        self._tracer = limits.tracer
        self._describe_reply = describe_reply
        if limits.tracer.enabled:
            self._span_attributes = _client_attributes(self._url, span_attributes or {})
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
            **headers,
        }
        self.timeout = limits.timeout
        self.max_retries = limits.max_retries
        self.max_reply_bytes = limits.max_reply_bytes
        self._observer = limits.observer

    async def post(
        self, content: bytes, *, time_left: float | None = None, traceparent: str | None = None
    ) -> Answer:
        """The 2xx answer, within the smaller of `time_left` and the configured timeout."""
        budget = self.timeout if time_left is None else min(self.timeout, time_left)
        deadline = time.monotonic() + budget
        headers = self._headers
        if traceparent:
            headers = {**headers, "traceparent": traceparent}
        retries = 0
        last_attempt: UpstreamAttempt | None = None
        while True:
            try:
                if self._tracer.enabled:
                    return await self._traced_attempt(
                        content, headers, deadline - time.monotonic(), traceparent
                    )
                return await self._attempt(content, headers, deadline - time.monotonic())
            except UpstreamError as error:
                last_attempt = error.attempt or last_attempt
                delay = self._retry_delay(error, retries, deadline)
                if delay is None:
                    if error.attempt is last_attempt:
                        raise
                    # No attempt was made this time (no time was left): it tells of the last one.
                    raise error.with_attempt(last_attempt) from None
            retries += 1
            await asyncio.sleep(delay)

    def _retry_delay(self, error: UpstreamError, retries: int, deadline: float) -> float | None:
        if retries >= self.max_retries:
            return None
        if isinstance(error, UpstreamUnavailable) and not error.sent:
            delay = random.uniform(0.05, 0.25)
        elif (
            isinstance(error, UpstreamStatusError)
            and error.status in (429, 503)
            and error.retry_after is not None
        ):
            delay = error.retry_after + random.uniform(0.0, 0.1)
        else:
            return None
        if time.monotonic() + delay + MIN_ATTEMPT_SECONDS > deadline:
            return None
        return delay

    async def _traced_attempt(
        self, content: bytes, headers: dict[str, str], budget: float, parent: str | None
    ) -> Answer:
        """`_attempt` in a client span whose traceparent is the one sent upstream."""
        span = self._tracer.child("POST", parent, self._span_attributes, client=True)
        traced = {**headers, "traceparent": span.traceparent(parent) or ""}
        error_type: str | None = None
        try:
            answer = await self._attempt(content, traced, budget)
            span.set({"http.response.status_code": int(answer.attempt.status)})
            if self._describe_reply is not None:
                span.set(self._describe_reply(answer.body))
            return answer
        except UpstreamError as error:
            attempt = error.attempt
            if isinstance(error, UpstreamStatusError):
                span.set({"http.response.status_code": error.status})
                error_type = str(error.status)
            else:
                error_type = attempt.status if attempt is not None else "timeout"
            raise
        except BaseException as exc:
            error_type = _failure_kind(exc)
            raise
        finally:
            span.end(error_type)

    async def _attempt(self, content: bytes, headers: dict[str, str], budget: float) -> Answer:
        """One HTTP attempt within `budget` seconds, reported to the observer once it ends."""
        if budget <= 0:
            raise UpstreamTimeout("no time left for the upstream call")
        started = time.monotonic()
        request = httpx.Request("POST", self._url, content=content, headers=headers)
        try:
            response, body = await self._exchange(request, budget)
        except BaseException as exc:
            attempt = UpstreamAttempt(_failure_kind(exc), time.monotonic() - started)
            self._report(attempt)
            if isinstance(exc, UpstreamError):
                # Raised by _exchange without a cause: the same error, built with the attempt.
                raise exc.with_attempt(attempt) from None
            raise
        status = response.status_code
        attempt = UpstreamAttempt(str(status), time.monotonic() - started)
        self._report(attempt)
        if not response.is_success:
            raise UpstreamStatusError(
                status,
                f"the upstream answered HTTP {status}",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
                body=bytes(body),
                attempt=attempt,
            )
        return Answer(body, attempt)

    async def _exchange(
        self, request: httpx.Request, budget: float
    ) -> tuple[httpx.Response, bytes | bytearray]:
        """The response and its body (see `_read`), within `budget` seconds.

        Every failure to get them is an UpstreamError, except cancellation. The one
        asyncio.timeout bounds connecting, sending and reading together.
        """
        try:
            async with asyncio.timeout(budget):
                # Not AsyncClient.send: the 1,000-in-flight target (900 req/s) fails with it (891).
                response = await self._transport.handle_async_request(request)
                try:
                    return response, await self._read(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except httpx.TransportError as exc:
            raise classify(exc) from None
        except aiohttp.ClientResponseError:
            # Not HTTP at all (bad status line, headers or length): the transport passes it on.
            raise UpstreamBadReply("the upstream reply is not valid HTTP") from None
        except aiohttp.ClientError:
            raise UpstreamUnavailable("the upstream connection failed", sent=True) from None

    async def _read(self, response: httpx.Response) -> bytes | bytearray:
        """A 2xx body within the byte cap; an error reply's body within MAX_ERROR_BODY_BYTES
        (a longer one is dropped: the connection is closed instead of drained)."""
        if not response.is_success:
            with contextlib.suppress(UpstreamReplyTooLarge, UpstreamBadReply):
                _check_encoding(response)
                return await read_capped(response, min(MAX_ERROR_BODY_BYTES, self.max_reply_bytes))
            return b""
        _check_encoding(response)
        return await read_capped(response, self.max_reply_bytes)

    def _report(self, attempt: UpstreamAttempt) -> None:
        if self._observer is not None:
            self._observer(attempt.status, attempt.seconds)


def _client_attributes(url: httpx.URL, extra: Attributes) -> dict[str, AttributeValue]:
    """What every client span to `url` says: the HTTP client conventions (the URL without its
    query or user info) and `extra`."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return {
        "http.request.method": "POST",
        "server.address": url.host,
        "server.port": port,
        "url.full": f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}",
        **extra,
    }


MAX_SPAN_TEXT = 128
"""The longest text (a model name, a finish reason) a span attribute takes from a reply."""


def _failure_kind(exc: BaseException) -> str:
    """The attempt status for an attempt that ended in `exc` instead of a status code."""
    if isinstance(exc, UpstreamReplyTooLarge):
        return "too_large"
    if isinstance(exc, UpstreamBadReply):
        return "invalid"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"
