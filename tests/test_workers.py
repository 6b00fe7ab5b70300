"""AGENTA_AI_SERVICES_WORKERS: several server processes share the ports under one supervisor,
which starts them, says "serving" once all serve, spreads nothing itself (the kernel does),
restarts one that dies, passes SIGHUP on, drains them all on SIGTERM, serves all their metrics
as one endpoint, and gives up when they keep dying."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from aiservices import ToolClient
from tests.standin import StandinUpstream
from tests.support.keys import TestKeys
from tests.support.processes import ServerProcess, run_to_exit, upstream_settings
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {"prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi"}]})}
WORKERS = 2
SERVICE = "aiservices.v1.ToolService"


def supervisor_serving(line: str) -> bool:
    return '"msg":"serving"' in line and '"workers"' in line


def supervisor_record(process: ServerProcess) -> dict[str, Any]:
    return next(r for r in process.records if r.get("msg") == "serving" and "workers" in r)


def worker_pids(process: ServerProcess) -> list[int]:
    return [int(pid) for pid in supervisor_record(process)["pids"]]


def workers_of_calls(process: ServerProcess) -> Counter[int]:
    """How many CallTool access lines each worker wrote."""
    return Counter(
        int(r["worker"])
        for r in process.records
        if r.get("msg") == "rpc" and str(r.get("method", "")).endswith("/CallTool")
    )


@contextmanager
def running_workers(
    upstream: StandinUpstream, keys: TestKeys, redis_server: RedisServer, **settings: str
) -> Iterator[ServerProcess]:
    """A supervisor of WORKERS workers, once it says serving (`settings` added to the env)."""
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "REDIS_URL": redis_server.url,
        "RATE_LIMIT_BURST": "100000",
        "WORKERS": str(WORKERS),
        "MCP_ADDRESS": "127.0.0.1:0",
        "METRICS_ADDRESS": "127.0.0.1:0",
        "SHUTDOWN_GRACE": "5",
        **settings,
    }
    process = ServerProcess(env, name="workers")
    try:
        process.spawn()
        assert process.wait_for_line(supervisor_serving, 60), process.lines[-20:]
        process.wait_until_serving()
        yield process
    finally:
        process.close()


@pytest.fixture
def workers(
    upstream: StandinUpstream, keys: TestKeys, redis_server: RedisServer
) -> Iterator[ServerProcess]:
    with running_workers(upstream, keys, redis_server) as process:
        yield process


def call_on_fresh_connections(process: ServerProcess, key: str, count: int) -> None:
    """`count` calls, each on a connection of its own, so the kernel picks a worker for each."""
    for _ in range(count):
        with ToolClient(process.target, api_key=key, timeout=10) as client:
            assert not client.call_tool(TOOL, ARGUMENTS).is_error


def test_workers_share_the_ports_and_every_one_serves_calls_health_and_metrics(
    workers: ServerProcess, keys: TestKeys
) -> None:
    pids = worker_pids(workers)
    assert len(set(pids)) == WORKERS and os.getpid() not in pids
    call_on_fresh_connections(workers, keys.editor, 24)
    assert wait_until(lambda: workers_of_calls(workers).total() == 24, 10)
    assert set(workers_of_calls(workers)) == {1, 2}, workers_of_calls(workers)
    # Health and reflection answer on every connection, whichever worker it reached.
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    for _ in range(8):
        with grpc.insecure_channel(workers.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            [listed] = reflection.ServerReflectionInfo(iter([listing]), timeout=10)
            assert SERVICE in {s.name for s in listed.list_services_response.service}
    # One metrics endpoint counts the calls of every worker.
    serving = supervisor_record(workers)
    metrics_port, mcp_port = serving["metrics_port"], serving["mcp_port"]
    with httpx.Client(trust_env=False, timeout=10) as http:
        text = http.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert http.get(f"http://127.0.0.1:{metrics_port}/healthz").status_code == 200
        assert http.get(f"http://127.0.0.1:{mcp_port}/healthz").status_code == 200
    handled = {
        family.name: sum(
            s.value
            for s in family.samples
            if s.labels.get("grpc_method") == "CallTool" and s.name.endswith("_total")
        )
        for family in text_string_to_metric_families(text)
    }
    assert handled["grpc_server_handled"] == 24


def test_a_dead_worker_is_started_again_and_sighup_reaches_every_worker(
    workers: ServerProcess, keys: TestKeys
) -> None:
    first, second = worker_pids(workers)
    os.kill(first, signal.SIGKILL)
    assert workers.wait_for_line(lambda line: '"msg":"worker serving"' in line, 30)
    restarted = next(r for r in workers.records if r.get("msg") == "worker serving")
    assert restarted["worker"] == 1 and restarted["pid"] not in (first, second)
    call_on_fresh_connections(workers, keys.editor, 4)

    os.kill(workers.pid, signal.SIGHUP)
    assert wait_until(lambda: len(reloads(workers)) == WORKERS, 15), workers.lines[-10:]
    assert sorted(int(r["worker"]) for r in reloads(workers)) == [1, 2]


def reloads(process: ServerProcess) -> list[dict[str, Any]]:
    """Lines of workers reloading their keys file (one per worker and SIGHUP)."""
    return [r for r in process.records if "worker" in r and "API keys file" in str(r.get("msg"))]


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    workers: ServerProcess, keys: TestKeys
) -> None:
    pids = worker_pids(workers)
    assert workers.terminate(timeout=30) == 0
    stopped = [r for r in workers.records if r.get("msg") == "stopped"]
    assert {int(r["worker"]) for r in stopped if "worker" in r} == {1, 2}
    assert any(r.get("codes") == [0, 0] for r in stopped)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"


def test_workers_that_keep_dying_stop_the_supervisor_with_1(workers: ServerProcess) -> None:
    killed: set[int] = set()

    def kill_the_current_ones() -> bool:
        for r in workers.records:
            pid = r.get("pid") if r.get("msg") == "worker serving" else None
            if isinstance(pid, int) and pid not in killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
        return workers.returncode is not None

    for pid in worker_pids(workers):
        killed.add(pid)
        os.kill(pid, signal.SIGKILL)
    assert wait_until(kill_the_current_ones, 60), workers.lines[-10:]
    assert workers.returncode == 1
    assert any(r.get("msg") == "workers keep exiting: stopping" for r in workers.records)


def test_more_than_one_worker_without_redis_is_refused_in_one_line(
    keys: TestKeys, tmp_path: Path
) -> None:
    finished = run_to_exit(tmp_path, {"API_KEYS_FILE": str(keys.path), "WORKERS": "2"})
    assert finished.returncode == 2
    assert (finished.stdout + finished.stderr).strip().splitlines() == [
        "aiservices: invalid settings: AGENTA_AI_SERVICES_WORKERS=2 runs 2 processes, each "
        "with its own rate-limit budgets: set AGENTA_AI_SERVICES_REDIS_URL so they share one"
    ]


def test_a_file_no_worker_can_start_with_is_refused_in_one_line(
    keys: TestKeys, redis_server: RedisServer, tmp_path: Path
) -> None:
    tools = tmp_path / "tools.toml"
    tools.write_text('[[tools]]\nname = "no dots"\n')
    finished = run_to_exit(
        tmp_path,
        {
            "API_KEYS_FILE": str(keys.path),
            "WORKERS": "2",
            "REDIS_URL": redis_server.url,
            "TOOLS_FILE": str(tools),
        },
    )
    assert finished.returncode == 2
    said = (finished.stdout + finished.stderr).strip().splitlines()
    assert len(said) == 1 and said[0].startswith(
        f"aiservices: tools file {tools}: tool #1: name"
    ), said


def test_a_maximum_connection_age_moves_one_clients_calls_between_workers(
    upstream: StandinUpstream, keys: TestKeys, redis_server: RedisServer
) -> None:
    """GRPC_MAX_CONNECTION_AGE asks each connection to go away after that long: the client
    reconnects, and its calls reach the other process too (a replica, behind a balancer that
    spreads connections), where one long-lived connection would stay on one worker for ever."""
    with (
        running_workers(
            upstream,
            keys,
            redis_server,
            GRPC_MAX_CONNECTION_AGE="0.3",
            GRPC_MAX_CONNECTION_AGE_GRACE="5",
        ) as process,
        ToolClient(process.target, api_key=keys.editor, timeout=10) as client,
    ):

        def both_workers_served() -> bool:
            assert not client.call_tool(TOOL, ARGUMENTS).is_error
            return len(workers_of_calls(process)) == WORKERS

        assert wait_until(both_workers_served, 30, interval=0.05), workers_of_calls(process)
