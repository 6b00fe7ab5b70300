"""Hostile requests cannot stall the server, overflow its trailers or confuse its records.

A caller may fill the 1 MiB a request may hold by default with unknown argument names, one huge
list, long keys, a huge tool name or a cursor of its own making; a tool may produce a reply larger
than the server may send. Each is answered with the documented status (or a tool error) quickly,
with trailers any gRPC client accepts (its default limit is 8 KB), while health checks sent during
the call answer within 100 ms (`responsive_during`), and the access log and metrics record what
the caller saw.
"""

from __future__ import annotations

import base64
import functools
import logging
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiservices import ToolClient, ToolServiceError
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from aiservices_server.call import Call
from aiservices_server.config import Settings
from aiservices_server.core.arguments import MAX_ARGUMENT_VALUES, MAX_KEY_CHARS
from aiservices_server.core.service import _decode_cursor, _encode_cursor
from aiservices_server.errors import (
    MAX_DESCRIPTION_CHARS,
    MAX_FIELD_CHARS,
    FieldViolation,
    InvalidArgument,
    ServiceError,
)
from aiservices_server.faces.grpc.status import MAX_DETAILS_BYTES, to_grpc_status
from aiservices_server.tools.base import JsonObject, ToolDefinition, ToolResult
from tests.support.keys import TestKeys, load_test_keys
from tests.support.responsive import responsive_during
from tests.support.servers import ServerThread, make_settings

TOOL = "tools.agenta.api.refine_prompt"
TEMPLATE = '{"messages": [{"role": "user", "content": "Hi {{name}}"}]}'
REQUEST_LIMIT = Settings.model_fields["max_message_bytes"].default
# gRPC's default limit on the metadata a client accepts is 8 KB; well under it means this.
TRAILER_BUDGET = 4096


class ListTool:
    """Takes a list of integers and a size; returns a text of that size (a reply of any size)."""

    def __init__(self, name: str = "tests.hostile.list") -> None:
        self._definition = ToolDefinition(
            name=name,
            title="List",
            description="Returns `size` characters.",
            input_schema={
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "ids": {"type": "array", "items": {"type": "integer"}},
                    "size": {"type": "integer", "minimum": 0},
                },
            },
            output_schema={"type": "object"},
            permission="echo",
        )

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: JsonObject, call: Call) -> ToolResult:
        return ToolResult(text="done", structured={"blob": "x" * arguments.get("size", 0)})


@pytest.fixture
def tool_server() -> Iterator[ServerThread]:
    """A server with ListTool and a 1 MiB message limit (the least it may be set to)."""
    settings = make_settings(
        "http://127.0.0.1:9", rate_limit_burst=1000, max_message_bytes=1024 * 1024
    )
    with ServerThread(settings, tools=[ListTool()]) as running:
        yield running


# --- helpers: the raw view of a refusal ----------------------------------------------------------


def raw_call(
    server: ServerThread, key: str, request: pb.CallToolRequest | pb.ListToolsRequest
) -> grpc.Call:
    """Send `request` with the generated stub; return the refused call (the test expects a
    refusal), whose code, details and trailers are what the caller got."""
    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ToolServiceStub(channel)
        call: grpc.Call
        if isinstance(request, pb.CallToolRequest):
            call = stub.CallTool.future(request, metadata=metadata, timeout=60)
        else:
            call = stub.ListTools.future(request, metadata=metadata, timeout=60)
        if call.code() is grpc.StatusCode.OK:
            raise AssertionError("the call was not refused")
    return call


def wire_bytes(pairs: Iterable[tuple[str, str | bytes]], message: str) -> int:
    """The size of a status's trailers as HTTP/2 counts them: name + value + 32 each, -bin
    values in base64 and grpc-message percent-encoded."""
    total = len("grpc-status") + 1 + 32
    encoded = sum(1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode()) for c in message)
    total += len("grpc-message") + encoded + 32
    for name, value in pairs:
        size = len(base64.b64encode(value)) if isinstance(value, bytes) else len(value)
        total += len(name) + size + 32
    return total


def refusal_details(
    error: grpc.Call,
) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return info, violations


def access_record(
    caplog: pytest.LogCaptureFixture, request_id: str, timeout: float = 5.0
) -> logging.LogRecord:
    """The access log record of one call: written as the call ends, maybe just after the
    caller got its answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "aiservices.access" and getattr(record, "request_id", "") == (
                request_id
            ):
                return record
        time.sleep(0.005)  # polling a condition, with a deadline
    raise AssertionError(f"no access log record for {request_id}")


def logged(record: logging.LogRecord, name: str) -> str:
    """A field of an access log line."""
    return str(getattr(record, name))


def request_id(error: grpc.Call) -> str:
    return str(dict(error.trailing_metadata())["x-request-id"])


def assert_refused_truthfully(
    error: grpc.Call, code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller got `code` with trailers far under 8 KB, and the access log says `code`."""
    assert error.code() is code, error.details()
    size = wire_bytes(error.trailing_metadata(), error.details())
    assert size < TRAILER_BUDGET
    assert logged(access_record(caplog, request_id(error)), "code") == code.name


