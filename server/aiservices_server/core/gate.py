"""A bound on tool calls in flight, so a slow upstream cannot pile up unbounded work.

Calls beyond the bound wait briefly for a slot, then fail fast with a retry hint: a caller
that retries elsewhere is better served than one that queues behind a stuck upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiservices_server.errors import Overloaded


class CallGate:
    """`async with gate:` runs the block holding one slot, or raises Overloaded."""

    def __init__(
        self,
        max_in_flight: int,
        *,
        max_wait: float,
        retry_after: float = 1.0,
        on_refusal: Callable[[], None] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self._on_refusal = on_refusal
        self._max_wait = max_wait
        self._retry_after = retry_after
        self._slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0

    async def acquire(self) -> None:
        """Take a slot, waiting at most `max_wait`; pair with release() in a finally."""
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._max_wait):
                    await self._slots.acquire()
            except TimeoutError:
                if self._on_refusal is not None:
                    self._on_refusal()
                raise Overloaded(
                    f"server busy: {self.max_in_flight} tool calls already in flight",
                    self._retry_after,
                ) from None
        else:
            await self._slots.acquire()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._slots.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
