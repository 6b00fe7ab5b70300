"""GCRA rate limiting: the math, the in-memory store, the Redis store (a real redis-server) and
failing open when Redis goes away."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio

from aiservices_server.ratelimit import (
    Decision,
    FailoverRateLimiter,
    InMemoryRateLimiter,
    RateLimit,
    gcra,
    limiter_from_url,
)
from aiservices_server.ratelimit.redis_store import (
    DEFAULT_PREFIX,
    RedisRateLimiter,
    redis_client_from_url,
)
from tests.support.redis_server import RedisServer

DEFAULT = RateLimit(burst=10, per_minute=30)
BASE_US = 1_700_000_000 * 1_000_000  # a Unix time in microseconds, like Redis TIME gives
LOGGER = "aiservices.ratelimit"


# --- the shared table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    at: float  # seconds since the start of the case
    allowed: bool
    remaining: int
    retry_after: float = 0.0
    reset_after: float | None = None  # checked when given


@dataclass(frozen=True)
class Case:
    name: str
    limit: RateLimit
    steps: tuple[Step, ...]


def burst(limit: RateLimit, at: float = 0.0) -> tuple[Step, ...]:
    """A fresh key's back-to-back burst: remaining burst-1 .. 0, reset_after T .. burst*T."""
    t = limit.interval_us / 1e6
    return tuple(
        Step(at, True, limit.burst - 1 - i, reset_after=(i + 1) * t) for i in range(limit.burst)
    )


CASES = [
    Case(
        "fresh key: exactly burst calls, then refused for one interval",
        DEFAULT,
        (*burst(DEFAULT), Step(0, False, 0, retry_after=2.0, reset_after=20.0)),
    ),
    Case(
        "admitted again after retry_after",
        DEFAULT,
        (
            *burst(DEFAULT),
            Step(0.5, False, 0, retry_after=1.5, reset_after=19.5),
            Step(2.0, True, 0, reset_after=20.0),
            Step(2.0, False, 0, retry_after=2.0, reset_after=20.0),
        ),
    ),
    Case(
        "steady state: one call per interval",
        DEFAULT,
        (
            *burst(DEFAULT),
            Step(2.0, True, 0),
            Step(4.0, True, 0),
            Step(6.0, True, 0),
            Step(7.0, False, 0, retry_after=1.0, reset_after=19.0),
            Step(8.0, True, 0, reset_after=20.0),
        ),
    ),
    Case(
        "refused calls consume nothing",
        DEFAULT,
        (
            *burst(DEFAULT),
            *(Step(0.1 * i, False, 0, retry_after=2.0 - 0.1 * i) for i in range(1, 6)),
            Step(2.0, True, 0),
        ),
    ),
    Case(
        "partial refill: 7 s after the burst, 3 calls are back",
        DEFAULT,
        (
            *burst(DEFAULT),
            Step(7.0, True, 2, reset_after=15.0),
            Step(7.0, True, 1, reset_after=17.0),
            Step(7.0, True, 0, reset_after=19.0),
            Step(7.0, False, 0, retry_after=1.0, reset_after=19.0),
        ),
    ),
    Case(
        "full again after reset_after, and after a long idle",
        DEFAULT,
        (
            *burst(DEFAULT),
            Step(20.0, True, 9, reset_after=2.0),
            Step(1000.0, True, 9, reset_after=2.0),
        ),
    ),
    Case(
        "burst 1, 60 per minute",
        RateLimit(1, 60),
        (
            Step(0, True, 0, reset_after=1.0),
            Step(0.5, False, 0, retry_after=0.5, reset_after=0.5),
            Step(1.0, True, 0, reset_after=1.0),
            Step(1.25, False, 0, retry_after=0.75, reset_after=0.75),
        ),
    ),
    Case(
        "burst 3, 120 per minute",
        RateLimit(3, 120),
        (
            *burst(RateLimit(3, 120)),
            Step(0, False, 0, retry_after=0.5, reset_after=1.5),
            Step(0.75, True, 0, reset_after=1.25),
            Step(0.75, False, 0, retry_after=0.25, reset_after=1.25),
        ),
    ),
    Case(
        "interval that is not a whole number of microseconds (7 per minute)",
        RateLimit(2, 7),
        (
            Step(0, True, 1, reset_after=8.571429),
            Step(0, True, 0, reset_after=17.142858),
            Step(0, False, 0, retry_after=8.571429, reset_after=17.142858),
            Step(8.571429, True, 0, reset_after=17.142858),
        ),
    ),
]

