"""Declared tools at run time, as callers see them: listed and called over gRPC (the thin client
and the generated stubs) and MCP (the SDK's client), against the real server and the stand-in
upstream, on either upstream.

A declared tool passes the same core as refine_prompt (permission, bounds, validation), asks
its upstream as its spec says, and never hands a caller an answer that breaks its output schema
(nor the model's words of such an answer).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import mcp_types as types
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from mcp.shared.exceptions import MCPError

from aiservices import NO_RETRY, AsyncToolClient, ToolClient, ToolServiceError
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from aiservices_server.config import Settings, UpstreamKind
from aiservices_server.core.arguments import ArgumentValidator
from aiservices_server.tools.base import ToolFailure
from aiservices_server.tools.declared import load_tools_file, load_tools_text
from aiservices_server.tools.declared_tool import MAX_OUTPUT_VALUES, DeclaredTool
from aiservices_server.tools.refine_prompt import NAME as REFINE_PROMPT
from aiservices_server.upstream.chat import (
    SCHEMA_INSTRUCTION,
    STRICT_KEYWORDS,
    format_name,
    strict_compatible,
)
from aiservices_server.upstream.openai import FORMAT_VERDICT_SECONDS
from aiservices_server.upstream.refiner import RefineReply, UpstreamAttempt
from tests import demo
from tests.standin import (
    OffSchema,
    Reply,
    Reset,
    Scenario,
    Slow,
    StandinUpstream,
    Status,
)
from tests.standin.schemas import OFF_SCHEMA_TEXT, instance, off_schema
from tests.support.demo import RunningDemo, demo_environment
from tests.support.keys import TestKeys
from tests.support.mcp import mcp_caller
from tests.support.processes import REPO_ROOT, ServerProcess, run_printed
from tests.support.servers import ENVIRONMENT, UPSTREAM_KEY, ServerThread, make_settings

SUMMARIZE = "tools.test.text.summarize"
SERVICE = "aiservices.v1.ToolService"
CLASSIFY = "tools.test.support.classify"
AGENTA_ONLY = "tools.test.only.agenta"
TIMEOUT = 10.0

SUMMARIZE_OUTPUT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["summary", "words"],
    "properties": {
        "summary": {"type": "string", "maxLength": 200},
        "words": {"type": "integer", "minimum": 1, "maximum": 100},
    },
}
CLASSIFY_OUTPUT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["label", "reason"],
    "properties": {
        "label": {"type": "string", "enum": ["billing", "bug", "other"]},
        "reason": {"type": "string"},
    },
}

TOOLS_TOML = f"""
[[tools]]
name = "{SUMMARIZE}"
title = "Summarize"
description = "Summarizes a text."
permission = "edit_workflows"
text = "summary"
model = "tool-model"
temperature = 0.5
max_tokens = 300
input_schema = '''{{"type": "object", "additionalProperties": false, "required": ["text"],
  "properties": {{"text": {{"type": "string", "minLength": 1, "maxLength": 100}},
  "style": {{"type": "string", "maxLength": 20}},
  "limit": {{"type": "integer", "minimum": 1, "maximum": 10}}}}}}'''
output_schema = '''{json.dumps(SUMMARIZE_OUTPUT)}'''
messages = [
  {{ role = "system", content = "Summarise in {{{{style}}}} style at most {{{{limit}}}} words." }},
  {{ role = "user", content = "{{{{text}}}}" }},
]

[[tools]]
name = "{CLASSIFY}"
title = "Classify"
description = "Classifies a ticket."
permission = "triage_tickets"
agenta_app = "classify-app"
input_schema = '''{{"type": "object", "additionalProperties": false, "required": ["ticket"],
  "properties": {{"ticket": {{"type": "string", "maxLength": 1000}},
  "product": {{"type": "string"}},
  "tags": {{"type": "array", "items": {{"type": "string"}}}}}}}}'''
output_schema = '''{json.dumps(CLASSIFY_OUTPUT)}'''
messages = [{{ role = "user", content = "Classify: {{{{ticket}}}}" }}]

