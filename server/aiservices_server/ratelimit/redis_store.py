"""Redis GCRA rate limiter: one atomic Lua script, Redis server time, shared by all replicas."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiservices_server.ratelimit.gcra import Decision, RateLimit, decision_from_us

# Both scripts: "now" in microseconds, from the Redis server clock, or from the given argument
# (tests only) so the scripts can be checked against the Python math.
_LUA_NOW = """
local function now_us(given)
  if given then
    return tonumber(given)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

# The same math as gcra.gcra(), line for line, in integer microseconds (exact in Lua doubles).
# Time comes from the Redis server (TIME), so replicas with skewed clocks share one budget exactly;
# a refused call writes nothing; an admitted one stores the new TAT with PX set to the time until
# the bucket is full again, so idle keys vanish by themselves. Scripts that read TIME and then
# write are fine since Redis 5 (effects replication; redis.replicate_commands() is not needed).
#
# KEYS[1]  the key
# ARGV[1]  burst
# ARGV[2]  emission interval, microseconds
# ARGV[3]  optional, tests only: "now" in microseconds instead of the server clock
# returns  {allowed 0/1, remaining, retry_after_us, reset_after_us}
LUA_GCRA = (
    _LUA_NOW
    + """
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local now = now_us(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
local diff = now - allow_at
if diff < 0 then
  return {0, 0, -diff, tat - now}
end
local reset_after = new_tat - now
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(reset_after / 1000))
return {1, math.floor(diff / interval), 0, reset_after}
"""
)

# Gives back one unit (gcra.refunded): the TAT moves back one interval, or the key goes when
# that leaves a full bucket. KEYS[1] the key; ARGV[1] the interval, microseconds; ARGV[2]
# optional, tests only: "now" in microseconds.
LUA_REFUND = (
    _LUA_NOW
    + """
local interval = tonumber(ARGV[1])
local now = now_us(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil then
  return 0
end
local new_tat = tat - interval
if new_tat <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return 1
"""
)

DEFAULT_PREFIX = "aiservices:rl:"


class RedisRateLimiter:
    """GCRA state in Redis under `prefix + key`, decided by one EVALSHA per call.

    The limiter owns `client` unless `owns_client=False`: `close()` closes it. Redis errors
    propagate (redis.exceptions.RedisError, OSError); wrap it in FailoverRateLimiter to fail open.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        owns_client: bool = True,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._owns_client = owns_client
        self._script = client.register_script(LUA_GCRA)
        self._refund_script = client.register_script(LUA_REFUND)

    @property
    def prefix(self) -> str:
        return self._prefix

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        return await self._run(key, limit, (limit.burst, limit.interval_us))

    async def _acquire_at(self, key: str, limit: RateLimit, now_us: int) -> Decision:
        """Run the script with a given "now" instead of the server clock (tests only)."""
        return await self._run(key, limit, (limit.burst, limit.interval_us, now_us))

    async def refund(self, key: str, limit: RateLimit) -> None:
        await self._refund_script(keys=[self._prefix + key], args=[limit.interval_us])

    async def _refund_at(self, key: str, limit: RateLimit, now_us: int) -> None:
        """Refund with a given "now" instead of the server clock (tests only)."""
        await self._refund_script(keys=[self._prefix + key], args=[limit.interval_us, now_us])

    async def _run(self, key: str, limit: RateLimit, args: Sequence[int]) -> Decision:
        reply = await self._script(keys=[self._prefix + key], args=args)
        allowed, remaining, retry_after_us, reset_after_us = (int(v) for v in reply)
        return decision_from_us(limit, allowed == 1, remaining, retry_after_us, reset_after_us)

    async def connect(self) -> None:
        """Open a connection if the pool has none ready and load both scripts (one pipelined
        round trip), so the next decision is a single EVALSHA even on a restarted Redis."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.script_load(LUA_GCRA)
            pipe.script_load(LUA_REFUND)
            await pipe.execute()

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def redis_client_from_url(url: str, *, socket_timeout: float = 2.0) -> redis.asyncio.Redis:
    """A Redis client for rate limiting: `socket_timeout` bounds opening a connection and each
    read, and at most one immediate retry.

    FailoverRateLimiter bounds decisions by its own, shorter timeout without cancelling them, so
    the socket timeout is what ends a request to a hung Redis and frees its connection.
    The URL may hold a password: never log it (FailoverRateLimiter does not)."""
    return redis.asyncio.Redis.from_url(
        url.strip(),
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        # One immediate retry replaces a stale pooled connection (e.g. after a Redis restart);
        # backing off would only run into the failover timeout.
        retry=Retry(NoBackoff(), 1),
    )
