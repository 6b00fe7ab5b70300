"""The stand-in upstreams (Agenta runner, OpenAI-compatible chat completions) over real loopback
HTTP: other suites trust them, so pin them down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.standin import (
    CHAT_PATH,
    JSON_SCHEMA_REFUSAL,
    REFINE_SUFFIX,
    RUN_PATH,
    ContentNotJson,
    ContentReply,
    Endless,
    Garbage,
    GzipBomb,
    Hang,
    Large,
    Length,
    NoChoices,
    RateLimited,
    Refine,
    RejectJsonSchema,
    Reply,
    Reset,
    Slow,
    StandinUpstream,
    Status,
    Truncated,
    Unauthorized,
    refine_template,
    token_count,
)
from tests.standin.__main__ import main as standin_main
from tests.standin.openai import parse_chat_request

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


@contextlib.contextmanager
def standin_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m tests.standin --port 0 ARGS` run from the checkout, with the first line it
    prints (ending with the URL it serves); killed on leaving if it is still running."""
    with subprocess.Popen(
        [sys.executable, "-m", "tests.standin", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stdout is not None
            yield proc, proc.stdout.readline()
        finally:
            if proc.poll() is None:
                proc.kill()


def test_command_line_serves_until_sigterm() -> None:
    with standin_process("--api-key", "k") as (proc, line):
        url = line.split()[-1]
        assert re.match(r"^http://127\.0\.0\.1:\d+$", url), line
        auth = {"Authorization": "ApiKey k"}
        response = httpx.post(url + RUN_PATH, json=run_body(), headers=auth)
        assert response.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


# -- the OpenAI-compatible chat completions endpoint -------------------------------------------

CHATCMPL = re.compile(r"^chatcmpl-[0-9a-f]{24}$")
SYSTEM_PROMPT = "Refine the prompt template. Answer only with JSON."
OUTPUT_SCHEMA = {"type": "object", "properties": {"messages": {"type": "array"}}}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "refined_prompt", "schema": OUTPUT_SCHEMA, "strict": True},
}


def chat_body(
    template: Any = None,
    response_format: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The body the OpenAI adapter sends, following ``tests.standin.openai``'s convention."""
    tpl = template if isinstance(template, str) else json.dumps(template or TEMPLATE)
    user = json.dumps({"prompt_template_json": tpl, "guidelines": "be brief", "context": ""})
    body: dict[str, Any] = {
        "model": "qwen2.5:7b",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ],
        "response_format": response_format or JSON_SCHEMA_FORMAT,
    }
    return body | options


