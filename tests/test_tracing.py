"""OpenTelemetry traces, end to end: real server processes export over OTLP (HTTP or gRPC) to
a real receiver (tests/support/otlp.py), callers send a W3C traceparent, and the stand-in upstream
records the traceparent the server sent it. Off by default, at no cost: no SDK is imported."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiservices import PermissionDenied, ToolClient
from aiservices_server.startup import StartupError
from aiservices_server.tracing import NO_TRACER, from_environment
from aiservices_server.upstream.http import MAX_SPAN_TEXT
from aiservices_server.upstream.openai import MAX_FINISH_REASONS, chat_reply_attributes
from tests.standin import StandinUpstream, Status
from tests.support.keys import TestKeys
from tests.support.mcp import mcp_client
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import ServerProcess, clean_env, upstream_settings
from tests.support.waiting import closed_port, wait_until

TOOL = "tools.agenta.api.refine_prompt"
MODEL = "gpt-standin-mini"
PROMPT_TEXT = "You answer questions about {{product}}."
TEMPLATE = json.dumps(
    {"messages": [{"role": "system", "content": PROMPT_TEXT}, {"role": "user", "content": "Hi"}]}
)
ARGUMENTS = {"prompt_template_json": TEMPLATE}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def settings(upstream: StandinUpstream, keys: TestKeys) -> dict[str, str]:
    """The server on the stand-in's OpenAI-compatible endpoint, with MCP and metrics."""
    return {
        "API_KEYS_FILE": str(keys.path),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": upstream.openai_url,
        "OPENAI_MODEL": MODEL,
        "RATE_LIMIT_BURST": "100000",
        "MCP_ADDRESS": "127.0.0.1:0",
        "METRICS_ADDRESS": "127.0.0.1:0",
        "SHUTDOWN_GRACE": "3",
    }


