"""GCRA rate limiting for CallTool: in memory, or in Redis shared by replicas, failing open.

This layer knows nothing of gRPC: callers build a key (organization, user or key id, tool), pick
a RateLimit and act on the Decision. The Redis store is in `server.ratelimit.redis_store`.
"""

from __future__ import annotations

from collections.abc import Callable

from server.ratelimit.failover import FailoverRateLimiter
from server.ratelimit.gcra import Decision, RateLimit, RateLimiter, gcra
from server.ratelimit.memory import InMemoryRateLimiter

__all__ = [
    "Decision",
    "FailoverRateLimiter",
    "InMemoryRateLimiter",
    "RateLimit",
    "RateLimiter",
    "gcra",
    "limiter_from_url",
]


def limiter_from_url(
    url: str | None,
    *,
    on_fallback: Callable[[], None] | None = None,
    timeout: float = 0.1,
) -> RateLimiter:
    """The limiter for a configured Redis URL: in memory when None or blank, else Redis failing
    open to in memory. No connection is made here (the client connects on first use)."""
    if url is None or not url.strip():
        return InMemoryRateLimiter()
    # Imported only when Redis is configured: the client library costs memory in every replica.
    from server.ratelimit.redis_store import (  # noqa: PLC0415
        RedisRateLimiter,
        redis_client_from_url,
    )

    return FailoverRateLimiter(
        RedisRateLimiter(redis_client_from_url(url)),
        InMemoryRateLimiter(),
        on_fallback=on_fallback,
        timeout=timeout,
    )
