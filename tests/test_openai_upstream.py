"""The OpenAI-compatible upstream end to end: the generated gRPC client and the MCP SDK's client
-> the real server with `UPSTREAM=openai` -> the real HTTP stand-in's chat completions endpoint.

Each test asserts what the service sent (the stand-in records every request) and what the
caller got: the request's exact shape, success equal to the Agenta path's, every way the
endpoint fails (statuses, Retry-After, refused keys, no choices, a cut answer, bad model
output, a refused JSON Schema response format, timeouts, deadlines, refused connections, the
size cap, cancellation), and the settings that turn the upstream on, off, or stop start-up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import mcp_types as types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiservices import AsyncToolClient, ToolClient, ToolServiceError
from aiservices_server.config import ENV_PREFIX, Settings
from aiservices_server.tools.refine_prompt import OUTPUT_SCHEMA
from aiservices_server.upstream import http as upstream_http
from aiservices_server.upstream.http import UpstreamLimits, build_http_transport
from aiservices_server.upstream.openai import FORMAT_VERDICT_SECONDS, OpenAIRefiner
from aiservices_server.upstream.refiner import RefineRequest
from tests.standin import (
    ContentNotJson,
    ContentReply,
    Hang,
    Large,
    Length,
    NoChoices,
    QuotingBadRequest,
    RateLimited,
    RawBytes,
    Refine,
    RejectJsonSchema,
    Slow,
    StandinUpstream,
    Status,
    Unauthorized,
)
from tests.support.keys import TestKeys, load_test_keys
from tests.support.mcp import auth_headers, mcp_caller, post_rpc
from tests.support.processes import ServerProcess, run_to_exit
from tests.support.responsive import responsive_during
from tests.support.servers import ServerThread, make_settings
from tests.support.waiting import closed_port
from tests.test_resilience import PATIENT, tool_error, upstream_attempts

TOOL = "tools.agenta.api.refine_prompt"
MODEL = "gpt-standin-mini"
TEMPLATE = json.dumps(
    {
        "messages": [
            {"role": "system", "content": "You answer questions about {{product}}."},
            {"role": "user", "content": "{{question}}"},
        ]
    }
)
ARGUMENTS = {"prompt_template_json": TEMPLATE}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OPENAI_KEY = "sk-standin-0123456789abcdef"
# The refine instructions as the package ships them, read here independently of the adapter.
SYSTEM_PROMPT = (Path(upstream_http.__file__).parent / "prompts" / "refine-v1.txt").read_text(
    "utf-8"
)


def openai_settings(upstream: StandinUpstream | None, **overrides: Any) -> Settings:
    """The server on the stand-in's chat completions endpoint, no Agenta settings at all."""
    values: dict[str, Any] = {"upstream": "openai", "openai_model": MODEL}
    if upstream is not None:
        values["openai_base_url"] = upstream.openai_url
    values["rate_limit_burst"] = 100_000
    values.update(overrides)
    return make_settings(None, **values)


@pytest.fixture
def server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    """The real server on the OpenAI-compatible upstream, with MCP beside gRPC."""
    settings = openai_settings(upstream, upstream_timeout=PATIENT, mcp_address="127.0.0.1:0")
    with ServerThread(settings) as running:
        yield running


@pytest.fixture
def client(server: ServerThread, keys: TestKeys) -> Iterator[ToolClient]:
    with ToolClient(server.target, api_key=keys.editor, timeout=10.0) as tool_client:
        yield tool_client


def response_formats(upstream: StandinUpstream) -> list[str]:
    return [request.body["response_format"]["type"] for request in upstream.requests]


# --- the request ---------------------------------------------------------------------------


