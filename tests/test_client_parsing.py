"""What the client reads from a server, as a hostile or broken server may send it.

The client turns trailers, google.rpc details and response messages into exceptions and plain
Python. Whatever the bytes, that must end in a ToolServiceError or a result, never another
exception, and any retry delay it reports is a number of seconds a caller can wait.
"""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiservices import RetryPolicy, ToolServiceError, dict_to_struct, struct_to_dict
from aiservices._convert import tool_result
from aiservices.errors import error_from_rpc
from aiservices.retry import delay_after_error, delay_after_result
from aiservices.v1 import tool_service_pb2 as pb

CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
DURATIONS = st.builds(duration_pb2.Duration, seconds=INT64, nanos=INT32)
# What a server may put in retry-after: numbers of any shape, dates, junk.
RETRY_AFTER_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["nan", "inf", "-inf", "-1", "1e309", "-0", "1e-400", "2", " 3 ", "0x10"]),
    st.floats().map(repr),
)


def packed(message: Any) -> any_pb2.Any:
    holder = any_pb2.Any()
    holder.Pack(message)
    return holder


DETAILS = st.lists(
    st.one_of(
        st.builds(
            error_details_pb2.ErrorInfo,
            reason=st.text(max_size=30),
            domain=st.text(max_size=30),
            metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
        ).map(packed),
        st.builds(error_details_pb2.RetryInfo, retry_delay=DURATIONS).map(packed),
        st.lists(
            st.builds(
                error_details_pb2.BadRequest.FieldViolation,
                field=st.text(max_size=20),
                description=st.text(max_size=20),
            ),
            max_size=3,
        )
        .map(lambda violations: error_details_pb2.BadRequest(field_violations=violations))
        .map(packed),
        st.binary(max_size=30).map(
            lambda data: any_pb2.Any(type_url="type.googleapis.com/x", value=data)
        ),
    ),
    max_size=4,
)


def assert_waitable(seconds: float | None) -> None:
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0), seconds


def refusal(
    code: grpc.StatusCode, details: str, trailers: list[tuple[str, str | bytes]]
) -> ToolServiceError:
    error = grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=details
    )
    return error_from_rpc(error)


@settings(max_examples=300, deadline=None)
@given(
    code=st.sampled_from(CODES),
    details=st.text(max_size=50),
    rich_details=DETAILS,
    matching=st.booleans(),
    retry_after=st.none() | RETRY_AFTER_TEXT,
    garbage=st.none() | st.binary(max_size=60),
)
@example(  # a delay past what datetime can hold
    code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    details="slow down",
    rich_details=[packed(error_details_pb2.RetryInfo(retry_delay={"seconds": 2**62}))],
    matching=True,
    retry_after=None,
    garbage=None,
)
@example(  # a negative delay
    code=grpc.StatusCode.UNAVAILABLE,
    details="busy",
    rich_details=[packed(error_details_pb2.RetryInfo(retry_delay={"seconds": -5}))],
    matching=True,
    retry_after="-3",
    garbage=None,
)
def test_any_trailers_become_a_tool_service_error_with_a_waitable_delay(
    code: grpc.StatusCode,
    details: str,
    rich_details: list[any_pb2.Any],
    matching: bool,
    retry_after: str | None,
    garbage: bytes | None,
) -> None:
    rich = status_pb2.Status(
        code=code.value[0] if matching else code.value[0] + 1,
        message=details,
        details=rich_details,
    )
    trailers: list[tuple[str, str | bytes]] = [
        ("grpc-status-details-bin", garbage if garbage is not None else rich.SerializeToString())
    ]
    if retry_after is not None and retry_after.isprintable() and retry_after.isascii():
        trailers.append(("retry-after", retry_after))

    error = refusal(code, details, trailers)

    assert isinstance(error, ToolServiceError)
    assert error.code is code
    assert error.message == details
    assert_waitable(error.retry_after)
    # A client with a retry policy never waits on a hostile delay.
    policy = RetryPolicy(max_attempts=2, random=lambda: 0.5)
    wait = delay_after_error(policy, error, 1, 0.0, None)
    assert wait is None or 0 <= wait <= policy.max_server_delay


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
@example(
    data=pb.CallToolResponse(
        is_error=True,
        error=pb.ToolError(retryable=True, retry_after=duration_pb2.Duration(seconds=2**62)),
    ).SerializeToString()
)
@example(
    data=pb.CallToolResponse(
        is_error=True,
        error=pb.ToolError(retryable=True, retry_after=duration_pb2.Duration(seconds=-(2**62))),
    ).SerializeToString()
)
def test_any_call_tool_response_becomes_a_result(data: bytes) -> None:
    try:
        response = pb.CallToolResponse.FromString(data)
    except DecodeError:
        return  # grpc would have refused it before the client saw it
    result = tool_result(response)
    if result.error is not None:
        assert_waitable(result.error.retry_after)
    if result.structured_content is not None:
        json.dumps(result.structured_content)
    policy = RetryPolicy(max_attempts=2, retry_tool_errors=True, random=lambda: 0.5)
    wait = delay_after_result(policy, response, 1, 0.0, None)
    assert wait is None or 0 <= wait <= policy.max_server_delay


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5))
def test_json_arguments_survive_the_struct_both_ways(value: dict[str, Any]) -> None:
    assert struct_to_dict(dict_to_struct(value)) == value


def test_a_struct_nested_as_deep_as_protobuf_allows_is_read() -> None:
    struct = struct_pb2.Struct()
    inner = struct
    for _ in range(30):
        inner = inner.fields["a"].struct_value
    decoded = struct_to_dict(struct_pb2.Struct.FromString(struct.SerializeToString()))
    depth = 0
    while decoded:
        decoded = decoded["a"]
        depth += 1
    assert depth == 30