[[tools]]
name = "{AGENTA_ONLY}"
title = "Agenta only"
description = "Runs only on the Agenta runner."
agenta_app = "agenta-only"
input_schema = {{ type = "object", properties = {{ q = {{ type = "string" }} }} }}
output_schema = {{ type = "object", properties = {{ a = {{ type = "string" }} }} }}
"""


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.toml"
    path.write_text(TOOLS_TOML)
    return path


def openai_settings(standin: StandinUpstream, tools_file: Path, **overrides: Any) -> Settings:
    return make_settings(
        upstream=UpstreamKind.OPENAI,
        openai_base_url=standin.openai_url,
        openai_model="base-model",
        tools_file=tools_file,
        mcp_address="127.0.0.1:0",
        **overrides,
    )


@pytest.fixture
def standin() -> Iterator[StandinUpstream]:
    """The stand-in, answering the Agenta app `classify-app` with CLASSIFY_OUTPUT."""
    upstream = StandinUpstream(api_key=UPSTREAM_KEY, apps={"classify-app": CLASSIFY_OUTPUT})
    upstream.start_in_thread()
    yield upstream
    upstream.stop_thread()


@pytest.fixture
def openai_server(standin: StandinUpstream, tools_file: Path) -> Iterator[ServerThread]:
    with ServerThread(openai_settings(standin, tools_file)) as running:
        yield running


def grpc_client(server: ServerThread, key: str) -> AsyncToolClient:
    return AsyncToolClient(server.target, api_key=key, timeout=TIMEOUT)


# --- listed and called ---------------------------------------------------------------------------


async def test_a_declared_tool_is_listed_and_called_over_both_faces(
    openai_server: ServerThread, standin: StandinUpstream, keys: TestKeys
) -> None:
    arguments = {"text": "The meeting moved to Tuesday.", "limit": 5}
    async with grpc_client(openai_server, keys.full) as caller:
        status = await caller.status()
        over_grpc = await caller.call_tool(SUMMARIZE, arguments)
    async with mcp_caller(openai_server, keys.full) as caller:
        listed = await caller.client.list_tools()
        over_mcp = await caller.client.call_tool(SUMMARIZE, arguments)

    names = [REFINE_PROMPT, CLASSIFY, SUMMARIZE]
    assert [tool.name for tool in status.tools] == sorted(names)
    assert [tool.name for tool in listed.tools] == sorted(names)
    (described,) = [tool for tool in listed.tools if tool.name == SUMMARIZE]
    assert described.output_schema == SUMMARIZE_OUTPUT

    expected = {"summary": "example summary", "words": 1}
    assert not over_grpc.is_error, over_grpc.error
    assert over_grpc.text == "example summary"
    assert over_grpc.structured_content == expected
    assert over_grpc.trace_id.startswith("chatcmpl-")
    assert over_mcp.is_error is False
    assert over_mcp.structured_content == expected
    assert [block.text for block in over_mcp.content if isinstance(block, types.TextContent)] == [
        "example summary"
    ]

    # What the model was asked: the messages rendered, the tool's model and options, its schema.
    first, second = standin.requests
    assert first.body == second.body
    body = first.body
    assert body["model"] == "tool-model"
    assert (body["temperature"], body["max_tokens"]) == (0.5, 300)
    assert body["messages"] == [
        {"role": "system", "content": "Summarise in  style at most 5 words."},
        {"role": "user", "content": "The meeting moved to Tuesday."},
    ]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "tools_test_text_summarize",
            "strict": False,
            "schema": SUMMARIZE_OUTPUT,
        },
    }


def test_a_declared_tool_is_called_through_reflection_as_grpcurl_calls_it(
    openai_server: ServerThread, keys: TestKeys
) -> None:
    """A client with no generated code (grpcurl, buf curl) learns the service by reflection,
    builds CallTool's messages from the descriptors and calls a declared tool by its name."""
    with grpc.insecure_channel(openai_server.target) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(SERVICE).FindMethodByName("CallTool")
        request_class = GetMessageClass(method.input_type)
        reply_class = GetMessageClass(method.output_type)
        request = json_format.ParseDict(
            {"name": SUMMARIZE, "arguments": {"text": "The meeting moved.", "limit": 3}},
            request_class(),
        )
        call = channel.unary_unary(
            f"/{SERVICE}/CallTool",
            request_serializer=request_class.SerializeToString,
            response_deserializer=reply_class.FromString,
        )
        reply = json_format.MessageToDict(call(request, metadata=bearer(keys.full), timeout=10))
    assert reply.get("isError") is not True, reply
    assert reply["structuredContent"] == {"summary": "example summary", "words": 1}


