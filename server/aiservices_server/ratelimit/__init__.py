"""GCRA rate limiting for CallTool: in memory, or in Redis shared by replicas, failing open.

This layer knows nothing of gRPC: callers build a key (organization, user or key id, tool), pick
a RateLimit and act on the Decision. The Redis store is in `redis_store`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiservices_server.ratelimit.failover import FailoverRateLimiter
from aiservices_server.ratelimit.gcra import Decision, RateLimit, RateLimiter, gcra
from aiservices_server.ratelimit.memory import InMemoryRateLimiter
from aiservices_server.urls import MAX_PORT, split_url

__all__ = [
    "Decision",
    "FailoverRateLimiter",
    "InMemoryRateLimiter",
    "RateLimit",
    "RateLimiter",
    "gcra",
    "limiter_from_url",
    "redis_url_problem",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def redis_url_problem(url: str) -> str | None:
    """Why the Redis client cannot use `url`, or None when it can; nothing is connected.

    The answer never quotes the URL, which may hold a password. Options in the query are checked
    by building (not opening) one connection, as the client would on first use: an unknown one
    would otherwise fail every rate-limit decision over to memory.
    """
    try:
        parts = split_url(
            url,
            _REDIS_SCHEMES,
            f"is not a valid URL (check the host, and the port: 1 to {MAX_PORT}; "
            "percent-encode / ? # @ : in a password)",
        )
    except ValueError as exc:
        return str(exc)
    if parts.scheme == "unix" and not parts.path:
        return "needs a socket path, e.g. unix:///run/redis/redis.sock"
    # Imported only when Redis is configured, as in limiter_from_url.
    from redis.asyncio import ConnectionPool  # noqa: PLC0415

    try:
        ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError):
        return "has an option or value the Redis client does not accept"
    return None


def limiter_from_url(
    url: str | None,
    *,
    on_fallback: Callable[[], None] | None = None,
    on_state_change: Callable[[bool], Awaitable[None]] | None = None,
    timeout: float = 0.1,
    connect_timeout: float = 2.0,
) -> RateLimiter:
    """The limiter for a configured Redis URL: in memory when None or blank, else Redis failing
    open to in memory (FailoverRateLimiter: `timeout` bounds a decision, `connect_timeout`
    opening a connection). No connection is made here: the limiter's watcher connects once
    started (`FailoverRateLimiter.start()`, or its first call)."""
    if url is None or not url.strip():
        return InMemoryRateLimiter()
    # Imported only when Redis is configured: the client library costs memory in every replica.
    from aiservices_server.ratelimit.redis_store import (  # noqa: PLC0415
        RedisRateLimiter,
        redis_client_from_url,
    )

    return FailoverRateLimiter(
        RedisRateLimiter(redis_client_from_url(url, socket_timeout=max(timeout, connect_timeout))),
        InMemoryRateLimiter(),
        on_fallback=on_fallback,
        on_state_change=on_state_change,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
