"""The stand-in Agenta upstream over real loopback HTTP: other suites trust it, so pin it down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.standin import (
    REFINE_SUFFIX,
    RUN_PATH,
    Endless,
    Garbage,
    GzipBomb,
    Hang,
    Large,
    Refine,
    Reply,
    Reset,
    Slow,
    StandinUpstream,
    Status,
    Truncated,
    refine_template,
)
from server.standin.__main__ import main as standin_main

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
ROOT = Path(__file__).resolve().parent.parent

TEMPLATE = {
    "messages": [
        {"role": "system", "content": "You help {{name}} and {place} with {{ topic }}."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First {{a}}."},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "text", "text": "Then {{ b }}."},
            ],
        },
        {"role": "assistant", "content": "Sure, {{name}}."},
    ],
    "template_format": "curly",
}


def run_body(template: Any = None) -> dict[str, Any]:
    """The body the service sends upstream (docs/operations.md, the Agenta deployment)."""
    tpl = template if isinstance(template, str) else json.dumps(template or TEMPLATE)
    return {
        "inputs": {
            "__ag_prompt_template_json": tpl,
            "__ag_guidelines": "",
            "__ag_context": "",
        },
        "environment": "production",
        "app": "ai-services-refine-prompt",
    }


@pytest.fixture
async def upstream() -> AsyncIterator[StandinUpstream]:
    async with StandinUpstream() as up:
        yield up


@pytest.fixture
async def client(upstream: StandinUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.url, timeout=5.0) as c:
        yield c


async def test_refine_reply_shape_and_variables_survive(client: httpx.AsyncClient) -> None:
    response = await client.post(RUN_PATH, json=run_body())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    envelope = response.json()
    assert envelope["version"] == "3.0"
    assert HEX32.match(envelope["trace_id"])
    assert HEX16.match(envelope["span_id"])
    assert isinstance(envelope["data"], str)
    data = json.loads(envelope["data"])
    assert data["summary"] == "Tightened the wording."
    messages = data["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == (
        "You help {{name}} and {place} with {{ topic }}." + REFINE_SUFFIX
    )
    # Text parts come back joined into one string; non-text parts are dropped.
    assert messages[1]["content"] == "First {{a}}.\nThen {{ b }}." + REFINE_SUFFIX
    assert messages == refine_template(json.dumps(TEMPLATE))


async def test_refine_options_and_unparseable_template(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Refine(summary=None, trace_id="f" * 32), Refine(trace_id=None))
    first = (await client.post(RUN_PATH, json=run_body())).json()
    assert first["trace_id"] == "f" * 32
    assert json.loads(first["data"])["summary"] is None
    second = (await client.post(RUN_PATH, json=run_body())).json()
    assert "trace_id" not in second

    for broken in ("not json", json.dumps(["a list"]), json.dumps({"messages": "nope"})):
        response = await client.post(RUN_PATH, json=run_body(broken))
        assert response.status_code == 422
        assert "detail" in response.json()


async def test_scenarios_are_consumed_in_order_then_default(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Status(500), Status(503), Reply({"messages": [], "summary": "x"}))
    assert upstream.pending == 3
    codes = [(await client.post(RUN_PATH, json=run_body())).status_code for _ in range(4)]
    assert codes == [500, 503, 200, 200]
    assert upstream.pending == 0


async def test_reply_as_string_object_and_trace_key(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    payload = {"messages": [{"role": "system", "content": "x"}], "summary": "s"}
    upstream.push(
        Reply(payload, trace_id="a" * 32),
        Reply(payload, data_as_string=False, trace_key="traceId", trace_id="b" * 32),
        Reply("{not json", status=200),
        Reply(payload, status=502),
    )
    as_string = (await client.post(RUN_PATH, json=run_body())).json()
    assert json.loads(as_string["data"]) == payload
    assert as_string["trace_id"] == "a" * 32
    as_object = (await client.post(RUN_PATH, json=run_body())).json()
    assert as_object["data"] == payload
    assert as_object["traceId"] == "b" * 32
    assert "trace_id" not in as_object
    raw = (await client.post(RUN_PATH, json=run_body())).json()
    assert raw["data"] == "{not json"
    assert (await client.post(RUN_PATH, json=run_body())).status_code == 502


async def test_api_key_is_required_when_configured() -> None:
    async with (
        StandinUpstream(api_key="s3cret") as up,
        httpx.AsyncClient(base_url=up.url) as client,
    ):
        up.push(Status(503))
        for headers in ({}, {"Authorization": "Bearer s3cret"}, {"Authorization": "ApiKey x"}):
            response = await client.post(RUN_PATH, json=run_body(), headers=headers)
            assert response.status_code == 401
            assert response.json() == {"detail": "invalid api key"}
        assert up.pending == 1  # a refused request does not consume a scenario
        ok = await client.post(
            RUN_PATH, json=run_body(), headers={"Authorization": "ApiKey s3cret"}
        )
        assert ok.status_code == 503


async def test_status_with_retry_after_and_garbage(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(
        Status(429, {"detail": "slow down"}, {"Retry-After": "7"}),
        Garbage(),
        Garbage(b"\x00\xffnope", status=502, content_type="application/octet-stream"),
    )
    limited = await client.post(RUN_PATH, json=run_body())
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    assert limited.json() == {"detail": "slow down"}
    html = await client.post(RUN_PATH, json=run_body())
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    assert html.content == b"<html>oops</html>"
    with pytest.raises(json.JSONDecodeError):
        html.json()
    binary = await client.post(RUN_PATH, json=run_body())
    assert (binary.status_code, binary.content) == (502, b"\x00\xffnope")


async def test_reset_and_truncated_are_transport_errors(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Reset(), Truncated())
    with pytest.raises(httpx.TransportError):
        await client.post(RUN_PATH, json=run_body())
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(RUN_PATH, json=run_body())
    # The server keeps serving and our own resets are not counted as client disconnects.
    assert (await client.post(RUN_PATH, json=run_body())).status_code == 200
    assert upstream.disconnects == 0


async def test_hang_then_client_timeout_counts_a_disconnect(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Hang())
    with pytest.raises(httpx.ReadTimeout):
        await client.post(RUN_PATH, json=run_body(), timeout=0.2)
    assert await upstream.until_disconnects(1, timeout=3.0)
    assert upstream.disconnects == 1
    assert upstream.in_flight == 0


async def test_slow_answers_late_or_counts_the_disconnect(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Slow(0.15, Status(503)), Slow(30))
    started = time.monotonic()
    response = await client.post(RUN_PATH, json=run_body())
    assert response.status_code == 503
    assert time.monotonic() - started >= 0.14  # loop timers may fire a tick early
    with pytest.raises(httpx.ReadTimeout):
        await client.post(RUN_PATH, json=run_body(), timeout=0.1)
    assert await upstream.until_disconnects(1, timeout=3.0)


async def test_in_flight_and_cancelled_callers(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Hang(), Hang(), Hang())
    calls = [asyncio.create_task(client.post(RUN_PATH, json=run_body())) for _ in range(3)]
    assert await upstream.until_requests(3)
    assert upstream.in_flight == 3
    assert upstream.max_in_flight == 3
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    assert await upstream.until_disconnects(3)
    assert upstream.in_flight == 0


async def test_stop_does_not_wait_for_hanging_handlers() -> None:
    up = await StandinUpstream(default=Hang()).start()
    async with httpx.AsyncClient(base_url=up.url) as client:
        call = asyncio.create_task(client.post(RUN_PATH, json=run_body()))
        assert await up.until_requests(1)
        started = time.monotonic()
        await up.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(httpx.TransportError):
            await call
    assert up.disconnects == 0  # stopping is not a client disconnect


async def test_refine_sends_any_json_value_as_the_trace_id(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    odd: list[Any] = [{"id": "x"}, ["x"], 7, "a\nb\x00\x1b[31m"]
    upstream.push(*(Refine(trace_id=value) for value in odd))
    for value in odd:
        assert (await client.post(RUN_PATH, json=run_body())).json()["trace_id"] == value


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_is_a_valid_refinement_of_exactly_its_size(
    upstream: StandinUpstream, client: httpx.AsyncClient, chunked: bool
) -> None:
    size = 3 * 64 * 1024 + 7  # a few chunks and a piece
    upstream.push(Large(size, chunked=chunked), Large(size, status=500))
    response = await client.post(RUN_PATH, json=run_body())
    assert response.status_code == 200
    assert len(response.content) == size
    assert ("content-length" in response.headers) is not chunked
    envelope = response.json()
    assert json.loads(envelope["data"])["messages"] == refine_template(json.dumps(TEMPLATE))
    assert HEX32.match(envelope["trace_id"])
    error_page = await client.post(RUN_PATH, json=run_body())
    assert (error_page.status_code, len(error_page.content)) == (500, size)


async def test_endless_streams_until_the_client_goes_away(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Endless())
    received = 0
    async with client.stream("POST", RUN_PATH, json=run_body()) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > 8 * 1024 * 1024:
                break  # leaving the block drops the half-read connection
    assert await upstream.until_disconnects(1)
    assert upstream.in_flight == 0


async def test_gzip_bomb_inflates_to_what_it_says(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    inflated = 5 * 1024 * 1024 + 3
    upstream.push(GzipBomb(inflated))
    async with client.stream("POST", RUN_PATH, json=run_body()) as response:
        assert response.headers["content-encoding"] == "gzip"
        decoded = await response.aread()  # httpx inflates it
    assert decoded == bytes(inflated)
    upstream.push(GzipBomb(inflated))
    raw = b""
    async with client.stream("POST", RUN_PATH, json=run_body()) as response:
        async for chunk in response.aiter_raw():
            raw += chunk
    assert len(raw) < inflated // 100
    assert zlib.decompress(raw, wbits=16 + zlib.MAX_WBITS) == bytes(inflated)


async def test_requests_are_recorded_on_arrival(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Hang())
    call = asyncio.create_task(
        client.post(RUN_PATH, json=run_body(), headers={"X-Request-ID": "abc"})
    )
    assert await upstream.until_requests(1)
    recorded = upstream.requests[0]  # recorded while the scenario is still hanging
    assert recorded.method == "POST"
    assert recorded.path == RUN_PATH
    assert recorded.headers["x-request-id"] == "abc"
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.body == run_body()
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)

    response = await client.post("/other", content=b"plain text")
    assert response.status_code == 404
    assert await upstream.until_requests(2)
    assert upstream.requests[1].body is None
    assert upstream.requests[1].raw == b"plain text"
    assert (await client.get(RUN_PATH)).status_code == 405
    upstream.clear()
    assert upstream.requests == [] and upstream.request_count == 0


async def test_sync_wait_from_the_servers_own_loop_is_refused(upstream: StandinUpstream) -> None:
    with pytest.raises(RuntimeError, match="async twin"):
        upstream.wait_for_requests(1, timeout=0.01)
    assert not await upstream.until_requests(1, timeout=0.01)


def test_threaded_mode_from_sync_code() -> None:
    with StandinUpstream(api_key="k") as up:
        assert up.url == f"http://127.0.0.1:{up.port}"
        up.push(Status(500))
        with httpx.Client(base_url=up.url, headers={"Authorization": "ApiKey k"}) as client:
            assert client.post(RUN_PATH, json=run_body()).status_code == 500
            envelope = client.post(RUN_PATH, json=run_body()).json()
            assert json.loads(envelope["data"])["messages"][0]["role"] == "system"
            up.push(Hang())
            with pytest.raises(httpx.ReadTimeout):
                client.post(RUN_PATH, json=run_body(), timeout=0.2)
        assert up.wait_for_requests(3, timeout=1.0)
        assert up.wait_for_disconnects(1, timeout=3.0)
        assert [r.headers["authorization"] for r in up.requests] == ["ApiKey k"] * 3
    with pytest.raises(RuntimeError):
        _ = up.port


async def test_threaded_mode_serves_another_loop() -> None:
    up = StandinUpstream()
    up.start_in_thread()
    try:
        async with httpx.AsyncClient(base_url=up.url) as client:
            assert (await client.post(RUN_PATH, json=run_body())).status_code == 200
        assert await up.until_requests(1)
    finally:
        up.stop_thread()


@pytest.mark.parametrize("host", ["0.0.0.0", "localhost", "192.168.1.1", "::"])
def test_only_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        StandinUpstream(host=host)
    with pytest.raises(SystemExit):
        standin_main(["--host", host])


def test_command_line_serves_until_sigterm() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "server.standin", "--port", "0", "--api-key", "k"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = line.split()[-1]
            assert re.match(r"^http://127\.0\.0\.1:\d+$", url), line
            auth = {"Authorization": "ApiKey k"}
            response = httpx.post(url + RUN_PATH, json=run_body(), headers=auth)
            assert response.status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
