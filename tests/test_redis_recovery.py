"""A slow or lost Redis: decisions fail open call by call, the limiter says so (the gauge
`aiservices_rate_limit_store_up`, the health of `aiservices.ratelimit`, one log line per change),
and a check in the background brings Redis back into use without any calls.

Real parts throughout: redis-server with a password behind a loopback proxy that delays every
byte (tests/support/slow_proxy.py), two servers on 127.0.0.1, the stand-in upstream and the
generated client. Each phase uses its own delegated user, so no budget carries over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from urllib.parse import quote

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiservices import ToolClient
from aiservices_server.app import RATE_LIMIT_HEALTH, SERVICE_NAME
from aiservices_server.ratelimit import FailoverRateLimiter, RateLimit, limiter_from_url
from tests.standin import StandinUpstream
from tests.support.keys import TestKeys
from tests.support.redis_server import RedisServer
from tests.support.replicas import ReplicaCaller, redis_key
from tests.support.replicas import assert_one_budget as assert_shared_budget
from tests.support.responsive import responsive_during, rpcs_started
from tests.support.servers import ServerThread, make_settings
from tests.support.slow_proxy import SlowProxy

BURST = 3
DECISION_TIMEOUT = 0.1
CONNECT_TIMEOUT = 0.5
RTT_WITHIN = 0.06  # a slow Redis that still answers within the decision timeout
RTT_BEYOND = 0.3  # one that does not
LOGGER = "aiservices.ratelimit"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WATCHER = "rate limit store watcher"


def wait_until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        time.sleep(0.01)


class Replica(ReplicaCaller):
    """One server, a client calling it as delegated users, and a view of its limiter's state."""

    def __init__(self, name: str, thread: ServerThread, client: ToolClient) -> None:
        super().__init__(name, client)
        self.thread = thread
        self._channel = grpc.insecure_channel(thread.target)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def health(self, service: str = RATE_LIMIT_HEALTH) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        status: int = self._health.Check(request, timeout=2).status
        return status

    def sample(self, name: str) -> float | None:
        return self.thread.server.metrics.registry.get_sample_value(name)

    def says_store_is(self, up: bool) -> bool:
        """The gauge and the health name both say whether Redis decides this replica's calls."""
        gauge = self.sample("aiservices_rate_limit_store_up")
        return self.health() == (SERVING if up else NOT_SERVING) and gauge == (1 if up else 0)

    def fallbacks(self) -> float:
        return self.sample("aiservices_rate_limit_redis_fallbacks_total") or 0.0

    def task_names(self) -> set[str]:
        async def names() -> set[str]:
            return {task.get_name() for task in asyncio.all_tasks()}

        return self.thread.run(names())


def assert_one_budget(a: Replica, b: Replica, user: str) -> None:
    assert_shared_budget(a, b, user, BURST)


def both(replicas: tuple[Replica, Replica], up: bool) -> Callable[[], bool]:
    return lambda: all(replica.says_store_is(up) for replica in replicas)


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [m for r in caplog.records if r.name == LOGGER and text in (m := r.getMessage())]


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[SlowProxy]:
    with SlowProxy(redis_server.port, rtt=RTT_WITHIN) as running:
        yield running


@pytest.fixture
def redis_url(redis_server: RedisServer, proxy: SlowProxy) -> str:
    """Redis through the slow proxy."""
    assert redis_server.password
    return f"redis://:{quote(redis_server.password, safe='')}@127.0.0.1:{proxy.port}/0"


