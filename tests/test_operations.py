"""What operators see: graceful drain on SIGTERM, Prometheus metrics, access logs without
secrets, and start-up that stops with one clear line on bad configuration."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from aiservices import AsyncToolClient, ToolClient, ToolServiceError, dict_to_struct
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from aiservices_server.config import ENV_PREFIX
from aiservices_server.logs import JsonFormatter
from tests.standin import Gate, Held, Refine, Slow, StandinUpstream, Status
from tests.support.keys import TestKeys
from tests.support.processes import ServerProcess, run_to_exit, upstream_settings
from tests.support.servers import UPSTREAM_KEY, ServerThread, make_settings
from tests.support.waiting import wait_until

TOOL = "tools.agenta.api.refine_prompt"
SERVICE = "aiservices.v1.ToolService"
CALL_TOOL = f"/{SERVICE}/CallTool"
ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
}


# --- graceful drain on SIGTERM ----------------------------------------------------------

HELD_CALLS = 5


async def health_status(channel: grpc.aio.Channel) -> int | None:
    """The health of the ToolService, or None when the server no longer answers."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1.0)
    except grpc.aio.AioRpcError:
        return None
    return int(reply.status)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT], ids=["TERM", "QUIT"])
async def test_sigterm_drains_calls_in_flight_then_exits_cleanly(
    upstream: StandinUpstream, keys: TestKeys, signum: signal.Signals
) -> None:
    """SIGQUIT drains like SIGTERM, as it does for nginx and gunicorn."""
    upstream.default = Slow(3.0)
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "RATE_LIMIT_BURST": "100000",
        "SHUTDOWN_GRACE": "10",
        "MCP_ADDRESS": "127.0.0.1:0",
        "METRICS_ADDRESS": "127.0.0.1:0",
    }
    process = ServerProcess(env, name="drain")
    try:
        await asyncio.to_thread(process.start)
        health_urls = [
            f"http://127.0.0.1:{process.port_of(listener)}/healthz"
            for listener in ("mcp_port", "metrics_port")
        ]
        async with (
            AsyncToolClient(process.target, api_key=keys.editor, timeout=30) as client,
            grpc.aio.insecure_channel(process.target) as channel,
            httpx.AsyncClient(timeout=5) as http,
        ):
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            for url in health_urls:  # HTTP balancers ask GET /healthz, with no key
                answer = await http.get(url)
                assert (answer.status_code, answer.json()) == (200, {"status": "SERVING"}), url
            held = [
                asyncio.create_task(client.call_tool(TOOL, ARGUMENTS)) for _ in range(HELD_CALLS)
            ]
            assert await upstream.until_requests(HELD_CALLS, timeout=10)

            os.kill(process.pid, signum)

            # Load balancers see NOT_SERVING while the calls in flight still run.
            seen = None
            for _ in range(100):
                seen = await health_status(channel)
                if seen == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.02)
            assert seen == health_pb2.HealthCheckResponse.NOT_SERVING
            for url in health_urls:
                answer = await http.get(url)
                assert (answer.status_code, answer.json()) == (503, {"status": "NOT_SERVING"})
            assert not any(task.done() for task in held), "a held call ended before the drain"

            # New calls are refused with a status a caller retries elsewhere.
            with pytest.raises(ToolServiceError) as refused:
                await client.call_tool(TOOL, ARGUMENTS, timeout=5)
            assert refused.value.code is grpc.StatusCode.UNAVAILABLE
            assert refused.value.reason == "SHUTTING_DOWN"
            assert refused.value.retry_after is not None

            results = await asyncio.gather(*held)
        assert [r.error for r in results if r.is_error] == []
        assert all(r.structured_content for r in results)

        exited = await asyncio.to_thread(wait_until, lambda: process.returncode is not None, 15.0)
        assert exited, "the server did not exit after draining"
        assert await asyncio.to_thread(process.terminate, 5.0) == 0
    finally:
        await asyncio.to_thread(process.close)

    assert upstream.request_count == HELD_CALLS, "the refused call reached the upstream"
    records = process.records
    messages = [record.get("msg") for record in records]
    assert "stopped" in messages, process.lines
    assert not [r for r in records if r.get("level") in ("ERROR", "CRITICAL")], process.lines
    assert not [r for r in records if "still in flight" in str(r.get("msg"))], process.lines
    codes = [r.get("code") for r in records if r.get("method") == CALL_TOOL]
    assert sorted(map(str, codes)) == ["OK"] * HELD_CALLS + ["UNAVAILABLE"]


