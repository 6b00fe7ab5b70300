"""GCRA rate limiting for CallTool: in memory, or in Redis shared by replicas, failing open.

This layer knows nothing of gRPC: callers build a key (organization, user or key id, tool), pick
a RateLimit and act on the Decision. The Redis store is in `redis_store`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlencode

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


MAX_OPTIONS_TRIED = 32
"""How many of a bad URL's query options are tried one by one to name the one to blame."""


def redis_url_problem(url: str) -> str | None:
    """Why the Redis client cannot use `url`, or None when it can; nothing is connected.

    The answer never quotes the URL, which may hold a password. Options in the query are checked
    by building (not opening) one connection, TLS context included, as the client would on first
    use: a bad one would otherwise fail every rate-limit decision over to memory. The option to
    blame is named when removing it alone lets the rest build, and only when the Redis client
    knows the name: other text in a query may be part of a password with an unencoded `?`.
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
    if _client_builds(url):
        return None
    # The client reads the first value of each option, as parse_qs gives them. The URL is cut
    # by hand: urlunsplit would turn unix:///path into unix:/path.
    options = {name: values[0] for name, values in parse_qs(parts.query).items()}
    before_query = url.partition("?")[0]
    # Each try builds the client again: past a few dozen options, finding the culprit is not
    # worth the start-up time.
    for name in list(options)[:MAX_OPTIONS_TRIED]:
        rest = urlencode({other: value for other, value in options.items() if other != name})
        if _client_builds(f"{before_query}?{rest}" if rest else before_query):
            if name not in _client_option_names():
                return (
                    "has an option the Redis client does not know (percent-encode ? in a password)"
                )
            return (
                f"option {name} is refused by the Redis client: check its value, and that it "
                f"applies to {parts.scheme}:// URLs"
            )
    return "has an option or value the Redis client does not accept"


def _client_builds(url: str) -> bool:
    """Whether the Redis client builds a connection for `url` as it would on first use: the
    pool, the connection and, for rediss://, the TLS context (which reads the files the options
    name). Nothing is connected."""
    # Imported only when Redis is configured, as in limiter_from_url.
    from redis.asyncio import ConnectionPool  # noqa: PLC0415
    from redis.exceptions import RedisError  # noqa: PLC0415

    try:
        connection = ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
        tls = getattr(connection, "ssl_context", None)
        if tls is not None:
            tls.get()
    # What trying every option the client parses, and every keyword its connections take, with
    # bad values raised: its own errors (protocol=9 is a ConnectionError, ssl_cert_reqs=bogus a
    # RedisError), Python's for a value of the wrong kind or range (retry=x an AttributeError,
    # ssl_min_version=99999999999 an OverflowError), and OSError for TLS files and ciphers
    # (ssl.SSLError among them).
    except (RedisError, ValueError, TypeError, AttributeError, ArithmeticError, OSError):
        return False
    return True


@functools.cache
def _client_option_names() -> frozenset[str]:
    """The names the Redis client knows as URL options: those it parses, and the keyword
    arguments of its connection pool and connections (read from their signatures, so they
    follow the installed version)."""
    from redis.asyncio.connection import (  # noqa: PLC0415
        URL_QUERY_ARGUMENT_PARSERS,
        ConnectionPool,
        SSLConnection,
        UnixDomainSocketConnection,
    )

    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = set(URL_QUERY_ARGUMENT_PARSERS)
    for cls in (ConnectionPool, SSLConnection, UnixDomainSocketConnection):
        for klass in cls.__mro__:
            try:
                parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
            except (KeyError, TypeError, ValueError):  # no __init__ of its own, or no signature
                continue
            names.update(p.name for p in parameters if p.kind in named)
    names.discard("self")
    return frozenset(names)


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
