"""Client for a prompt deployed on an Agenta completion runner.

It speaks HTTP only and reports failures as `UpstreamError`s, classified so callers can tell
"could not reach it" from "it was slow" from "it answered badly".
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson

RUN_PATH = "/services/completion/run"
# A longer Retry-After is no use to a caller and would not fit a protobuf Duration anyway.
MAX_RETRY_AFTER = 86_400.0
USER_AGENT = "aiservices/0.1"
# The body is built with json, not orjson: orjson's 4 KB working buffer per call fragments the
# heap while the call waits, about 4 MB more at peak with 1,000 slow calls in flight (measured
# with `python -m bench --only slow`), for 2 % less CPU per call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class UpstreamError(Exception):
    """Base of upstream failures; messages are safe to show callers (no keys, no payloads)."""

    retryable = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    """Could not connect, or the connection broke before a reply arrived."""

    retryable = True

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        # False when the request never left: retrying cannot run the prompt twice.
        self.sent = sent


class UpstreamTimeout(UpstreamError):
    retryable = True


class UpstreamStatusError(UpstreamError):
    """A non-2xx reply."""

    def __init__(self, status: int, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.retryable = status in (408, 425, 429, 500, 502, 503, 504)


class UpstreamBadReply(UpstreamError):
    """A 2xx reply that is not the completion-runner JSON shape."""


@dataclass(frozen=True)
class CompletionReply:
    data: Any
    trace_id: str
    status: int
    latency: float


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


def _classify(exc: httpx.TransportError) -> UpstreamError:
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


def _trace_id(reply: dict[str, Any]) -> str:
    value = reply.get("trace_id") or reply.get("traceId") or ""
    return value if isinstance(value, str) else str(value)


# (status or failure kind, seconds): reported once per HTTP attempt, for metrics and logs.
ResponseObserver = Callable[[str, float], None]

# Retry-After delays are honoured only when this much time is left for the retried attempt.
MIN_ATTEMPT_SECONDS = 0.5


class AgentaCompletionClient:
    """Runs a deployed prompt: `POST {base_url}/services/completion/run`.

    Retries only where it is safe and can help: a connection that failed before the request
    was sent, and 429/503 with a Retry-After that fits in the time left.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        base_url: str,
        api_key: str,
        environment: str,
        timeout: float,
        max_retries: int = 1,
        observer: ResponseObserver | None = None,
    ) -> None:
        self._transport = transport
        self._url = httpx.URL(base_url.rstrip("/") + RUN_PATH)  # parsed once, not per call
        # Normalised once: httpx.Request(content=...) re-parses every header on each call,
        # which cost about a fifth of the upstream call's CPU under load.
        self._headers: list[tuple[bytes, bytes]] = httpx.Headers(
            {
                "Host": self._url.netloc.decode("ascii"),
                "Authorization": f"ApiKey {api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            }
        ).raw
        self._environment = environment
        self.timeout = timeout
        self.max_retries = max_retries
        self._observer = observer

    async def run(
        self,
        app: str,
        inputs: dict[str, str],
        *,
        time_left: float | None = None,
        traceparent: str | None = None,
    ) -> CompletionReply:
        """The reply, within the smaller of `time_left` and the configured timeout."""
        budget = self.timeout if time_left is None else min(self.timeout, time_left)
        deadline = time.monotonic() + budget
        headers = self._headers
        if traceparent:
            headers = [*headers, (b"traceparent", traceparent.encode("ascii"))]
        body = _JSON.encode({"inputs": inputs, "environment": self._environment, "app": app})
        content = body.encode()
        attempt = 0
        while True:
            try:
                return await self._attempt(content, headers, deadline - time.monotonic())
            except UpstreamError as error:
                delay = self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise
            attempt += 1
            await asyncio.sleep(delay)

    def _retry_delay(self, error: UpstreamError, attempt: int, deadline: float) -> float | None:
        if attempt >= self.max_retries:
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

    async def _attempt(
        self, content: bytes, headers: list[tuple[bytes, bytes]], budget: float
    ) -> CompletionReply:
        if budget <= 0:
            raise UpstreamTimeout("no time left for the upstream call")
        started = time.monotonic()
        outcome = "error"
        # A request built from a stream skips httpx's header preparation (the headers above
        # are complete); read() then holds the body as bytes, which the transport sends as is.
        # No timeout extension: the one asyncio.timeout below bounds connect, send and read
        # together, and per-phase timers in the transport would only add work to every call.
        request = httpx.Request(
            "POST",
            self._url,
            headers=httpx.Headers([*headers, (b"Content-Length", b"%d" % len(content))]),
            stream=httpx.ByteStream(content),
        )
        request.read()
        try:
            async with asyncio.timeout(budget):
                response = await self._transport.handle_async_request(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            outcome = str(response.status_code)
        except TimeoutError:
            outcome = "timeout"
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except httpx.TransportError as exc:
            error = _classify(exc)
            outcome = "timeout" if isinstance(error, UpstreamTimeout) else "unavailable"
            raise error from None
        except aiohttp.ClientResponseError:
            # Not HTTP at all (bad status line, headers or length): the transport passes it on.
            outcome = "invalid"
            raise UpstreamBadReply("the upstream reply is not valid HTTP") from None
        except aiohttp.ClientError:
            outcome = "unavailable"
            raise UpstreamUnavailable("the upstream connection failed", sent=True) from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if self._observer is not None:
                self._observer(outcome, time.monotonic() - started)
        return self._parse(response, time.monotonic() - started)

    @staticmethod
    def _parse(response: httpx.Response, latency: float) -> CompletionReply:
        status = response.status_code
        if not 200 <= status < 300:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise UpstreamStatusError(
                status, f"the upstream answered HTTP {status}", retry_after=retry_after
            )
        try:
            reply = orjson.loads(response.content)
        except (ValueError, RecursionError):
            raise UpstreamBadReply("the upstream reply is not JSON") from None
        if not isinstance(reply, dict) or "data" not in reply:
            raise UpstreamBadReply("the upstream reply has no data field")
        return CompletionReply(reply["data"], _trace_id(reply), status, latency)