CASE_IDS = [c.name for c in CASES]


def check(step: Step, decision: Decision, limit: RateLimit, index: int) -> None:
    where = f"step {index} at {step.at}"
    assert decision.allowed is step.allowed, where
    assert decision.limit == limit.burst, where
    assert decision.remaining == step.remaining, where
    assert decision.retry_after == pytest.approx(step.retry_after, abs=1e-6), where
    if step.reset_after is not None:
        assert decision.reset_after == pytest.approx(step.reset_after, abs=1e-6), where


def at_us(seconds: float) -> int:
    return BASE_US + round(seconds * 1_000_000)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gcra_math(case: Case) -> None:
    tat: int | None = None
    for i, step in enumerate(case.steps):
        decision, new_tat = gcra(tat, at_us(step.at), case.limit)
        check(step, decision, case.limit, i)
        assert (new_tat is not None) is step.allowed
        if new_tat is not None:
            tat = new_tat


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_memory_limiter_table(case: Case) -> None:
    clock = FakeClock()
    start = clock.now
    limiter = InMemoryRateLimiter(clock=clock)
    for i, step in enumerate(case.steps):
        clock.now = start + step.at
        check(step, await limiter.acquire("k", case.limit), case.limit, i)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_redis_lua_table(case: Case, redis_limiter: RedisRateLimiter) -> None:
    """The Lua script, fed the same clock values, gives the same answers as the Python math."""
    for i, step in enumerate(case.steps):
        decision = await redis_limiter._acquire_at("table", case.limit, at_us(step.at))
        check(step, decision, case.limit, i)


# --- RateLimit --------------------------------------------------------------------------------


def test_rate_limit_values() -> None:
    assert DEFAULT.emission_interval == 2.0
    assert DEFAULT.interval_us == 2_000_000
    for burst_, per_minute in [(0, 30), (-1, 30), (10, 0), (10, -5), (10, math.nan)]:
        with pytest.raises(ValueError):
            RateLimit(burst_, per_minute)
    with pytest.raises(ValueError):
        RateLimit(True, 30)
    with pytest.raises(ValueError):
        RateLimit(10, math.inf)


# --- in memory --------------------------------------------------------------------------------


async def test_memory_admits_again_after_retry_after() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock)
    decisions = [await limiter.acquire("k", DEFAULT) for _ in range(10)]
    assert [d.remaining for d in decisions] == list(range(9, -1, -1))
    clock.now += 0.25
    refused = await limiter.acquire("k", DEFAULT)
    assert not refused.allowed and refused.retry_after == pytest.approx(1.75)
    clock.now += refused.retry_after - 0.001
    assert not (await limiter.acquire("k", DEFAULT)).allowed
    clock.now += 0.001
    assert (await limiter.acquire("k", DEFAULT)).allowed
    # Keys are independent.
    assert (await limiter.acquire("other", DEFAULT)).remaining == 9


async def test_memory_refund_gives_back_exactly_one_unit() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock)
    for _ in range(10):
        await limiter.acquire("k", DEFAULT)
    await limiter.refund("k", DEFAULT)
    again = await limiter.acquire("k", DEFAULT)
    assert again.allowed and again.remaining == 0
    assert not (await limiter.acquire("k", DEFAULT)).allowed
    # A full bucket stays full: refunds never add beyond the burst.
    await limiter.refund("fresh", DEFAULT)
    await limiter.refund("k", DEFAULT)
    await limiter.refund("k", DEFAULT)
    await limiter.refund("k", DEFAULT)
    assert [(await limiter.acquire("fresh", DEFAULT)).remaining for _ in range(2)] == [9, 8]
    assert len(limiter) == 2