def with_user_fields(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``body`` with ``fields`` added to its user message's JSON object."""
    system, user = body["messages"]
    content = json.dumps(json.loads(user["content"]) | fields)
    return body | {"messages": [system, user | {"content": content}]}


async def test_chat_reads_test_cases_when_the_user_message_has_them(
    client: httpx.AsyncClient,
) -> None:
    cases = [
        {"inputs": {"q": "hi"}, "expected_output": "Hello!", "actual_output": "Hi", "note": "n"},
        {"inputs": {}, "expected_output": ""},
    ]
    body = with_user_fields(chat_body(), test_cases=cases)
    assert parse_chat_request(body).test_cases == tuple(cases)
    assert parse_chat_request(chat_body()).test_cases == ()
    reply = await client.post(CHAT_PATH, json=body)
    assert chat_content(reply)["messages"] == refine_template(json.dumps(TEMPLATE))


def chat_content(response: httpx.Response) -> Any:
    """The refinement a chat completion carries, parsed from its message content."""
    return json.loads(response.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("path", [CHAT_PATH, "/chat/completions"])
async def test_chat_refine_reply_shape_usage_and_variables(
    upstream: StandinUpstream, client: httpx.AsyncClient, path: str
) -> None:
    before = int(time.time())
    response = await client.post(path, json=chat_body(temperature=0.2, max_tokens=2048))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    reply = response.json()
    assert CHATCMPL.match(reply["id"])
    assert reply["object"] == "chat.completion"
    assert before <= reply["created"] <= int(time.time())
    assert reply["model"] == "qwen2.5:7b"
    [choice] = reply["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert json.loads(content) == {
        "messages": refine_template(json.dumps(TEMPLATE)),
        "summary": "Tightened the wording.",
    }
    sent = chat_body()["messages"]
    prompt_tokens = sum(token_count(m["content"]) for m in sent)
    assert reply["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": token_count(content),
        "total_tokens": prompt_tokens + token_count(content),
    }
    assert upstream.openai_url == upstream.url + "/v1"


async def test_chat_accepts_json_object_and_no_format_and_text_parts(
    client: httpx.AsyncClient,
) -> None:
    body = chat_body(response_format={"type": "json_object"})
    assert chat_content(await client.post(CHAT_PATH, json=body))["summary"] is not None
    del body["response_format"]
    user = body["messages"][1]["content"]
    body["messages"][1]["content"] = [{"type": "text", "text": user}]
    reply = await client.post(CHAT_PATH, json=body)
    assert chat_content(reply)["messages"] == refine_template(json.dumps(TEMPLATE))


def _broken_chat_bodies() -> list[tuple[Any, str]]:
    good = chat_body()
    no_user = good | {"messages": [good["messages"][0]]}
    plain_user = good | {"messages": [{"role": "user", "content": "refine this please"}]}
    missing_context = good | {
        "messages": [{"role": "user", "content": json.dumps({"prompt_template_json": "{}"})}]
    }
    bad_schema = {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}
    case = {"inputs": {"q": "hi"}, "expected_output": "Hello!"}
    off_user_message: list[dict[str, Any]] = [
        {"tone": "formal"},
        {"test_cases": []},
        {"test_cases": case},
        {"test_cases": [case] * 21},
        {"test_cases": [{**case, "inputs": {"q": 1}}]},
        {"test_cases": [{"inputs": {}}]},
        {"test_cases": [{**case, "expected": "x"}]},
        {"test_cases": [{**case, "note": None}]},
    ]
    return [
        *[(with_user_fields(good, **extra), "messages") for extra in off_user_message],
        (["a list"], "body"),
        (good | {"model": ""}, "model"),
        ({k: v for k, v in good.items() if k != "model"}, "model"),
        (good | {"messages": []}, "messages"),
        (good | {"messages": [{"content": "x"}]}, "messages[0]"),
        (no_user, "messages"),
        (plain_user, "messages"),
        (missing_context, "messages"),
        (chat_body("not json"), "messages"),
        (chat_body(json.dumps({"messages": "nope"})), "messages"),
        (good | {"response_format": {"type": "yaml"}}, "response_format"),
        (good | {"response_format": bad_schema}, "response_format"),
        (good | {"temperature": 3}, "temperature"),
        (good | {"temperature": True}, "temperature"),
        (good | {"max_tokens": 0}, "max_tokens"),
        (good | {"max_tokens": 1.5}, "max_tokens"),
        (good | {"stream": True}, "stream"),
    ]


@pytest.mark.parametrize(("body", "param"), _broken_chat_bodies())
async def test_chat_refuses_a_request_off_the_convention_naming_the_field(
    client: httpx.AsyncClient, body: Any, param: str
) -> None:
    response = await client.post(CHAT_PATH, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


async def test_chat_requests_are_recorded_with_headers_and_body(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    await client.post(CHAT_PATH, json=chat_body(), headers={"Authorization": "Bearer sk-1"})
    await client.post("/chat/completions", json=chat_body(temperature=0))
    first, second = upstream.requests
    assert (first.method, first.path) == ("POST", CHAT_PATH)
    assert first.headers["authorization"] == "Bearer sk-1"
    assert first.body == chat_body()
    assert second.path == "/chat/completions"
    assert "authorization" not in second.headers
    assert second.body["temperature"] == 0
    assert (await client.get(CHAT_PATH)).status_code == 405
    assert (await client.post("/v2/chat/completions", json=chat_body())).status_code == 404


async def test_chat_openai_specific_scenarios(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(
        Length(),
        NoChoices(),
        ContentNotJson(),
        ContentReply({"messages": [], "summary": "x"}, response_id="chatcmpl-fixed"),
        ContentReply("{broken", finish_reason="content_filter", response_id=None),
    )
    cut = (await client.post(CHAT_PATH, json=chat_body())).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    content = cut["choices"][0]["message"]["content"]
    whole = json.dumps({"messages": refine_template(json.dumps(TEMPLATE)), "summary": "x"})
    assert 0 < len(content) < len(whole)
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)

    empty = (await client.post(CHAT_PATH, json=chat_body())).json()
    assert empty["choices"] == []
    assert CHATCMPL.match(empty["id"])

    chatty = await client.post(CHAT_PATH, json=chat_body())
    assert chatty.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        chat_content(chatty)

    given = await client.post(CHAT_PATH, json=chat_body())
    assert given.json()["id"] == "chatcmpl-fixed"
    assert chat_content(given) == {"messages": [], "summary": "x"}

    odd = (await client.post(CHAT_PATH, json=chat_body())).json()
    assert "id" not in odd
    assert odd["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "{broken"},
        "finish_reason": "content_filter",
    }
    assert upstream.pending == 0


async def test_chat_reject_json_schema_only_for_json_schema(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(RejectJsonSchema(), RejectJsonSchema(), RejectJsonSchema(Status(503)))
    refused = await client.post(CHAT_PATH, json=chat_body())
    assert refused.status_code == 400
    assert refused.json() == {
        "error": {
            "message": JSON_SCHEMA_REFUSAL,
            "type": "invalid_request_error",
            "param": "response_format",
            "code": None,
        }
    }
    fallback = await client.post(CHAT_PATH, json=chat_body(response_format={"type": "json_object"}))
    assert fallback.status_code == 200
    assert chat_content(fallback)["messages"] == refine_template(json.dumps(TEMPLATE))
    # Not asked for json_schema (the Agenta endpoint never is): answered by `then`.
    assert (await client.post(RUN_PATH, json=run_body())).status_code == 503


async def test_server_wide_json_schema_rejection_consumes_no_scenario() -> None:
    async with (
        StandinUpstream(reject_json_schema=True) as up,
        httpx.AsyncClient(base_url=up.url) as client,
    ):
        up.push(Status(502))
        for _ in range(2):
            response = await client.post(CHAT_PATH, json=chat_body())
            assert response.status_code == 400
            assert response.json()["error"]["param"] == "response_format"
        assert up.pending == 1
        body = chat_body(response_format={"type": "json_object"})
        assert (await client.post(CHAT_PATH, json=body)).status_code == 502
        assert (await client.post(CHAT_PATH, json=body)).status_code == 200


async def test_chat_rate_limited_and_unauthorized_in_each_endpoints_shape(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(RateLimited(7), RateLimited(0.5), RateLimited(None), Unauthorized())
    limited = await client.post(CHAT_PATH, json=chat_body())
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert (await client.post(CHAT_PATH, json=chat_body())).headers["retry-after"] == "0.5"
    no_header = await client.post(CHAT_PATH, json=chat_body())
    assert (no_header.status_code, "retry-after" in no_header.headers) == (429, False)
    refused = await client.post(CHAT_PATH, json=chat_body())
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"

    upstream.push(RateLimited(3), Unauthorized())
    agenta_limited = await client.post(RUN_PATH, json=run_body())
    assert agenta_limited.status_code == 429
    assert agenta_limited.headers["retry-after"] == "3"
    assert "detail" in agenta_limited.json()
    agenta_refused = await client.post(RUN_PATH, json=run_body())
    assert agenta_refused.json() == {"detail": "invalid api key"}


async def test_chat_only_scenarios_on_the_agenta_endpoint_say_so(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Length(), NoChoices())
    for name in ("Length", "NoChoices"):
        response = await client.post(RUN_PATH, json=run_body())
        assert response.status_code == 501
        assert name in response.json()["detail"]


async def test_shared_scenarios_answer_chat_in_its_own_shape(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    payload = {"messages": [{"role": "system", "content": "x"}], "summary": "s"}
    upstream.push(
        Status(500),
        Status(503, headers={"Retry-After": "2"}),
        Refine(summary=None, trace_id="chatcmpl-abc"),
        Refine(trace_id=None),
        Reply(payload, trace_id="chatcmpl-r"),
        ContentReply(payload),
        Slow(0.05, Status(502)),
        Garbage(),
    )
    error = await client.post(CHAT_PATH, json=chat_body())
    assert error.status_code == 500
    assert error.json()["error"]["type"] == "server_error"
    unavailable = await client.post(CHAT_PATH, json=chat_body())
    assert (unavailable.status_code, unavailable.headers["retry-after"]) == (503, "2")
    fixed = await client.post(CHAT_PATH, json=chat_body())
    assert fixed.json()["id"] == "chatcmpl-abc"
    assert chat_content(fixed)["summary"] is None
    assert "id" not in (await client.post(CHAT_PATH, json=chat_body())).json()
    replied = await client.post(CHAT_PATH, json=chat_body())
    assert (replied.json()["id"], chat_content(replied)) == ("chatcmpl-r", payload)
    # ContentReply on the Agenta endpoint: the same content as the envelope's data.
    envelope = (await client.post(RUN_PATH, json=run_body())).json()
    assert json.loads(envelope["data"]) == payload
    assert (await client.post(CHAT_PATH, json=chat_body())).status_code == 502
    html = await client.post(CHAT_PATH, json=chat_body())
    assert html.content == b"<html>oops</html>"


async def test_chat_transport_failures_hang_and_disconnects(
    upstream: StandinUpstream, client: httpx.AsyncClient
) -> None:
    upstream.push(Reset(), Truncated(), Hang())
    with pytest.raises(httpx.TransportError):
        await client.post(CHAT_PATH, json=chat_body())
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(CHAT_PATH, json=chat_body())
    with pytest.raises(httpx.ReadTimeout):
        await client.post(CHAT_PATH, json=chat_body(), timeout=0.2)
    assert await upstream.until_disconnects(1, timeout=3.0)
    assert upstream.in_flight == 0


async def test_chat_large_and_endless(upstream: StandinUpstream, client: httpx.AsyncClient) -> None:
    size = 2 * 64 * 1024 + 11
    upstream.push(Large(size), Endless())
    response = await client.post(CHAT_PATH, json=chat_body())
    assert len(response.content) == size
    assert response.json()["object"] == "chat.completion"
    assert chat_content(response)["messages"] == refine_template(json.dumps(TEMPLATE))
    received = 0
    async with client.stream("POST", CHAT_PATH, json=chat_body()) as stream:
        async for chunk in stream.aiter_raw():
            received += len(chunk)
            if received > 1024 * 1024:
                break
    assert await upstream.until_disconnects(1)


async def test_chat_key_is_required_only_when_configured() -> None:
    async with (
        StandinUpstream(api_key="agenta", openai_api_key="sk-1") as up,
        httpx.AsyncClient(base_url=up.url) as client,
    ):
        up.push(Status(503))
        for headers in ({}, {"Authorization": "ApiKey agenta"}, {"Authorization": "Bearer x"}):
            response = await client.post(CHAT_PATH, json=chat_body(), headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert up.pending == 1
        ok = await client.post(
            CHAT_PATH, json=chat_body(), headers={"Authorization": "Bearer sk-1"}
        )
        assert ok.status_code == 503
        # The Agenta key does not open the chat endpoint, nor the chat key the Agenta one.
        agenta = await client.post(
            RUN_PATH, json=run_body(), headers={"Authorization": "Bearer sk-1"}
        )
        assert agenta.status_code == 401


def test_command_line_serves_chat_completions_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        standin_main(["--help"])
    assert CHAT_PATH in capsys.readouterr().out
    with standin_process("--openai-api-key", "sk-1", "--reject-json-schema") as (proc, line):
        url = line.split()[-1]
        auth = {"Authorization": "Bearer sk-1"}
        json_object = chat_body(response_format={"type": "json_object"})
        response = httpx.post(url + CHAT_PATH, json=json_object, headers=auth)
        assert chat_content(response)["messages"] == refine_template(json.dumps(TEMPLATE))
        refused = httpx.post(url + CHAT_PATH, json=chat_body(), headers=auth)
        assert refused.json()["error"]["message"] == JSON_SCHEMA_REFUSAL
        assert httpx.post(url + CHAT_PATH, json=chat_body()).status_code == 401
        assert httpx.post(url + RUN_PATH, json=run_body()).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