def otel(endpoint: str) -> dict[str, str]:
    """The standard variables that turn traces on, exported every 50 ms."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "aiservices-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
    }


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def traced(
    upstream: StandinUpstream, keys: TestKeys, receiver: OtlpReceiver
) -> Iterator[ServerProcess]:
    with ServerProcess(
        settings(upstream, keys), variables=otel(receiver.endpoint), name="traced"
    ) as process:
        yield process


def only(spans: list[ReceivedSpan], **wanted: object) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in wanted.items())]
    assert len(found) == 1, (wanted, spans)
    return found[0]


def no_secrets(spans: list[ReceivedSpan], *secrets: str) -> None:
    """No span attribute holds prompt text, arguments or a key."""
    text = repr([span.attributes for span in spans])
    for secret in secrets:
        assert secret not in text


def tool_and_client(spans: list[ReceivedSpan], server: ReceivedSpan) -> tuple[ReceivedSpan, ...]:
    """The tool span under `server` and the upstream client span under it, checked as such."""
    tool = only(spans, parent_id=server.span_id, kind="internal")
    assert tool.trace_id == CALLER_TRACE
    assert tool.attributes["gen_ai.tool.name"] == TOOL
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    client = only(spans, parent_id=tool.span_id, kind="client")
    attributes = client.attributes
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.full"].endswith("/chat/completions")
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.response.model"]
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    return tool, client


def test_a_call_tool_over_grpc_is_a_server_span_a_tool_span_and_a_client_span(
    traced: ServerProcess,
    receiver: OtlpReceiver,
    upstream: StandinUpstream,
    keys: TestKeys,
) -> None:
    with ToolClient(traced.target, api_key=keys.editor, timeout=10) as client:
        assert not client.call_tool(TOOL, ARGUMENTS, traceparent=TRACEPARENT).is_error
    spans = receiver.wait_for(3)
    server = only(spans, kind="server")
    assert server.name == "aiservices.v1.ToolService/CallTool"
    assert (server.trace_id, server.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    assert not server.error
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == "aiservices.v1.ToolService"
    assert server.attributes["rpc.method"] == "CallTool"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.resource["service.name"] == "aiservices-test"
    assert server.resource["deployment.environment.name"] == "test"
    _, upstream_span = tool_and_client(spans, server)
    # The upstream was told of the client span, in the caller's trace.
    (sent,) = upstream.requests
    assert sent.headers["traceparent"] == f"00-{CALLER_TRACE}-{upstream_span.span_id}-01"
    no_secrets(spans, PROMPT_TEXT, keys.editor)

    # The access line names the server span.
    def access_lines() -> list[dict[str, object]]:
        return [r for r in traced.records if r.get("msg") == "rpc"]

    assert wait_until(access_lines, 10)
    (line,) = access_lines()
    assert (line["trace_id"], line["span_id"]) == (CALLER_TRACE, server.span_id)


async def test_a_tools_call_over_mcp_is_a_server_span_a_tool_span_and_a_client_span(
    traced: ServerProcess,
    receiver: OtlpReceiver,
    upstream: StandinUpstream,
    keys: TestKeys,
) -> None:
    url = f"http://127.0.0.1:{traced.port_of('mcp_port')}/mcp"
    async with mcp_client(url, keys.editor, headers={"traceparent": TRACEPARENT}) as client:
        await client.list_tools()
        assert not (await client.call_tool(TOOL, ARGUMENTS)).is_error
    assert wait_until(
        lambda: (
            any(s.name == f"tools/call {TOOL}" for s in receiver.spans)
            and any(s.kind == "client" for s in receiver.spans)
        ),
        15,
    )
    spans = receiver.spans
    server = only(spans, name=f"tools/call {TOOL}")
    assert (server.kind, server.trace_id, server.parent_id) == ("server", CALLER_TRACE, CALLER_SPAN)
    assert server.attributes["mcp.method.name"] == "tools/call"
    assert server.attributes["gen_ai.tool.name"] == TOOL
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.response.status_code"] == 200
    assert not server.error
    _, upstream_span = tool_and_client(spans, server)
    (sent,) = upstream.requests
    assert sent.headers["traceparent"] == f"00-{CALLER_TRACE}-{upstream_span.span_id}-01"
    listing = only(spans, name="tools/list")
    assert listing.attributes["mcp.method.name"] == "tools/list"
    no_secrets(spans, PROMPT_TEXT, keys.editor)


SUMMARIZE = "tools.test.text.summarize"
TOOL_MODEL = "gpt-standin-large"
TOOLS_FILE = f"""
[[tools]]
name = "{SUMMARIZE}"
title = "Summarise"
description = "Summarises a text."
model = "{TOOL_MODEL}"
input_schema.type = "object"
input_schema.required = ["text"]
input_schema.properties.text.type = "string"
output_schema = {{ type = "object", properties = {{ summary = {{ type = "string" }} }} }}
messages = [{{ role = "user", content = "Summarise: {{{{text}}}}" }}]
"""


def test_a_declared_tools_client_span_names_the_model_it_asks_for(
    upstream: StandinUpstream, keys: TestKeys, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    tools = tmp_path / "tools.toml"
    tools.write_text(TOOLS_FILE)
    with (
        ServerProcess(
            {**settings(upstream, keys), "TOOLS_FILE": str(tools)},
            variables=otel(receiver.endpoint),
            name="declared",
        ) as process,
        ToolClient(process.target, api_key=keys.full, timeout=10) as client,
    ):
        client.call_tool(SUMMARIZE, {"text": "A long text."})
    client_span = only(receiver.wait_for(3), kind="client")
    assert client_span.attributes["gen_ai.request.model"] == TOOL_MODEL
    (sent,) = upstream.requests
    assert sent.body["model"] == TOOL_MODEL


def test_a_refusal_fails_the_server_and_tool_spans_with_its_code(
    traced: ServerProcess, receiver: OtlpReceiver, upstream: StandinUpstream, keys: TestKeys
) -> None:
    with (
        ToolClient(traced.target, api_key=keys.viewer, timeout=10) as client,
        pytest.raises(PermissionDenied),
    ):
        client.call_tool(TOOL, ARGUMENTS, traceparent=TRACEPARENT)
    spans = receiver.wait_for(2)
    server = only(spans, kind="server")
    assert server.error
    assert server.attributes["error.type"] == "PERMISSION_DENIED"
    assert server.attributes["rpc.grpc.status_code"] == 7
    tool = only(spans, kind="internal", parent_id=server.span_id)
    assert (tool.error, tool.attributes["error.type"]) == (True, "PERMISSION_DENIED")
    assert not upstream.requests
    no_secrets(spans, PROMPT_TEXT, keys.viewer)


def test_an_mcp_request_refused_before_mcp_is_a_failed_http_server_span(
    traced: ServerProcess, receiver: OtlpReceiver
) -> None:
    url = f"http://127.0.0.1:{traced.port_of('mcp_port')}/mcp"
    request = urllib.request.Request(
        url,
        data=b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}',
        headers={"Content-Type": "application/json", "traceparent": TRACEPARENT},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    (server,) = receiver.wait_for(1)
    assert (server.kind, server.name, server.parent_id) == ("server", "POST /mcp", CALLER_SPAN)
    assert server.attributes["http.response.status_code"] == 401
    assert (server.error, server.attributes["error.type"]) == (True, "UNAUTHENTICATED")


def test_a_tool_error_fails_the_tool_and_client_spans(
    traced: ServerProcess, receiver: OtlpReceiver, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Status(500))
    with ToolClient(traced.target, api_key=keys.editor, timeout=10) as client:
        assert client.call_tool(TOOL, ARGUMENTS).is_error
    spans = receiver.wait_for(3)
    server = only(spans, kind="server")
    assert not server.error  # the RPC itself is OK, with is_error
    tool = only(spans, kind="internal")
    assert (tool.error, tool.attributes["error.type"]) == (True, "UPSTREAM_ERROR")
    upstream_span = only(spans, kind="client")
    assert upstream_span.error
    assert upstream_span.attributes["http.response.status_code"] == 500
    assert upstream_span.attributes["error.type"] == "500"


def dropped_spans(process: ServerProcess) -> float:
    port = process.port_of("metrics_port")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("aiservices_trace_spans_dropped_total ")
    )


def stops_within_its_grace_period(process: ServerProcess) -> bool:
    """SIGTERM: the server exits 0 within SHUTDOWN_GRACE (3 s) and a margin, whatever its
    collector does."""
    started = time.monotonic()
    return process.terminate() == 0 and time.monotonic() - started < 3 + 3


def test_a_dead_collector_neither_fails_nor_slows_calls_and_its_spans_are_counted_dropped(
    upstream: StandinUpstream, keys: TestKeys, traced: ServerProcess
) -> None:
    """Calls to a server whose collector refuses connections take what calls to one exporting
    to a live collector take: measured in turns, one call to each, so load on the machine
    weighs on both alike."""
    dead = f"http://127.0.0.1:{closed_port()}"
    with ServerProcess(settings(upstream, keys), variables=otel(dead), name="dead") as process:
        took: dict[str, list[float]] = {"live": [], "dead": []}
        with (
            ToolClient(traced.target, api_key=keys.editor, timeout=10) as live,
            ToolClient(process.target, api_key=keys.editor, timeout=10) as refused,
        ):
            for _ in range(60):
                for name, client in (("live", live), ("dead", refused)):
                    started = time.perf_counter()
                    assert not client.call_tool(TOOL, ARGUMENTS, traceparent=TRACEPARENT).is_error
                    took[name].append(time.perf_counter() - started)
        live_p50, dead_p50 = (statistics.median(took[name]) for name in ("live", "dead"))
        assert dead_p50 < live_p50 * 1.5 + 0.002, (dead_p50, live_p50)
        assert wait_until(lambda: dropped_spans(process) >= 3 * 60, 20)
        assert stops_within_its_grace_period(process)


def test_a_collector_that_never_answers_costs_calls_nothing_and_a_full_queue_drops_spans(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    """Spans waiting for a collector that accepts connections and never answers are bounded by
    OTEL_BSP_MAX_QUEUE_SIZE: the rest are dropped and counted at once, calls never wait, and
    the server still exits within its grace period."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel accepts the exporter's connections; nothing reads them
        variables = {
            **otel(f"http://127.0.0.1:{hung.getsockname()[1]}"),
            "OTEL_EXPORTER_OTLP_TIMEOUT": "60",
            "OTEL_BSP_MAX_QUEUE_SIZE": "32",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8",
        }
        with ServerProcess(settings(upstream, keys), variables=variables, name="hung") as process:
            with ToolClient(process.target, api_key=keys.editor, timeout=10) as client:
                for _ in range(40):
                    started = time.monotonic()
                    assert not client.call_tool(TOOL, ARGUMENTS).is_error
                    assert time.monotonic() - started < 2.0
            # 3 spans a call; 32 may wait for the export that never ends, the other 88 may not.
            assert wait_until(lambda: dropped_spans(process) >= 40 * 3 - 32, 10)
            assert dropped_spans(process) == 40 * 3 - 32
            assert stops_within_its_grace_period(process)


