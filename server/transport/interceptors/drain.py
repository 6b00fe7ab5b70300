"""Graceful drain: once shutdown starts, new calls are refused with UNAVAILABLE while calls in
flight finish, and health checks keep answering NOT_SERVING so load balancers move away.

grpc's own `server.stop(grace)` also refuses new calls, but it stops answering health checks
at once; draining here first keeps the server observable until the last call is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.errors import ShuttingDown
from server.transport.interceptors.base import Behaviour, Context, UnaryInterceptor
from server.transport.state import current_call
from server.transport.status import abort


class DrainInterceptor(UnaryInterceptor):
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        # Set once draining and no call is left; not touched per call otherwise.
        self._idle = asyncio.Event()
        self._hurry = asyncio.Event()

    @property
    def hurried(self) -> bool:
        return self._hurry.is_set()

    def hurry(self) -> None:
        """Stop waiting for calls in flight (an operator's second signal)."""
        self._hurry.set()

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            if self.draining:
                error = ShuttingDown("the server is shutting down; retry on another replica", 1.0)
                await abort(context, error, current_call().trailers)
            self.in_flight += 1
            try:
                return await behaviour(request, context)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0 and self.draining:
                    self._idle.set()

        return run

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