async def test_an_argument_that_holds_a_placeholder_is_sent_as_it_is(
    openai_server: ServerThread, standin: StandinUpstream, keys: TestKeys
) -> None:
    async with grpc_client(openai_server, keys.full) as caller:
        result = await caller.call_tool(SUMMARIZE, {"text": "{{limit}} {{style}}", "style": "{{"})
    assert not result.is_error, result.error
    (sent,) = standin.requests
    assert sent.body["messages"][0]["content"] == "Summarise in {{ style at most  words."
    assert sent.body["messages"][1]["content"] == "{{limit}} {{style}}"


def page_through_grpc(target: str, key: str, page_size: int) -> list[str]:
    """Every tool ListTools gives `key`, page after page, with the generated stub."""
    names: list[str] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ToolServiceStub(channel)
        cursor = ""
        while True:
            page = stub.ListTools(
                pb.ListToolsRequest(cursor=cursor, page_size=page_size),
                metadata=bearer(key),
                timeout=TIMEOUT,
            )
            assert len(page.tools) <= page_size
            names += [tool.name for tool in page.tools]
            cursor = page.next_cursor
            if not cursor:
                return names


async def test_120_declared_tools_page_out_each_exactly_once_over_both_faces(
    standin: StandinUpstream, keys: TestKeys, tmp_path: Path
) -> None:
    tables = [
        textwrap.dedent(f"""
        [[tools]]
        name = "tools.bulk.n{number:03d}.echo"
        title = "Echo {number}"
        description = "Tool number {number}."
        permission = "edit_workflows"
        input_schema = {{ type = "object", properties = {{ q = {{ type = "string" }} }} }}
        output_schema = {{ type = "object", properties = {{ a = {{ type = "string" }} }} }}
        messages = [{{ role = "user", content = "{{{{q}}}}" }}]
        """)
        for number in range(120)
    ]
    path = tmp_path / "bulk.toml"
    path.write_text("".join(tables))
    declared = sorted(f"tools.bulk.n{number:03d}.echo" for number in range(120))
    expected = sorted([REFINE_PROMPT, *declared])

    with ServerThread(openai_settings(standin, path)) as running:
        assert page_through_grpc(running.target, keys.editor, 50) == expected
        assert page_through_grpc(running.target, keys.editor, 7) == expected
        over_mcp: list[str] = []
        async with mcp_caller(running, keys.editor) as caller:
            cursor: str | None = None
            pages = 0
            while True:
                page = await caller.client.list_tools(cursor=cursor)
                over_mcp += [tool.name for tool in page.tools]
                pages += 1
                cursor = page.next_cursor
                if cursor is None:
                    break
            called = await caller.client.call_tool(declared[-1], {"q": "hi"})
    assert over_mcp == expected
    assert pages > 1
    assert called.is_error is False
    assert called.structured_content == {"a": "example a"}


# --- refused before the upstream -----------------------------------------------------------------


async def test_a_key_without_the_permission_sees_no_such_tool_and_may_not_call_it(
    openai_server: ServerThread, standin: StandinUpstream, keys: TestKeys
) -> None:
    arguments = {"ticket": "It broke."}
    async with grpc_client(openai_server, keys.editor) as caller:
        visible = [tool.name for tool in await caller.list_tools()]
        with pytest.raises(ToolServiceError) as denied:
            await caller.call_tool(CLASSIFY, arguments)
    async with mcp_caller(openai_server, keys.editor) as caller:
        listed = [tool.name for tool in (await caller.client.list_tools()).tools]
        with pytest.raises(MCPError) as refused:
            await caller.client.call_tool(CLASSIFY, arguments)

    assert visible == listed == [REFINE_PROMPT, SUMMARIZE]
    assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.error_metadata["permission"] == "triage_tickets"
    assert refused.value.code == types.INVALID_PARAMS
    assert refused.value.data["reason"] == "PERMISSION_DENIED"
    assert standin.request_count == 0


