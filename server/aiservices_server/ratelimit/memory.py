"""In-memory GCRA rate limiter: per process, bounded, no background task."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from aiservices_server.ratelimit.gcra import MICROS, Decision, RateLimit, gcra, refunded

# How many expired entries one call may sweep at most. Each call adds at most one entry, so the
# sweep keeps pace with insertions while the latency of a single call stays bounded.
_SWEEP_PER_CALL = 8


class InMemoryRateLimiter:
    """GCRA state in a dict of key -> TAT (integer microseconds on `clock`).

    Memory stays bounded: an entry is useless once its TAT has passed (its bucket is full again,
    and a missing entry behaves the same), so every call sweeps a few expired entries from the
    front of an insertion-ordered dict (least recently admitted first), and when `max_keys` is
    reached the least recently admitted entry is evicted even if it has not expired (that caller
    gets a fresh budget: the price of the bound). All of it is amortized O(1) per call.

    Decisions are atomic with respect to the event loop (no await inside); the limiter is meant
    for one event loop and is not thread-safe.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        if max_keys <= 0:
            raise ValueError(f"max_keys must be positive, got {max_keys!r}")
        self._clock = clock
        self._max_keys = max_keys
        self._tats: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        """How many keys currently hold state."""
        return len(self._tats)

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        return self.acquire_now(key, limit)

    def acquire_now(self, key: str, limit: RateLimit) -> Decision:
        """The synchronous form of `acquire`."""
        now = round(self._clock() * MICROS)
        tats = self._tats
        self._sweep(now)
        decision, new_tat = gcra(tats.get(key), now, limit)
        if new_tat is not None:
            if key in tats:
                tats.move_to_end(key)
            elif len(tats) >= self._max_keys:
                tats.popitem(last=False)
            tats[key] = new_tat
        return decision

    async def refund(self, key: str, limit: RateLimit) -> None:
        self.refund_now(key, limit)

    def refund_now(self, key: str, limit: RateLimit) -> None:
        """The synchronous form of `refund`."""
        now = round(self._clock() * MICROS)
        new_tat = refunded(self._tats.get(key), now, limit)
        if new_tat is None:
            self._tats.pop(key, None)
        else:
            self._tats[key] = new_tat

    def _sweep(self, now: int) -> None:
        tats = self._tats
        for _ in range(_SWEEP_PER_CALL):
            if not tats:
                return
            oldest = next(iter(tats))
            if tats[oldest] > now:
                return
            del tats[oldest]

    async def close(self) -> None:
        self._tats.clear()
