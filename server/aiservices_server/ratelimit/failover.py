"""Fail open: a shared (Redis) rate limiter with an in-memory limiter behind it, and a background
task that watches the shared store and brings it back into use."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from aiservices_server.ratelimit.gcra import Decision, RateLimit, RateLimiter

_LOG = logging.getLogger("aiservices.ratelimit")

T = TypeVar("T")

# user:password@ in anything that looks like a URL, in case an error message carries one.
_URL_USERINFO = re.compile(r"(?<=://)[^@/\s]*@")


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short, secret-free description of why the primary failed."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout:g} s"
    text = _URL_USERINFO.sub("***@", str(exc))[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SharedStore(RateLimiter, Protocol):
    """A rate limiter in a store shared by replicas, which can be checked without a decision."""

    async def connect(self) -> None:
        """Open a connection if none is ready and prepare what decisions need (scripts)."""
        ...

    async def ping(self) -> None:
        """One round trip to the store."""
        ...


class FailoverRateLimiter:
    """Ask `primary` while it is in use; otherwise, or when it fails or is slow, answer from
    `fallback` (fail open).

    - A decision asks the primary for at most `timeout` seconds. A call that fails or runs over
      is answered by the fallback; the primary's request is not cancelled but left to finish in
      the background (bounded by the client's socket timeouts), so a connection being opened
      for it still joins the pool instead of being thrown away half-made.
    - The first such failure takes the primary out of use at once and wakes the watcher, a
      background task (`start()`; `close()` ends it) that checks the primary off the call path:
      connect and prepare within `connect_timeout`, then one round trip within `timeout`. A
      check that passes puts the primary back into use. One that fails reports the store down
      and repeats the check every `retry_interval` seconds, doubling up to
      `max_retry_interval`, until one passes: a recovering store is picked up even when no
      calls arrive, and calls never pay for the checks.
    - `store_up` is the reported state: False from a failed check until a check passes (and
      before the first check has passed). Each change is logged once, WARNING with a
      secret-free reason when the store goes down, INFO when it is back, and passed to
      `on_state_change(up)`. A single slow or failed call whose check passes changes nothing
      reported; it is counted like every call the fallback answers, by `on_fallback()`.
    - Cancellation of the caller is not a failure here and propagates; the request it
      started finishes in the background like one that ran over.

    While the primary is out of use the fallback's budget is per process and starts fresh, so
    callers may get up to one extra burst per replica: the price of failing open.
    """

    def __init__(
        self,
        primary: SharedStore,
        fallback: RateLimiter,
        *,
        timeout: float = 0.1,
        connect_timeout: float = 2.0,
        retry_interval: float = 0.1,
        max_retry_interval: float = 2.0,
        on_fallback: Callable[[], None] | None = None,
        on_state_change: Callable[[bool], Awaitable[None]] | None = None,
        logger: logging.Logger = _LOG,
    ) -> None:
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("retry_interval", retry_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if max_retry_interval < retry_interval:
            raise ValueError("max_retry_interval must be at least retry_interval")
        self._primary = primary
        self._fallback = fallback
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._on_fallback = on_fallback
        self._on_state_change = on_state_change
        self._logger = logger
        # Calls go to the primary only after a check has passed.
        self._in_use = False
        self._store_up: bool | None = None  # None until the first check has finished
        self._check_wanted = asyncio.Event()
        self._check_wanted.set()
        self._watcher: asyncio.Task[None] | None = None
        self._unfinished: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def degraded(self) -> bool:
        """True while calls are answered by the fallback."""
        return not self._in_use

    @property
    def store_up(self) -> bool:
        """The reported state of the primary: True from a passed check until a failed one."""
        return bool(self._store_up)

    def start(self) -> None:
        """Start the watcher, which checks the primary at once. Idempotent; the first call
        starts it too, so a limiter that is never started still recovers."""
        if self._watcher is None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="rate limit store watcher"
            )

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        if self._in_use:
            try:
                return await self._ask_primary(self._primary.acquire(key, limit))
            except Exception as exc:
                self._primary_failed(exc)
        elif self._watcher is None:
            self.start()
        if self._on_fallback is not None:
            self._on_fallback()
        return await self._fallback.acquire(key, limit)

    async def refund(self, key: str, limit: RateLimit) -> None:
        """Refund where calls are decided now; a refund that fails is dropped (fail open: it
        only costs the caller one unit), and does not take the primary out of use."""
        if not self._in_use:
            await self._fallback.refund(key, limit)
            return
        try:
            await self._ask_primary(self._primary.refund(key, limit))
        except Exception as exc:
            self._logger.debug("rate limit refund dropped (%s)", describe_error(exc, self._timeout))

    async def _ask_primary(self, request: Coroutine[Any, Any, T]) -> T:
        """The request's result within `timeout`; past it, the request finishes unobserved."""
        task = asyncio.ensure_future(request)
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(task)
        finally:
            if not task.done():
                self._unfinished.add(task)
                task.add_done_callback(self._request_finished)

    def _request_finished(self, task: asyncio.Future[Any]) -> None:
        self._unfinished.discard(task)
        if not task.cancelled():
            task.exception()  # already answered by the fallback: retrieved, not logged

    def _primary_failed(self, exc: Exception) -> None:
        if not self._in_use:
            return
        self._in_use = False
        self._logger.debug(
            "rate limit store call failed (%s); checking it", describe_error(exc, self._timeout)
        )
        self._check_wanted.set()
        self.start()

    async def _watch(self) -> None:
        while True:
            await self._check_wanted.wait()
            self._check_wanted.clear()
            delay = self._retry_interval
            while (problem := await self._check()) is not None:
                await self._report(False, problem)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self._max_retry_interval)
            self._in_use = True
            await self._report(True, None)

    async def _check(self) -> str | None:
        """None when the primary connects and answers in time, else why not."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._primary.connect()
        except Exception as exc:
            return describe_error(exc, self._connect_timeout)
        try:
            async with asyncio.timeout(self._timeout):
                await self._primary.ping()
        except Exception as exc:
            return describe_error(exc, self._timeout)
        return None

    async def _report(self, up: bool, problem: str | None) -> None:
        if self._store_up is up:
            return
        first, self._store_up = self._store_up is None, up
        if not up:
            self._logger.warning(
                "rate limit store unavailable (%s); failing open to the in-memory limiter "
                "and checking it in the background",
                problem,
            )
        elif first:
            self._logger.info("rate limit store connected; using it")
        else:
            self._logger.info("rate limit store is back; using it again")
        if self._on_state_change is not None:
            try:
                await self._on_state_change(up)
            except Exception as exc:
                self._logger.error("rate limit store state not reported (%s)", type(exc).__name__)

    async def close(self) -> None:
        """End the watcher and the requests left running, then close both limiters."""
        self._closed = True
        pending = [*self._unfinished, *([self._watcher] if self._watcher else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self._primary.close()
        finally:
            await self._fallback.close()