async def test_invalid_arguments_name_each_field_over_both_faces(
    openai_server: ServerThread, standin: StandinUpstream, keys: TestKeys
) -> None:
    arguments: dict[str, Any] = {"text": 7, "limit": 11, "nope": True}
    async with grpc_client(openai_server, keys.editor) as caller:
        with pytest.raises(ToolServiceError) as caught:
            await caller.call_tool(SUMMARIZE, arguments)
    async with mcp_caller(openai_server, keys.editor) as caller:
        result = await caller.client.call_tool(SUMMARIZE, arguments)

    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    fields = [field for field, _ in caught.value.field_violations]
    assert sorted(fields) == ["arguments.limit", "arguments.nope", "arguments.text"]
    assert result.is_error is True
    (block,) = result.content
    assert isinstance(block, types.TextContent)
    for field in fields:
        assert field in block.text
    assert standin.request_count == 0


# --- what the model answers ----------------------------------------------------------------------


# As docs/tools.md shows it.
OFF_ENUM = (
    "the model's output was rejected: it does not match the tool's output schema "
    "(rule enum at /properties/label/enum)"
)
BROKEN_ANSWERS: dict[str, tuple[Scenario, str]] = {
    "a value outside the enum": (OffSchema(), OFF_ENUM),
    "not JSON": (Reply(f"Sure! {OFF_SCHEMA_TEXT}"), "it is not valid JSON"),
    "a list, not an object": (Reply([OFF_SCHEMA_TEXT]), "it is not a JSON object"),
    "a missing field": (Reply({"label": "bug"}), "rule required at /required"),
}