def test_spans_still_queued_at_shutdown_are_exported_before_the_server_exits(
    upstream: StandinUpstream, keys: TestKeys, receiver: OtlpReceiver
) -> None:
    variables = {**otel(receiver.endpoint), "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    with ServerProcess(settings(upstream, keys), variables=variables, name="flush") as process:
        with ToolClient(process.target, api_key=keys.editor, timeout=10) as client:
            assert not client.call_tool(TOOL, ARGUMENTS, traceparent=TRACEPARENT).is_error
        assert receiver.spans == []  # a batch of 3 waits for the 10-minute schedule
        assert stops_within_its_grace_period(process)
        spans = receiver.spans
    assert sorted(span.kind for span in spans) == ["client", "internal", "server"]
    assert {span.trace_id for span in spans} == {CALLER_TRACE}


def test_a_sampler_that_drops_the_trace_exports_nothing_and_says_so_upstream(
    upstream: StandinUpstream, keys: TestKeys, receiver: OtlpReceiver
) -> None:
    variables = {**otel(receiver.endpoint), "OTEL_TRACES_SAMPLER": "always_off"}
    with ServerProcess(settings(upstream, keys), variables=variables, name="off") as process:
        with ToolClient(process.target, api_key=keys.editor, timeout=10) as client:
            assert not client.call_tool(TOOL, ARGUMENTS, traceparent=TRACEPARENT).is_error
        assert process.terminate() == 0  # what was queued is exported by now
    assert receiver.spans == []
    (sent,) = upstream.requests
    version, trace, _, flags = sent.headers["traceparent"].split("-")
    assert (version, trace, flags) == ("00", CALLER_TRACE, "00")


def test_a_queue_bound_that_is_not_a_positive_integer_stops_start_up_in_one_line() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    for bad in ("0", "-5", "many", "1e3", "9" * 20):
        with pytest.raises(StartupError, match=r"^invalid setting OTEL_BSP_MAX_QUEUE_SIZE: "):
            from_environment({**environ, "OTEL_BSP_MAX_QUEUE_SIZE": bad})


def test_a_call_to_the_agenta_runner_is_a_chat_client_span_named_in_the_traceparent_sent(
    upstream: StandinUpstream, keys: TestKeys, receiver: OtlpReceiver
) -> None:
    base = {"API_KEYS_FILE": str(keys.path), **upstream_settings(upstream.url)}
    with (
        ServerProcess(base, variables=otel(receiver.endpoint), name="agenta") as process,
        ToolClient(process.target, api_key=keys.editor, timeout=10) as client,
    ):
        assert not client.call_tool(TOOL, ARGUMENTS, traceparent=TRACEPARENT).is_error
    spans = receiver.wait_for(3)
    server = only(spans, kind="server")
    tool = only(spans, parent_id=server.span_id, kind="internal")
    runner = only(spans, parent_id=tool.span_id, kind="client")
    assert runner.trace_id == CALLER_TRACE
    assert runner.attributes["url.full"].endswith("/services/completion/run")
    assert runner.attributes["http.response.status_code"] == 200
    assert runner.attributes["gen_ai.operation.name"] == "chat"
    assert runner.attributes["gen_ai.provider.name"] == "agenta"
    (sent,) = upstream.requests
    assert sent.headers["traceparent"] == f"00-{CALLER_TRACE}-{runner.span_id}-01"
    no_secrets(spans, PROMPT_TEXT, keys.editor)


def test_without_the_variables_the_sdk_is_never_imported(keys: TestKeys) -> None:
    """A server started and stopped without OTEL_* variables has not imported the SDK; with
    them it has (so this test can tell)."""
    script = (
        "import asyncio, sys\n"
        "from aiservices_server.app import AiServicesServer\n"
        "from aiservices_server.config import load_settings\n"
        "async def main():\n"
        "    server = AiServicesServer(load_settings())\n"
        "    await server.start()\n"
        "    await server.stop(0)\n"
        "    print('opentelemetry.sdk' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    env = clean_env({"API_KEYS_FILE": str(keys.path), "GRPC_ADDRESS": "127.0.0.1:0"})

    def sdk_imported(variables: Mapping[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**env, **variables},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]

    assert sdk_imported({}) == "False"
    assert sdk_imported(otel(f"http://127.0.0.1:{closed_port()}")) == "True"


def test_spans_go_over_otlp_grpc_when_the_protocol_says_so(
    upstream: StandinUpstream, keys: TestKeys, receiver: OtlpReceiver
) -> None:
    variables = {
        **otel(receiver.grpc_endpoint),
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    with (
        ServerProcess(settings(upstream, keys), variables=variables, name="grpc") as process,
        ToolClient(process.target, api_key=keys.editor, timeout=10) as client,
    ):
        assert not client.call_tool(TOOL, ARGUMENTS, traceparent=TRACEPARENT).is_error
        spans = receiver.wait_for(3)
    server = only(spans, kind="server")
    assert (server.trace_id, server.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    assert server.resource["service.name"] == "aiservices-test"
    tool_and_client(spans, server)


def test_a_protocol_other_than_http_protobuf_or_grpc_stops_start_up_in_one_line() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    with pytest.raises(StartupError, match=r"OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json' is not"):
        from_environment({**environ, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert from_environment({}) is NO_TRACER
    assert from_environment({**environ, "OTEL_SDK_DISABLED": "true"}) is NO_TRACER


# --- what a reply may put in a span ----------------------------------------------------------

_ALLOWED_REPLY_ATTRIBUTES = {
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
}
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=20), inner),
    max_leaves=60,
)
_replies = st.fixed_dictionaries(
    {},
    optional={
        "model": _json_values,
        "usage": st.fixed_dictionaries(
            {}, optional={"prompt_tokens": _json_values, "completion_tokens": _json_values}
        )
        | _json_values,
        "choices": st.lists(
            st.fixed_dictionaries({}, optional={"finish_reason": _json_values}) | _json_values,
            max_size=40,
        )
        | _json_values,
        "id": _json_values,
    },
)


@given(st.binary(max_size=2000) | _replies.map(lambda reply: json.dumps(reply).encode()))
def test_a_reply_puts_only_short_named_facts_in_a_span_whatever_it_holds(body: bytes) -> None:
    """Whatever an upstream answers, its span gets at most the model, two token counts and the
    finish reasons: short strings and non-negative whole numbers, never its text."""
    found = chat_reply_attributes(body)
    assert set(found) <= _ALLOWED_REPLY_ATTRIBUTES
    model = found.get("gen_ai.response.model")
    assert model is None or (isinstance(model, str) and 0 < len(model) <= MAX_SPAN_TEXT)
    for name in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"):
        count = found.get(name)
        assert count is None or (type(count) is int and count >= 0)
    reasons = found.get("gen_ai.response.finish_reasons")
    if reasons is not None:
        assert isinstance(reasons, list) and 0 < len(reasons) <= MAX_FINISH_REASONS
        assert all(isinstance(r, str) and len(r) <= MAX_SPAN_TEXT for r in reasons)
