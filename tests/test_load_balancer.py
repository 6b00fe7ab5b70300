"""Three replicas behind a real nginx running deploy/nginx.conf: what an operator sees through
the balancer.

Everything is real and on 127.0.0.1: redis-server (the replicas' one rate-limit budget), the
stand-in upstream, three `aiservices-server` processes and nginx with the committed
configuration, only its `# EDIT` lines changed (tests/support/nginx.py). Which replica served a
call is read from the replicas' own access lines, as an operator would read it. nginx must be
installed: `make test` installs it (the Makefile's `redis` target).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from aiservices import RetryPolicy, ToolClient, ToolResult, ToolServiceError
from tests.standin import Gate, Held, Slow, StandinUpstream
from tests.support.keys import TestKeys, load_test_keys
from tests.support.mcp import PROTOCOL_VERSION, mcp_client, rpc
from tests.support.nginx import NginxProcess, nginx_binary
from tests.support.processes import HOST, ServerProcess, upstream_settings
from tests.support.redis_server import RedisServer
from tests.support.servers import UPSTREAM_KEY
from tests.support.waiting import wait_until

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
}
SERVICE = "aiservices.v1.ToolService"
CALL_TOOL = f"/{SERVICE}/CallTool"
METHODS = {"grpc": CALL_TOOL, "mcp": "tools/call"}
REPLICAS = ("A", "B", "C")
# The shared cluster's budget (each test calls as a user of its own), and the limit of the
# clusters of the tests that stop replicas: one they never come near.
BURST = 10
NO_LIMIT = 100_000
# Calls held at the upstream while a replica is killed: two per replica.
HELD = 6


# --- the cluster --------------------------------------------------------------------------


def serving_record(process: ServerProcess) -> dict[str, Any]:
    return next(r for r in process.records if r.get("msg") == "serving")


def access_lines(process: ServerProcess, transport: str, **fields: str) -> list[dict[str, Any]]:
    """The process's access lines of tool calls over `transport` that match `fields`."""
    return [
        r
        for r in process.records
        if r.get("logger") == "aiservices.access"
        and r.get("transport") == transport
        and r.get("method") == METHODS[transport]
        and all(r.get(name) == value for name, value in fields.items())
    ]


def calls_served(process: ServerProcess, transport: str = "grpc") -> int:
    return len(access_lines(process, transport, code="OK"))


class Replica:
    """One replica: the processes that served on its ports, one after another (a restart
    starts a new process on the same gRPC and MCP ports; nginx knows it by those)."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.processes: list[ServerProcess] = []
        self.grpc_port = 0  # 0 until the first process has chosen
        self.mcp_port = 0
        self.metrics_port = 0

    @property
    def process(self) -> ServerProcess:
        return self.processes[-1]

    def spawn(self) -> None:
        addresses = {
            "GRPC_ADDRESS": f"{HOST}:{self.grpc_port}",
            "MCP_ADDRESS": f"{HOST}:{self.mcp_port}",
            "METRICS_ADDRESS": f"{HOST}:0",
        }
        name = f"{self.name}{len(self.processes) + 1}"
        self.processes.append(ServerProcess({**self.env, **addresses}, name=name).spawn())

    def wait_until_serving(self) -> None:
        process = self.process
        process.wait_until_serving()
        serving = serving_record(process)
        if self.grpc_port:
            assert (serving["port"], serving["mcp_port"]) == (self.grpc_port, self.mcp_port)
        self.grpc_port, self.mcp_port = int(serving["port"]), int(serving["mcp_port"])
        self.metrics_port = int(serving["metrics_port"])
        # Until the limiter's first check of Redis has passed, calls are decided in memory.
        assert process.wait_for_record(
            lambda r: "rate limit store connected" in str(r.get("msg")), timeout=10
        ), f"{process.name} never connected to Redis:\n" + "\n".join(process.lines)

    def restart(self) -> None:
        """A new process on the same ports (the previous one has exited)."""
        assert not self.process.running, f"{self.process.name} still runs"
        self.spawn()
        self.wait_until_serving()

    def in_flight(self) -> float:
        """Tool calls running on the current process now (its metrics)."""
        with httpx.Client(trust_env=False, timeout=5) as http:
            text = http.get(f"http://{HOST}:{self.metrics_port}/metrics").text
        return next(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "aiservices_tool_calls_in_flight"
            for sample in family.samples
        )

    def close(self) -> None:
        for process in self.processes:
            process.close()


def stop_all(replicas: list[Replica]) -> None:
    """SIGTERM every replica at once (each drain takes about a second), then clean up."""
    running = [p for r in replicas for p in r.processes if p.running]
    for process in running:
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    wait_until(lambda: not any(p.running for p in running), 15)
    for replica in replicas:
        replica.close()  # kills any process still running


@dataclass
class Cluster:
    replicas: list[Replica]
    nginx: NginxProcess

    def served(self, transport: str, **fields: str) -> dict[str, int]:
        """Tool calls each replica (all its processes) logged over `transport`, by name."""
        return {
            replica.name: sum(len(access_lines(p, transport, **fields)) for p in replica.processes)
            for replica in self.replicas
        }

    def wait_for_served(self, transport: str, total: int, **fields: str) -> dict[str, int]:
        """`served` once `total` lines have arrived (each is written as its call ends, which may
        be just after the caller got its answer), or after 10 s."""
        wait_until(lambda: sum(self.served(transport, **fields).values()) >= total, 10)
        return self.served(transport, **fields)


def health_through(target: str) -> int | None:
    """The ToolService's health as a caller of `target` sees it; None when nothing answers."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
        except grpc.RpcError:
            return None
        return int(reply.status)


