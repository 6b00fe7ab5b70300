"""Two server processes, one real redis-server: one shared rate-limit budget, failing open.

Everything is real: `aiservices-server` twice, redis-server with a password, the stand-in
upstream. Each phase uses its own delegated user (gateway key + `x-agenta-user-id`), so budgets
left over from one phase cannot decide another.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from aiservices import ToolClient
from tests.standin import StandinUpstream
from tests.support.keys import TestKeys
from tests.support.processes import ServerProcess
from tests.support.redis_server import RedisServer
from tests.support.replicas import ReplicaCaller, redis_key
from tests.support.replicas import assert_one_budget as assert_shared_budget
from tests.support.servers import APP, ENVIRONMENT, UPSTREAM_KEY

BURST = 10
# Long enough for the server to check the dead Redis several times in the background (every
# 0.1 s at first, backing off), which must not log a second warning.
OUTAGE_SECONDS = 2.5


def outage_warnings(server: ServerProcess) -> list[dict[str, object]]:
    return [
        record
        for record in server.records
        if record.get("level") in ("WARNING", "ERROR", "CRITICAL")
        and any(
            word in str(record.get("msg", "")).lower() for word in ("redis", "rate limit store")
        )
    ]


class Replica(ReplicaCaller):
    """One server process and a client for it, calling as a delegated user."""

    def __init__(self, process: ServerProcess, client: ToolClient) -> None:
        super().__init__(process.name, client)
        self.process = process


@pytest.fixture
def replicas(
    redis_server: RedisServer, upstream: StandinUpstream, keys: TestKeys
) -> Iterator[tuple[Replica, Replica]]:
    env = {
        "API_KEYS_FILE": str(keys.path),
        "REDIS_URL": redis_server.url,
        "API_KEY": UPSTREAM_KEY,
        "API_URL": upstream.url,
        "ENVIRONMENT_SLUG": ENVIRONMENT,
        "REFINE_PROMPT_KEY": APP,
        "RATE_LIMIT_BURST": str(BURST),
        "RATE_LIMIT_PER_MINUTE": "30",
        "SHUTDOWN_GRACE": "2",
    }
    with ExitStack() as stack:
        processes = [
            stack.enter_context(ServerProcess(env, name=name).spawn()) for name in ("A", "B")
        ]
        for process in processes:
            process.wait_until_serving()
            # Calls fail open until the limiter's first check of Redis has passed.
            assert process.wait_for_record(
                lambda r: "rate limit store connected" in str(r.get("msg")), timeout=5
            ), f"{process.name} never connected to Redis:\n" + "\n".join(process.lines)
        a, b = (
            Replica(p, stack.enter_context(ToolClient(p.target, api_key=keys.gateway, timeout=5)))
            for p in processes
        )
        yield a, b


def assert_one_budget(a: Replica, b: Replica, user: str) -> None:
    assert_shared_budget(a, b, user, BURST)


def test_two_processes_share_one_budget(
    replicas: tuple[Replica, Replica], redis_server: RedisServer
) -> None:
    a, b = replicas
    assert_one_budget(a, b, "shared-user")
    # The budget lives in Redis, where an operator would look for it.
    assert redis_server.client().exists(redis_key("shared-user")) == 1


def test_redis_outage_fails_open_and_shared_budget_returns(
    replicas: tuple[Replica, Replica], redis_server: RedisServer, keys: TestKeys
) -> None:
    a, b = replicas
    redis = redis_server.client()

    # Both replicas are using Redis before it dies.
    for replica in (a, b):
        replica.call(f"before-{replica.name}")
        assert redis.exists(redis_key(f"before-{replica.name}")) == 1
    redis.close()

    redis_server.kill()

    # Every call is still served: no UNAVAILABLE/INTERNAL, no refusal for a fresh budget. The
    # outage lasts for several background checks of the dead Redis.
    for replica in (a, b):
        replica.call(f"outage-first-{replica.name}")
        assert replica.process.wait_for_record(
            lambda r: r.get("level") == "WARNING" and "rate limit store" in str(r.get("msg")),
            timeout=5,
        ), f"{replica.name} logged no outage warning:\n" + "\n".join(replica.process.lines)
    outage_ends = time.monotonic() + OUTAGE_SECONDS
    served = 0
    while time.monotonic() < outage_ends:
        for replica in (a, b):
            replica.call(f"outage-{served}")
            served += 1

    redis_server.start()  # same port, empty: the shared budget starts afresh

    # Each replica switches back: a probe call lands in Redis (bounded poll, fresh users so the
    # in-memory budget never refuses a probe).
    for replica in (a, b):
        deadline = time.monotonic() + 10
        attempt = 0
        with redis_server.client() as redis:
            while True:
                user = f"probe-{replica.name}-{attempt}"
                replica.call(user)
                if redis.exists(redis_key(user)):
                    break
                attempt += 1
                assert time.monotonic() < deadline, f"{replica.name} never used Redis again"
        assert replica.process.wait_for_record(
            lambda r: "rate limit store is back" in str(r.get("msg")), timeout=5
        ), f"{replica.name} did not log that Redis is back"

    assert_one_budget(a, b, "after-restart")

    # The full logs: drain on SIGTERM, then one warning per outage and no secret in any line.
    for replica in (a, b):
        assert replica.process.terminate() == 0
        lines = replica.process.lines
        warnings = outage_warnings(replica.process)
        assert len(warnings) == 1, f"{replica.name}: {len(warnings)} outage warnings: {warnings}"
        assert redis_server.password and not any(redis_server.password in ln for ln in lines)
        assert not any(keys.gateway in line for line in lines)
