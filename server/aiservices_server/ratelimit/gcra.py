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

MAX_BURST = 1_000_000
MAX_PER_MINUTE = 6_000_000
"""100,000 calls a second: far above what one replica serves, and an interval of 10 us."""

# burst * T must stay far below 2**53 microseconds (Lua doubles) even when added to a Unix
# timestamp in microseconds (~1.7e15): 2**50 us is about 35 years.
_MAX_WINDOW_US = 2**50


class RateLimitError(ValueError):
    """A limit the limiter cannot hold: `field` ("burst" or "per_minute") and what is wrong,
    without the offending value, so callers can name the field in their own words."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _interval_us(per_minute: float) -> int:
    return max(1, round(60 * MICROS / per_minute))


def check_rate_limit(burst: object, per_minute: object) -> None:
    """Raise RateLimitError unless `burst` and `per_minute` make a limit the math can hold.

    The one rule for every limit: the service default from the settings, a key's own limit
    from the keys file, and RateLimit itself, so a limit accepted at start-up never fails a call.
    """
    if isinstance(burst, bool) or not isinstance(burst, int) or burst <= 0:
        raise RateLimitError("burst", "must be a positive integer")
    if burst > MAX_BURST:
        raise RateLimitError("burst", f"must be at most {MAX_BURST:,}")
    if (
        isinstance(per_minute, bool)
        or not isinstance(per_minute, int | float)
        or not math.isfinite(per_minute)
        or per_minute <= 0
    ):
        raise RateLimitError("per_minute", "must be a positive number")
    if per_minute > MAX_PER_MINUTE:
        raise RateLimitError("per_minute", f"must be at most {MAX_PER_MINUTE:,}")
    # In floats first: a tiny per_minute makes the interval infinite, which round() refuses.
    if burst * 60 * MICROS / per_minute > _MAX_WINDOW_US or (
        burst * _interval_us(per_minute) > _MAX_WINDOW_US
    ):
        raise RateLimitError(
            "per_minute",
            "is too small for the burst: a full burst must refill within 35 years "
            "(burst * 60 / per_minute seconds)",
        )


@dataclass(frozen=True)
class RateLimit:
    """`burst` back-to-back calls, then `per_minute` calls per minute."""

    burst: int
    per_minute: float

    def __post_init__(self) -> None:
        check_rate_limit(self.burst, self.per_minute)

    @property
    def emission_interval(self) -> float:
        """Seconds between two calls in steady state (60 / per_minute)."""
        return 60.0 / self.per_minute

    @cached_property
    def interval_us(self) -> int:
        """The emission interval in whole microseconds (at least 1), as the math uses it."""
        return _interval_us(self.per_minute)


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
