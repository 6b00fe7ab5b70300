"""Fail open: a shared (Redis) rate limiter with an in-memory limiter behind it."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from server.ratelimit.gcra import Decision, RateLimit, RateLimiter

_LOG = logging.getLogger("aiservices.ratelimit")

# user:password@ in anything that looks like a URL, in case an error message carries one.
_URL_USERINFO = re.compile(r"(?<=://)[^@/\s]*@")


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short, secret-free description of why the primary failed."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout:g} s"
    text = _URL_USERINFO.sub("***@", str(exc))[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FailoverRateLimiter:
    """Ask `primary`; when it fails or is slow, answer from `fallback` (fail open).

    - Every call to the primary is bounded by `timeout` seconds (asyncio.timeout).
    - Any exception from the primary (Redis errors, OSError, the timeout) sends the call to the
      fallback. Cancellation of the caller is not an exception here and propagates.
    - `on_fallback()` is called once for every call the fallback answers (a metrics counter).
    - One WARNING when an outage starts, one INFO line when the primary answers again; nothing
      per call in between. Messages carry the exception type and a redacted message, never a URL
      with credentials.
    - Retry policy: while the primary is down, at most one call per `retry_interval` seconds
      (default 1 s) probes it; all other calls go straight to the fallback, so a dead Redis costs
      the hot path at most one `timeout` per interval rather than one per call. The first probe
      that succeeds switches back to the primary (its answer is used).

    During an outage the fallback's budget is per process and starts fresh, so callers may get
    up to one extra burst per replica: the price of failing open.
    """

    def __init__(
        self,
        primary: RateLimiter,
        fallback: RateLimiter,
        *,
        timeout: float = 0.1,
        retry_interval: float = 1.0,
        on_fallback: Callable[[], None] | None = None,
        logger: logging.Logger = _LOG,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if retry_interval < 0:
            raise ValueError(f"retry_interval must not be negative, got {retry_interval!r}")
        self._primary = primary
        self._fallback = fallback
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._on_fallback = on_fallback
        self._logger = logger
        self._clock = clock
        self._down = False
        self._next_probe = 0.0

    @property
    def degraded(self) -> bool:
        """True while calls are answered by the fallback."""
        return self._down

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        if self._down:
            now = self._clock()
            if now < self._next_probe:
                return await self._from_fallback(key, limit)
            # Claim the probe before awaiting, so concurrent calls do not all probe at once.
            self._next_probe = now + self._retry_interval
        try:
            async with asyncio.timeout(self._timeout):
                decision = await self._primary.acquire(key, limit)
        except Exception as exc:
            self._primary_failed(exc)
            return await self._from_fallback(key, limit)
        if self._down:
            self._down = False
            self._logger.info("rate limit store is back; using it again")
        return decision

    async def refund(self, key: str, limit: RateLimit) -> None:
        """Refund where calls are decided now; a refund that fails is dropped (fail open: it
        only costs the caller one unit), and does not start an outage by itself."""
        if self._down:
            await self._fallback.refund(key, limit)
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._primary.refund(key, limit)
        except Exception as exc:
            self._logger.debug("rate limit refund dropped (%s)", describe_error(exc, self._timeout))

    def _primary_failed(self, exc: Exception) -> None:
        if self._down:
            return
        self._down = True
        self._next_probe = self._clock() + self._retry_interval
        self._logger.warning(
            "rate limit store unavailable (%s); failing open to the in-memory limiter, "
            "retrying at most every %g s",
            describe_error(exc, self._timeout),
            self._retry_interval,
        )

    async def _from_fallback(self, key: str, limit: RateLimit) -> Decision:
        if self._on_fallback is not None:
            self._on_fallback()
        return await self._fallback.acquire(key, limit)

    async def close(self) -> None:
        try:
            await self._primary.close()
        finally:
            await self._fallback.close()