@contextmanager
def running_cluster(
    upstream: StandinUpstream,
    redis_server: RedisServer,
    keys: TestKeys,
    *,
    burst: int,
    per_minute: float,
) -> Iterator[Cluster]:
    nginx_binary()  # when nginx is missing, fail now, naming what installs it
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "REDIS_URL": redis_server.url,
        "RATE_LIMIT_BURST": str(burst),
        "RATE_LIMIT_PER_MINUTE": str(per_minute),
        "SHUTDOWN_GRACE": "10",
        # The name callers reach nginx by, any port: nginx passes their Host on.
        "MCP_ALLOWED_HOSTS": HOST,
    }
    with ExitStack() as stack:
        replicas = [Replica(name, env) for name in REPLICAS]
        stack.callback(stop_all, replicas)
        for replica in replicas:
            replica.spawn()  # all three start at once
        for replica in replicas:
            replica.wait_until_serving()
        nginx = NginxProcess(
            [f"{HOST}:{r.grpc_port}" for r in replicas],
            [f"{HOST}:{r.mcp_port}" for r in replicas],
        )
        stack.callback(nginx.close)
        nginx.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        assert wait_until(lambda: health_through(nginx.grpc_target) == serving, 10), (
            f"nginx never reached a serving replica:\n{nginx.errors()}"
        )
        yield Cluster(replicas, nginx)


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[Cluster]:
    """One cluster for the tests that stop no replica: the default budget is a burst of 10,
    then one call a minute (nothing comes back during a test), and each test calls as a
    delegated user of its own (the gateway key with `x-agenta-user-id`)."""
    with ExitStack() as stack:
        upstream = stack.enter_context(StandinUpstream(api_key=UPSTREAM_KEY))
        redis_server = stack.enter_context(RedisServer(password=secrets.token_urlsafe(24)))
        yield stack.enter_context(
            running_cluster(upstream, redis_server, load_test_keys(), burst=BURST, per_minute=1)
        )


@pytest.fixture
def cluster(
    upstream: StandinUpstream, redis_server: RedisServer, keys: TestKeys
) -> Iterator[Cluster]:
    """A cluster of its own, without a rate limit that matters, for a test that stops replicas."""
    with running_cluster(
        upstream, redis_server, keys, burst=NO_LIMIT, per_minute=NO_LIMIT
    ) as running:
        yield running


# --- what callers see -----------------------------------------------------------------------


