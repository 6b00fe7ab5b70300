"""GCRA (generic cell rate algorithm): the pure math every rate-limit store shares.

Formulation (virtual scheduling with a "theoretical arrival time", TAT):

    T      = emission interval = 60 / per_minute seconds (one call every T in steady state)
    tau    = burst * T           (how far ahead of `now` the TAT may run)

    tat     = max(stored TAT or now, now)
    new_tat = tat + T
    allow_at = new_tat - tau
    if now < allow_at:   refused; retry_after = allow_at - now; state unchanged
    else:                admitted; TAT := new_tat; remaining = floor((now - allow_at) / T)

A fresh caller therefore gets exactly `burst` back-to-back calls; the next one is refused with
retry_after = T (minus whatever time has passed since the burst), after which one more call is
admitted. `reset_after` is TAT - now: the time until the bucket is full again, which is also when
the stored state can be forgotten (an expired TAT behaves exactly like a missing one).

All times here are integer microseconds, so the Python code and the Redis Lua script
(`redis_store.LUA_GCRA`, the same formulation line for line) compute bit-identical results: Lua
numbers are doubles, and integers below 2**53 are exact in them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

MICROS = 1_000_000

# burst * T must stay far below 2**53 microseconds (Lua doubles) even when added to a Unix
# timestamp in microseconds (~1.7e15): 2**50 us is about 35 years.
_MAX_WINDOW_US = 2**50


@dataclass(frozen=True)
class RateLimit:
    """`burst` back-to-back calls, then `per_minute` calls per minute."""

    burst: int
    per_minute: float

    def __post_init__(self) -> None:
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst <= 0:
            raise ValueError(f"burst must be a positive integer, got {self.burst!r}")
        if not math.isfinite(self.per_minute) or self.per_minute <= 0:
            raise ValueError(f"per_minute must be a positive number, got {self.per_minute!r}")
        if self.per_minute > 60 * MICROS:
            raise ValueError("per_minute must be at most one call per microsecond")
        if self.burst * self.interval_us > _MAX_WINDOW_US:
            raise ValueError("burst * emission interval is too long")

    @property
    def emission_interval(self) -> float:
        """Seconds between two calls in steady state (60 / per_minute)."""
        return 60.0 / self.per_minute

    @cached_property
    def interval_us(self) -> int:
        """The emission interval in whole microseconds (at least 1), as the math uses it."""
        return max(1, round(60 * MICROS / self.per_minute))


@dataclass(frozen=True)
class Decision:
    """The answer for one call. Times are in seconds."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float


def decision_from_us(
    limit: RateLimit, allowed: bool, remaining: int, retry_after_us: int, reset_after_us: int
) -> Decision:
    """Build a Decision from the microsecond results of the math (Python or Lua)."""
    return Decision(
        allowed=allowed,
        limit=limit.burst,
        remaining=remaining,
        retry_after=retry_after_us / MICROS,
        reset_after=reset_after_us / MICROS,
    )


def gcra(tat: int | None, now: int, limit: RateLimit) -> tuple[Decision, int | None]:
    """Decide one call.

    `tat` is the stored theoretical arrival time (None for a key never seen or forgotten) and
    `now` the current time, both integer microseconds on the same clock. Returns the decision and
    the TAT to store, or None when the call is refused and the state must stay as it was.
    """
    interval = limit.interval_us
    if tat is None or tat < now:
        tat = now
    new_tat = tat + interval
    allow_at = new_tat - limit.burst * interval
    diff = now - allow_at
    if diff < 0:
        return decision_from_us(limit, False, 0, -diff, tat - now), None
    return decision_from_us(limit, True, diff // interval, 0, new_tat - now), new_tat


class RateLimiter(Protocol):
    """A rate-limit store: decides calls for a key under a limit."""

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        """Decide one call for `key`; an admitted call consumes budget, a refused one does not."""
        ...

    async def refund(self, key: str, limit: RateLimit) -> None:
        """Give back the unit an admitted call consumed, when the call then did not run."""
        ...

    async def close(self) -> None:
        """Release what the limiter holds (connections); it is not used afterwards."""
        ...


def refunded(tat: int | None, now: int, limit: RateLimit) -> int | None:
    """The TAT after giving one unit back, or None when nothing is left to keep (the bucket
    is full again). Never earlier than `now`: a refund cannot create more than a full bucket."""
    if tat is None:
        return None
    new_tat = tat - limit.interval_us
    return new_tat if new_tat > now else None
