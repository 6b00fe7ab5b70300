"""GCRA rate limiting for CallTool: in memory, or in Redis shared by replicas, failing open.

This layer knows nothing of gRPC: callers build a key (organization, user or key id, tool), pick
a RateLimit and act on the Decision.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.ratelimit.failover import FailoverRateLimiter
from server.ratelimit.gcra import Decision, RateLimit, RateLimiter, gcra
from server.ratelimit.memory import InMemoryRateLimiter
from server.ratelimit.redis_store import RedisRateLimiter

__all__ = [
    "Decision",
    "FailoverRateLimiter",
    "InMemoryRateLimiter",
    "RateLimit",
    "RateLimiter",
    "RedisRateLimiter",
    "gcra",
    "limiter_from_url",
    "redis_client_from_url",
]

# Socket timeouts for the Redis client: the hot path is bounded by FailoverRateLimiter's own
# (shorter) timeout anyway; these stop a dead connection from lingering in the pool.
REDIS_SOCKET_TIMEOUT = 0.5


def redis_client_from_url(url: str) -> redis.asyncio.Redis:
    """A Redis client for rate limiting: short socket timeouts, at most one immediate retry.

    The URL may hold a password: never log it (FailoverRateLimiter does not)."""
    return redis.asyncio.Redis.from_url(
        url.strip(),
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
        # One immediate retry replaces a stale pooled connection (e.g. after a Redis restart);
        # backing off would only run into the failover timeout.
        retry=Retry(NoBackoff(), 1),
    )


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
    return FailoverRateLimiter(
        RedisRateLimiter(redis_client_from_url(url)),
        InMemoryRateLimiter(),
        on_fallback=on_fallback,
        timeout=timeout,
    )