async def test_memory_idle_keys_expire() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock)
    for key in ("a", "b", "c"):
        await limiter.acquire(key, DEFAULT)  # reset_after 2 s
    for _ in range(4):
        await limiter.acquire("d", DEFAULT)  # reset_after 8 s
    assert len(limiter) == 4
    clock.now += 2.0
    await limiter.acquire("e", DEFAULT)  # sweeps a, b, c: their buckets are full again
    assert len(limiter) == 2
    clock.now += 100
    await limiter.acquire("f", DEFAULT)
    assert len(limiter) == 1


async def test_memory_max_keys_bound() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock, max_keys=3)
    for i in range(50):
        for _ in range(5):
            await limiter.acquire(f"k{i}", DEFAULT)
        assert len(limiter) <= 3
    # The least recently admitted keys went first; the newest kept their state.
    assert (await limiter.acquire("k49", DEFAULT)).remaining == 4
    assert (await limiter.acquire("k0", DEFAULT)).remaining == 9


async def test_memory_sweep_is_bounded_per_call_but_keeps_up() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock)
    for i in range(100):
        await limiter.acquire(f"k{i}", DEFAULT)
    clock.now += 10
    await limiter.acquire("x", DEFAULT)
    assert 1 < len(limiter) < 100  # a few swept, not all at once
    for _ in range(20):
        await limiter.acquire("x", DEFAULT)
    assert len(limiter) == 1


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def wait_for(
    condition: Callable[[], Awaitable[bool]], within: float = 5.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


# --- Redis ------------------------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def async_client(server: RedisServer) -> redis.asyncio.Redis:
    return redis_client_from_url(server.url)


@pytest.fixture
async def redis_limiter(redis_server: RedisServer) -> AsyncIterator[RedisRateLimiter]:
    limiter = RedisRateLimiter(async_client(redis_server), prefix="test:rl:")
    try:
        yield limiter
    finally:
        await limiter.close()


async def test_redis_real_time_burst(redis_limiter: RedisRateLimiter) -> None:
    decisions = [await redis_limiter.acquire("org:user:tool", DEFAULT) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions] == [*range(9, -1, -1), 0]
    assert all(d.limit == 10 and d.retry_after == 0 for d in decisions[:10])
    refused = decisions[10]
    assert 1.5 < refused.retry_after <= 2.0
    assert 19.5 < refused.reset_after <= 20.0


async def test_redis_refund_matches_the_python_math(
    redis_server: RedisServer, redis_limiter: RedisRateLimiter
) -> None:
    memory_clock = FakeClock(start=BASE_US / 1_000_000)
    memory = InMemoryRateLimiter(clock=memory_clock)
    steps = ["acquire"] * 10 + ["refund", "acquire", "acquire"] + ["refund"] * 12 + ["acquire"]
    for index, step in enumerate(steps):
        now = at_us(index * 0.01)
        memory_clock.now = now / 1_000_000
        if step == "refund":
            await redis_limiter._refund_at("refund", DEFAULT, now)
            await memory.refund("refund", DEFAULT)
            continue
        shared = await redis_limiter._acquire_at("refund", DEFAULT, now)
        local = await memory.acquire("refund", DEFAULT)
        assert (shared.allowed, shared.remaining) == (local.allowed, local.remaining), index
    assert (shared.allowed, shared.remaining) == (True, 9)  # refunds stop at a full bucket
    check_client = redis_server.client()
    await redis_limiter.refund("never-seen", DEFAULT)
    assert not check_client.exists("test:rl:never-seen")
    check_client.close()


async def test_redis_key_expires_when_bucket_is_full(
    redis_server: RedisServer, redis_limiter: RedisRateLimiter
) -> None:
    check_client = redis_server.client()
    await redis_limiter.acquire("slow", DEFAULT)
    await redis_limiter.acquire("slow", DEFAULT)
    assert 3900 < check_client.pttl("test:rl:slow") <= 4000  # reset_after: 4 s
    fast = RateLimit(1, 6000)  # 10 ms interval
    decision = await redis_limiter.acquire("fast", fast)
    assert decision.allowed and decision.reset_after <= 0.01

    async def gone() -> bool:
        return not check_client.exists("test:rl:fast")

    await wait_for(gone, what="the key to expire")
    check_client.close()


async def test_two_redis_limiters_share_one_budget(redis_server: RedisServer) -> None:
    a = RedisRateLimiter(async_client(redis_server))
    b = RedisRateLimiter(async_client(redis_server))
    try:
        remaining = []
        for i in range(10):
            decision = await (a if i % 2 == 0 else b).acquire("org:user:tool", DEFAULT)
            assert decision.allowed
            remaining.append(decision.remaining)
        assert remaining == list(range(9, -1, -1))
        assert not (await a.acquire("org:user:tool", DEFAULT)).allowed
        assert not (await b.acquire("org:user:tool", DEFAULT)).allowed
        assert redis_server.client().exists(DEFAULT_PREFIX + "org:user:tool")
    finally:
        await a.close()
        await b.close()


# --- failover ---------------------------------------------------------------------------------


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [m for r in caplog.records if r.name == LOGGER and text in (m := r.getMessage())]


async def wait_until(
    condition: Callable[[], bool], within: float = 5.0, what: str = "condition"
) -> None:
    async def holds() -> bool:
        return condition()

    await wait_for(holds, within, what)


async def test_failover_kill_and_restart_with_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    password = "s3cret-Pa55word"
    server = RedisServer(password=password)
    server.start()
    fallbacks = Counter()
    limiter = limiter_from_url(server.url, on_fallback=fallbacks)
    assert isinstance(limiter, FailoverRateLimiter)
    check_client = server.client()
    try:
        limiter.start()
        await wait_until(lambda: limiter.store_up, what="the first check to pass")
        for expected in (9, 8, 7):
            assert (await limiter.acquire("org:user:tool", DEFAULT)).remaining == expected
        assert check_client.exists(DEFAULT_PREFIX + "org:user:tool")
        assert fallbacks.count == 0 and not limiter.degraded

        server.kill()
        started = time.monotonic()
        decisions = [await limiter.acquire("org:user:tool", DEFAULT) for _ in range(5)]
        assert time.monotonic() - started < 1.0  # bounded by the failover timeout
        # Served, from the in-memory limiter (a fresh budget there: fail open).
        assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5]
        assert fallbacks.count == 5 and limiter.degraded
        await wait_until(lambda: not limiter.store_up, what="the store to be reported down")
        warnings = records(caplog, logging.WARNING)
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "in-memory" in warnings[0].getMessage()
        assert password not in caplog.text

        server.start()  # same port, empty data set: picked up without any call

        await wait_until(lambda: limiter.store_up, what="the limiter to use Redis again")
        assert not limiter.degraded
        assert len(messages(caplog, "is back")) == 1
        assert len(records(caplog, logging.WARNING)) == 1
        served_by_fallback = fallbacks.count
        assert (await limiter.acquire("after-restart", DEFAULT)).remaining == 9
        assert check_client.exists(DEFAULT_PREFIX + "after-restart")
        assert fallbacks.count == served_by_fallback
        assert password not in caplog.text
    finally:
        check_client.close()
        await limiter.close()
        server.cleanup()