@pytest.mark.parametrize("answer", list(BROKEN_ANSWERS))
async def test_output_that_breaks_the_schema_is_invalid_model_output_without_the_models_text(
    openai_server: ServerThread, standin: StandinUpstream, keys: TestKeys, answer: str
) -> None:
    scenario, said = BROKEN_ANSWERS[answer]
    standin.push(scenario, scenario)
    async with grpc_client(openai_server, keys.full) as caller:
        over_grpc = await caller.call_tool(CLASSIFY, {"ticket": "Charged twice."})
    async with mcp_caller(openai_server, keys.full) as caller:
        over_mcp = await caller.client.call_tool(CLASSIFY, {"ticket": "Charged twice."})

    assert over_grpc.is_error and over_grpc.error is not None
    assert over_grpc.error.code == "INVALID_MODEL_OUTPUT"
    assert said in over_grpc.error.message
    assert over_grpc.structured_content is None
    assert over_mcp.is_error is True
    assert over_mcp.structured_content is None
    (block,) = over_mcp.content
    assert isinstance(block, types.TextContent)
    assert block.text == f"INVALID_MODEL_OUTPUT: {over_grpc.error.message}"
    for text in (over_grpc.error.message, block.text, over_grpc.text):
        assert OFF_SCHEMA_TEXT not in text


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_the_callers_traceparent_goes_upstream_on_both_upstreams(
    standin: StandinUpstream, tools_file: Path, keys: TestKeys
) -> None:
    for chosen in (
        openai_settings(standin, tools_file),
        make_settings(standin.url, tools_file=tools_file),
    ):
        with ServerThread(chosen) as running:
            async with grpc_client(running, keys.full) as caller:
                result = await caller.call_tool(
                    CLASSIFY, {"ticket": "Charged twice."}, traceparent=TRACEPARENT
                )
        assert not result.is_error, result.error
    over_openai, over_agenta = standin.requests
    assert over_openai.path.endswith("/chat/completions")
    assert over_agenta.path == "/services/completion/run"
    for sent in (over_openai, over_agenta):
        assert sent.headers["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]


async def test_the_callers_deadline_ends_the_upstream_request(
    openai_server: ServerThread, standin: StandinUpstream, keys: TestKeys
) -> None:
    standin.push(Slow(30.0))
    async with grpc_client(openai_server, keys.full) as caller:
        with pytest.raises(ToolServiceError) as caught:
            await caller.call_tool(SUMMARIZE, {"text": "hello"}, timeout=0.5, retry=NO_RETRY)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await standin.until_disconnects(1)


# Each answered twice, for refine_prompt and for the declared tool; 500 is retried once.
UPSTREAM_FAILURES: dict[str, tuple[list[Scenario], str]] = {
    "500 twice": ([Status(500), Status(500)], "UPSTREAM_ERROR"),
    "503 with Retry-After": (
        [Status(503, headers={"Retry-After": "30"})],
        "UPSTREAM_ERROR",
    ),
    "a reset connection": ([Reset()], "UPSTREAM_UNAVAILABLE"),
    "too slow": ([Slow(5.0)], "UPSTREAM_TIMEOUT"),
}


@pytest.mark.parametrize("failure", list(UPSTREAM_FAILURES))
async def test_upstream_failures_map_as_refine_prompts_do(
    standin: StandinUpstream, tools_file: Path, keys: TestKeys, failure: str
) -> None:
    scenarios, code = UPSTREAM_FAILURES[failure]
    settings = openai_settings(standin, tools_file, upstream_timeout=1.0)
    template = json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
    with ServerThread(settings) as running:
        async with grpc_client(running, keys.full) as caller:
            standin.push(*scenarios)
            refined = await caller.call_tool(REFINE_PROMPT, {"prompt_template_json": template})
            standin.push(*scenarios)
            declared = await caller.call_tool(SUMMARIZE, {"text": "hello"})
        standin.push(*scenarios)
        async with mcp_caller(running, keys.full) as mcp:
            over_mcp = await mcp.client.call_tool(SUMMARIZE, {"text": "hello"})

    assert refined.error is not None and declared.error is not None
    assert declared.error.code == refined.error.code == code
    assert declared.error.message == refined.error.message
    assert declared.error.retryable == refined.error.retryable
    assert declared.error.retry_after == refined.error.retry_after
    assert over_mcp.is_error is True
    assert over_mcp.meta is not None
    assert over_mcp.meta["aiservices/error"]["code"] == code


async def test_an_endpoint_without_json_schema_is_asked_for_json_object_and_told_the_schema(
    tools_file: Path, keys: TestKeys
) -> None:
    standin = StandinUpstream(reject_json_schema=True).start_in_thread()
    try:
        with ServerThread(openai_settings(standin, tools_file)) as running:
            async with grpc_client(running, keys.full) as caller:
                first = await caller.call_tool(SUMMARIZE, {"text": "one"})
                second = await caller.call_tool(SUMMARIZE, {"text": "two"})
        refused, fallen_back, straight = standin.requests
    finally:
        standin.stop_thread()

    assert (
        first.structured_content
        == second.structured_content
        == {
            "summary": "example summary",
            "words": 1,
        }
    )
    assert refused.body["response_format"]["type"] == "json_schema"
    # The verdict holds: the second call asks for json_object at once.
    for sent in (fallen_back, straight):
        assert sent.body["response_format"] == {"type": "json_object"}
        *asked, told = sent.body["messages"]
        assert [message["role"] for message in asked] == ["system", "user"]
        assert told["role"] == "system"
        assert told["content"].startswith(SCHEMA_INSTRUCTION)
        assert json.loads(told["content"].removeprefix(SCHEMA_INSTRUCTION)) == SUMMARIZE_OUTPUT
    assert fallen_back.body["messages"][1]["content"] == "one"
    assert straight.body["messages"][1]["content"] == "two"


# --- the Agenta upstream -------------------------------------------------------------------------


async def test_the_agenta_path_sends_the_arguments_as_the_apps_inputs(
    standin: StandinUpstream, tools_file: Path, keys: TestKeys
) -> None:
    settings = make_settings(standin.url, tools_file=tools_file, mcp_address="127.0.0.1:0")
    arguments = {"ticket": "Charged twice.", "tags": ["billing", "urgent"]}
    with ServerThread(settings) as running:
        async with grpc_client(running, keys.full) as caller:
            names = [tool.name for tool in await caller.list_tools()]
            over_grpc = await caller.call_tool(CLASSIFY, arguments)
        async with mcp_caller(running, keys.full) as mcp:
            over_mcp = await mcp.client.call_tool(CLASSIFY, arguments)

    # summarize has no agenta_app: it is not served on this upstream.
    assert names == [REFINE_PROMPT, AGENTA_ONLY, CLASSIFY]
    expected = {"label": "billing", "reason": "example reason"}
    assert over_grpc.structured_content == over_mcp.structured_content == expected
    assert over_grpc.text == json.dumps(expected, separators=(",", ":"))
    for sent in standin.requests:
        assert sent.path == "/services/completion/run"
        assert sent.headers["authorization"] == f"ApiKey {UPSTREAM_KEY}"
        assert sent.body == {
            "inputs": {"ticket": "Charged twice.", "product": "", "tags": '["billing","urgent"]'},
            "environment": ENVIRONMENT,
            "app": "classify-app",
        }


def test_a_tool_with_nothing_for_the_upstream_is_left_out_with_one_start_up_line(
    standin: StandinUpstream, tools_file: Path, keys: TestKeys
) -> None:
    env = {
        "API_KEYS_FILE": str(keys.path),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": standin.openai_url,
        "OPENAI_MODEL": "base-model",
        "TOOLS_FILE": str(tools_file),
    }
    with ServerProcess(env).start() as server:
        with ToolClient(server.target, api_key=keys.full, timeout=TIMEOUT) as client:
            names = [tool.name for tool in client.list_tools()]
            result = client.call_tool(SUMMARIZE, {"text": "hello"})
        left_out = [r for r in server.records if r.get("msg") == "declared tool not served"]
    assert names == [REFINE_PROMPT, CLASSIFY, SUMMARIZE]
    assert result.structured_content == {"summary": "example summary", "words": 1}
    (line,) = left_out
    assert line["tool"] == AGENTA_ONLY
    assert line["upstream"] == "openai"
    assert "messages" in line["reason"]


def test_make_demo_on_agenta_serves_the_example_tools_and_its_printed_calls_work(
    tmp_path: Path,
) -> None:
    env = demo_environment(tmp_path / "home", grpc_address="127.0.0.1:0", mcp_address="127.0.0.1:0")
    running = RunningDemo.start(tmp_path, env)
    try:
        lines = running.instructions()
        start = next(i for i, line in enumerate(lines) if line.startswith("Declared tools ("))
        commands = [line.strip() for line in lines[start + 1 : -2]]
        outputs = [
            run_printed(command, tmp_path, demo_environment(tmp_path / "home"))
            for command in commands
        ]
    finally:
        assert running.stop() == 0
    assert [command.split(" call ")[1].split()[0] for command in commands] == list(
        demo.DECLARED_EXAMPLE_ARGUMENTS
    )
    classified, extracted, generated = outputs
    assert classified.splitlines()[0] == "billing"
    assert json.loads(extracted.partition("\n")[2])["fields"][0]["found"] is True
    assert generated.splitlines()[0] == "example summary"


# --- the answer check, on any text ---------------------------------------------------------------

SPEC = load_tools_text(TOOLS_TOML, "tools.toml", reserved_names=frozenset())[1]
ATTEMPT = UpstreamAttempt("200", 0.01)


async def _never(arguments: Any, *, time_left: float | None, traceparent: str | None) -> Any:
    raise AssertionError("not called")


CHECKER = DeclaredTool(SPEC, _never)
MARK = "MODEL-WORDS-"


@settings(max_examples=300, deadline=None)
@given(st.text().map(lambda text: MARK + text))
def test_any_text_is_a_checked_object_or_invalid_model_output_that_never_quotes_it(
    text: str,
) -> None:
    try:
        output = CHECKER._check(RefineReply(text, "", ATTEMPT))
    except ToolFailure as failure:
        assert failure.code == "INVALID_MODEL_OUTPUT"
        assert MARK not in failure.message
        assert failure.upstream == ATTEMPT
    else:
        raise AssertionError(f"text with a prefix cannot be JSON: {output}")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["label", "reason", "x"]), JSON_VALUES))