class Attempts(grpc.UnaryUnaryClientInterceptor):
    """Every attempt a client sends (its retries included) and the status it got."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.failures: list[tuple[grpc.StatusCode, str]] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        code = outcome.code()
        with self._lock:
            self.sent += 1
            if code is not grpc.StatusCode.OK:
                self.failures.append((code, str(outcome.details())))
        return outcome


class SteadyCaller:
    """Threads calling the tool through nginx back to back, each call with the client's retry
    policy, until `stop()`: how many succeeded, and every call that failed all the same."""

    def __init__(self, target: str, key: str, policy: RetryPolicy, threads: int = 2) -> None:
        self.attempts = Attempts()
        self._clients = [
            ToolClient(target, key, timeout=30, retry=policy, interceptors=[self.attempts])
            for _ in range(threads)
        ]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.succeeded = 0
        self.failed: list[str] = []
        self._threads = [
            threading.Thread(target=self._run, args=(client,), name=f"caller-{index}")
            for index, client in enumerate(self._clients)
        ]

    def _run(self, client: ToolClient) -> None:
        while not self._stopping.is_set():
            try:
                result = client.call_tool(TOOL, ARGUMENTS)
                outcome = None if not result.is_error else f"tool error {result.error}"
            except ToolServiceError as exc:
                outcome = f"{exc.code.name}: {exc}"
            with self._lock:
                if outcome is None:
                    self.succeeded += 1
                else:
                    self.failed.append(outcome)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(60)
        for client in self._clients:
            client.close()


def outcome_of(future: Future[ToolResult]) -> str:
    """`OK`, or the status code name the call failed with."""
    error = future.exception()
    if error is None:
        result = future.result()
        return "OK" if not result.is_error else f"tool error {result.error}"
    assert isinstance(error, ToolServiceError), repr(error)
    return error.code.name


# --- the tests ------------------------------------------------------------------------------


async def test_calls_through_nginx_reach_every_replica_over_grpc_and_mcp(
    shared_cluster: Cluster, keys: TestKeys
) -> None:
    cluster = shared_cluster
    calls = 9  # within the burst of each user
    as_grpc_user = [("x-agenta-user-id", "spread-grpc")]
    with ToolClient(cluster.nginx.grpc_target, keys.gateway, timeout=10) as client:
        for _ in range(calls):
            result = client.call_tool(TOOL, ARGUMENTS, metadata=as_grpc_user)
            assert not result.is_error and result.structured_content, result.error

    as_mcp_user = {"x-agenta-user-id": "spread-mcp"}
    async with mcp_client(
        cluster.nginx.mcp_url, keys.gateway, headers=as_mcp_user, timeout=10
    ) as mcp:
        for _ in range(calls):
            answer = await mcp.call_tool(TOOL, ARGUMENTS)
            assert answer.is_error is False and answer.structured_content, answer

    for transport in ("grpc", "mcp"):
        served = cluster.wait_for_served(transport, calls, user_id=f"spread-{transport}")
        assert served == cluster.served(transport, user_id=f"spread-{transport}", code="OK")
        assert sum(served.values()) == calls, (transport, served)
        assert all(served.values()), f"over {transport} a replica served nothing: {served}"


def test_nginx_passes_the_callers_host_so_replicas_still_refuse_other_names(
    shared_cluster: Cluster, keys: TestKeys
) -> None:
    """DNS rebinding stays out behind nginx: the replicas check the caller's own Host and
    Origin, which nginx passes on, against MCP_ALLOWED_HOSTS."""
    cluster = shared_cluster
    headers = {
        "Authorization": f"Bearer {keys.editor}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": PROTOCOL_VERSION,
        "Mcp-Method": "tools/list",
    }
    own = f"{HOST}:{cluster.nginx.mcp_port}"
    cases = [
        ({"Host": own}, 200, None),
        ({"Host": "rebound.example"}, 421, "HOST_NOT_ALLOWED"),
        ({"Host": own, "Origin": "http://rebound.example"}, 403, "ORIGIN_NOT_ALLOWED"),
        ({"Host": own, "Origin": f"http://{own}"}, 200, None),
    ]
    with httpx.Client(trust_env=False, timeout=10) as http:
        for extra, status, reason in cases:
            reply = http.post(
                cluster.nginx.mcp_url, content=rpc("tools/list"), headers={**headers, **extra}
            )
            assert reply.status_code == status, (extra, reply.status_code, reply.text)
            if reason is not None:
                assert reply.json()["error"]["data"]["reason"] == reason, reply.text
            else:
                assert reply.json()["result"]["tools"], reply.text


def test_one_callers_burst_is_exact_across_replicas_whichever_one_nginx_picks(
    shared_cluster: Cluster, keys: TestKeys
) -> None:
    cluster = shared_cluster
    refused_calls = 6
    user = "budget"
    delegated = [("x-agenta-user-id", user)]
    with ToolClient(cluster.nginx.grpc_target, keys.gateway, timeout=10) as client:
        for index in range(BURST):
            try:
                result = client.call_tool(TOOL, ARGUMENTS, metadata=delegated)
            except ToolServiceError as exc:
                pytest.fail(f"call {index + 1} of the burst of {BURST} was refused: {exc}")
            assert not result.is_error, result.error
        refusals = []
        for _ in range(refused_calls):
            with pytest.raises(ToolServiceError) as refused:
                client.call_tool(TOOL, ARGUMENTS, metadata=delegated)
            refusals.append(refused.value)

        for error in refusals:
            assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert error.retry_after is not None and error.retry_after >= 1, error.retry_after
        admitted = cluster.wait_for_served("grpc", BURST, user_id=user, code="OK")
        refused_by = cluster.wait_for_served(
            "grpc", refused_calls, user_id=user, code="RESOURCE_EXHAUSTED"
        )
    assert sum(admitted.values()) == BURST, admitted
    assert sum(refused_by.values()) == refused_calls, refused_by
    # Every replica admitted part of the burst and refused past it: one budget, not three.
    assert all(admitted.values()), f"admitted by replica: {admitted}"
    assert all(refused_by.values()), f"refused by replica: {refused_by}"


def test_a_message_over_nginxs_body_limit_is_resource_exhausted_not_unknown(
    shared_cluster: Cluster, keys: TestKeys
) -> None:
    """nginx refuses a request body over `client_max_body_size` itself (HTTP 413, which gRPC
    would report as UNKNOWN); deploy/nginx.conf answers it as the replicas answer a message
    over MAX_MESSAGE_BYTES."""
    too_large = {"prompt_template_json": "x" * 3 * 1024 * 1024}  # over nginx's 2 MiB
    with (
        ToolClient(shared_cluster.nginx.grpc_target, keys.gateway, timeout=10) as client,
        pytest.raises(ToolServiceError) as refused,
    ):
        client.call_tool(TOOL, too_large, metadata=[("x-agenta-user-id", "too-large")])
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert "client_max_body_size" in str(refused.value)


def test_a_rolling_restart_behind_nginx_fails_no_call_of_a_client_that_retries(
    cluster: Cluster, upstream: StandinUpstream, keys: TestKeys
) -> None:
    # Each call takes 20 ms at the upstream: a steady load (up to 100 calls a second from the
    # two callers) that leaves the replicas' starts some of the machine's two cores.
    upstream.default = Slow(0.02)
    caller = SteadyCaller(cluster.nginx.grpc_target, keys.editor, RetryPolicy())
    caller.start()
    try:
        assert wait_until(lambda: caller.succeeded >= 20, 20), "the calls never got going"
        for replica in cluster.replicas:
            old = replica.process
            assert wait_until(partial(calls_served, old), 10), f"{old.name} served no call"
            assert old.terminate(30) == 0, "\n".join(old.lines)  # SIGTERM: drain, then exit
            replica.restart()
            # Back in rotation before the next one goes: nginx sends it calls again.
            new = replica.process
            assert wait_until(partial(calls_served, new), 20), (
                f"nginx sent {new.name} no call after its restart:\n{cluster.nginx.errors()}"
            )
    finally:
        caller.stop()

    assert caller.failed == [], f"{len(caller.failed)} calls failed: {caller.failed[:5]}"
    assert caller.succeeded > 0
    # What the client retried: only UNAVAILABLE (a draining replica's SHUTTING_DOWN, or a call
    # nginx could not finish on a replica that was going away), each time into a success.
    failed_attempts = caller.attempts.failures
    assert {code for code, _ in failed_attempts} <= {grpc.StatusCode.UNAVAILABLE}, failed_attempts
    assert caller.attempts.sent == caller.succeeded + len(failed_attempts)
    for replica in cluster.replicas:
        old, new = replica.processes
        records = old.records
        messages = [r.get("msg") for r in records]
        assert "draining" in messages and "stopped" in messages, old.lines
        assert not [r for r in records if r.get("level") in ("ERROR", "CRITICAL")], old.lines
        assert calls_served(new) > 0


@dataclass
class KillOutcome:
    victim: str
    in_flight: int  # calls the victim was running when it was killed
    ended_at_kill: list[str]  # the outcomes of the calls that ended before the gate opened
    outcomes: list[str]  # every held call's, in the end
    upstream_requests: int  # requests the upstream received meanwhile


def hold_calls_and_kill_the_busiest(
    cluster: Cluster, upstream: StandinUpstream, client: ToolClient
) -> KillOutcome:
    """HELD calls through nginx, all held at the upstream, spread over the replicas; SIGKILL
    the replica running the most of them; wait until as many calls as it was running have
    ended; then let the others go."""
    gate = Gate()
    requests_before = upstream.request_count
    upstream.push(*(Held(gate) for _ in range(HELD)))
    live = [r for r in cluster.replicas if r.process.running]
    with ThreadPoolExecutor(HELD) as pool:
        futures = [pool.submit(client.call_tool, TOOL, ARGUMENTS) for _ in range(HELD)]
        try:
            assert upstream.wait_for_requests(requests_before + HELD, timeout=15)
            assert wait_until(lambda: sum(r.in_flight() for r in live) == HELD, 10, interval=0.05)
            counts = {r.name: int(r.in_flight()) for r in live}
            victim = max(live, key=lambda r: counts[r.name])
            in_flight = counts[victim.name]
            victim.process.kill()
            assert wait_until(lambda: sum(f.done() for f in futures) >= in_flight, 15), (
                f"the calls on {victim.name} did not end when it was killed: {counts}\n"
                f"{cluster.nginx.errors()}"
            )
            ended = [outcome_of(f) for f in futures if f.done()]
        finally:
            gate.open()
        outcomes = [outcome_of(f) for f in futures]
    return KillOutcome(
        victim=victim.name,
        in_flight=in_flight,
        ended_at_kill=ended,
        outcomes=outcomes,
        upstream_requests=upstream.request_count - requests_before,
    )


def test_a_killed_replica_costs_only_its_calls_in_flight_as_unavailable_which_retries_absorb(
    cluster: Cluster, upstream: StandinUpstream, keys: TestKeys
) -> None:
    target = cluster.nginx.grpc_target

    # Without a retry policy: exactly the calls the killed replica was running fail, each with
    # UNAVAILABLE; the calls on the others finish, and later calls go to the living.
    with ToolClient(target, keys.editor, timeout=30) as client:
        killed = hold_calls_and_kill_the_busiest(cluster, upstream, client)
        assert killed.in_flight >= 1
        assert killed.ended_at_kill == ["UNAVAILABLE"] * killed.in_flight, killed
        assert Counter(killed.outcomes) == {
            "UNAVAILABLE": killed.in_flight,
            "OK": HELD - killed.in_flight,
        }, killed
        # The upstream saw the killed replica's requests go away.
        assert upstream.wait_for_disconnects(killed.in_flight, timeout=10), killed
        for _ in range(len(REPLICAS) * 2):
            assert not client.call_tool(TOOL, ARGUMENTS).is_error

    victim = next(r for r in cluster.replicas if r.name == killed.victim)
    victim.restart()

    # With the client's retry policy: the same loss is retried on another replica, and no call
    # fails; the retried calls reach the upstream a second time.
    attempts = Attempts()
    with ToolClient(
        target, keys.editor, timeout=30, retry=RetryPolicy(), interceptors=[attempts]
    ) as client:
        killed = hold_calls_and_kill_the_busiest(cluster, upstream, client)
    assert killed.in_flight >= 1
    assert killed.ended_at_kill == ["OK"] * killed.in_flight, killed
    assert killed.outcomes == ["OK"] * HELD, killed
    assert killed.upstream_requests == HELD + killed.in_flight, killed
    assert attempts.sent == HELD + killed.in_flight
    assert [code for code, _ in attempts.failures] == [grpc.StatusCode.UNAVAILABLE] * (
        killed.in_flight
    ), attempts.failures
