"""Graceful drain, for every face at once: once started, new calls are refused with
ShuttingDown while calls in flight finish.

grpc's own `server.stop(grace)` also refuses new calls, but it stops answering health checks at
once; draining first keeps the server observable until the last call is done.
"""

from __future__ import annotations

import asyncio

from aiservices_server.errors import ShuttingDown


class Drain:
    """Counts calls in flight on every face; `enter()` raises ShuttingDown once draining."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._hurry = asyncio.Event()

    @property
    def hurried(self) -> bool:
        return self._hurry.is_set()

    def hurry(self) -> None:
        """Stop waiting for calls in flight (an operator's second signal)."""
        self._hurry.set()

    def enter(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica", 1.0)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self.draining:
            self._idle.set()

    async def drain(self, grace: float) -> bool:
        """Refuse new calls and wait up to `grace` seconds for those in flight; True when idle."""
        self.draining = True
        if self.in_flight == 0:
            self._idle.set()
        idle = asyncio.ensure_future(self._idle.wait())
        hurry = asyncio.ensure_future(self._hurry.wait())
        done, pending = await asyncio.wait(
            {idle, hurry}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()
        return idle in done