def test_any_json_object_passes_only_when_it_fits_the_schema(value: dict[str, Any]) -> None:
    fits = (
        set(value) == {"label", "reason"}
        and value["label"] in ("billing", "bug", "other")
        and isinstance(value["reason"], str)
    )
    try:
        output = CHECKER._check(RefineReply(json.dumps(value), "", ATTEMPT))
    except ToolFailure as failure:
        assert not fits
        assert failure.message.startswith("the model's output was rejected: it does not match")
    else:
        assert fits and output == value


def test_an_answer_of_too_many_values_is_refused_before_it_is_parsed() -> None:
    text = "[" + "0," * MAX_OUTPUT_VALUES + "0]"
    with pytest.raises(ToolFailure) as refused:
        CHECKER._check(RefineReply(text, "", ATTEMPT))
    assert "more than 10,000 JSON values" in refused.value.message


@pytest.mark.parametrize(
    "data",
    [
        {"label": "bug", "reason": [0] * MAX_OUTPUT_VALUES},
        {"label": "bug", "reason": {str(n): [n] for n in range(MAX_OUTPUT_VALUES // 2)}},
    ],
    ids=["one long list", "many small ones"],
)
def test_an_answer_sent_parsed_is_held_to_the_same_number_of_values(data: Any) -> None:
    """The Agenta runner may send `data` as an object, not text: it gets the same bound."""
    with pytest.raises(ToolFailure) as refused:
        CHECKER._check(RefineReply(data, "", ATTEMPT))
    assert "more than 10,000 JSON values" in refused.value.message
    fits = {"label": "bug", "reason": "x" * 1000}
    assert CHECKER._check(RefineReply(fits, "", ATTEMPT)) == fits


def test_only_a_closed_fully_required_schema_is_sent_as_strict() -> None:
    closed = {
        "type": "object",
        "additionalProperties": False,
        "required": ["a"],
        "properties": {"a": {"type": "array", "items": {"type": "string"}}},
    }
    assert strict_compatible(closed)
    assert not strict_compatible({**closed, "required": []})
    assert not strict_compatible({**closed, "additionalProperties": True})
    assert not strict_compatible(SUMMARIZE_OUTPUT)  # maxLength, minimum: not strict keywords
    assert strict_compatible(
        {**closed, "properties": {"a": {"type": "string", "enum": ["x", "y"]}}}
    )
    assert format_name("tools.acme.text.summarize") == "tools_acme_text_summarize"
    assert len(format_name("tools." + "a" * 200)) == 64


# --- the examples and the docs -------------------------------------------------------------------


def test_the_example_tools_load_with_both_ways_of_asking() -> None:
    specs = load_tools_file(demo.EXAMPLE_TOOLS_FILE, reserved_names=frozenset({REFINE_PROMPT}))
    assert [spec.definition.name for spec in specs] == list(demo.DECLARED_EXAMPLE_ARGUMENTS)
    for spec in specs:
        assert spec.messages is not None and spec.agenta_app is not None
        validator = ArgumentValidator(spec.definition.input_schema)
        validator.validate(demo.DECLARED_EXAMPLE_ARGUMENTS[spec.definition.name])


def test_the_docs_say_what_the_adapter_sends_and_the_caller_gets() -> None:
    page = (REPO_ROOT / "docs" / "tools.md").read_text()
    section = page[page.index("### How a declared tool is called") : page.index("### Errors")]
    words = " ".join(section.split())
    assert f"`{SCHEMA_INSTRUCTION}`" in words
    for keyword in STRICT_KEYWORDS:
        assert f"`{keyword}`" in words
    assert f"for the next {FORMAT_VERDICT_SECONDS / 60:.0f} minutes" in words
    assert f"at most {MAX_OUTPUT_VALUES:,} values" in words
    assert OFF_ENUM in section.splitlines()


def test_the_stand_in_answers_each_example_tool_with_output_that_fits_and_can_break_it() -> None:
    specs = load_tools_file(demo.EXAMPLE_TOOLS_FILE, reserved_names=frozenset())
    for spec in (*specs, SPEC):
        schema = spec.definition.output_schema
        validator = Draft202012Validator(schema)
        assert validator.is_valid(instance(schema)), spec.definition.name
        assert not validator.is_valid(off_schema(schema)), spec.definition.name