# --- unknown keys and arguments as large as a request may be ------------------------------------


def test_three_hundred_unknown_keys_are_refused_with_twenty_violations_and_a_count(
    server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    arguments = {"prompt_template_json": TEMPLATE} | {f"k{i:03d}": 0 for i in range(300)}
    with (
        ToolClient(server.target, api_key=keys.editor, timeout=30) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        responsive_during(server, lambda: client.call_tool(TOOL, arguments))
    refused = caught.value
    assert refused.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.field_violations == [
        (f"arguments.k{i:03d}", "unknown argument") for i in range(20)
    ]
    assert refused.error_metadata["violations_not_shown"] == "280"

    request = pb.CallToolRequest(name=TOOL)
    request.arguments.update(arguments)
    error = raw_call(server, keys.editor, request)
    assert_refused_truthfully(error, grpc.StatusCode.INVALID_ARGUMENT, caplog)


@functools.cache
def largest_request(shape: str) -> bytes:
    """A CallTool request for ListTool just under the message limit, serialized (built once)."""
    request = pb.CallToolRequest(name="tests.hostile.list")
    if shape == "unknown keys":
        request.arguments.update({f"k{i:07d}": 0 for i in range(45_000)})
    elif shape == "a huge list":
        request.arguments.update({"ids": [1.5] * 95_000})
    elif shape == "long keys":
        request.arguments.update({f"{i:03d}" + "x" * 40_000: 0 for i in range(25)})
    elif shape == "nested objects":
        request.arguments.update({"ids": [{"a": {"b": {"c": {}}}}] * 32_000})
    data = request.SerializeToString()
    assert REQUEST_LIMIT * 0.9 < len(data) < REQUEST_LIMIT
    return data


@pytest.mark.parametrize(
    ("shape", "field", "description"),
    [
        (
            "unknown keys",
            "arguments",
            f"holds more values than the {MAX_ARGUMENT_VALUES} allowed in all",
        ),
        (
            "a huge list",
            "arguments.ids",
            f"holds more values than the {MAX_ARGUMENT_VALUES} allowed in all",
        ),
        (
            "nested objects",
            "arguments.ids",
            f"holds more values than the {MAX_ARGUMENT_VALUES} allowed in all",
        ),
        ("long keys", "arguments.", f"is a name longer than {MAX_KEY_CHARS} characters"),
    ],
)
def test_arguments_as_large_as_a_request_may_be_are_refused_while_the_server_stays_responsive(
    caplog: pytest.LogCaptureFixture, shape: str, field: str, description: str
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings("http://127.0.0.1:9", rate_limit_burst=1000)
    request = pb.CallToolRequest.FromString(largest_request(shape))
    with ServerThread(settings, tools=[ListTool()]) as server:
        error = responsive_during(server, lambda: raw_call(server, load_test_keys().full, request))

    assert_refused_truthfully(error, grpc.StatusCode.INVALID_ARGUMENT, caplog)
    _, [(got_field, got_description)] = refusal_details(error)
    assert got_field.startswith(field)
    assert len(got_field) <= MAX_FIELD_CHARS
    assert got_description == description


def test_a_tool_name_as_large_as_a_request_may_be_is_not_found_with_a_short_message(
    server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = pb.CallToolRequest(name="\U0001f600" * 262_000)  # 1,048,000 bytes of UTF-8
    error = responsive_during(server, lambda: raw_call(server, keys.editor, request))

    assert_refused_truthfully(error, grpc.StatusCode.NOT_FOUND, caplog)
    assert len(error.details()) <= 100
    assert len(logged(access_record(caplog, request_id(error)), "tool")) <= 200


# --- replies over the send limit ------------------------------------------------------------------


def tool_calls(server: ServerThread, outcome: str) -> float:
    value = server.server.metrics.registry.get_sample_value(
        "aiservices_tool_calls_total",
        {"tool": "tests.hostile.list", "outcome": outcome, "key_id": "full", "transport": "grpc"},
    )
    return value or 0.0


def handled(server: ServerThread, code: str) -> float:
    value = server.server.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": "aiservices.v1.ToolService",
            "grpc_method": "CallTool",
            "grpc_code": code,
        },
    )
    return value or 0.0


def test_a_reply_over_the_send_limit_is_a_tool_error_the_log_and_metrics_record(
    tool_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    limit = tool_server.settings.max_message_bytes
    with ToolClient(tool_server.target, api_key=load_test_keys().full, timeout=30) as client:
        fits = client.call_tool("tests.hostile.list", {"size": limit - 1000})
        too_large = responsive_during(
            tool_server, lambda: client.call_tool("tests.hostile.list", {"size": limit})
        )

    assert not fits.is_error
    assert too_large.is_error
    assert too_large.error is not None
    assert too_large.error.code == "UPSTREAM_ERROR"
    assert not too_large.error.retryable
    assert "larger than this server may send" in too_large.text
    assert f"limit {limit}" in too_large.text

    record = access_record(caplog, too_large.request_id)
    assert (logged(record, "code"), logged(record, "outcome")) == ("OK", "UPSTREAM_ERROR")
    assert logged(access_record(caplog, fits.request_id), "outcome") == "OK"
    assert tool_calls(tool_server, "UPSTREAM_ERROR") == 1
    assert tool_calls(tool_server, "OK") == 1
    assert handled(tool_server, "OK") == 2
    assert handled(tool_server, "RESOURCE_EXHAUSTED") == 0


# --- cursors and page sizes -----------------------------------------------------------------------


def cursor_of(text: str) -> str:
    """A cursor as the server encodes them, around any text."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD_CURSORS = [
    cursor_of("v1:\u0661"),  # ARABIC-INDIC DIGIT ONE: str.isdigit() says yes
    cursor_of("v1:\u00b2"),  # SUPERSCRIPT TWO: isdigit() yes, int() no
    cursor_of("v1:" + "9" * 5_000),  # more digits than int() converts
    cursor_of("v1:-1"),
    cursor_of("v1: 1"),
    cursor_of("v1:01"),
    cursor_of("v1:1") + "==",
    "A" * 1_000_000,
    "\u0661" * 1_000,
]


@pytest.mark.parametrize("cursor", BAD_CURSORS, ids=range(len(BAD_CURSORS)))
def test_a_forged_cursor_is_invalid_argument_and_no_error_in_the_log(
    tool_server: ServerThread, cursor: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with (
        ToolClient(tool_server.target, api_key=load_test_keys().viewer, timeout=30) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        responsive_during(tool_server, lambda: client.list_tools_page(cursor=cursor))
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in caught.value.field_violations] == ["cursor"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_page_size_extremes(tool_server: ServerThread) -> None:
    with ToolClient(tool_server.target, api_key=load_test_keys().full, timeout=30) as client:
        page = client.list_tools_page(page_size=2**31 - 1)
        assert [tool.name for tool in page.tools] == ["tests.hostile.list"]
        assert page.next_cursor == ""
        with pytest.raises(ToolServiceError) as caught:
            client.list_tools_page(page_size=-(2**31))
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in caught.value.field_violations] == ["page_size"]


@settings(deadline=timedelta(milliseconds=200), max_examples=300)
@given(st.text())
@example("\u0661")
@example(cursor_of("v1:\u0661"))
@example(cursor_of("v1:\u00b2"))
@example(cursor_of("v1:" + "9" * 5_000))
@example(cursor_of("v1:" + "1" * 750_000))  # a 1 MB cursor
@example("A" * 1_000_000)
@example("\u00b2" * 1_000_000)
@example(cursor_of("v1:0"))
def test_a_cursor_decodes_to_an_offset_or_is_invalid_argument(cursor: str) -> None:
    try:
        offset = _decode_cursor(cursor)
    except InvalidArgument as refused:
        assert [v.field for v in refused.violations] == ["cursor"]
    else:
        assert 0 <= offset < 10**9
        assert _encode_cursor(offset) == cursor


@given(st.integers(min_value=0, max_value=10**9 - 1))
def test_every_cursor_the_server_issues_decodes_to_its_offset(offset: int) -> None:
    assert _decode_cursor(_encode_cursor(offset)) == offset


# --- every status fits the trailer budget ---------------------------------------------------------


def test_a_status_with_long_violations_and_metadata_is_cut_to_fit() -> None:
    wide = "\U0001f600" * 1_000
    error = InvalidArgument(
        wide,
        [FieldViolation(f"arguments.{i}{wide}", wide) for i in range(100)],
        metadata={"tool": wide, wide: "x"},
    )
    assert len(error.violations) == 20
    assert all(len(v.field) <= MAX_FIELD_CHARS for v in error.violations)
    assert all(len(v.description) <= MAX_DESCRIPTION_CHARS for v in error.violations)

    status = to_grpc_status(error, {"x-request-id": "r1"})
    [details] = [value for name, value in status.trailing_metadata if name.endswith("-bin")]
    assert isinstance(details, bytes)
    assert len(details) <= MAX_DETAILS_BYTES
    assert wire_bytes(status.trailing_metadata, status.details) < TRAILER_BUDGET
    assert status.details.startswith("\U0001f600")
    shown = rpc_status_violations(details)
    assert 0 < len(shown) < 20
    assert shown[0][0].startswith("arguments.0")
    info = rpc_status_info(details)
    assert info.metadata["violations_not_shown"] == str(100 - len(shown))


def test_a_plain_error_with_a_huge_message_and_metadata_fits() -> None:
    huge = "%\n" * 1_000_000
    status = to_grpc_status(ServiceError(huge, metadata={"a": huge, "b": huge}))
    assert wire_bytes(status.trailing_metadata, status.details) < TRAILER_BUDGET
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    assert rpc_status_info(details).reason


def _status(details: bytes) -> status_pb2.Status:
    return status_pb2.Status.FromString(details)


def rpc_status_violations(details: bytes) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for detail in _status(details).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


def rpc_status_info(details: bytes) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    for detail in _status(details).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
    return info