@pytest.fixture
def replicas(
    redis_url: str, upstream: StandinUpstream, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> Iterator[tuple[Replica, Replica]]:
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = make_settings(
        upstream.url,
        redis_url=redis_url,
        redis_timeout=DECISION_TIMEOUT,
        redis_connect_timeout=CONNECT_TIMEOUT,
        rate_limit_burst=BURST,
        rate_limit_per_minute=30,
    )
    with ExitStack() as stack:
        pair = []
        for name in ("A", "B"):
            thread = stack.enter_context(ServerThread(settings))
            client = stack.enter_context(ToolClient(thread.target, api_key=keys.gateway))
            replica = Replica(name, thread, client)
            stack.callback(replica.close)
            pair.append(replica)
        a, b = pair
        wait_until(both((a, b), True), "both replicas to connect to Redis")
        yield a, b


def test_redis_within_the_decision_timeout_decides_for_both_replicas(
    replicas: tuple[Replica, Replica], redis_server: RedisServer
) -> None:
    a, b = replicas
    assert_one_budget(a, b, "within")
    with redis_server.client() as redis:
        assert redis.exists(redis_key("within")) == 1
    assert a.fallbacks() == b.fallbacks() == 0


def test_redis_beyond_the_timeout_fails_open_and_is_back_without_calls(
    replicas: tuple[Replica, Replica],
    redis_server: RedisServer,
    proxy: SlowProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = replicas
    proxy.rtt = RTT_BEYOND
    for replica in (a, b):
        # Served, not refused or failed, and the server stays responsive while it waits.
        responsive_during(replica.thread, partial(replica.call, "beyond"))
    wait_until(both((a, b), False), "both replicas to report Redis down")
    assert a.fallbacks() >= 1 and b.fallbacks() >= 1
    for replica in (a, b):
        # Failing open is by design: the server itself stays in rotation.
        assert replica.health("") == replica.health(SERVICE_NAME) == SERVING
        replica.call("beyond")  # still served, from memory
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per replica
    assert all("rate limit store unavailable" in r.getMessage() for r in warnings)

    proxy.rtt = RTT_WITHIN
    calls = [rpcs_started(replica.thread) for replica in (a, b)]
    wait_until(both((a, b), True), "the background check to bring Redis back")
    assert [rpcs_started(replica.thread) for replica in (a, b)] == calls  # no call needed
    assert len(log_lines(caplog, "rate limit store is back")) == 2
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
    assert_one_budget(a, b, "back")
    assert redis_server.password and redis_server.password not in caplog.text


def test_killed_redis_is_back_after_restart_without_calls(
    replicas: tuple[Replica, Replica], redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = replicas
    redis_server.kill()
    for replica in (a, b):
        responsive_during(replica.thread, partial(replica.call, "killed"))
    wait_until(both((a, b), False), "both replicas to report Redis down")

    redis_server.start()  # same port, empty
    calls = [rpcs_started(replica.thread) for replica in (a, b)]
    wait_until(both((a, b), True), "the background check to bring Redis back")
    assert [rpcs_started(replica.thread) for replica in (a, b)] == calls
    assert len(log_lines(caplog, "rate limit store is back")) == 2
    assert_one_budget(a, b, "restarted")


def test_the_watcher_runs_only_with_redis_and_ends_with_the_server(
    replicas: tuple[Replica, Replica], upstream: StandinUpstream
) -> None:
    a, _ = replicas
    assert WATCHER in a.task_names()
    a.thread.run(a.thread.server.stop(0))
    assert WATCHER not in a.task_names()

    with ServerThread(make_settings(upstream.url)) as plain:
        with grpc.insecure_channel(plain.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=RATE_LIMIT_HEALTH), timeout=2
            )
        assert reply.status == SERVING  # the in-memory limiter is the store
        metrics = plain.server.metrics.registry
        assert metrics.get_sample_value("aiservices_rate_limit_store_up") == 1

        async def names() -> set[str]:
            return {task.get_name() for task in asyncio.all_tasks()}

        assert WATCHER not in plain.run(names())


async def test_concurrent_decisions_grow_the_pool_instead_of_failing_open(
    redis_url: str,
) -> None:
    """Decisions that run over the timeout while their connections are being opened are
    answered from memory, but the connections are finished and kept: within a few rounds, 8
    concurrent decisions at 60 ms round trip all come from Redis. (Were they thrown away
    half-made, only the background check would add connections, one per round.)"""
    fallbacks = 0

    def fell_back() -> None:
        nonlocal fallbacks
        fallbacks += 1

    limiter = limiter_from_url(redis_url, on_fallback=fell_back, connect_timeout=CONNECT_TIMEOUT)
    assert isinstance(limiter, FailoverRateLimiter)
    limit = RateLimit(burst=1000, per_minute=60)

    async def in_use() -> None:
        deadline = time.monotonic() + 5
        while limiter.degraded:
            assert time.monotonic() < deadline, "Redis was not put (back) into use"
            await asyncio.sleep(0.01)

    try:
        limiter.start()
        await in_use()
        per_round = []
        for _ in range(4):
            before = fallbacks
            await asyncio.gather(*(limiter.acquire("pool", limit) for _ in range(8)))
            per_round.append(fallbacks - before)
            if per_round[-1] == 0:
                break
            await in_use()  # the check, off the call path
        assert per_round[-1] == 0, f"fallbacks per round of 8 concurrent decisions: {per_round}"
    finally:
        await limiter.close()