def test_the_request_is_the_model_the_two_messages_and_the_tools_output_schema(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    guidelines = "Plus court, s'il vous plaît: 短く 🙂"
    arguments = {**ARGUMENTS, "guidelines": guidelines, "context": "a support bot"}
    result = client.call_tool(TOOL, arguments, metadata=[("traceparent", TRACEPARENT)])
    assert not result.is_error, result.text
    (tool,) = client.list_tools()

    (request,) = upstream.requests
    assert request.path == "/v1/chat/completions"
    assert "authorization" not in request.headers  # no key set: none is sent
    assert request.headers["content-type"] == "application/json"
    assert request.headers["traceparent"] == TRACEPARENT
    body = request.body
    assert set(body) == {"model", "messages", "response_format"}  # no temperature, no max_tokens
    assert body["model"] == MODEL
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user"
    assert json.loads(user["content"]) == {
        "prompt_template_json": TEMPLATE,
        "guidelines": guidelines,
        "context": "a support bot",
    }
    assert guidelines.encode() in request.raw  # UTF-8 as is, not \u escapes
    response_format = body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["schema"] == tool.output_schema
    assert response_format["json_schema"]["strict"] is True


def test_guidelines_and_context_not_given_are_sent_empty(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    assert not client.call_tool(TOOL, ARGUMENTS).is_error
    (request,) = upstream.requests
    assert json.loads(request.body["messages"][1]["content"]) == {
        "prompt_template_json": TEMPLATE,
        "guidelines": "",
        "context": "",
    }
    assert "traceparent" not in request.headers  # none is invented


@pytest.mark.parametrize(
    ("suffix", "path"),
    [("/v1", "/v1/chat/completions"), ("/v1/", "/v1/chat/completions"), ("", "/chat/completions")],
)
def test_chat_completions_is_appended_to_the_base_url(
    upstream: StandinUpstream, keys: TestKeys, suffix: str, path: str
) -> None:
    settings = openai_settings(upstream, openai_base_url=upstream.url + suffix)
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
    ):
        assert not tool_client.call_tool(TOOL, ARGUMENTS).is_error
    assert [request.path for request in upstream.requests] == [path]


def test_a_key_temperature_and_max_tokens_are_sent_when_set(keys: TestKeys) -> None:
    with StandinUpstream(openai_api_key=OPENAI_KEY) as upstream:
        settings = openai_settings(
            upstream, openai_api_key=OPENAI_KEY, openai_temperature=0.0, openai_max_tokens=800
        )
        with (
            ServerThread(settings) as running,
            ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
        ):
            result = tool_client.call_tool(TOOL, ARGUMENTS)
        (request,) = upstream.requests
    assert not result.is_error, result.text
    assert request.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert request.body["temperature"] == 0  # zero is a setting, not "unset"
    assert request.body["max_tokens"] == 800


# --- success -------------------------------------------------------------------------------


def test_success_is_what_the_agenta_path_gives_for_the_same_template(
    client: ToolClient, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Refine(trace_id="chatcmpl-0123abcd"))
    result = client.call_tool(TOOL, ARGUMENTS)
    with (
        ServerThread(make_settings(upstream.url)) as agenta,
        ToolClient(agenta.target, api_key=keys.editor, timeout=10) as agenta_client,
    ):
        expected = agenta_client.call_tool(TOOL, ARGUMENTS)

    assert [request.path for request in upstream.requests] == [
        "/v1/chat/completions",
        "/services/completion/run",
    ]
    assert not expected.is_error, expected.text
    assert not result.is_error, result.text
    assert result.structured_content == expected.structured_content
    assert result.text == expected.text == "Tightened the wording."
    assert result.trace_id == "chatcmpl-0123abcd"  # the response id


def test_an_answer_fenced_like_a_chat_answer_is_accepted(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    answer = {
        "messages": [
            {"role": "system", "content": "Answer questions about {{product}} briefly."},
            {"role": "user", "content": "{{question}}"},
        ],
        "summary": "Shorter.",
    }
    upstream.push(ContentReply(f"```json\n{json.dumps(answer)}\n```"))
    result = client.call_tool(TOOL, ARGUMENTS)
    assert not result.is_error, result.text
    assert result.structured_content == answer


@pytest.mark.parametrize("response_id", [None, {"id": 1}, "chatcmpl-\n-x", "x" * 129])
def test_a_missing_or_unsafe_response_id_is_no_trace_id(
    client: ToolClient, upstream: StandinUpstream, response_id: Any
) -> None:
    upstream.push(Refine(trace_id=response_id))
    result = client.call_tool(TOOL, ARGUMENTS)
    assert not result.is_error, result.text
    assert result.trace_id == ""


# --- statuses and Retry-After --------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_is_a_retryable_upstream_error_without_a_retry(
    client: ToolClient, upstream: StandinUpstream, status: int
) -> None:
    upstream.push(Status(status))
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert error.retryable
    assert error.message == f"the upstream answered HTTP {status}"
    assert upstream.request_count == 1


def test_a_429_with_a_retry_after_that_fits_is_retried_once_and_succeeds(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(RateLimited(retry_after=1))
    result = client.call_tool(TOOL, ARGUMENTS)
    assert not result.is_error, result.text
    first, second = upstream.requests
    assert first.body == second.body


def test_a_429_twice_is_retried_only_once(client: ToolClient, upstream: StandinUpstream) -> None:
    upstream.push(RateLimited(retry_after=1), RateLimited(retry_after=1))
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert error.retryable
    assert error.retry_after == 1
    assert upstream.request_count == 2


@pytest.mark.parametrize(("retry_after", "deadline"), [(30, 10.0), (None, 10.0)])
def test_a_429_whose_retry_after_does_not_fit_is_passed_on_not_retried(
    client: ToolClient, upstream: StandinUpstream, retry_after: int | None, deadline: float
) -> None:
    upstream.push(RateLimited(retry_after=retry_after))
    error = tool_error(client.call_tool(TOOL, ARGUMENTS, timeout=deadline), "UPSTREAM_ERROR")
    assert error.retryable
    assert error.retry_after == retry_after
    assert upstream.request_count == 1


def test_a_refused_key_is_a_credentials_error_that_is_not_retryable(keys: TestKeys) -> None:
    with StandinUpstream(openai_api_key=OPENAI_KEY) as upstream:
        settings = openai_settings(upstream, openai_api_key="sk-wrong-key-000")
        with (
            ServerThread(settings) as running,
            ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
        ):
            result = tool_client.call_tool(TOOL, ARGUMENTS)
        assert upstream.request_count == 1
    error = tool_error(result, "UPSTREAM_ERROR")
    assert not error.retryable
    assert error.message == (
        "the upstream answered HTTP 401 (the service's upstream credentials were refused)"
    )
    assert "sk-wrong" not in error.message


@pytest.mark.parametrize(
    ("scenario", "status"), [(Unauthorized(), 401), (Status(403), 403)], ids=["401", "403"]
)
def test_401_and_403_say_the_credentials_were_refused(
    client: ToolClient, upstream: StandinUpstream, scenario: Any, status: int
) -> None:
    upstream.push(scenario)
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert not error.retryable
    assert error.message.startswith(f"the upstream answered HTTP {status}")
    assert "credentials were refused" in error.message
    assert upstream.request_count == 1


# --- what the model answered ---------------------------------------------------------------


def test_no_choices_is_an_upstream_error(client: ToolClient, upstream: StandinUpstream) -> None:
    upstream.push(NoChoices())
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert error.message == "the upstream reply has no choices"
    assert not error.retryable
    assert upstream.request_count == 1


def test_finish_reason_length_says_the_model_ran_out_of_tokens(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Length())
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert "ran out of tokens" in error.message
    assert "finish_reason length" in error.message
    assert not error.retryable
    assert upstream.request_count == 1


def http_reply(document: dict[str, Any]) -> RawBytes:
    """A whole HTTP response carrying `document`, for answers the stand-in does not shape."""
    body = json.dumps(document).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return RawBytes(head % len(body) + body)


def test_a_refusal_or_a_content_filter_is_an_upstream_error_that_quotes_nothing(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    refusal = "I cannot help with SECRET-REFUSAL-TEXT."
    upstream.push(
        http_reply(
            {
                "id": "chatcmpl-refused",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": None, "refusal": refusal},
                        "finish_reason": "stop",
                    }
                ],
            }
        ),
        ContentReply("{}", finish_reason="content_filter"),
    )
    declined = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    filtered = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert declined.message == "the model declined to answer"
    assert "SECRET-REFUSAL-TEXT" not in declined.message
    assert filtered.message == "the upstream's content filter stopped the model's answer"
    assert not declined.retryable and not filtered.retryable


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        (ContentNotJson(), "it is not valid JSON"),
        (ContentReply([1, 2]), "it is not a JSON object"),
        (ContentReply({"summary": "no messages"}), "messages is missing or empty"),
        (
            ContentReply(
                {
                    "messages": [
                        {"role": "system", "content": "You answer questions."},
                        {"role": "user", "content": "{{question}}"},
                    ],
                    "summary": "Dropped one.",
                }
            ),
            "it dropped template variables: product",
        ),
        (
            ContentReply({"messages": [{"role": "user", "content": "{{product}} {{question}}"}]}),
            "it has 1 messages where the template has 2",
        ),
    ],
    ids=["not-json", "not-an-object", "no-messages", "dropped-variable", "merged-messages"],
)
def test_an_answer_that_fails_the_checks_is_invalid_model_output(
    client: ToolClient, upstream: StandinUpstream, scenario: Any, message: str
) -> None:
    upstream.push(scenario)
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "INVALID_MODEL_OUTPUT")
    assert error.message == f"the model's output was rejected: {message}"
    assert error.retryable
    assert upstream.request_count == 1