# --- the other signals ------------------------------------------------------------------


def ignores_sighup(pid: int) -> bool:
    """Whether the process `pid` has SIGHUP ignored (/proc/PID/status, SigIgn bit 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


def test_sighups_from_the_first_line_of_the_entry_point_on_never_end_the_process(
    keys: TestKeys,
) -> None:
    """A deploy tool may ask for a reload as soon as it has started the process: from the entry
    point's first line until the reload handler is installed, SIGHUP is ignored, so SIGHUPs sent
    all through start-up leave a server that serves."""
    process = ServerProcess({"API_KEYS_FILE": str(keys.path)}, name="early-sighup")
    try:
        process.spawn()
        assert wait_until(lambda: ignores_sighup(process.pid), 10)
        while not process.wait_for_record(lambda r: r.get("msg") == "serving", 0.01):
            assert process.running, process.lines
            os.kill(process.pid, signal.SIGHUP)
        os.kill(process.pid, signal.SIGHUP)
        process.wait_until_serving()
        with ToolClient(process.target, api_key=keys.editor, timeout=10) as client:
            assert client.status().enabled is False
        assert process.terminate() == 0
    finally:
        process.close()


def test_usr1_usr2_and_alrm_are_ignored_and_repeated_sighups_without_keys_log_little() -> None:
    with ServerProcess({"AUTH": "disabled"}, name="signals") as process:
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
            os.kill(process.pid, signum)
        for _ in range(200):
            os.kill(process.pid, signal.SIGHUP)
        with ToolClient(process.target, api_key="unused", timeout=10) as client:
            assert client.status().enabled is False
        assert process.running
        assert process.terminate() == 0
    nothing = [r for r in process.records if r.get("msg", "").startswith("nothing to reload")]
    # The first signal's line, then one summary (at stop) of how many more came.
    assert 1 <= len(nothing) <= 2, nothing
    assert process.records[-1].get("msg") == "stopped"


# --- metrics ----------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        response = http.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the `name` series whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


USERS = ("u-alpha-9917", "u-beta-5521", "u-gamma-3306")


def test_metrics_count_calls_by_method_code_tool_and_outcome(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    # A burst of 1 per delegated user: each user's second call is rate limited.
    settings = make_settings(
        upstream.url, metrics_address="127.0.0.1:0", rate_limit_burst=1, rate_limit_per_minute=1
    )
    with ServerThread(settings) as running:
        port = running.server.metrics_port
        assert port

        def as_user(user: str) -> list[tuple[str, str]]:
            return [("x-agenta-user-id", user)]

        with ToolClient(running.target, api_key=keys.gateway, timeout=10) as gateway:
            assert not gateway.call_tool(TOOL, ARGUMENTS, metadata=as_user(USERS[0])).is_error
            assert not gateway.call_tool(TOOL, ARGUMENTS, metadata=as_user(USERS[1])).is_error
            upstream.push(Status(500))
            failed = gateway.call_tool(TOOL, ARGUMENTS, metadata=as_user(USERS[2]))
            assert failed.error is not None
            assert failed.error.code == "UPSTREAM_ERROR"
            with pytest.raises(ToolServiceError) as limited:
                gateway.call_tool(TOOL, ARGUMENTS, metadata=as_user(USERS[0]))
            assert limited.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert gateway.status().enabled
        with ToolClient(running.target, api_key=keys.editor, timeout=10) as editor:
            with pytest.raises(ToolServiceError) as invalid:
                editor.call_tool(TOOL, {})
            assert invalid.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with ToolClient(running.target, api_key="not-a-key-0000", timeout=10) as stranger:
            with pytest.raises(ToolServiceError) as unknown:
                stranger.call_tool(TOOL, ARGUMENTS)
            assert unknown.value.code is grpc.StatusCode.UNAUTHENTICATED

        calls = {"grpc_service": SERVICE, "grpc_method": "CallTool"}
        assert wait_until(
            lambda: value(scrape(port)[1], "grpc_server_handled_total", **calls) == 6,
            5.0,
            interval=0.02,
        )
        text, samples = scrape(port)
        assert running.server.metrics_port == port

    assert value(samples, "grpc_server_started_total", **calls) == 6
    handled = {
        code: value(samples, "grpc_server_handled_total", grpc_code=code, **calls)
        for code in ("OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED")
    }
    assert handled == {
        "OK": 3,
        "INVALID_ARGUMENT": 1,
        "UNAUTHENTICATED": 1,
        "RESOURCE_EXHAUSTED": 1,
    }
    assert value(samples, "grpc_server_handling_seconds_count", **calls) == 6
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_service=SERVICE,
            grpc_method="GetStatus",
            grpc_code="OK",
        )
        == 1
    )

    tool_calls = {"tool": TOOL, "key_id": "gateway", "transport": "grpc"}
    assert value(samples, "aiservices_tool_calls_total", outcome="OK", **tool_calls) == 2
    assert (
        value(samples, "aiservices_tool_calls_total", outcome="UPSTREAM_ERROR", **tool_calls) == 1
    )
    assert value(samples, "aiservices_tool_calls_total") == 3
    assert value(samples, "aiservices_upstream_request_seconds_count", status="200") == 2
    assert value(samples, "aiservices_upstream_request_seconds_count", status="500") == 1
    assert ("aiservices_tool_calls_in_flight", frozenset()) in samples
    assert value(samples, "aiservices_tool_calls_in_flight") == 0
    refused = {"tool": TOOL, "key_id": "gateway"}
    assert value(samples, "aiservices_rate_limit_refusals_total", **refused) == 1
    assert value(samples, "aiservices_rate_limit_refusals_total") == 1

    # User ids have unbounded cardinality: never a label value, nowhere in the exposition.
    labels = {label for _, have in samples for _, label in have}
    for user in USERS:
        assert not any(user in label for label in labels)
        assert user not in text


def test_metrics_are_off_unless_an_address_is_set(server: ServerThread) -> None:
    assert server.server.metrics_port is None


# --- access logs ------------------------------------------------------------------------

PROMPT_SECRET = "Greet {{name}} as the keeper of vault PROMPT-SECRET-6620."
OUTPUT_SECRET = "Made it sound like MODEL-OUTPUT-SECRET-4471."
SECRET_ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": PROMPT_SECRET}]})
}
TRACE_ID = "ab" * 16
ACCESS_FIELDS = {
    "request_id",
    "transport",
    "method",
    "code",
    "duration_ms",
    "key_id",
    "tool",
    "outcome",
    "upstream_status",
    "upstream_ms",
    "upstream_trace_id",
}


def call_with_trailers(
    target: str, api_key: str, arguments: dict[str, Any], metadata: list[tuple[str, str]]
) -> tuple[pb.CallToolResponse, dict[str, str]]:
    """A raw CallTool, to see the trailing metadata of a successful call."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ToolServiceStub(channel)
        request = pb.CallToolRequest(name=TOOL, arguments=dict_to_struct(arguments))
        response, call = stub.CallTool.with_call(
            request, metadata=(("authorization", f"Bearer {api_key}"), *metadata), timeout=10
        )
    return response, {
        key: value for key, value in call.trailing_metadata() if isinstance(value, str)
    }