def failover(server: RedisServer, fallbacks: Counter) -> FailoverRateLimiter:
    limiter = FailoverRateLimiter(
        RedisRateLimiter(async_client(server)),
        InMemoryRateLimiter(),
        on_fallback=fallbacks,
        connect_timeout=0.3,
        retry_interval=0.05,
    )
    limiter.start()
    return limiter


async def test_failover_limiters_share_budget_again_after_restart(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fallbacks = Counter()
    a, b = failover(redis_server, fallbacks), failover(redis_server, fallbacks)
    try:
        await wait_until(lambda: a.store_up and b.store_up, what="both limiters to connect")
        redis_server.kill()
        # Each replica falls back to its own in-memory budget.
        for limiter in (a, b):
            assert [(await limiter.acquire("k", DEFAULT)).remaining for _ in range(10)] == list(
                range(9, -1, -1)
            )
        assert fallbacks.count == 20
        await wait_until(lambda: not (a.store_up or b.store_up), what="both to report down")
        assert len(records(caplog, logging.WARNING)) == 2  # one per limiter

        redis_server.start()

        await wait_until(lambda: a.store_up and b.store_up, what="both to use Redis again")
        remaining = [
            (await (a if i % 2 == 0 else b).acquire("shared", DEFAULT)).remaining for i in range(10)
        ]
        assert remaining == list(range(9, -1, -1))
        assert not (await a.acquire("shared", DEFAULT)).allowed
        assert not (await b.acquire("shared", DEFAULT)).allowed
        assert fallbacks.count == 20
    finally:
        await a.close()
        await b.close()


async def test_failover_hung_redis_times_out(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fallbacks = Counter()
    limiter = failover(redis_server, fallbacks)
    try:
        await wait_until(lambda: limiter.store_up, what="the first check to pass")
        assert (await limiter.acquire("k", DEFAULT)).remaining == 9
        redis_server.pause()
        started = time.monotonic()
        # Concurrent calls in flight when Redis hangs: all served, one warning.
        decisions = await asyncio.gather(*(limiter.acquire("k", DEFAULT) for _ in range(5)))
        assert time.monotonic() - started < 0.5  # the 0.1 s failover timeout, not the socket's
        assert sorted(d.remaining for d in decisions) == [5, 6, 7, 8, 9]
        assert fallbacks.count == 5
        await wait_until(lambda: not limiter.store_up, what="the store to be reported down")
        (warning,) = records(caplog, logging.WARNING)
        assert "no answer within 0.3 s" in warning.getMessage()  # the connect timeout
        redis_server.resume()

        await wait_until(lambda: limiter.store_up, what="Redis to answer again")
        # The state written before the hang is still there: the Redis budget continues. (The
        # calls that timed out may or may not have been applied once Redis woke up.)
        assert 3 <= (await limiter.acquire("k", DEFAULT)).remaining <= 8
    finally:
        await limiter.close()


class Store:
    """An in-memory store standing in for Redis that fails (or hangs) on demand, counting
    what it is asked."""

    def __init__(self) -> None:
        self.memory = InMemoryRateLimiter()
        self.failing = False
        self.hanging = False
        self.calls = 0
        self.refunds = 0
        self.checks: list[float] = []

    def _answer(self) -> None:
        if self.failing:
            raise ConnectionRefusedError("connect to redis://user:hunter2@127.0.0.1:1 refused")

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        self.calls += 1
        if self.hanging:
            await asyncio.Event().wait()
        self._answer()
        return await self.memory.acquire(key, limit)

    async def refund(self, key: str, limit: RateLimit) -> None:
        self.refunds += 1
        self._answer()
        await self.memory.refund(key, limit)

    async def connect(self) -> None:
        self.checks.append(time.monotonic())
        self._answer()

    async def ping(self) -> None:
        self._answer()

    async def close(self) -> None:
        pass


class States:
    def __init__(self) -> None:
        self.seen: list[bool] = []

    async def __call__(self, up: bool) -> None:
        self.seen.append(up)


async def test_failover_checks_in_the_background_and_calls_never_pay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store, fallbacks, states = Store(), Counter(), States()
    limiter = FailoverRateLimiter(
        store, InMemoryRateLimiter(), on_fallback=fallbacks, on_state_change=states
    )
    limiter.start()
    try:
        await wait_until(lambda: limiter.store_up, what="the first check to pass")
        assert (await limiter.acquire("k", DEFAULT)).remaining == 9
        assert store.calls == 1 and fallbacks.count == 0

        store.failing = True
        for _ in range(5):
            assert (await limiter.acquire("k", DEFAULT)).allowed
        assert store.calls == 2 and fallbacks.count == 5  # only the first call asked the store
        await wait_until(lambda: not limiter.store_up, what="the store to be reported down")
        checks = len(store.checks)
        await wait_until(lambda: len(store.checks) > checks, what="a check without any call")

        store.failing = False
        await wait_until(lambda: limiter.store_up, what="the store to be back, without calls")
        assert store.calls == 2
        assert (await limiter.acquire("k", DEFAULT)).remaining == 8  # the store's budget
        assert states.seen == [True, False, True]
        (warning,) = records(caplog, logging.WARNING)
        assert "ConnectionRefusedError" in warning.getMessage()
        assert len(messages(caplog, "connected")) == 1
        assert len(messages(caplog, "is back")) == 1
        assert "hunter2" not in caplog.text
    finally:
        await limiter.close()


async def test_failover_one_failed_call_with_a_passing_check_reports_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store, states = Store(), States()
    limiter = FailoverRateLimiter(store, InMemoryRateLimiter(), on_state_change=states)
    limiter.start()
    try:
        await wait_until(lambda: limiter.store_up, what="the first check to pass")
        store.hanging = True
        assert (await limiter.acquire("k", DEFAULT)).allowed  # from memory, after 0.1 s
        store.hanging = False
        await wait_until(lambda: not limiter.degraded, what="the store to be in use again")
        assert limiter.store_up and states.seen == [True]
        assert records(caplog, logging.WARNING) == []
    finally:
        await limiter.close()


async def test_failover_backs_off_between_checks() -> None:
    store = Store()
    store.failing = True
    limiter = FailoverRateLimiter(
        store, InMemoryRateLimiter(), retry_interval=0.01, max_retry_interval=0.04
    )
    limiter.start()
    try:
        await wait_until(lambda: len(store.checks) >= 6, what="six checks")
        gaps = [later - earlier for earlier, later in itertools.pairwise(store.checks)]
        for gap, expected in zip(gaps, (0.01, 0.02, 0.04, 0.04, 0.04), strict=False):
            assert gap >= expected - 0.002, gaps
    finally:
        await limiter.close()


async def test_failover_refunds_where_calls_are_decided_and_drops_failed_refunds() -> None:
    store = Store()
    fallback = InMemoryRateLimiter()
    limiter = FailoverRateLimiter(store, fallback)
    limiter.start()
    try:
        await wait_until(lambda: limiter.store_up, what="the first check to pass")
        store.failing = True
        await limiter.refund("k", DEFAULT)  # the store fails: dropped, and it stays in use
        assert store.refunds == 1 and not limiter.degraded
        for _ in range(10):
            await limiter.acquire("k", DEFAULT)  # the first call finds the store down
        assert limiter.degraded
        await limiter.refund("k", DEFAULT)  # goes to the fallback, which decided these calls
        assert store.refunds == 1
        assert (await limiter.acquire("k", DEFAULT)).allowed
        assert not (await limiter.acquire("k", DEFAULT)).allowed
    finally:
        await limiter.close()


async def test_failover_close_ends_the_watcher_and_requests_left_running() -> None:
    store = Store()
    limiter = FailoverRateLimiter(store, InMemoryRateLimiter())
    # Not started: the first call starts the watcher and is answered from memory meanwhile.
    assert limiter.degraded
    assert (await limiter.acquire("k", DEFAULT)).remaining == 9
    await wait_until(lambda: limiter.store_up, what="the first check to pass")
    store.hanging = True
    assert (await limiter.acquire("k", DEFAULT)).remaining == 8  # memory, after 0.1 s
    assert store.calls == 1
    await limiter.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_limiter_from_url_without_redis() -> None:
    assert isinstance(limiter_from_url(None), InMemoryRateLimiter)
    assert isinstance(limiter_from_url("  "), InMemoryRateLimiter)