# --- the response format -------------------------------------------------------------------


# Words a caller may write, naming the response format; they must never reach a probe.
CALLER_WORDS = "Keep the response_format and json_schema wording. CALLER-WORDS-7731"


def test_a_400_whose_param_is_response_format_falls_back_to_json_object_without_a_probe(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(RejectJsonSchema())
    first = client.call_tool(TOOL, ARGUMENTS)
    second = client.call_tool(TOOL, ARGUMENTS)

    assert not first.is_error, first.text
    assert not second.is_error, second.text
    assert first.structured_content == second.structured_content
    # Refused, asked again with json_object, and the next call asks json_object straight away.
    assert response_formats(upstream) == ["json_schema", "json_object", "json_object"]
    assert all(
        request.body["response_format"] == {"type": "json_object"}
        for request in upstream.requests[1:]
    )


def test_a_callers_words_quoted_in_a_400_do_not_switch_off_the_json_schema(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    """The 400's message names the format only because it quotes the caller: the probe, which
    carries none of the caller's words, is accepted, so the schema stays. The probe's success
    stands, so a second such call is not probed again."""
    # The first call, the probe (accepted, as this server takes the schema), the second call.
    upstream.push(QuotingBadRequest(), Refine(), QuotingBadRequest())
    arguments = {**ARGUMENTS, "guidelines": CALLER_WORDS}
    first = tool_error(client.call_tool(TOOL, arguments), "UPSTREAM_ERROR")
    second = tool_error(client.call_tool(TOOL, arguments), "UPSTREAM_ERROR")
    later = client.call_tool(TOOL, ARGUMENTS)

    assert first.message == second.message == "the upstream answered HTTP 400"
    assert not later.is_error, later.text
    # The caller's call, the probe, the second call, and a later call: all ask for the schema.
    assert response_formats(upstream) == ["json_schema"] * 4
    quoted, probe, _, _ = upstream.requests
    assert b"CALLER-WORDS-7731" in quoted.raw
    assert b"CALLER-WORDS-7731" not in probe.raw
    assert probe.body["max_tokens"] == 1


def test_a_400_whose_param_names_another_field_is_passed_on_without_a_probe(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(QuotingBadRequest(param="messages"))
    arguments = {**ARGUMENTS, "guidelines": CALLER_WORDS}
    error = tool_error(client.call_tool(TOOL, arguments), "UPSTREAM_ERROR")
    later = client.call_tool(TOOL, ARGUMENTS)

    assert error.message == "the upstream answered HTTP 400"
    assert not later.is_error, later.text
    assert response_formats(upstream) == ["json_schema", "json_schema"]


def test_a_server_that_names_the_format_only_in_its_message_switches_once_the_probe_agrees(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(RejectJsonSchema(structured=False), RejectJsonSchema(structured=False))
    arguments = {**ARGUMENTS, "guidelines": CALLER_WORDS}
    first = client.call_tool(TOOL, arguments)
    second = client.call_tool(TOOL, ARGUMENTS)

    assert not first.is_error, first.text
    assert not second.is_error, second.text
    # Refused, the probe refused too, the call again with json_object, then json_object at once.
    assert response_formats(upstream) == [
        "json_schema",
        "json_schema",
        "json_object",
        "json_object",
    ]
    refused, probe, retried, _ = upstream.requests
    assert b"CALLER-WORDS-7731" not in probe.raw
    assert probe.body["max_tokens"] == 1
    assert refused.body["messages"] == retried.body["messages"]


async def test_the_switch_to_json_object_expires_and_the_schema_is_asked_again() -> None:
    """A server gains structured outputs (an upgrade): after FORMAT_VERDICT_SECONDS the service
    asks for the schema again, and keeps it."""
    now = 1000.0
    request = RefineRequest(TEMPLATE)
    async with (
        StandinUpstream(reject_json_schema=True) as upstream,
        build_http_transport(max_connections=4) as transport,
    ):
        refiner = OpenAIRefiner(
            transport,
            UpstreamLimits(timeout=10.0),
            base_url=upstream.openai_url,
            model=MODEL,
            output_schema=OUTPUT_SCHEMA,
            clock=lambda: now,
        )
        await refiner.refine(request, time_left=None, traceparent=None)
        now += FORMAT_VERDICT_SECONDS - 1
        await refiner.refine(request, time_left=None, traceparent=None)
        upstream.reject_json_schema = False
        now += 1
        await refiner.refine(request, time_left=None, traceparent=None)
        await refiner.refine(request, time_left=None, traceparent=None)
        formats = response_formats(upstream)
    assert formats == ["json_schema", "json_object", "json_object", "json_schema", "json_schema"]


def test_a_server_without_structured_outputs_is_asked_once(keys: TestKeys) -> None:
    with StandinUpstream(reject_json_schema=True) as upstream:
        with (
            ServerThread(openai_settings(upstream)) as running,
            ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
        ):
            results = [tool_client.call_tool(TOOL, ARGUMENTS) for _ in range(3)]
        formats = response_formats(upstream)
    assert [r.is_error for r in results] == [False, False, False]
    assert formats == ["json_schema", "json_object", "json_object", "json_object"]


def test_a_400_to_json_object_is_an_upstream_error_and_not_asked_again(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(RejectJsonSchema(), Status(400))
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert error.message == "the upstream answered HTTP 400"
    assert not error.retryable
    assert response_formats(upstream) == ["json_schema", "json_object"]


def test_a_400_for_another_reason_keeps_the_json_schema(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    """A 400 that is not about the response format (a context too long, say) is passed on,
    and the schema is still asked for next time."""
    upstream.push(Status(400))
    error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    result = client.call_tool(TOOL, ARGUMENTS)
    assert error.message == "the upstream answered HTTP 400"
    assert not error.retryable
    assert not result.is_error, result.text
    assert response_formats(upstream) == ["json_schema", "json_schema"]


def test_the_json_object_retry_keeps_to_the_callers_deadline(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(RejectJsonSchema(), Slow(30.0))
    with pytest.raises(ToolServiceError) as caught:
        client.call_tool(TOOL, ARGUMENTS, timeout=1.0)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert upstream.wait_for_disconnects(1, timeout=5), "the second request outlived the deadline"
    assert response_formats(upstream) == ["json_schema", "json_object"]


# --- time, connections, size, cancellation -------------------------------------------------


def test_a_hanging_endpoint_is_a_retryable_upstream_timeout(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Hang())
    with (
        ServerThread(openai_settings(upstream, upstream_timeout=0.5)) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=PATIENT) as tool_client,
    ):
        error = tool_error(tool_client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_TIMEOUT")
        assert error.retryable
        assert upstream.wait_for_disconnects(1, timeout=5)
        assert upstream.request_count == 1, "a timed-out request must not be sent again"
        assert upstream_attempts(running, "timeout") == 1


def test_the_callers_deadline_ends_the_upstream_request(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Slow(30.0))
    with pytest.raises(ToolServiceError) as caught:
        client.call_tool(TOOL, ARGUMENTS, timeout=0.5)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert upstream.wait_for_disconnects(1, timeout=5), "the upstream request outlived the deadline"
    assert upstream.request_count == 1


def test_a_refused_connection_is_retried_once_then_upstream_unavailable(keys: TestKeys) -> None:
    settings = openai_settings(None, openai_base_url=f"http://127.0.0.1:{closed_port()}/v1")
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
    ):
        error = tool_error(tool_client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_UNAVAILABLE")
        assert error.retryable
        assert upstream_attempts(running, "unavailable") == 2


CAP = 64 * 1024


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_reply_of_the_cap_is_read_and_one_byte_more_is_refused(
    upstream: StandinUpstream, keys: TestKeys, chunked: bool
) -> None:
    upstream.push(Large(CAP, chunked=chunked), Large(CAP + 1, chunked=chunked))
    with (
        ServerThread(openai_settings(upstream, upstream_max_reply_bytes=CAP)) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
    ):
        fits = tool_client.call_tool(TOOL, ARGUMENTS)
        over = tool_client.call_tool(TOOL, ARGUMENTS)
    assert not fits.is_error, fits.text
    error = tool_error(over, "UPSTREAM_ERROR")
    assert error.message == f"the upstream reply is too large: more than {CAP:,} bytes"
    assert not error.retryable
    assert upstream.request_count == 2


def test_an_answer_of_countless_tiny_values_is_refused_and_the_server_stays_responsive(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    # A content string of 1.5 million values: within the byte cap, too costly to parse.
    upstream.push(ContentReply("[" + "0," * 1_500_000 + "0]"))
    result = responsive_during(server, lambda: client.call_tool(TOOL, ARGUMENTS))
    error = tool_error(result, "UPSTREAM_ERROR")
    assert error.message.startswith("the upstream reply is too large: more than")
    assert "JSON values" in error.message


async def test_a_caller_that_cancels_drops_the_upstream_request(
    server: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Hang())
    async with AsyncToolClient(server.target, api_key=keys.editor, timeout=30) as tool_client:
        call = asyncio.create_task(tool_client.call_tool(TOOL, ARGUMENTS))
        assert await upstream.until_requests(1, timeout=5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await upstream.until_disconnects(1, timeout=5), "the upstream request leaked"
        result = await tool_client.call_tool(TOOL, ARGUMENTS, timeout=10)
    assert not result.is_error, result.text
    assert upstream.request_count == 2


# --- over MCP ------------------------------------------------------------------------------


async def test_over_mcp_a_call_answers_what_call_tool_answers(
    server: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Refine(trace_id="chatcmpl-grpc"), Refine(trace_id="chatcmpl-mcp"))
    async with AsyncToolClient(server.target, api_key=keys.editor, timeout=10) as grpc_caller:
        expected = await grpc_caller.call_tool(TOOL, ARGUMENTS)
    async with mcp_caller(server, keys.editor) as caller:
        result = await caller.client.call_tool(TOOL, ARGUMENTS)

    assert not expected.is_error, expected.text
    assert result.is_error is False
    assert result.structured_content == expected.structured_content
    assert result.meta is not None
    assert result.meta["aiservices/trace_id"] == "chatcmpl-mcp"
    first, second = upstream.requests
    assert first.body == second.body


@pytest.mark.parametrize(
    ("scenario", "error"),
    [
        (Length(), {"code": "UPSTREAM_ERROR", "retryable": False}),
        (
            # Longer than the server's own upstream timeout: an MCP call has no deadline of
            # its own, so a shorter delay would be waited out and retried.
            RateLimited(retry_after=90),
            {"code": "UPSTREAM_ERROR", "retryable": True, "retryAfterSeconds": 90},
        ),
        (ContentNotJson(), {"code": "INVALID_MODEL_OUTPUT", "retryable": True}),
    ],
    ids=["length", "429", "not-json"],
)
async def test_over_mcp_a_failure_is_a_result_with_is_error_and_the_code(
    server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    scenario: Any,
    error: dict[str, Any],
) -> None:
    upstream.push(scenario)
    async with AsyncToolClient(server.target, api_key=keys.editor, timeout=10) as grpc_caller:
        expected = await grpc_caller.call_tool(TOOL, ARGUMENTS)
    upstream.push(scenario)
    async with mcp_caller(server, keys.editor) as caller:
        result = await caller.client.call_tool(TOOL, ARGUMENTS)

    assert expected.error is not None
    assert result.is_error is True
    (block,) = result.content
    assert isinstance(block, types.TextContent)
    assert block.text == f"{error['code']}: {expected.error.message}"
    assert result.meta is not None
    assert result.meta["aiservices/error"] == error
    assert upstream.request_count == 2


async def test_over_mcp_closing_the_request_cancels_the_upstream_request(
    server: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Hang())
    params = {"name": TOOL, "arguments": ARGUMENTS}
    calling = asyncio.create_task(
        post_rpc(server, "tools/call", params, headers=auth_headers(keys.editor))
    )
    assert await upstream.until_requests(1, timeout=10)
    calling.cancel()  # the client closes the connection of the request it abandons
    with pytest.raises(asyncio.CancelledError):
        await calling
    assert await upstream.until_disconnects(1, timeout=5), "the upstream request was not cancelled"


# --- settings ------------------------------------------------------------------------------


def test_a_base_url_and_a_model_enable_the_tool_without_a_key(
    client: ToolClient, server: ServerThread
) -> None:
    assert server.settings.openai_api_key is None
    status = client.status()
    assert status.enabled
    assert [tool.name for tool in status.tools] == [TOOL]


@pytest.mark.parametrize(
    "missing",
    [
        {"openai_model": None},
        {"openai_model": "   "},
        {"openai_base_url": None},
    ],
    ids=["no-model", "blank-model", "no-base-url"],
)
def test_without_a_base_url_or_a_model_the_feature_is_disabled(
    upstream: StandinUpstream, keys: TestKeys, missing: dict[str, Any]
) -> None:
    settings = openai_settings(upstream, **missing)
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
    ):
        status = tool_client.status()
        with pytest.raises(ToolServiceError) as caught:
            tool_client.call_tool(TOOL, ARGUMENTS)
    assert not status.enabled
    assert status.tools == []
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "AI_SERVICES_DISABLED"
    assert upstream.request_count == 0


def test_complete_agenta_settings_do_not_enable_the_openai_upstream(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    with (
        ServerThread(make_settings(upstream.url, upstream="openai")) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as tool_client,
    ):
        assert not tool_client.status().enabled
    assert upstream.request_count == 0


SECRET = "sk-SECRET-do-not-print-4417"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("UPSTREAM", "anthropic"),
        ("OPENAI_BASE_URL", "api.openai.com/v1"),
        ("OPENAI_BASE_URL", "ftp://127.0.0.1/v1"),
        ("OPENAI_BASE_URL", f"https://user:{SECRET}@127.0.0.1/v1"),
        ("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1?key=x"),
        ("OPENAI_TEMPERATURE", "3"),
        ("OPENAI_MAX_TOKENS", "0"),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line(
    tmp_path: Path, setting: str, value: str
) -> None:
    settings = {
        "GRPC_ADDRESS": "127.0.0.1:0",
        "API_KEYS_FILE": str(load_test_keys().path),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1",
        "OPENAI_MODEL": MODEL,
        setting: value,
    }
    result = run_to_exit(tmp_path, settings)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"aiservices: invalid setting {ENV_PREFIX}{setting}: ")
    assert SECRET not in result.stderr


def test_credentials_in_the_base_url_point_at_the_key_setting(tmp_path: Path) -> None:
    settings = {
        "API_KEYS_FILE": str(load_test_keys().path),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": f"https://user:{SECRET}@127.0.0.1/v1",
        "OPENAI_MODEL": MODEL,
    }
    result = run_to_exit(tmp_path, {"GRPC_ADDRESS": "127.0.0.1:0", **settings})
    assert result.returncode == 2, result.stderr
    assert f"{ENV_PREFIX}OPENAI_API_KEY" in result.stderr
    assert SECRET not in result.stderr


def test_the_serving_line_names_the_upstream_and_never_the_key(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    env = {
        "API_KEYS_FILE": str(load_test_keys().path),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": upstream.openai_url,
        "OPENAI_MODEL": MODEL,
        "OPENAI_API_KEY": SECRET,
        "LOG_LEVEL": "DEBUG",
    }
    with ServerProcess(env) as process:
        with ToolClient(process.target, api_key=keys.editor, timeout=10) as caller:
            result = caller.call_tool(TOOL, ARGUMENTS)
        assert process.terminate() == 0
        lines = process.lines
        (serving,) = [r for r in process.records if r.get("msg") == "serving"]
    assert not result.is_error, result.text
    assert upstream.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert serving["upstream"] == "openai"
    assert serving["enabled"] is True
    assert not [line for line in lines if SECRET in line]


@settings(max_examples=200, deadline=None)
@given(
    template=st.text(max_size=200),
    guidelines=st.text(max_size=50),
    context=st.text(max_size=50),
    json_schema=st.booleans(),
)
def test_every_request_body_is_the_whole_request_encoded(
    template: str, guidelines: str, context: str, json_schema: bool
) -> None:
    """The fixed part of a request is encoded once per format; the body sent still holds the
    whole request, in order, whatever text the caller's arguments hold."""
    refiner = OpenAIRefiner(
        build_http_transport(max_connections=1),
        UpstreamLimits(timeout=5.0, max_retries=0, max_reply_bytes=1 << 20),
        base_url="http://127.0.0.1:9/v1",
        model="stand-in",
        output_schema=OUTPUT_SCHEMA,
        temperature=0.5,
    )
    request = RefineRequest(template, guidelines=guidelines, context=context)
    body = json.loads(refiner._body(request, json_schema=json_schema))
    user = {"prompt_template_json": template, "guidelines": guidelines, "context": context}
    assert json.loads(body["messages"][1]["content"]) == user
    assert body["messages"][0]["role"] == "system" and body["temperature"] == 0.5
    kind = "json_schema" if json_schema else "json_object"
    assert body["response_format"]["type"] == kind
    assert list(body) == ["model", "messages", "response_format", "temperature"]