def access_entry(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The access record of one call, checked against its JSON rendering."""

    def matching() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "aiservices.access" and getattr(r, "request_id", None) == request_id
        ]

    assert wait_until(lambda: bool(matching()), 5.0, interval=0.02), (
        f"no access record for {request_id}"
    )
    (record,) = matching()
    entry: dict[str, Any] = json.loads(JsonFormatter().format(record))
    assert entry["logger"] == "aiservices.access"
    assert entry["level"] == "INFO"
    for field in ACCESS_FIELDS & set(entry):
        assert entry[field] == getattr(record, field), field
    return entry


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO)
    yield caplog


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """caplog's text plus every record as the JSON line an operator would read."""
    formatter = JsonFormatter()
    return caplog.text + "\n".join(formatter.format(record) for record in caplog.records)


def test_access_log_line_has_every_field_and_echoes_the_request_id(
    server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    access_log: pytest.LogCaptureFixture,
) -> None:
    upstream.push(Refine(trace_id=TRACE_ID))
    response, trailers = call_with_trailers(
        server.target, keys.editor, ARGUMENTS, [("x-request-id", "req-42.abc")]
    )
    assert not response.is_error
    assert trailers["x-request-id"] == "req-42.abc"
    assert response.meta.request_id == "req-42.abc"

    entry = access_entry(access_log, "req-42.abc")
    assert set(entry) >= ACCESS_FIELDS, sorted(entry)
    assert entry["msg"] == "rpc"
    assert entry["method"] == CALL_TOOL
    assert entry["code"] == "OK"
    assert entry["key_id"] == "editor"
    assert entry["tool"] == TOOL
    assert entry["outcome"] == "OK"
    assert entry["upstream_status"] == "200"
    assert entry["upstream_trace_id"] == TRACE_ID
    assert isinstance(entry["duration_ms"], float | int)
    assert isinstance(entry["upstream_ms"], float | int)
    assert 0 <= entry["upstream_ms"] <= entry["duration_ms"]
    assert "payload" not in entry


def test_a_request_id_is_generated_when_none_is_sent(
    server: ServerThread, keys: TestKeys, access_log: pytest.LogCaptureFixture
) -> None:
    first, first_trailers = call_with_trailers(server.target, keys.editor, ARGUMENTS, [])
    second, second_trailers = call_with_trailers(
        server.target, keys.editor, ARGUMENTS, [("x-request-id", "bad id with spaces")]
    )
    for response, trailers in ((first, first_trailers), (second, second_trailers)):
        request_id = trailers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
        assert response.meta.request_id == request_id
        assert access_entry(access_log, request_id)["code"] == "OK"
    assert first_trailers["x-request-id"] != second_trailers["x-request-id"]


async def test_a_reply_the_caller_stopped_waiting_for_is_not_logged_as_ok(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    """The server is stopped (SIGSTOP) while the upstream answers and the caller's deadline
    passes: when it runs again its answer reaches nobody, and the access line says what the
    caller got, not OK."""
    gate = Gate()
    upstream.push(Held(gate))
    process = ServerProcess({"API_KEYS_FILE": str(keys.path), **upstream_settings(upstream.url)})
    try:
        await asyncio.to_thread(process.start)
        async with AsyncToolClient(process.target, api_key=keys.editor, timeout=30) as client:
            call = asyncio.create_task(
                client.call_tool(TOOL, ARGUMENTS, timeout=2, metadata=[("x-request-id", "late-1")])
            )
            assert await upstream.until_requests(1, timeout=10)
            # The server's deadline is its receipt of the call plus 2 s, and it received the call
            # before the upstream saw the request: so it has passed by `upstream_saw + 2`.
            upstream_saw = time.monotonic()
            os.kill(process.pid, signal.SIGSTOP)
            try:
                gate.open()
                with pytest.raises(ToolServiceError) as caught:
                    await call
                await asyncio.sleep(max(0.0, upstream_saw + 2.0 - time.monotonic()))
            finally:
                os.kill(process.pid, signal.SIGCONT)
        assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED

        def logged() -> dict[str, Any] | None:
            return next((r for r in process.records if r.get("request_id") == "late-1"), None)

        assert await asyncio.to_thread(wait_until, lambda: logged() is not None, 10.0)
        assert (logged() or {})["code"] == "DEADLINE_EXCEEDED"
    finally:
        await asyncio.to_thread(process.close)


def test_refused_calls_are_logged_with_their_code_and_request_id(
    server: ServerThread, access_log: pytest.LogCaptureFixture
) -> None:
    bad_key = "sk-not-a-real-key-7781"
    with (
        ToolClient(server.target, api_key=bad_key, timeout=10) as stranger,
        pytest.raises(ToolServiceError) as caught,
    ):
        stranger.call_tool(TOOL, ARGUMENTS, metadata=[("x-request-id", "req-refused-1")])
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.trailing_metadata.get("x-request-id") == "req-refused-1"
    entry = access_entry(access_log, "req-refused-1")
    assert entry["code"] == "UNAUTHENTICATED"
    assert entry["method"] == CALL_TOOL
    assert bad_key not in everything_logged(access_log)


def test_logs_hold_no_keys_prompts_or_model_output(
    server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    access_log: pytest.LogCaptureFixture,
) -> None:
    upstream.push(Refine(summary=OUTPUT_SECRET), Status(401))
    with ToolClient(server.target, api_key=keys.editor, timeout=10) as client:
        result = client.call_tool(TOOL, SECRET_ARGUMENTS, metadata=[("x-request-id", "req-s1")])
        assert result.text == OUTPUT_SECRET  # the output really went through the server
        failed = client.call_tool(TOOL, SECRET_ARGUMENTS, metadata=[("x-request-id", "req-s2")])
        assert failed.is_error
    access_entry(access_log, "req-s1")
    access_entry(access_log, "req-s2")

    logged = everything_logged(access_log)
    for secret in (keys.editor, UPSTREAM_KEY, "PROMPT-SECRET-6620", "MODEL-OUTPUT-SECRET-4471"):
        assert secret not in logged


def test_log_payloads_puts_prompt_and_output_in_the_access_line_but_never_keys(
    upstream: StandinUpstream, keys: TestKeys, access_log: pytest.LogCaptureFixture
) -> None:
    upstream.push(Refine(summary=OUTPUT_SECRET))
    with (
        ServerThread(make_settings(upstream.url, log_payloads=True)) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as client,
    ):
        result = client.call_tool(TOOL, SECRET_ARGUMENTS, metadata=[("x-request-id", "req-p1")])
        assert not result.is_error, result.text
        entry = access_entry(access_log, "req-p1")

    payload = json.dumps(entry["payload"])
    assert "PROMPT-SECRET-6620" in payload
    assert "MODEL-OUTPUT-SECRET-4471" in payload
    logged = everything_logged(access_log)
    assert keys.editor not in logged
    assert UPSTREAM_KEY not in logged


# --- start-up configuration errors ------------------------------------------------------


def listening_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("setting", "bad"),
    [
        ("UPSTREAM_TIMEOUT", "abc"),
        ("GRPC_ADDRESS", "nonsense"),
        ("METRICS_ADDRESS", "bad"),
        ("MAX_CONCURRENT_CALLS", "0"),
        ("QUEUE_TIMEOUT", "soon"),
        ("UPSTREAM_RETRIES", "9"),
        ("SHUTDOWN_GRACE", "-1"),
        ("LOG_LEVEL", "loud"),
    ],
)
def test_bad_configuration_stops_start_up_with_one_line_naming_the_setting(
    tmp_path: Path, keys: TestKeys, setting: str, bad: str
) -> None:
    settings = {"API_KEYS_FILE": str(keys.path), "GRPC_ADDRESS": "127.0.0.1:0", setting: bad}
    result = run_to_exit(tmp_path, settings)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert ENV_PREFIX + setting in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("setting", ["GRPC_ADDRESS", "METRICS_ADDRESS", "MCP_ADDRESS"])
def test_an_address_in_use_stops_start_up_with_one_line_naming_the_setting(
    tmp_path: Path, keys: TestKeys, setting: str
) -> None:
    with listening_port() as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = {
            "API_KEYS_FILE": str(keys.path),
            "GRPC_ADDRESS": "127.0.0.1:0",
            setting: address,
        }
        result = run_to_exit(tmp_path, settings)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert ENV_PREFIX + setting in lines[0]
    assert address in lines[0]
